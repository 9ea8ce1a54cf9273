"""Writing files so that a crash never leaves half of one: a temporary file, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value: Any) -> Any:
    # numpy and torch scalars and arrays; anything else as its text
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json_atomic(
    path: str | os.PathLike, value: Any, *, indent: int | None = 1, sort_keys: bool = False
) -> Path:
    """Write `value` as JSON (numpy values as numbers, NaN allowed) atomically; returns the path."""
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, default=_json_default)
    return write_atomic(path, text + "\n")
