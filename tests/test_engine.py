"""Engine: DeepSpeed config, schedule, checkpoints (crash safety, bad files, restricted loading)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from pimc_dist import config, distributed, engine
from pimc_dist.distributed import free_port


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process (DeepSpeed needs one)."""
    saved = dict(os.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    # Later tests expect a process without a group, and the subprocesses they start
    # must not inherit this rank's variables and port.
    distributed.cleanup()  # with DeepSpeed's cached clones of this group
    os.environ.clear()
    os.environ.update(saved)


def tiny_cfg(tmp_path, *overrides):
    return config.load(
        None, [f"train.run_dir={tmp_path}", "train.batch_size=4", "train.keep_last=2", *overrides]
    )


def make_engine(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2)
    )
    return engine.Engine(cfg, model, world_size=1, rank=0, total_steps=100, **kw)


def train_steps(eng, n):
    for _ in range(n):
        loss = eng.module(torch.randn(4, 8)).pow(2).mean()
        eng.module.backward(loss)
        eng.module.step()


def client_state(step):
    return {
        "step": step,
        "samples_seen": step * 4,
        "data_epoch": 1,
        "rng": {"0": engine.rng_state()},
        "config": "",
    }


def test_deepspeed_config_from_job_config_and_json_file(tmp_path):
    extra = tmp_path / "ds.json"
    extra.write_text(
        json.dumps({"zero_optimization": {"overlap_comm": True}, "bf16": {"enabled": True}})
    )
    cfg = config.load(
        None, ["train.batch_size=8", "train.grad_accum=2", f"deepspeed.config_file={extra}"]
    )
    ds = engine.deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64
    assert ds["zero_optimization"] == {"stage": 1, "reduce_scatter": False, "overlap_comm": True}
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        engine.deepspeed_config(config.load(None, [f"deepspeed.config_file={bad}"]), 1)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        engine.deepspeed_config(config.load(None, [f"deepspeed.config_file={bad}"]), 1)
    missing = tmp_path / "absent.json"
    with pytest.raises(ValueError, match=f"{missing}: DeepSpeed config file not found"):
        engine.deepspeed_config(config.load(None, [f"deepspeed.config_file={missing}"]), 1)


def test_param_groups_exclude_norms_biases_and_logit_scale():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.logit_scale = torch.nn.Parameter(torch.ones(1))
    decay, no_decay = engine.param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine_schedule_shape():
    f = engine.warmup_cosine(total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55, abs=1e-6)
    assert f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_rng_state_round_trips_through_json():
    state = json.loads(json.dumps(engine.rng_state()))
    a = (torch.rand(3), __import__("numpy").random.rand(2))
    engine.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(2))
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all()


