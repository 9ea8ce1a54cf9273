"""Errors of the shard format and the loader."""

from __future__ import annotations


class ShardError(RuntimeError):
    """A shard set is invalid, incomplete or inconsistent; the message names the files."""


class TarError(ShardError):
    """A tar file is corrupt or truncated; names the file and the byte offset."""


class LoaderError(RuntimeError):
    """The loader cannot produce batches (bad config for this shard set, nothing decodable)."""
