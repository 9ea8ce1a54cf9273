"""Time pyts' RecurrencePlot against pimc_dist.recurrence on the same series, in one run.

N random series of T=61 values in [-1, 1] (float64, what pyts computes in) go through pyts
``RecurrencePlot(...).transform`` and through ours: the float path (``recurrence_plot``), the uint8
path (``recurrence_plot_uint8``, with and without a 48 x 48 resize), thresholded plots and the
torch twin on CPU. Two modes, each pinned before numpy/numba/torch load:

- one-core: bound to one CPU (sched_setaffinity, checked in each process); numba, torch, OpenMP
  and BLAS get 1 thread, so ours runs its serial kernels (pyts' kernels are serial anyway);
- all-cores: every CPU of the machine.

Processes. In each mode pyts and ours run in two processes of their own, and this process asks
them for one timed call at a time, alternating: pyts once per set of options, then every case
of ours on those options, for ``--repeats`` rounds, so load from other processes hits both
sides alike. Every timed call follows an untimed call of the same case. Each side so runs as in
a loop of its own calls in a fresh process -- what a user gets -- and its memory allocator is
left alone by the other: a call's time depends on whether its result lands on fresh pages (a
page fault each 4 KiB, microseconds apiece on this VM, longer than computing the plots) or on
pages glibc reuses, and that depends on the process' allocation history. Sharing a process,
pyts' 30 MB result at N=1024 is faulted in on each call or reused, depending on what the
process freed before -- 17 ms or 4 ms -- so the ratio would swing four-fold between runs.

The first call of each of ours (numba compile, or loading the compiled kernel from the on-disk
cache) is timed apart and checked against pyts' output (float: equal to pyts cast to float32;
uint8: within one rounding step; resized plots: shape only, their values are pinned down by
tests/test_recurrence.py); one more process with an empty numba cache times a cold compile.

The table gives, per side, the fastest call over the rounds (the least disturbed: the ratio the
targets are checked on) and the median, with the minor page faults per call. "floor" rows time
only writing a result of that size (a new or a reused array, no arithmetic): no implementation
that returns such a result can be faster, so pyts / floor caps the ratio any could reach.

    python bench/recurrence.py [--series 1024,4096] [--timesteps 61] [--repeats 9]
    python bench/recurrence.py --device-check cuda   # torch on the GPU vs numba on all cores

`--device-check DEVICE` (the hook of bench/gpu_check.py) times only the plots a training step
makes on the fly: (N, 3, T) float16 index series -> (N, 3, 48, 48) uint8 plots, through
`recurrence_plot_torch` on DEVICE (series already there; synchronised) and through the numba
`recurrence_plot_uint8` on every CPU core, and compares the values (at most one rounding step
apart). Writes its JSON to --output.

Prints a table and writes bench/results/recurrence.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "recurrence.json"
THREAD_VARIABLES = (
    "NUMBA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)
# Ratio targets of the issue: uint8 path >= 50x pyts on one core, float path >= 20x.
TARGETS = {"float": 20.0, "uint8": 50.0}
EMBEDDING = {"dimension": 3, "time_delay": 2}
# pyts options of each group -> the cases of ours timed against them.
GROUPS = {
    "default": (
        {},
        [
            "float",
            "float, out= reused",
            "floor: new float32 array, written",
            "floor: float32 out=, written",
            "uint8",
            "uint8, out= reused",
            "floor: new uint8 array, written",
            "uint8 resized to 48x48",
            "torch CPU uint8",
            "torch CPU uint8 resized to 48x48",
        ],
    ),
    "dimension=3 time_delay=2": (
        EMBEDDING,
        ["float, dimension=3 time_delay=2", "uint8, dimension=3 time_delay=2"],
    ),
    "threshold='point'": ({"threshold": "point"}, ["float, threshold='point'"]),
}
TARGET_PATHS = {"float": "float", "uint8": "uint8"}
FLOORS = {"float": "floor: new float32 array, written", "uint8": "floor: new uint8 array, written"}


def load_pyts_recurrence_plot() -> type:
    """pyts' RecurrencePlot from its module file: ``import pyts.image`` compiles every pyts image
    transformer with numba, uncached (30-40 s here), and only this one is timed."""
    spec = importlib.util.find_spec("pyts")
    path = Path(spec.submodule_search_locations[0]) / "image" / "_recurrence.py"
    module_spec = importlib.util.spec_from_file_location("_pyts_image_recurrence", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.RecurrencePlot


def machine_info() -> dict:
    import numba
    import numpy as np
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pyts_spec = importlib.util.find_spec("pyts")
    pyts_init = Path(pyts_spec.origin).read_text()
    pyts_version = pyts_init.split("__version__ = ")[1].split("\n")[0].strip("'\"")
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "pyts": pyts_version,
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# The two timing processes
# --------------------------------------------------------------------------------------------


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(call: Callable[[], object]) -> tuple[float, int]:
    """Seconds and minor page faults of one call, after an untimed call of the same case."""
    call()
    faults = minor_faults()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return seconds, minor_faults() - faults


def pyts_calls(series) -> dict[str, Callable[[], object]]:
    """pyts' transform of ``series`` for each group's options."""
    RecurrencePlot = load_pyts_recurrence_plot()
    calls = {}
    for group, (options, _) in GROUPS.items():
        calls[group] = lambda options=options: RecurrencePlot(**options).transform(series)
    return calls


def our_calls(series) -> dict[str, tuple[Callable[[], object], Callable]]:
    """Every case of ours on ``series``: name -> (call, check of its result against pyts')."""
    import numpy as np
    import torch

    from pimc_dist import recurrence

    n_series, n_timestamps = series.shape
    shape = (n_series, n_timestamps, n_timestamps)
    tensor = torch.from_numpy(series)
    float_out = np.empty(shape, dtype=np.float32)
    uint8_out = np.empty(shape, dtype=np.uint8)

    def same_float(ours, reference):
        np.testing.assert_array_equal(ours, reference.astype(np.float32))

    def within_a_step(ours, reference, dimension=1):
        scaled = np.clip(reference / recurrence.default_max_distance(dimension), 0, 1) * 255
        assert np.abs(np.asarray(ours, dtype=np.float64) - np.round(scaled)).max() <= 1

    def shape_48(ours, reference):
        assert ours.shape == (n_series, 48, 48) and ours.dtype == np.uint8

    def no_check(ours, reference):
        pass

    def written(array):
        array.fill(1)
        return array

    plot, plot8 = recurrence.recurrence_plot, recurrence.recurrence_plot_uint8
    torch_plot = recurrence.recurrence_plot_torch
    return {
        "float": (lambda: plot(series), same_float),
        "float, out= reused": (lambda: plot(series, out=float_out), same_float),
        "floor: new float32 array, written": (
            lambda: written(np.empty(shape, dtype=np.float32)),
            no_check,
        ),
        "floor: float32 out=, written": (lambda: written(float_out), no_check),
        "uint8": (lambda: plot8(series), within_a_step),
        "uint8, out= reused": (lambda: plot8(series, out=uint8_out), within_a_step),
        "floor: new uint8 array, written": (
            lambda: written(np.empty(shape, dtype=np.uint8)),
            no_check,
        ),
        "uint8 resized to 48x48": (lambda: plot8(series, size=48), shape_48),
        "torch CPU uint8": (lambda: torch_plot(tensor).numpy(), within_a_step),
        "torch CPU uint8 resized to 48x48": (
            lambda: torch_plot(tensor, size=48).numpy(),
            shape_48,
        ),
        "float, dimension=3 time_delay=2": (lambda: plot(series, **EMBEDDING), same_float),
        "uint8, dimension=3 time_delay=2": (
            lambda: plot8(series, **EMBEDDING),
            lambda ours, reference: within_a_step(ours, reference, EMBEDDING["dimension"]),
        ),
        "float, threshold='point'": (lambda: plot(series, threshold="point"), same_float),
    }


def serve(side: str, mode: str) -> None:
    """Answer the parent's requests, one JSON line each, for ``side`` 'pyts' or 'ours'."""
    # Replies go to a private copy of stdout; anything a library prints lands on stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import numba
    import numpy as np
    import torch

    threads = int(os.environ["NUMBA_NUM_THREADS"])
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "one-core" and (len(cpus) != 1 or numba.get_num_threads() != 1):
        raise RuntimeError(
            f"one-core {side} runs on CPUs {cpus}, {numba.get_num_threads()} threads"
        )
    calls = {}
    for line in sys.stdin:
        request = json.loads(line)
        reply = {}
        if request["cmd"] == "setup":
            series = np.random.default_rng(0).uniform(
                -1.0, 1.0, size=(request["series"], request["timesteps"])
            )
            theirs = pyts_calls(series)
            if side == "pyts":
                calls = theirs
            else:
                cases = our_calls(series)
                calls = {name: call for name, (call, _) in cases.items()}
                first_call = {}
                for group, (_, names) in GROUPS.items():
                    reference = theirs[group]()
                    for name in names:
                        call, check = cases[name]
                        start = time.perf_counter()
                        result = call()
                        first_call[name] = time.perf_counter() - start
                        check(result, reference)
                        del result
                    del reference
                reply = {"first_call_s": first_call}
        elif request["cmd"] == "time":
            seconds, faults = timed(calls[request["case"]])
            reply = {"seconds": seconds, "faults": faults}
        elif request["cmd"] == "info":
            layer = numba.threading_layer() if threads > 1 else "serial kernels"
            reply = {
                "cpus": cpus,
                "threads": {"numba": numba.get_num_threads(), "torch": torch.get_num_threads()},
                "numba_threading_layer": layer,
            }
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


class Server:
    """One timing process, pinned to ``cpus`` with ``env`` (thread counts) from its start."""

    def __init__(self, side: str, mode: str, env: dict, cpus: set[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", side, "--mode", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, **env),
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            text=True,
        )

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"timing process exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def run_mode(mode: str, env: dict, cpus: set[int], sizes: list[int], config: dict) -> dict:
    """Time every case for every N with a pyts process and an ours process (module docstring)."""
    import numpy as np

    theirs = Server("pyts", mode, env, cpus)
    ours = Server("ours", mode, env, cpus)
    try:
        rows = []
        for n_series in sizes:
            setup = {"cmd": "setup", "series": n_series, "timesteps": config["timesteps"]}
            theirs.ask(**setup)
            first_call = ours.ask(**setup)["first_call_s"]
            pyts_runs = {group: [] for group in GROUPS}
            our_runs = {name: [] for _, names in GROUPS.values() for name in names}
            for _ in range(config["repeats"]):
                for group, (_, names) in GROUPS.items():
                    pyts_runs[group].append(theirs.ask(cmd="time", case=group))
                    for name in names:
                        our_runs[name].append(ours.ask(cmd="time", case=name))
            for group, (_, names) in GROUPS.items():
                pyts_ms = np.array([run["seconds"] for run in pyts_runs[group]]) * 1e3
                pyts_faults = np.median([run["faults"] for run in pyts_runs[group]])
                for name in names:
                    ours_ms = np.array([run["seconds"] for run in our_runs[name]]) * 1e3
                    ours_faults = np.median([run["faults"] for run in our_runs[name]])
                    rows.append(
                        {
                            "series": n_series,
                            "case": name,
                            "target_path": TARGET_PATHS.get(name),
                            "pyts_ms_min": round(float(pyts_ms.min()), 3),
                            "ours_ms_min": round(float(ours_ms.min()), 3),
                            "ratio_min": round(float(pyts_ms.min() / ours_ms.min()), 2),
                            "pyts_ms_median": round(float(np.median(pyts_ms)), 3),
                            "ours_ms_median": round(float(np.median(ours_ms)), 3),
                            "ratio_median": round(
                                float(np.median(pyts_ms) / np.median(ours_ms)), 2
                            ),
                            "pyts_faults_per_call": int(pyts_faults),
                            "ours_faults_per_call": int(ours_faults),
                            "ours_first_call_s": round(first_call[name], 3),
                            "series_per_s_ours": round(n_series / (float(ours_ms.min()) / 1e3)),
                        }
                    )
        info = {"pyts_process": theirs.ask(cmd="info"), "ours_process": ours.ask(cmd="info")}
    finally:
        theirs.close()
        ours.close()
    return {"mode": mode, **info, "rows": rows}


# --------------------------------------------------------------------------------------------
# Cold compile, table, main
# --------------------------------------------------------------------------------------------


def cold_compile() -> dict:
    """First-call seconds of each public path with an empty numba cache (this process)."""
    import numpy as np
    import torch

    from pimc_dist import recurrence

    series = np.random.default_rng(1).uniform(-1, 1, size=(8, 61))
    calls = {
        "recurrence_plot": lambda: recurrence.recurrence_plot(series),
        "recurrence_plot(dimension=3)": lambda: recurrence.recurrence_plot(series, dimension=3),
        "recurrence_plot(threshold='point')": lambda: recurrence.recurrence_plot(
            series, threshold="point"
        ),
        "recurrence_plot_uint8": lambda: recurrence.recurrence_plot_uint8(series),
        "recurrence_plot_uint8(size=48)": lambda: recurrence.recurrence_plot_uint8(series, size=48),
        "resize_plot": lambda: recurrence.resize_plot(np.ones((2, 61, 61)), 48),
        "recurrence_plot_torch (no JIT)": lambda: recurrence.recurrence_plot_torch(
            torch.from_numpy(series)
        ),
    }
    seconds = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        seconds[name] = round(time.perf_counter() - start, 3)
    return seconds


def run_cold_compile(env: dict, cpus: set[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--cold", "--result-file", str(out)]
        subprocess.run(
            command,
            env=dict(os.environ, **env, NUMBA_CACHE_DIR=tmp),
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
            check=True,
        )
        return json.loads(out.read_text())


def print_table(results: dict) -> None:
    config = results["config"]
    print(f"\nT = {config['timesteps']}; {config['repeats']} rounds; ms: fastest call (min) and")
    print("median; ratio = pyts / ours; faults: minor page faults per call (pyts / ours)")
    header = (
        f"{'mode':9} {'N':>5} {'case':34} {'pyts min':>8} {'ours min':>8} {'ratio':>7} "
        f"{'pyts med':>8} {'ours med':>8} {'ratio':>7} {'faults':>12}"
    )
    print(header)
    print("-" * len(header))
    for mode in results["modes"]:
        for row in mode["rows"]:
            faults = f"{row['pyts_faults_per_call']}/{row['ours_faults_per_call']}"
            print(
                f"{mode['mode']:9} {row['series']:5} {row['case']:34} "
                f"{row['pyts_ms_min']:8.2f} {row['ours_ms_min']:8.3f} {row['ratio_min']:6.1f}x "
                f"{row['pyts_ms_median']:8.2f} {row['ours_ms_median']:8.3f} "
                f"{row['ratio_median']:6.1f}x {faults:>12}"
            )
    print("\ntargets, one core (ratio of the fastest calls; floor: the most any implementation")
    print("returning a new array of that dtype could reach against the same pyts calls):")
    for mode in results["modes"]:
        if mode["mode"] != "one-core":
            continue
        by_case = {(row["series"], row["case"]): row for row in mode["rows"]}
        for row in mode["rows"]:
            path = row["target_path"]
            if path is None:
                continue
            floor = by_case[(row["series"], FLOORS[path])]["ratio_min"]
            met = "met" if row["ratio_min"] >= TARGETS[path] else "NOT met"
            print(
                f"  {path:5} N={row['series']:<5} {row['ratio_min']:6.1f}x (median "
                f"{row['ratio_median']:.1f}x), target {TARGETS[path]:.0f}x {met}; floor {floor:.1f}x"
            )
    print("\ncold numba compile, first call (s):", results["cold_compile_s"])
    print("load average before / after:", results["load_average_before"], "/", end=" ")
    print(results["machine"]["load_average_1_5_15"])


def device_check(
    device: str, n_series: int, timesteps: int, size: int | None, repeats: int
) -> dict:
    """Plots/s of the torch path on `device` against numba on all cores; same values?"""
    import numba
    import numpy as np
    import torch

    from pimc_dist import recurrence

    rng = np.random.default_rng(0)
    series = rng.uniform(-1, 1, size=(n_series, 3, timesteps)).astype(np.float16)
    on_device = torch.from_numpy(series).to(device)

    def sync() -> None:
        if on_device.device.type == "cuda":
            torch.cuda.synchronize()

    def run_torch():
        out = recurrence.recurrence_plot_torch(on_device, size=size)
        sync()
        return out

    def run_numba():
        return recurrence.recurrence_plot_uint8(series, size=size)

    results = {}
    outputs = {}
    for name, call in (
        ("torch_" + on_device.device.type, run_torch),
        ("numba_all_cores", run_numba),
    ):
        outputs[name] = call()  # compile / warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        best = min(times)
        results[name] = {
            "plots_per_s": n_series * 3 / best,
            "series_per_s": n_series / best,
            "best_ms": 1e3 * best,
        }
    ours = outputs["torch_" + on_device.device.type].cpu().numpy().astype(int)
    diff = np.abs(ours - outputs["numba_all_cores"].astype(int))
    return {
        "device": str(on_device.device),
        "device_name": torch.cuda.get_device_name(0) if on_device.device.type == "cuda" else "cpu",
        "series": n_series,
        "channels": 3,
        "timesteps": timesteps,
        "size": size,
        "numba_threads": numba.get_num_threads(),
        "paths": results,
        "speedup_torch_over_numba": results["torch_" + on_device.device.type]["plots_per_s"]
        / results["numba_all_cores"]["plots_per_s"],
        "max_abs_diff": int(diff.max()),
        "fraction_equal": float((diff == 0).mean()),
        "same_values": bool(diff.max() <= 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--series", default="1024,4096", help="comma-separated N values (default 1024,4096)"
    )
    parser.add_argument("--timesteps", type=int, default=61, help="T (default 61)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--serve", choices=["pyts", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["one-core", "all-cores"], help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--device-check",
        metavar="DEVICE",
        help="only time torch on DEVICE (cuda, cpu) against numba on all cores; see above",
    )
    parser.add_argument("--size", type=int, default=48, help="--device-check: plot side")
    args = parser.parse_args()

    if args.device_check:
        n = int(args.series.split(",")[-1])
        result = device_check(args.device_check, n, args.timesteps, args.size, args.repeats)
        from machine import machine_info as cpu_machine_info  # bench/machine.py; no pyts needed

        result["machine"] = cpu_machine_info()
        for name, row in result["paths"].items():
            print(f"{name:>18}: {row['plots_per_s']:>14,.0f} plots/s")
        print(
            f"torch / numba: {result['speedup_torch_over_numba']:.1f}x; max difference "
            f"{result['max_abs_diff']} ({result['fraction_equal']:.2%} equal)"
        )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
        return

    if args.serve:
        serve(args.serve, args.mode)
        return
    if args.cold:
        args.result_file.write_text(json.dumps(cold_compile()))
        return

    load_before = [round(v, 2) for v in os.getloadavg()]
    sizes = [int(n) for n in args.series.split(",")]
    config = {"series": sizes, "timesteps": args.timesteps, "repeats": args.repeats}
    usable = set(os.sched_getaffinity(0))
    one = {name: "1" for name in THREAD_VARIABLES}
    every = {name: str(len(usable)) for name in THREAD_VARIABLES}
    first = {min(usable)}
    print(f"one core (cpu {min(usable)}) ...", flush=True)
    one_core = run_mode("one-core", one, first, sizes, config)
    print(f"all {len(usable)} cores ...", flush=True)
    all_cores = run_mode("all-cores", every, usable, sizes, config)
    print("cold compile ...", flush=True)
    cold = run_cold_compile(one, first)

    results = {
        "benchmark": "recurrence plots: pyts RecurrencePlot vs pimc_dist.recurrence",
        "machine": machine_info(),
        "config": config,
        "load_average_before": load_before,
        "targets_one_core": TARGETS,
        "modes": [one_core, all_cores],
        "cold_compile_s": cold,
        "notes": [
            "pyts and ours run in two processes of their own, asked for one timed call at a "
            "time, alternating; every timed call follows an untimed call of the same case",
            "ratio_min = fastest pyts call / fastest call of ours (the targets are checked on "
            "it); ratio_median the same with medians",
            "pyts returns float64 plots; ours float32 (equal to pyts cast) or uint8",
            "pyts' float64 result is allocated afresh on each call and, in a process of its own, "
            "faulted in page by page: most of pyts' time is those faults (pyts_faults_per_call); "
            "where glibc reuses the memory instead, pyts takes ~4 ms at N=1024",
            "results above glibc's 32 MB mmap limit (the 61 MB float32 result at N=4096) are new "
            "pages on every call, which the kernel zeroes on first touch: see the floor rows",
            "uint8 resized and torch rows compare against plain pyts (pyts has no resize)",
        ],
    }
    print_table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