def test_save_load_round_trip_and_keep_last(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    for step in (1, 2, 3):
        train_steps(eng, 1)
        eng.save(step, client_state(step))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert ckpts == ["step00000002", "step00000003"]
    assert engine.latest_tag(tmp_path / "checkpoints") == "step00000003"
    weights = [p.detach().clone() for p in eng.module.parameters()]
    other = make_engine(cfg, seed=1)
    other.load("step00000003")
    for a, b in zip(weights, other.module.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_crash_during_save_keeps_previous_checkpoint_in_charge(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    train_steps(eng, 1)
    eng.save(1, client_state(1))
    good = [p.detach().clone() for p in eng.module.parameters()]
    train_steps(eng, 1)

    real_save = eng.module.save_checkpoint

    def crash_midway(save_dir, tag, **kw):
        real_save(save_dir, tag=tag, **kw)
        # Half-written optimizer file, then the process "dies".
        path = next((tmp_path / "checkpoints" / tag).glob("*optim_states.pt"))
        path.write_bytes(path.read_bytes()[:100])
        raise OSError("disk full")

    eng.module.save_checkpoint = crash_midway
    with pytest.raises(OSError):
        eng.save(2, client_state(2))
    assert engine.latest_tag(tmp_path / "checkpoints") == "step00000001"
    fresh = make_engine(cfg, seed=5)
    fresh.load(engine.latest_tag(tmp_path / "checkpoints"))
    for a, b in zip(good, fresh.module.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    # The next successful save removes the debris of the crashed one.
    eng.module.save_checkpoint = real_save
    eng.save(3, client_state(3))
    assert not (tmp_path / "checkpoints" / "step00000002").exists()


def test_truncated_checkpoint_file_raises_checkpoint_error_naming_it(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    train_steps(eng, 1)
    eng.save(1, client_state(1))
    model_file = next((tmp_path / "checkpoints" / "step00000001").glob("mp_rank_*_model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:200])
    with pytest.raises(engine.CheckpointError, match="step00000001"):
        make_engine(cfg).load("step00000001")


@pytest.mark.parametrize("payload", ["exploit", "torch_module"])
def test_checkpoint_loading_refuses_arbitrary_pickled_objects(tmp_path, process_group, payload):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    train_steps(eng, 1)
    eng.save(1, client_state(1))
    model_file = next((tmp_path / "checkpoints" / "step00000001").glob("mp_rank_*_model_states.pt"))
    state = torch.load(model_file, weights_only=False)
    # A torch class is refused too: only the few DeepSpeed classes are admitted.
    state["evil"] = _Exploit(tmp_path / "pwned") if payload == "exploit" else torch.nn.Linear(1, 1)
    torch.save(state, model_file)
    with pytest.raises(engine.CheckpointError, match="step00000001.*refuses to unpickle"):
        make_engine(cfg).load("step00000001")
    assert not (tmp_path / "pwned").exists()


def test_universal_conversion_and_loading_refuse_arbitrary_pickled_objects(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    train_steps(eng, 1)
    eng.save(1, client_state(1))
    ckpt = tmp_path / "checkpoints"
    tag = engine.convert_to_universal(ckpt, "step00000001")
    assert tag == "step00000001_universal"
    make_engine(cfg, load_universal=True).load(tag)  # a clean conversion loads
    # A universal per-parameter file with a pickled object: loading refuses it.
    fp32 = ckpt / tag / "zero" / "0.weight" / "fp32.pt"
    torch.save({"param": torch.zeros(16, 8), "evil": _Exploit(tmp_path / "pwned")}, fp32)
    with pytest.raises(engine.CheckpointError, match="fp32.pt: refuses to unpickle"):
        make_engine(cfg, load_universal=True).load(tag)
    # A ZeRO optimizer file with one: the conversion (DeepSpeed's ds_to_universal) refuses it.
    shutil.rmtree(ckpt / tag)
    optim_file = next((ckpt / "step00000001").glob("*optim_states.pt"))
    state = torch.load(optim_file, weights_only=False)
    state["evil"] = _Exploit(tmp_path / "pwned")
    torch.save(state, optim_file)
    with pytest.raises(engine.CheckpointError, match="optim_states.pt: refuses to unpickle"):
        engine.convert_to_universal(ckpt, "step00000001")
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def checkpoint_folders(ckpt):
    return sorted(p.name for p in ckpt.iterdir() if p.is_dir())


def test_keep_last_counts_only_checkpoints_every_rank_finished(
    tmp_path, process_group, monkeypatch
):
    cfg = tiny_cfg(tmp_path)  # keep_last=2
    ckpt = tmp_path / "checkpoints"
    eng = make_engine(cfg)
    for step in (1, 2):
        train_steps(eng, 1)
        eng.save(step, client_state(step))

    # Step 3: this rank's files are written, then another rank dies in its save, so
    # the barrier after the writes fails here.
    def lost_rank(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    real_save = eng.module.save_checkpoint

    def save_then_lose_a_rank(*args, **kwargs):
        real_save(*args, **kwargs)
        monkeypatch.setattr(dist, "barrier", lost_rank)

    eng.module.save_checkpoint = save_then_lose_a_rank
    train_steps(eng, 1)
    with pytest.raises(RuntimeError, match="closed by peer"):
        eng.save(3, client_state(3))
    assert not (ckpt / "step00000003" / engine.CLIENT_STATE).exists()
    assert engine.latest_tag(ckpt) == "step00000002"

    # The requeued job saves again: the two newest COMPLETE checkpoints stay, and load.
    monkeypatch.undo()
    eng.module.save_checkpoint = real_save
    train_steps(eng, 1)
    eng.save(4, client_state(4))
    assert checkpoint_folders(ckpt) == ["step00000002", "step00000004"]
    for tag in ("step00000002", "step00000004"):
        make_engine(cfg).load(tag)


def test_keep_last_does_not_count_universal_conversions(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)  # keep_last=2
    ckpt = tmp_path / "checkpoints"
    eng = make_engine(cfg)
    for step in (1, 2):
        train_steps(eng, 1)
        eng.save(step, client_state(step))
    engine.convert_to_universal(ckpt, "step00000002")
    train_steps(eng, 1)
    eng.save(3, client_state(3))
    assert checkpoint_folders(ckpt) == ["step00000002", "step00000002_universal", "step00000003"]
    # A conversion goes when the checkpoint it came from goes.
    train_steps(eng, 1)
    eng.save(4, client_state(4))
    assert checkpoint_folders(ckpt) == ["step00000003", "step00000004"]


def test_client_state_errors_name_the_file(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000001").mkdir(parents=True)
    path = ckpt / "step00000001" / engine.CLIENT_STATE
    path.write_text('{"step": 1, "samples_seen"')
    with pytest.raises(engine.CheckpointError, match="truncated") as err:
        engine.read_client_state(ckpt, "step00000001")
    assert str(path) in str(err.value)
    path.write_text(json.dumps({"step": 1}))
    with pytest.raises(engine.CheckpointError, match="missing key 'samples_seen'"):
        engine.read_client_state(ckpt, "step00000001")
    with pytest.raises(engine.CheckpointError, match="missing"):
        engine.read_client_state(ckpt, "step00000009")


def test_latest_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    assert engine.latest_tag(ckpt) is None
    (ckpt / engine.LATEST).write_text("step00000007")
    with pytest.raises(engine.CheckpointError, match="step00000007"):
        engine.latest_tag(ckpt)


def test_cast_batch_casts_floating_inputs_only():
    batch = {
        "rp": torch.rand(2, 3, 4, 4),
        "rsi": torch.rand(2, 10, 4, 4, dtype=torch.float64),
        "labels": torch.tensor([[0.0, 1.0], [0.5, 0.5]]),  # a target: stays exact
        "index": torch.arange(2),
        "mask": torch.ones(2, dtype=torch.bool),
        "meta": [{"patch": 1}, {"patch": 2}],
    }
    out = engine.cast_batch(batch, torch.bfloat16, "cpu")
    assert out["rp"].dtype == out["rsi"].dtype == torch.bfloat16
    torch.testing.assert_close(out["rp"], batch["rp"].bfloat16())
    assert out["labels"] is batch["labels"] or torch.equal(out["labels"], batch["labels"])
    assert out["labels"].dtype == torch.float32
    assert out["index"].dtype == torch.int64 and out["mask"].dtype == torch.bool
    assert out["meta"] is batch["meta"]
    assert engine.cast_batch(batch, torch.float32)["rsi"].dtype == torch.float32
