"""Shared pytest fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# The checkout: configs/, slurm/ and the package; subprocesses run from here by default.
REPO = Path(__file__).resolve().parents[1]

# DeepSpeed picks its accelerator at import time; tests run on CPU with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test's in-process run wrote to os.environ (init_distributed exports the
    torchrun variables), so that later tests' subprocesses do not inherit a rank and a port
    that this process still holds."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


# The signals a job handles (pimc_dist.distributed's stop requests, the launcher's Ctrl-C).
_JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Put back the handlers a test's in-process job installed (pretrain.main handles
    SIGTERM as a stop request): a later test's forked child would inherit a SIGTERM that
    no longer kills it, and one such child outlived pytest and kept CI's output open."""
    saved = {sig: signal.getsignal(sig) for sig in _JOB_SIGNALS}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)


def run_module(
    module: str, *args: Any, cwd: str | os.PathLike = REPO, timeout: float = 300, **kwargs: Any
) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a subprocess (by default in the checkout), its output
    captured as text; further keywords go to subprocess.run (env=..., check=...)."""
    return subprocess.run(
        [sys.executable, "-m", module, *(str(a) for a in args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
