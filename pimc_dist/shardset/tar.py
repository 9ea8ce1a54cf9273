"""Tar shards: deterministic member writing and a fast sample reader.

Each tar holds samples as consecutive members named `<key>.<view>.<ext>` (plus
`<key>.json`), the WebDataset convention. Tar headers are deterministic (fixed
mtime, uid, gid, mode, member order), so the same samples give the same bytes
and the same sha256 on every run. `iter_shard_samples` is the fast tar reader
the loader uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from pimc_dist.shardset.errors import TarError

# Fixed tar header fields: the same input gives the same bytes on every run.
_TAR_MTIME = 1577836800  # 2020-01-01T00:00:00Z
_TAR_MODE = 0o644
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
END_OF_ARCHIVE = _ZERO_BLOCK * 2


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file with fixed metadata."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(BLOCK)
    header[0 : len(raw_name)] = raw_name
    header[100:108] = _octal(_TAR_MODE, 8)
    header[108:116] = _octal(0, 8)  # uid
    header[116:124] = _octal(0, 8)  # gid
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(_TAR_MTIME, 12)
    header[148:156] = b" " * 8  # checksum placeholder while summing
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    checksum = sum(header)
    header[148:156] = f"{checksum:06o}".encode() + b"\0 "
    return bytes(header)


def tar_padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def _header_checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].rstrip(b" \0") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _parse_pax(data: bytes) -> dict[bytes, bytes]:
    records = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def iter_shard_samples(
    source: str | os.PathLike | BinaryIO,
    *,
    skip: int = 0,
    limit: int | None = None,
    suffixes: set[str] | frozenset[str] | None = None,
    chunk_bytes: int = 4 << 20,
) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard as dicts {"__key__": key, "<suffix>": bytes, ...}.

    Reads the file in large chunks and parses the 512-byte headers directly.
    Consecutive members with the same key form one sample. The first `skip`
    samples are passed over without copying their payloads; at most `limit`
    samples are yielded; with `suffixes` only those members are kept.

    Raises TarError (file name, byte offset) on a corrupt header, a truncated
    member or a missing end-of-archive marker, after yielding the samples
    before the damage (the last one may lack members).
    """
    if limit is not None and limit <= 0:
        return
    own = not hasattr(source, "read")
    label = str(source) if own else str(getattr(source, "name", "<stream>"))
    f = open(source, "rb") if own else source  # noqa: SIM115 (closed in finally)
    seekable = f.seekable()
    buf = b""
    pos = 0
    base = 0  # file offset of buf[0]
    key: str | None = None
    raw_key: bytes | None = None
    suffix_names: dict[bytes, str] = {}  # member suffixes seen, decoded once
    sample: dict[str, Any] = {}
    index = 0  # samples started so far
    long_name: bytes | None = None

    def refill(need: int) -> bool:
        """Make buf[pos:pos + need] available (buf restarts at pos); False at end of file."""
        nonlocal buf, pos, base
        base += pos
        if seekable:  # re-read the unparsed tail rather than copy the new chunk onto it
            f.seek(base)
            parts = []
        else:
            parts = [buf[pos:]]
        have = sum(len(p) for p in parts)
        while have < need:
            more = f.read(max(chunk_bytes, need - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        buf = b"".join(parts)
        pos = 0
        return have >= need

    try:
        while True:
            if pos + BLOCK > len(buf) and not refill(BLOCK):
                raise TarError(
                    f"{label}: truncated at byte {base + len(buf)}: no end-of-archive marker"
                )
            if buf[pos + 257 : pos + 262] != b"ustar":  # rare: end of archive, or not ustar
                header = buf[pos : pos + BLOCK]
                if header == _ZERO_BLOCK:
                    break
                if not _header_checksum_ok(header):
                    raise TarError(f"{label}: corrupt tar header at byte {base + pos}")
            try:
                size = int(buf[pos + 124 : pos + 135], 8)  # 11 octal digits, then NUL or space
            except ValueError:
                try:
                    size = int(buf[pos + 124 : pos + 136].strip(b" \0") or b"0", 8)
                except ValueError:
                    raise TarError(
                        f"{label}: corrupt tar header at byte {base + pos} (size)"
                    ) from None
            padded = BLOCK + ((size + BLOCK - 1) & ~(BLOCK - 1))
            if pos + padded > len(buf) and not refill(padded):
                raise TarError(
                    f"{label}: truncated at byte {base + len(buf)}: member at byte {base + pos} "
                    f"needs {size} bytes"
                )
            header_at = pos
            start = pos + BLOCK
            pos += padded
            kind = buf[header_at + 156]
            if kind != 48 and kind != 0:  # not a regular file ("0" or NUL)
                if kind == 76:  # "L": GNU long name of the next member
                    long_name = buf[start : start + size].rstrip(b"\0")
                elif kind == 120:  # "x": pax extended header, may carry the path
                    long_name = _parse_pax(buf[start : start + size]).get(b"path", long_name)
                else:
                    long_name = None
                continue
            if long_name is not None:
                name, long_name = long_name, None
            else:
                end = buf.find(b"\0", header_at, header_at + 100)
                name = buf[header_at : end if end >= 0 else header_at + 100]
                if buf[header_at + 345]:
                    prefix = buf[header_at + 345 : header_at + 500].split(b"\0", 1)[0]
                    name = prefix + b"/" + name
            dot = name.find(b".", name.rfind(b"/") + 1)
            if dot < 0:
                continue  # not a sample member (no extension)
            member_key = name[:dot]
            suffix = suffix_names.get(name[dot + 1 :])
            if suffix is None:
                try:
                    suffix = name[dot + 1 :].decode()
                except UnicodeDecodeError:
                    raise TarError(
                        f"{label}: member name at byte {base + header_at} is not UTF-8"
                    ) from None
                if len(suffix_names) < 64:
                    suffix_names[name[dot + 1 :]] = suffix
            if member_key != raw_key or suffix in sample:
                if raw_key is not None and index > skip:
                    yield sample
                    if limit is not None and index - skip >= limit:
                        return
                try:
                    key = member_key.decode()
                except UnicodeDecodeError:
                    raise TarError(
                        f"{label}: member name at byte {base + header_at} is not UTF-8"
                    ) from None
                raw_key = member_key
                sample = {"__key__": key}
                index += 1
            if index > skip and (suffixes is None or suffix in suffixes):
                sample[suffix] = buf[start : start + size]
        if key is not None and index > skip:
            yield sample
    except TarError:
        if key is not None and index > skip and len(sample) > 1:
            yield sample
        raise
    finally:
        if own:
            f.close()
