"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

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
