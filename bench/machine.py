"""What machine a benchmark ran on, for its JSON: CPU model, cores, vector extensions, load,
versions.

    from machine import machine_info   # bench scripts run as `python bench/<name>.py`
    result["machine"] = machine_info(webdataset=wds.__version__)

Timings of compression, decoding and numpy kernels depend on the vector units
(zlib-ng / libdeflate and numpy pick AVX2 or AVX-512 code at run time), so a
figure without them cannot be compared with another machine's.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

# Flags of /proc/cpuinfo that decide which kernels run (x86); others are left out.
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_vbmi2",
    "vaes",
    "vpclmulqdq",
    "sha_ni",
    "amx_tile",
)


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU model and the vector extensions it has (x86 flags; ARM `Features`), from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path(path).read_text()
    except OSError:
        return {"model": model, "vector_extensions": [], "avx2": None, "avx512": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    vector = [f for f in VECTOR_FLAGS if f in flags] + sorted(
        f for f in flags if f in ("asimd", "sve", "sve2")
    )
    return {
        "model": model,
        "vector_extensions": vector,
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
    }


def machine_info(**versions: str) -> dict[str, Any]:
    """Machine facts for a benchmark's JSON; `versions` adds library versions by name."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:  # other processes on the machine slow every wall-clock figure: say how busy it was
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        **cpu_info(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "load_average_1_5_15_min": load,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **versions,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=1))
