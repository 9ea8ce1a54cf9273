"""Shared pytest fixtures."""

from __future__ import annotations

import os

# DeepSpeed picks its accelerator at import time; tests run on CPU with gloo.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
