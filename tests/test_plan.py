"""The planner's cost model against what this machine can measure, and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_helpers import VIT_TOWERS

from pimc_dist import config as config_lib
from pimc_dist import plan as plan_cli
from pimc_dist import planning, pretrain
from pimc_dist.models import count_flops

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/pretrain/tiny.yaml"
PIMC = REPO / "configs/pretrain/pimc.yaml"
MOSAIC = REPO / "configs/pretrain/mosaic.yaml"

# World 1, ZeRO-0, fp32: the one configuration a plain CPU step reproduces exactly.
CPU_STEP = ["deepspeed.zero_stage=0", "deepspeed.bf16=false", "train.batch_size=16"]


def measured_step_peak(cfg) -> int:
    """Peak tensor memory of building the model and AdamW and running two training steps."""
    batch = planning.random_batch(cfg, int(cfg.train.batch_size), seed=1)

    def job() -> None:
        torch.manual_seed(0)
        model = pretrain.build_model(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn = pretrain.build_loss(cfg)
        for _ in range(2):  # the second step holds Adam's states from the start
            opt.zero_grad(set_to_none=True)
            loss, _ = pretrain.compute_loss(model, loss_fn, batch, cfg.method)
            loss.backward()
            opt.step()

    return planning.peak_memory_bytes(job)


@pytest.mark.parametrize("overrides", [[], VIT_TOWERS], ids=["tiny", "small_vit"])
def test_memory_prediction_is_within_20_percent_of_the_measured_peak(overrides):
    cfg = config_lib.load(TINY, [*CPU_STEP, *overrides])
    measured = planning.measure(cfg)
    predicted = planning.predicted_peak_bytes(cfg, measured)
    actual = measured_step_peak(cfg)
    assert abs(predicted - actual) <= 0.2 * actual, (predicted / 2**20, actual / 2**20)
    # Activations were measured at 2 and 6 samples; the prediction is at the batch of 16.
    assert int(cfg.train.batch_size) not in measured["activations"]["measured_at"]


def fake_measured(cfg) -> dict:
    with torch.device("meta"):
        params = sum(p.numel() for p in pretrain.build_model(cfg).parameters())
    return {
        "params": params,
        "activations": {"per_sample_bytes": 1e6, "fixed_bytes": 0.0, "measured_at": [2, 6]},
        "loss_matrices": 5.0,
    }


def test_flops_per_sample_equal_the_engines_count():
    cfg = config_lib.load(PIMC, ["data.root=unused"])
    plan = planning.plan_job(cfg, gpus=8, measured=fake_measured(cfg))
    assert plan.flops_per_sample == pretrain.flops_per_sample(cfg)
    with torch.device("meta"):
        model = pretrain.build_model(cfg)
    assert plan.flops_per_sample == 3 * count_flops(model)


def test_zero_stages_split_model_states_as_the_zero_paper_counts():
    p, n = 1_000_000, 8
    full = planning.model_state_bytes(p, 0, n, bf16=True)
    assert sum(full.values()) == 16 * p
    s1 = planning.model_state_bytes(p, 1, n, bf16=True)
    assert s1["optimizer_states"] == 12 * p / n and s1["weights"] == 2 * p
    s2 = planning.model_state_bytes(p, 2, n, bf16=True)
    assert s2["gradients"] == (2 + 4) * p / n
    s3 = planning.model_state_bytes(p, 3, n, bf16=True)
    assert sum(s3.values()) == 16 * p / n
    assert sum(planning.model_state_bytes(p, 0, 1, bf16=False).values()) == 16 * p


def test_plan_scales_communication_and_finds_the_largest_batch():
    cfg = config_lib.load(PIMC, ["data.root=unused"])
    measured = fake_measured(cfg)
    small = planning.plan_job(cfg, gpus=8, gpu="h100", measured=measured)
    large = planning.plan_job(cfg, gpus=1024, gpu="h100", measured=measured)
    # Ring all-reduce: 2 (N-1)/N of the bf16 gradients through each GPU.
    assert large.comm_bytes["gradient_all_reduce"] == pytest.approx(
        2 * 1023 / 1024 * 2 * large.params
    )
    # The gathered features grow with the global batch, logits with b x N b.
    assert large.memory["loss_features"] == pytest.approx(128 * small.memory["loss_features"])
    assert large.memory["loss_logits"] == pytest.approx(128 * small.memory["loss_logits"])
    assert large.max_batch_per_gpu < small.max_batch_per_gpu
    # The largest batch fits, one more does not.
    for plan in (small, large):
        at_max = planning.plan_job(
            cfg, gpus=plan.gpus, measured=measured, batch_per_gpu=plan.max_batch_per_gpu
        )
        above = planning.plan_job(
            cfg, gpus=plan.gpus, measured=measured, batch_per_gpu=plan.max_batch_per_gpu + 1
        )
        assert at_max.fits and not above.fits
    # Slower links between nodes make the step longer; H200 memory fits a larger batch.
    slow = planning.plan_job(cfg, gpus=1024, inter_node_gbits_s=100, measured=measured)
    assert slow.step_s > large.step_s
    h200 = planning.plan_job(cfg, gpus=1024, gpu="h200", measured=measured)
    assert h200.max_batch_per_gpu > large.max_batch_per_gpu
    assert large.gpu_hours == pytest.approx(large.wall_hours * 1024)


@pytest.mark.slow
@pytest.mark.parametrize("config", [PIMC, MOSAIC], ids=["pimc", "mosaic"])
def test_plan_cli_runs_at_1024_gpus(config, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = plan_cli.main(
        ["--config", str(config), "--gpus", "1024", "--gpu", "h100", "--json", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "1024 x H100" in text and "GPU-hours" in text
    (row,) = json.loads(out.read_text())
    assert row["gpus"] == 1024 and row["memory_total"] > 0 and row["gpu_hours"] > 0
    assert row["measured"]["activations"]["per_sample_bytes"] > 0


def test_plan_cli_names_a_bad_override(capsys):
    assert plan_cli.main(["--config", str(PIMC), "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "8", "-4"], "--gpus"),
        (["--mfu", "0"], "--mfu"),
        (["--mfu", "2"], "--mfu"),
        (["--inter-node-gbps", "-1"], "--inter-node-gbps"),
        (["--inter-node-gbps", "0"], "--inter-node-gbps"),
        (["--batch", "0"], "--batch"),
        (["--json", "FOLDER"], "--json"),
    ],
)
def test_plan_cli_refuses_bad_arguments_before_measuring(args, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(planning, "measure", lambda cfg: pytest.fail("measured"))
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    assert plan_cli.main(["--config", str(TINY), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("config", ["data", "empty"])
def test_plan_cli_given_a_config_with_no_model_says_so(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(planning, "measure", lambda cfg: pytest.fail("measured"))
    path = REPO / "configs/data/demo.yaml"
    if config == "empty":
        path = tmp_path / "empty.yaml"
        path.write_text("")
    assert plan_cli.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'model.views'" in err and "Traceback" not in err


def test_plan_cli_names_a_model_it_cannot_build(capsys):
    code = plan_cli.main(["--config", str(TINY), "model.views.rp.encoder=resnet19"])
    assert code == 2
    err = capsys.readouterr().err
    assert "resnet19" in err and len(err.strip().splitlines()) == 1, err


def test_plan_job_refuses_impossible_inputs():
    cfg = config_lib.load(TINY)
    measured = fake_measured(cfg)
    for kwargs in ({"gpus": 0}, {"gpus": 8, "mfu": 0.0}, {"gpus": 8, "batch_per_gpu": 0}):
        with pytest.raises(ValueError):
            planning.plan_job(cfg, measured=measured, **kwargs)
