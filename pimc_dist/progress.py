"""Progress bars for long loops: count, rate and ETA on stderr, readable in Slurm log files."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, label: str | None, unit: str = "it") -> Any:
    """A tqdm bar with count, rate and ETA on stderr; `label` None makes it silent (other ranks).

    It refreshes every 0.5 s on a terminal and every 30 s otherwise: Slurm logs are files,
    and a bar every 30 s is what they need.
    """
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=label,
        unit=unit,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
        disable=label is None,
        dynamic_ncols=True,
    )
