"""Everything a rare GPU session should measure, in one run of at most 8 minutes on one H100/H200.

Sections, each in a process of its own with a time limit, each failing soft (its error goes
into the JSON and the next section runs), in this order:

  environment     nvidia-smi, torch / CUDA / NCCL / DeepSpeed versions, CPU model and vector
                  extensions (bench/machine.py)
  pytest_gpu      `pytest -m gpu` on the test files that hold GPU tests: passed / failed / skipped
  train_step      bench/train_step.py's device mode: our DeepSpeed engine (ZeRO-1, ZeRO-2) vs
                  DDP (one rank, timed once) on the same model and data, bf16, for pimc.yaml's
                  model, its plot tower and crop tower alone at their real input sizes, and
                  ViT-L/16 at 224 px: samples/s, MFU (models/flops.py), peak memory
  loss            bench/loss.py: the gathered CLIP loss on NCCL (one rank) at batch 4k, 16k, 64k:
                  time and peak memory (out of memory is a result, not a failure)
  recurrence      bench/recurrence.py --device-check: plots/s of the torch path on the GPU vs
                  numba on all CPU cores, and whether the values agree
  loader_to_gpu   shards of synthetic PASTIS pixels -> the shard loader (workers, pinned
                  memory) -> the pimc.yaml training step on the GPU: samples/s of the loader
                  alone, of loader + step, and of the step on one cached batch
  pretrain        a real `python -m pimc_dist.pretrain` (tiny.yaml's towers, bf16, nccl):
                  4 steps, a resume to 6, `load_encoder` of the export on the GPU

`--device cpu --smoke` runs the same sections end to end on the CPU (gloo, tiny stand-ins of
the models, small batches) in under 3 minutes: tests/test_gpu_check.py does, so this script
keeps working between GPU sessions.

    bash bench/gpu_check.sh                          # on a GPU node: all sections, <= 8 min
    bash bench/gpu_check.sh --device cpu --smoke     # anywhere, < 3 min
    python bench/gpu_check.py --sections train_step loss

Writes gpu_check.json, gpu_check.md and gpu_check.log (every section's output, one after the
other) to $OUT when set, else to bench/results/gpu/ (--out overrides both): three files, so
that a device session's file limits never drop one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tests"))  # the rank runner the distributed benches use

# Seconds each section may take on a GPU (sum 470: the whole run stays under 8 minutes)
# and in the CPU smoke mode (sum 180). --time-scale stretches both (a loaded CI machine).
BUDGET_S = {
    "environment": (30, 10),
    "pytest_gpu": (50, 15),
    "train_step": (150, 50),
    "loss": (60, 15),
    "recurrence": (40, 15),
    "loader_to_gpu": (80, 30),
    "pretrain": (60, 45),
}
SECTIONS = tuple(BUDGET_S)
DEADLINE: float | None = None  # in a section's process: when the driver stops it (epoch s)


# ---------------------------------------------------------------------------------------------
# Sections (each runs in a child process: `gpu_check.py --section NAME`)


def section_environment(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    import deepspeed
    import numba
    import torch
    from machine import machine_info

    out: dict[str, Any] = {
        "machine": machine_info(torch=torch.__version__, deepspeed=deepspeed.__version__),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "numba": numba.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu_count": torch.cuda.device_count(),
        # The loader's batch ring and torch's worker transport live in /dev/shm.
        "dev_shm_gib": _disk_gib("/dev/shm"),
        "packages": _versions("typing_extensions", "pydantic", "pydantic_core", "numpy", "numba"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "gpu_name": props.name,
            "gpu_memory_gib": props.total_memory / 2**30,
            "gpu_sm_count": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "nccl": ".".join(map(str, _as_tuple(torch.cuda.nccl.version()))),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,memory.total,driver_version,power.limit,clocks.max.sm,pcie.link.gen.max"
        csv = subprocess.run(
            [smi, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        out["nvidia_smi_query"] = {"fields": query.split(","), "rows": csv.stdout.splitlines()}
        full = subprocess.run([smi], capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = full.stdout
        topo = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=20)
        out["nvidia_smi_topo"] = topo.stdout
    else:
        out["nvidia_smi"] = None  # no NVIDIA driver on this machine (the CPU smoke mode)
    return out


def _disk_gib(path: str) -> dict[str, float] | None:
    if not Path(path).is_dir():
        return None
    usage = shutil.disk_usage(path)
    return {"total": usage.total / 2**30, "free": usage.free / 2**30}


def _versions(*names: str) -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _as_tuple(version: Any) -> tuple:
    return version if isinstance(version, tuple) else (version,)


def section_pytest_gpu(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text(errors="replace")
    )
    junit = work / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", *files]
    env = dict(os.environ, DS_ACCELERATOR=device, WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "files": files,
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed_tests": failed,
        "exit_code": proc.returncode,
        "summary": proc.stdout.strip().splitlines()[-1:] if proc.stdout else [],
    }


def _kill_group(proc: subprocess.Popen, started: float) -> None:
    """Kill `proc`'s whole process group, and remove the lock files of the torch extension
    builds it took since `started` (DeepSpeed compiles its CPU comm op on first start): left
    behind, they make every later start wait forever for a build that is gone."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    for lock in Path(root).glob("*/*/lock"):
        try:
            if lock.stat().st_mtime >= started:
                lock.unlink()
        except FileNotFoundError:  # a build that ended meanwhile removed it
            pass


def _run_bench(cmd: list[str], device: str) -> None:
    """Run `python *cmd` (a bench script, or `-m module`); stop it (its whole process group)
    before this section's deadline."""
    env = dict(os.environ, DS_ACCELERATOR=device, WANDB_MODE="disabled")
    what = " ".join(cmd[:2]) if cmd[0] == "-m" else cmd[0]
    left = DEADLINE - time.time() - 3 if DEADLINE else None
    if left is not None and left < 5:
        raise TimeoutError(f"no time left for {what}")
    started = time.time()
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        _kill_group(proc, started)
        raise TimeoutError(f"{what} stopped at this section's time limit") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode} (see this section's log)")


def section_train_step(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    from train_step import add_ratios_to_ddp

    from pimc_dist.tracking import read_metrics

    # One bench run per workload, most wanted first: a time limit loses the rest, not all.
    workloads = ["pimc", "vit_l16_224"] if smoke else ["pimc", "vit_l16_224", "pimc_rp", "pimc_rsi"]
    rows: list[dict] = []
    options = None
    for workload in workloads:
        out = work / f"train_step_{workload}.json"
        cmd = ["bench/train_step.py", "--device", device, "--stages", "1", "2", "--out", str(out)]
        cmd += ["--models", workload]
        if smoke:
            cmd += ["--smoke", "--steps", "1", "--repeats", "2", "--warmup", "1"]
        else:
            cmd += ["--steps", "5", "--repeats", "3", "--warmup", "5"]
        try:
            _run_bench(cmd, device)
        except (RuntimeError, TimeoutError) as exc:
            # The rows measured before it stopped, then what stopped it.
            partial = out.with_suffix(".partial.jsonl")
            if partial.is_file():  # a line torn by the kill is left out
                rows += add_ratios_to_ddp(read_metrics(partial))
            rows.append({"model": workload, "stage": None, "path": "rest", "error": str(exc)})
            continue
        result = json.loads(out.read_text())
        rows += result["rows"]
        options = result["options"]
    ok = [r for r in rows if "error" not in r]
    if not ok:
        raise RuntimeError(f"every training-step run failed, first: {rows[0].get('error')}")
    return {"rows": rows, "options": options, "failed_runs": len(rows) - len(ok)}


def section_loss(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    out = work / "loss.json"
    batches = ["64", "128", "256"] if smoke else ["4096", "16384", "65536"]
    cmd = ["bench/loss.py", "--device", device, "--world-sizes", "1", "--forms", "local"]
    cmd += ["--per-rank-batch", *batches, "--repeats", "1" if smoke else "3"]
    cmd += ["--max-logits-mib", "1e9", "--out", str(out)]
    _run_bench(cmd, device)
    rows = json.loads(out.read_text())["rows"]
    if not any("ms_per_step" in r for r in rows):
        raise RuntimeError(f"no batch size ran: {[r.get('skipped') for r in rows]}")
    return {"backend": "nccl" if device == "cuda" else "gloo", "world": 1, "rows": rows}


def section_recurrence(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    out = work / "recurrence.json"
    series = "512" if smoke else "65536"
    cmd = ["bench/recurrence.py", "--device-check", device, "--series", series]
    cmd += ["--repeats", "2" if smoke else "5", "--output", str(out)]
    _run_bench(cmd, device)
    return json.loads(out.read_text())


def section_loader_to_gpu(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    from dist_utils import run_on_ranks

    shards = _fixture_shards(work, smoke)
    options = {"device": device, "smoke": smoke, "shards": str(shards), "work": str(work)}
    backend = "nccl" if device == "cuda" else "gloo"
    return run_on_ranks(_loader_rank, 1, options, backend=backend, timeout_s=600, threads=4)[0]


def section_pretrain(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    """A real `python -m pimc_dist.pretrain`: tiny.yaml's towers on small synthetic shards,
    one rank (nccl on the GPU, bf16 there): 4 steps with a checkpoint every 2, then a resume
    to step 6, then `load_encoder` of the export on the device (no W&B: not the device's).
    The benches time steps; this runs what only the job does on the device: its own
    collectives, checkpoints of device tensors, the resume and the export."""
    import torch

    from pimc_dist import config as config_lib
    from pimc_dist.encoders import load_encoder
    from pimc_dist.tracking import read_metrics

    shards = _fixture_shards(work, smoke=True)
    bf16 = device == "cuda"
    extra = [f"deepspeed.bf16={str(bf16).lower()}", "train.ckpt_every_steps=2"]
    extra += ["train.log_every_steps=1"]
    extra += ["tracking.wandb=false"]
    cfg = _loader_config(shards, work, True, extra)
    config_path = config_lib.save(cfg, work / "pretrain.yaml")
    run_dir, batch = Path(cfg.train.run_dir), int(cfg.train.batch_size)
    seconds = []
    for steps in (4, 6):
        started = time.perf_counter()
        cmd = ["-m", "pimc_dist.pretrain", "--config", str(config_path)]
        _run_bench([*cmd, f"train.total_samples={steps * batch}"], device)
        seconds.append(round(time.perf_counter() - started, 1))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    steps_logged = [int(r["step"]) for r in rows]
    if steps_logged != list(range(1, 7)):
        raise RuntimeError(f"steps logged {steps_logged}, expected 1..6 (4, then a resume)")
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    encoder = load_encoder(run_dir, "rp", device=dev)
    spec = encoder.input
    features = encoder(torch.zeros(2, spec.channels, spec.size, spec.size, dtype=torch.uint8))
    last = rows[-1]
    return {
        "bf16": bf16,
        "run_seconds": seconds,
        "steps": steps_logged[-1],
        "first_loss": rows[0]["loss"],
        "last_loss": last["loss"],
        "samples_per_s": last.get("samples_per_s"),
        "mfu": last.get("mfu"),
        "peak_mem_gb": last.get("peak_mem_gb"),
        "encoder_features_finite": bool(torch.isfinite(features).all()),
        "encoder_device": str(encoder.device),
    }


def _loader_config(shards: Path | None, work: Path, smoke: bool, extra: list[str]) -> Any:
    from train_step import PIMC_CONFIG, TINY_CONFIG

    from pimc_dist import config as config_lib

    workers = 1 if smoke else max(1, min(8, (os.cpu_count() or 2) - 4))
    overrides = [
        "data.source=pastis",
        f"data.root={work / 'raw'}",
        f"data.shard_dir={work / 'shards'}",
        f"train.run_dir={work / 'run'}",
        f"loader.workers={workers}",
        "deepspeed.zero_stage=1",
        f"deepspeed.bf16={str(not smoke).lower()}",  # CPU bf16 convolutions crawl
        *extra,
    ]
    if shards is not None:
        overrides.append(f"loader.shards={shards}")
    if smoke:
        overrides += ["data.pixels_per_patch=64", "data.max_samples_per_shard=128"]
        overrides += ["train.batch_size=16", "data.workers=1"]
        return config_lib.load(TINY_CONFIG, overrides)  # tiny.yaml's towers: the stand-in
    overrides += ["data.pixels_per_patch=256", "data.max_samples_per_shard=2048"]
    return config_lib.load(PIMC_CONFIG, overrides)


def _fixture_shards(work: Path, smoke: bool) -> Path:
    """Synthetic PASTIS patches, sharded as the job's config shards real ones."""
    from pimc_dist import shard
    from pimc_dist.sources.fixtures import write_pastis

    if smoke:
        write_pastis(work / "raw", n_patches=6, size=32, seed=1)
    else:
        write_pastis(work / "raw", n_patches=20, size=64, seed=1)
    cfg = _loader_config(None, work, smoke, [])
    if shard.main(cfg) != 0:
        raise RuntimeError("sharding the synthetic PASTIS patches failed")
    return work / "shards"


def _loader_rank(rank: int, world: int, options: dict) -> dict[str, Any]:
    import statistics

    import torch

    from pimc_dist import pretrain, shardset
    from pimc_dist.engine import Engine

    work, smoke = Path(options["work"]), options["smoke"]
    cfg = _loader_config(Path(options["shards"]), work, smoke, [])
    device = torch.device("cuda", 0) if options["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    n_batches = 4 if smoke else 40
    b = int(cfg.train.batch_size)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    loader = shardset.build_loader(cfg, rank=0, world_size=1, device=device)
    batches = iter(loader)
    for _ in range(2):  # workers up, first shards open
        next(batches)
    start = time.perf_counter()
    pinned = []
    for _ in range(n_batches):
        host = next(batches)
        pinned += [v.is_pinned() for v in host.values() if torch.is_tensor(v)]
        loader.to_device(host, device)
    sync()
    loader_rate = n_batches * b / (time.perf_counter() - start)

    model = pretrain.build_model(cfg)
    engine = Engine(cfg, model, world_size=1, rank=0, total_steps=10**6)
    loss_fn = pretrain.build_loss(cfg)

    def step(batch: dict) -> None:
        engine.module.train()
        loss, _ = pretrain.compute_loss(engine.module, loss_fn, engine.model_batch(batch), "pimc")
        engine.module.backward(loss)
        engine.module.step()

    cached = loader.to_device(next(batches), device)
    for _ in range(3):
        step(cached)
    sync()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(max(2, n_batches // 4)):
            step(cached)
        sync()
        times.append((time.perf_counter() - start) / max(2, n_batches // 4))
    step_rate = b / statistics.median(times)
    start = time.perf_counter()
    for _ in range(n_batches):
        step(loader.to_device(next(batches), device))
    sync()
    fed_rate = n_batches * b / (time.perf_counter() - start)
    return {
        "batch": b,
        "loader_workers": int(cfg.loader.workers),
        "batches_timed": n_batches,
        "host_batch_pinned": bool(pinned) and all(pinned),
        "loader_to_device_samples_per_s": loader_rate,
        "step_on_cached_batch_samples_per_s": step_rate,
        "loader_plus_step_samples_per_s": fed_rate,
        "fed_over_cached": fed_rate / step_rate,
        "model": {v: dict(s) for v, s in cfg.model.views.items()},
    }


SECTION_FUNCTIONS = {
    "environment": section_environment,
    "pytest_gpu": section_pytest_gpu,
    "train_step": section_train_step,
    "loss": section_loss,
    "recurrence": section_recurrence,
    "loader_to_gpu": section_loader_to_gpu,
    "pretrain": section_pretrain,
}


# ---------------------------------------------------------------------------------------------
# The driver


def run_section(name: str, args: argparse.Namespace, out_dir: Path, limit_s: float) -> dict:
    """Run one section in a child process with a time limit; never raises.

    Its output is appended to out_dir/gpu_check.log under a header line.
    """
    started, started_epoch = time.perf_counter(), time.time()
    status: dict[str, Any] = {"ok": False}
    log = out_dir / "gpu_check.log"
    with tempfile.TemporaryDirectory(prefix=f"gpu_check-{name}-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name]
        cmd += ["--device", args.device, "--result-file", str(result_file)]
        cmd += ["--deadline", str(started_epoch + limit_s)]
        cmd += ["--smoke"] if args.smoke else []
        env = dict(os.environ, DS_ACCELERATOR=args.device, WANDB_MODE="disabled")
        # Straight into the log under $OUT: if the device session itself is cut short, what
        # the section printed (a traceback, say) still comes back.
        with open(log, "ab") as out:
            out.write(f"\n===== {name} (limit {limit_s:.0f} s) =====\n".encode())
            out.flush()
            offset = out.tell()
            # A session of its own: on timeout the whole group (ranks, loader workers) goes.
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=max(1.0, limit_s))
            except subprocess.TimeoutExpired:
                _kill_group(proc, started_epoch)
                status["error"] = f"timed out after {limit_s:.0f} s"
        status["seconds"] = round(time.perf_counter() - started, 1)
        if result_file.is_file():
            status |= json.loads(result_file.read_text())
        elif "error" not in status:
            status["error"] = f"exited {proc.returncode} without a result"
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    with open(log, "a") as f:
        f.write(f"===== {name}: {'ok' if 'error' not in status else 'failed'}, "
                f"{status['seconds']} s =====\n")  # fmt: skip
    if "error" in status:
        status["ok"] = False
        status["log_tail"] = text[-3000:]
    return status


def child_main(args: argparse.Namespace) -> int:
    """One section in this process: {"ok": true, "result": ...} or {"ok": false, "error": ...}."""
    import traceback

    with tempfile.TemporaryDirectory(prefix=f"gpu_check-{args.section}-") as tmp:
        try:
            result = SECTION_FUNCTIONS[args.section](args.device, args.smoke, Path(tmp))
            payload = {"ok": True, "result": result}
        except BaseException as exc:  # the driver records it and goes on with the next section
            traceback.print_exc()
            payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    args.result_file.write_text(json.dumps(payload, indent=1, default=str))
    return 0


def _fmt(x: Any, spec: str = ",.0f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def markdown(report: dict) -> str:
    """The JSON report as Markdown tables."""
    lines = [
        f"# GPU check ({report['device']}{', smoke' if report['smoke'] else ''}), {report['date']}",
        "",
        f"Total {report['seconds']:.0f} s.",
        "",
        "| section | ok | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, sec in report["sections"].items():
        note = sec.get("error", "")[:120].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {'yes' if sec['ok'] else 'NO'} | {sec['seconds']} | {note} |")
    env = report["sections"].get("environment", {}).get("result")
    if env:
        m = env["machine"]
        lines += [
            "",
            f"GPU: {env.get('gpu_name', 'none')}; torch {env['torch']}, CUDA {env['torch_cuda']}, "
            f"NCCL {env.get('nccl', 'n/a')}, DeepSpeed {env['deepspeed']}; CPU {m.get('model')} "
            f"x {m.get('cpus')} ({', '.join(m.get('vector_extensions', []))})",
        ]
    tests = report["sections"].get("pytest_gpu", {}).get("result")
    if tests:
        lines += [
            "",
            f"pytest -m gpu: {tests['passed']} passed, {tests['failures'] + tests['errors']} "
            f"failed, {tests['skipped']} skipped ({', '.join(tests['failed_tests']) or 'none failed'})",
        ]
    ts = report["sections"].get("train_step", {}).get("result")
    if ts:
        lines += [
            "",
            "## Training step (one rank)",
            "",
            "| workload | ZeRO | path | batch | samples/s | MFU | peak GiB | vs DDP |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in ts["rows"]:
            stage = "-" if r["stage"] is None else r["stage"]  # DDP, or a whole workload
            if "error" in r:
                lines.append(f"| {r['model']} | {stage} | {r['path']} | | failed: "
                             f"{r['error'][:80]} | | | |")  # fmt: skip
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            ratio = f"{r['ratio_to_ddp']:.2f}" if "ratio_to_ddp" in r else ""
            lines.append(
                f"| {r['model']} | {stage} | {r['path']} | {r['batch_per_gpu']} | "
                f"{_fmt(r['samples_per_s'])} | {mfu} | {_fmt(r['peak_mem_gib'], '.2f')} | {ratio} |"
            )
    loss = report["sections"].get("loss", {}).get("result")
    if loss:
        lines += [
            "",
            f"## Gathered CLIP loss ({loss['backend']}, {loss['world']} rank)",
            "",
            "| batch | logits MiB | peak MiB | ms/step |",
            "|---|---|---|---|",
        ]
        for r in loss["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['global_batch']} | {_fmt(r['logits_mib_per_rank'], ',.1f')} | "
                             f"{r['skipped'][:60]} | |")  # fmt: skip
            else:
                lines.append(
                    f"| {r['global_batch']} | {_fmt(r['logits_mib_per_rank'], ',.1f')} | "
                    f"{_fmt(r['peak_mib_per_rank'], ',.1f')} | {_fmt(r['ms_per_step'], '.1f')} |"
                )
    rec = report["sections"].get("recurrence", {}).get("result")
    if rec:
        paths = rec["paths"]
        lines += ["", "## Recurrence plots", ""]
        for name, row in paths.items():
            lines.append(f"- {name}: {_fmt(row['plots_per_s'])} plots/s")
        lines.append(
            f"- torch / numba {rec['speedup_torch_over_numba']:.3g}x; values: max difference "
            f"{rec['max_abs_diff']}, {rec['fraction_equal']:.2%} equal"
        )
    ld = report["sections"].get("loader_to_gpu", {}).get("result")
    if ld:
        lines += [
            "",
            "## Loader -> device",
            "",
            f"- loader alone (to device, pinned: {ld['host_batch_pinned']}): "
            f"{_fmt(ld['loader_to_device_samples_per_s'])} samples/s with "
            f"{ld['loader_workers']} workers",
            f"- step on a cached batch: {_fmt(ld['step_on_cached_batch_samples_per_s'])} samples/s",
            f"- loader + step: {_fmt(ld['loader_plus_step_samples_per_s'])} samples/s "
            f"({ld['fed_over_cached']:.2f} of the cached rate)",
        ]
    pt = report["sections"].get("pretrain", {}).get("result")
    if pt:
        mfu = f"{pt['mfu']:.1%}" if pt.get("mfu") is not None else "n/a"
        lines += [
            "",
            "## Pretraining job (tiny.yaml's towers, one rank)",
            "",
            f"- 4 steps, then a resume to {pt['steps']}: {pt['run_seconds']} s per run; loss "
            f"{pt['first_loss']:.3f} -> {pt['last_loss']:.3f}; bf16 {pt['bf16']}",
            f"- last logged: {_fmt(pt['samples_per_s'])} samples/s, MFU {mfu}, peak "
            f"{_fmt(pt['peak_mem_gb'], '.2f')} GiB",
            f"- load_encoder on {pt['encoder_device']}: features finite "
            f"{pt['encoder_features_finite']}",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (with --device cpu)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--out", type=Path, help="output folder (default $OUT or bench/results/gpu)"
    )
    parser.add_argument(
        "--budget-s", type=float, help="whole-run limit (default: 480 on a GPU, 180 smoke)"
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every time limit (a machine shared with other jobs)",
    )
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _build_deepspeed_cpu_op() -> float:
    """Seconds to load DeepSpeed's CPU comm op, compiling it first where it is not cached.

    On the CPU, DeepSpeed compiles that op at its first start on a machine (about a minute on
    2 cores): done here, outside the timed sections, whose limits would cut every try short.
    """
    started = time.perf_counter()
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.section:
        global DEADLINE
        DEADLINE = args.deadline
        return child_main(args)
    out_dir = args.out or Path(os.environ.get("OUT") or BENCH / "results" / "gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.log").write_text(f"gpu_check {' '.join(sys.argv[1:])}\n")
    prebuild_s = _build_deepspeed_cpu_op() if args.device == "cpu" else None
    budget = (args.budget_s or (180.0 if args.smoke else 480.0)) * args.time_scale
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "budget_s": budget,
        "time_scale": args.time_scale,
        "deepspeed_cpu_op_build_s": prebuild_s,
        "sections": {},
    }
    for name in args.sections:
        left = budget - (time.perf_counter() - started)
        limit = min(BUDGET_S[name][1 if args.smoke else 0] * args.time_scale, left - 2)
        if limit < 5:
            report["sections"][name] = {"ok": False, "seconds": 0, "error": "no time left"}
            continue
        print(f"[gpu_check] {name} (limit {limit:.0f} s) ...", flush=True)
        report["sections"][name] = run_section(name, args, out_dir, limit)
        sec = report["sections"][name]
        state = "ok" if sec["ok"] else f"FAILED: {sec.get('error', '')[:200]}"
        print(f"[gpu_check] {name}: {state} ({sec['seconds']} s)", flush=True)
        report["seconds"] = time.perf_counter() - started
        # Written after every section: a run cut short still leaves what it measured.
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - started
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    failed = [n for n, s in report["sections"].items() if not s["ok"]]
    print(markdown(report))
    print(f"wrote {out_dir / 'gpu_check.json'}, gpu_check.md and gpu_check.log beside it")
    if failed:
        print(f"sections that failed: {', '.join(failed)} (errors in the JSON)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
