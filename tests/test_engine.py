"""Engine: DeepSpeed config, schedule, checkpoints (crash safety, bad files, restricted loading)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from pimc_dist import config, engine
from pimc_dist.distributed import free_port


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group in this process (DeepSpeed needs one)."""
    saved = dict(os.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    # Later tests expect a process without a group, and the subprocesses they start
    # must not inherit this rank's variables and port.
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def tiny_cfg(tmp_path, *overrides):
    return config.load(
        None, [f"train.run_dir={tmp_path}", "train.batch_size=4", "train.keep_last=2", *overrides]
    )


def make_engine(cfg, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2)
    )
    return engine.Engine(cfg, model, world_size=1, rank=0, total_steps=100)


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
    with pytest.raises(engine.CheckpointError, match="not found"):
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


def test_checkpoint_loading_refuses_arbitrary_pickled_objects(tmp_path, process_group):
    cfg = tiny_cfg(tmp_path)
    eng = make_engine(cfg)
    train_steps(eng, 1)
    eng.save(1, client_state(1))
    model_file = next((tmp_path / "checkpoints" / "step00000001").glob("mp_rank_*_model_states.pt"))
    state = torch.load(model_file, weights_only=False)
    state["evil"] = _Exploit()
    torch.save(state, model_file)
    with pytest.raises(engine.CheckpointError, match="step00000001"):
        make_engine(cfg).load("step00000001")
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __reduce__(self):
        return (open, (os.path.join(os.getcwd(), "pwned"), "w"))


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
