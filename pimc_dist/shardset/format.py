"""Shard sets: WebDataset tar shards plus the manifest that describes them.

A shard set is one folder::

    shard-000000.tar  shard-000000.stats.json
    shard-000001.tar  shard-000001.stats.json
    ...
    manifest.json     skipped.json

Each tar holds samples as consecutive members named `<key>.<view>.<ext>` (plus
`<key>.json`), the WebDataset convention. Tar headers are deterministic (fixed
mtime, uid, gid, mode, member order), so the same samples give the same bytes
and the same sha256 on every run.

`ShardSetWriter` writes shards (each under a temporary name, renamed into place
only when complete), accumulates per-channel mean/std of every array view while
writing, and leaves a small `.stats.json` sidecar beside each shard. The
manifest is assembled from the sidecars (`merge_manifest`), so shards written
by different processes or Slurm array tasks combine into one set, and a rerun
can skip the shards that are already complete (`ShardSetWriter.shard_done`).

`read_manifest` validates the manifest; `verify` checks the shard files
against it. `iter_shard_samples` is the fast tar reader the loader uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# 2: MoSAiC samples store S2 as the reader's digital numbers (uint16; float32 when
#    resampled bilinearly) and S1 as float32, where schema 1 stored both as float16.
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "skipped.json"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
ARRAY_EXTS = ("npy", "png")

# Fixed tar header fields: the same input gives the same bytes on every run.
_TAR_MTIME = 1577836800  # 2020-01-01T00:00:00Z
_TAR_MODE = 0o644
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class ShardError(RuntimeError):
    """A shard set is invalid, incomplete or inconsistent; the message names the files."""


class TarError(ShardError):
    """A tar file is corrupt or truncated; names the file and the byte offset."""


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-000042.tar."""
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    """File name of the per-shard statistics written beside shard `index`."""
    return f"shard-{index:06d}.stats.json"


# ---------------------------------------------------------------------------
# Member encoding: PNG, NPY, JSON
# ---------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # PNG colour type -> channels


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """Encode a (C, H, W) or (H, W) uint8 image (C in 1..4) as PNG.

    Every row uses the PNG "Up" filter: on recurrence plots it compresses best
    of the simple filters (smaller than PIL's adaptive choice), and the loader
    undoes it for a whole batch at once. zlib level 1 is the default: on 3x48x48
    plots it is about 10 % larger than level 6 (2.5 vs 2.2 KiB), writes 4x
    faster, and inflates just as fast.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in _PNG_COLOR_TYPES:
        raise ValueError(
            f"PNG needs a (C, H, W) uint8 array with C in 1..4, got {image.dtype} {image.shape}"
        )
    channels, height, width = image.shape
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0)).reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), np.uint8)
    rows[:, 0] = 2  # Up filter
    rows[0, 1:] = hwc[0]
    rows[1:, 1:] = hwc[1:] - hwc[:-1]  # uint8 arithmetic wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPES[channels], 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _png_chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class PngStream:
    """The parts of a PNG the fast decoder needs: size, channels, compressed rows."""

    height: int
    width: int
    channels: int
    idat: bytes  # zlib stream of filtered rows


def parse_png(data: bytes) -> PngStream | None:
    """Split a PNG into header facts and its IDAT stream; None if not an 8-bit plain PNG.

    Raises ValueError when the bytes are not a PNG at all.
    """
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG (bad signature)")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or interlace != 0 or color not in _PNG_CHANNELS:
        return None
    pos = 33  # after signature and the IHDR chunk
    idat = []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        elif kind == b"PLTE":
            return None
        pos += 12 + length
    else:
        raise ValueError("truncated PNG (no IEND chunk)")
    return PngStream(height, width, _PNG_CHANNELS[color], b"".join(idat))


def unfilter_png_rows(rows: np.ndarray, channels: int) -> np.ndarray | None:
    """Undo PNG filters on (N, H, 1 + W*C) uint8 rows -> (N, H, W, C); None if a row
    uses Average or Paeth (then PIL decodes it) or rows mix filter types."""
    filters = rows[:, :, 0]
    kind = int(filters.flat[0])
    if kind > 2 or (filters != kind).any():
        return None
    n, height, stride = rows.shape
    pixels = rows[:, :, 1:].reshape(n, height, (stride - 1) // channels, channels)
    if kind == 1:  # Sub: each byte adds the byte one pixel to the left
        return np.cumsum(pixels, axis=2, dtype=np.uint8)
    if kind == 2:  # Up: each byte adds the byte above
        return np.cumsum(pixels, axis=1, dtype=np.uint8)
    return pixels


def decode_png(data: bytes) -> np.ndarray:
    """Decode a PNG to a (C, H, W) uint8 array (fast path for our own PNGs, PIL otherwise)."""
    stream = parse_png(data)
    if stream is not None:
        raw = zlib.decompress(stream.idat)
        stride = 1 + stream.width * stream.channels
        if len(raw) != stream.height * stride:
            raise ValueError(f"PNG rows hold {len(raw)} bytes, expected {stream.height * stride}")
        rows = np.frombuffer(raw, np.uint8).reshape(1, stream.height, stride)
        hwc = unfilter_png_rows(rows, stream.channels)
        if hwc is not None:
            return np.ascontiguousarray(hwc[0].transpose(2, 0, 1))
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"PNG is not 8-bit ({arr.dtype})")
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def encode_npy(array: np.ndarray) -> bytes:
    """Encode an array as .npy bytes (C order)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class NpyHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # where the data starts
    nbytes: int


_NPY_MAGIC = b"\x93NUMPY"


def npy_header_length(data: bytes) -> int:
    """Length of the .npy header (magic, version, header dict) at the start of `data`."""
    if data[:6] != _NPY_MAGIC or len(data) < 10:
        raise ValueError("not an .npy file (bad magic)")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6] in (2, 3):
        return 12 + int.from_bytes(data[8:12], "little")
    raise ValueError(f"unsupported .npy version {data[6]}")


def parse_npy_header(header: bytes) -> NpyHeader:
    """Parse the header bytes of an .npy file (C order, no object dtype)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = read(stream)
    if fortran:
        raise ValueError(".npy array is in Fortran order")
    if dtype.hasobject:
        raise ValueError(".npy array has an object dtype")
    shape = tuple(int(s) for s in shape)
    return NpyHeader(
        dtype, shape, len(header), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    )


def decode_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes to an array without pickle; ValueError on a bad header or length."""
    header = parse_npy_header(data[: npy_header_length(data)])
    if len(data) != header.offset + header.nbytes:
        raise ValueError(
            f".npy holds {len(data) - header.offset} data bytes, header says {header.nbytes}"
        )
    return np.frombuffer(data, header.dtype, offset=header.offset).reshape(header.shape)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_json(value: Any) -> bytes:
    """Deterministic compact JSON (sorted keys; numpy scalars and dates converted)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def encode_member(suffix: str, value: Any, png_level: int = 1) -> tuple[bytes, np.ndarray | None]:
    """Bytes of one sample member, chosen by its extension, and the array it holds (if any)."""
    ext = suffix.rsplit(".", 1)[-1]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        array = None
        if ext == "npy":
            array = decode_npy(data)
        elif ext == "png":
            array = decode_png(data)
        return data, array
    if ext == "npy":
        array = np.asarray(value)
        return encode_npy(array), array
    if ext == "png":
        array = np.asarray(value)
        return encode_png(array, png_level), array
    if ext == "json":
        return encode_json(value), None
    if ext in ("txt", "cls"):
        return str(value).encode(), None
    raise ValueError(f"don't know how to encode a {type(value).__name__} as .{ext}")


# ---------------------------------------------------------------------------
# Tar writing and reading
# ---------------------------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file with fixed metadata."""
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(_BLOCK)
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


def _padding(size: int) -> bytes:
    return bytes(-size % _BLOCK)


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
            if pos + _BLOCK > len(buf) and not refill(_BLOCK):
                raise TarError(
                    f"{label}: truncated at byte {base + len(buf)}: no end-of-archive marker"
                )
            if buf[pos + 257 : pos + 262] != b"ustar":  # rare: end of archive, or not ustar
                header = buf[pos : pos + _BLOCK]
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
            padded = _BLOCK + ((size + _BLOCK - 1) & ~(_BLOCK - 1))
            if pos + padded > len(buf) and not refill(padded):
                raise TarError(
                    f"{label}: truncated at byte {base + len(buf)}: member at byte {base + pos} "
                    f"needs {size} bytes"
                )
            header_at = pos
            start = pos + _BLOCK
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


# ---------------------------------------------------------------------------
# Running statistics
# ---------------------------------------------------------------------------


@dataclass
class RunningStats:
    """Per-channel count, mean and sum of squared deviations (Chan et al. merge).

    Channels are the first axis of a view; all other axes are pooled.
    """

    n: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def add(self, array: np.ndarray) -> None:
        """Fold one array of shape (C, ...) into the statistics."""
        x = np.asarray(array, np.float64)
        x = x.reshape(x.shape[0] if x.ndim else 1, -1)
        count = x.shape[1]
        if count == 0:
            return
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        self.merge(RunningStats(count, mean, m2))

    def merge(self, other: RunningStats) -> None:
        """Fold another set of statistics over the same channels into this one."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"channel counts differ: {self.mean.shape} vs {other.mean.shape}")
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / total)
        self.n = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.n)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunningStats:
        return cls(
            int(data["n"]), np.asarray(data["mean"], np.float64), np.asarray(data["m2"], np.float64)
        )


# ---------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """Name, file extension, dtype and shape of one array view (e.g. rp: png uint8 3x48x48)."""

    ext: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardEntry:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ViewStats:
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Manifest:
    """What a shard set holds; the loader trusts nothing else."""

    path: Path  # the manifest file
    schema_version: int
    kind: str
    source: str
    config: dict[str, Any]
    classes: list[str]
    views: dict[str, ViewSpec]
    members: list[str]  # member suffixes of every sample, e.g. ["json", "rp.png", "rsi.npy"]
    shards: list[ShardEntry]
    total_samples: int
    stats: dict[str, ViewStats]
    skipped: int = 0
    report: str = REPORT_NAME

    @property
    def root(self) -> Path:
        return self.path.parent

    def shard_paths(self) -> list[Path]:
        return [self.root / s.name for s in self.shards]

    def without(self, names: set[str] | frozenset[str]) -> Manifest:
        """This manifest with the shards named in `names` left out (totals follow)."""
        shards = [s for s in self.shards if s.name not in names]
        return dataclasses.replace(
            self, shards=shards, total_samples=sum(s.samples for s in shards)
        )


_RESHARD = (
    "the set was written by another pimc_dist version; shard it again (python -m pimc_dist.shard)"
)


def _stale_sidecar(path: Path, info: dict[str, Any]) -> str | None:
    """The problem of a shard sidecar written in another schema, or None."""
    if info.get("schema_version") == SCHEMA_VERSION:
        return None
    return (
        f"{path}: schema_version {info.get('schema_version')}, this code writes "
        f"{SCHEMA_VERSION}: {_RESHARD} into a new folder"
    )


def _check(cond: bool, path: Path, key: str, problem: str) -> None:
    if not cond:
        raise ShardError(f"{path}: key '{key}' {problem}")


def _typed(
    data: Mapping[str, Any], key: str, types: type | tuple[type, ...], path: Path, where: str = ""
) -> Any:
    full = f"{where}{key}"
    _check(isinstance(data, Mapping), path, where.rstrip(".") or "<top>", "must be a mapping")
    _check(key in data, path, full, "is missing")
    value = data[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    names = "/".join(t.__name__ for t in _as_tuple(types))
    _check(ok, path, full, f"must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate `<directory>/manifest.json` (or a manifest path).

    Raises ShardError naming the file and the key on a missing file, bad JSON,
    a missing key, a wrong type or inconsistent totals.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{path}: manifest not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: not valid JSON: {exc}") from exc
    version = _typed(data, "schema_version", int, path)
    _check(
        version == SCHEMA_VERSION,
        path,
        "schema_version",
        f"is {version}, this code reads {SCHEMA_VERSION}: {_RESHARD}",
    )
    views = {}
    for name, spec in _typed(data, "views", dict, path).items():
        where = f"views.{name}."
        shape = _typed(spec, "shape", list, path, where)
        _check(
            all(isinstance(s, int) and s >= 0 for s in shape),
            path,
            where + "shape",
            "must list sizes",
        )
        views[name] = ViewSpec(
            _typed(spec, "ext", str, path, where),
            _typed(spec, "dtype", str, path, where),
            tuple(shape),
        )
        try:
            np.dtype(views[name].dtype)
        except TypeError:
            _check(False, path, where + "dtype", f"is not a numpy dtype: {views[name].dtype!r}")
    shards = []
    for i, entry in enumerate(_typed(data, "shards", list, path)):
        where = f"shards[{i}]."
        shards.append(
            ShardEntry(
                _typed(entry, "name", str, path, where),
                _typed(entry, "samples", int, path, where),
                _typed(entry, "bytes", int, path, where),
                _typed(entry, "sha256", str, path, where),
            )
        )
    total = _typed(data, "total_samples", int, path)
    counted = sum(s.samples for s in shards)
    _check(total == counted, path, "total_samples", f"is {total} but the shards hold {counted}")
    stats = {}
    for name, entry in _typed(data, "stats", dict, path).items():
        where = f"stats.{name}."
        mean = _typed(entry, "mean", list, path, where)
        std = _typed(entry, "std", list, path, where)
        _check(len(mean) == len(std), path, where + "std", "must have as many values as mean")
        _check(
            all(isinstance(v, (int, float)) for v in mean + std),
            path,
            where + "mean",
            "must be numbers",
        )
        stats[name] = ViewStats(tuple(map(float, mean)), tuple(map(float, std)))
    config = _typed(data, "config", dict, path)
    classes = _typed(data, "classes", list, path)
    members = _typed(data, "members", list, path)
    return Manifest(
        path=path,
        schema_version=version,
        kind=_typed(data, "kind", str, path),
        source=_typed(data, "source", str, path),
        config=config,
        classes=[str(c) for c in classes],
        views=views,
        members=[str(m) for m in members],
        shards=shards,
        total_samples=total,
        stats=stats,
        skipped=_typed(data, "skipped", int, path),
        report=_typed(data, "report", str, path),
    )


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problems(manifest: Manifest, *, checksums: bool = True) -> dict[str, str]:
    """Listed shards that disagree with `manifest`: name -> problem (missing, resized, changed).

    Each problem names the file. Sizes are always compared; sha256 with `checksums`.
    """
    problems = {}
    for entry in manifest.shards:
        path = manifest.root / entry.name
        if not path.is_file():
            problems[entry.name] = f"{path}: listed in {manifest.path.name} but missing"
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems[entry.name] = f"{path}: {size} bytes, {manifest.path.name} says {entry.bytes}"
            continue
        if checksums:
            digest = sha256_file(path)
            if digest != entry.sha256:
                problems[entry.name] = (
                    f"{path}: sha256 {digest[:16]}... differs from {manifest.path.name} "
                    f"{entry.sha256[:16]}..."
                )
    return problems


def unlisted_shards(manifest: Manifest) -> list[Path]:
    """Shard files in the manifest's folder that it does not list (never read by a loader)."""
    listed = {entry.name for entry in manifest.shards}
    return [p for p in sorted(manifest.root.glob("shard-*.tar")) if p.name not in listed]


def verify(directory: str | os.PathLike, *, checksums: bool = True) -> list[str]:
    """Problems of a shard set against its manifest: missing, resized, changed or unlisted shards.

    Each problem names the file. An empty list means the set is intact.
    Raises ShardError when the manifest itself is missing or invalid.
    """
    manifest = read_manifest(directory)
    problems = list(shard_problems(manifest, checksums=checksums).values())
    for path in unlisted_shards(manifest):
        problems.append(f"{path}: shard file not listed in {manifest.path.name}")
    return problems


def ensure_valid(directory: str | os.PathLike, *, checksums: bool = True) -> Manifest:
    """The manifest of a shard set, after `verify` found no problem; ShardError listing them all otherwise."""
    problems = verify(directory, checksums=checksums)
    if problems:
        lines = "\n  ".join(problems)
        raise ShardError(f"{directory}: {len(problems)} problem(s) with the shard set:\n  {lines}")
    return read_manifest(directory)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _atomic_write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return json.loads(encode_json(dict(config)))


@dataclass
class _OpenShard:
    index: int
    tmp: Path
    file: BinaryIO
    digest: Any = field(default_factory=hashlib.sha256)
    bytes: int = 0
    samples: int = 0
    keys: set[str] = field(default_factory=set)
    stats: dict[str, RunningStats] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.bytes += len(data)


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class ShardSetWriter:
    """Writes a shard set: tar shards, per-shard sidecars, then the manifest.

    Two ways to use it:

    - automatic: `write(sample)` again and again; a new shard starts every
      `max_samples` samples or `max_bytes` bytes, numbered from `start_index`;
    - explicit: `with writer.shard(index): writer.write(...)`. A sharder that
      assigns inputs to shard indices deterministically can then skip inputs
      whose shard is done (`writer.shard_done(index)`), which makes reruns and
      Slurm array tasks (disjoint index ranges) resumable. The size limits
      apply only to the automatic mode; here the caller decides what a shard holds.

    A sample is a dict: `__key__` plus members by suffix ("rp.png", "rsi.npy",
    "json"); values are arrays (encoded by extension), dicts (JSON) or bytes.
    Every sample must have the same members with the same dtypes and shapes.
    `skip(key, reason)` records an input that made no sample; the skip report
    beside the manifest lists them all.

    A shard is written under a temporary name and renamed when complete; its
    sidecar is written just before the rename, so a shard file under its final
    name always has its sidecar. A rerun that produces a shard already present
    keeps the file if the bytes agree and raises ShardError if they differ.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_samples: int = 4096,
        max_bytes: int = 256 * 2**20,
        start_index: int = 0,
        config: Any = None,
        source: str = "",
        classes: list[str] | tuple[str, ...] = (),
        kind: str = "pimc",
        png_level: int = 1,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.next_index = start_index
        self.config = _plain_config(config)
        self.source = source
        self.classes = [str(c) for c in classes]
        self.kind = kind
        self.png_level = png_level
        self.views: dict[str, ViewSpec] | None = None
        self.members: list[str] | None = None
        self.written: list[ShardEntry] = []
        self._open: _OpenShard | None = None
        self._explicit = False

    # -- shard lifecycle ---------------------------------------------------

    def shard_done(self, index: int) -> bool:
        """True if shard `index` is complete: file under its final name with a matching sidecar.

        Raises ShardError for a shard file whose sidecar is missing or disagrees
        with it, rather than guess whether it is complete.
        """
        path = self.out_dir / shard_name(index)
        if not path.is_file():
            return False
        sidecar = self.out_dir / sidecar_name(index)
        try:
            info = json.loads(sidecar.read_text())
            size = int(info["bytes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardError(
                f"{path}: present but its sidecar {sidecar.name} is unreadable ({exc})"
            ) from exc
        if size != path.stat().st_size:
            raise ShardError(
                f"{path}: {path.stat().st_size} bytes but {sidecar.name} says {size}; "
                "remove both to rewrite the shard"
            )
        stale = _stale_sidecar(sidecar, info)
        if stale:
            raise ShardError(stale)
        return True

    def begin_shard(self, index: int) -> None:
        """Start shard `index` (explicit mode); removes stale temporary files of that index."""
        if self._open is not None:
            raise ShardError(f"{self.out_dir}: shard {self._open.index} is still open")
        self._explicit = True
        self._start(index)

    def end_shard(self) -> ShardEntry | None:
        """Finish the open shard; returns its entry (None if it was empty and skipped nothing)."""
        shard, self._open = self._open, None
        self._explicit = False
        if shard is None:
            return None
        return self._finish(shard)

    @contextmanager
    def shard(self, index: int) -> Iterator[ShardSetWriter]:
        """`with writer.shard(i): ...` writes shard i; on an exception the partial shard is discarded."""
        self.begin_shard(index)
        try:
            yield self
        except BaseException:
            self.abort()
            raise
        self.end_shard()

    def abort(self) -> None:
        """Discard the open shard (its temporary file); complete shards stay."""
        shard, self._open = self._open, None
        self._explicit = False
        if shard is not None:
            shard.file.close()
            shard.tmp.unlink(missing_ok=True)

    def _start(self, index: int) -> None:
        final = shard_name(index)
        for pattern in (f".{final}.*.tmp", f".{sidecar_name(index)}.*.tmp"):
            for stale in self.out_dir.glob(pattern):
                stale.unlink(missing_ok=True)  # left by a crashed run; never renamed into place
        tmp = self.out_dir / f".{final}.{os.getpid()}.tmp"
        self._open = _OpenShard(index, tmp, open(tmp, "wb", buffering=1 << 20))  # noqa: SIM115
        self.next_index = index + 1

    def _finish(self, shard: _OpenShard) -> ShardEntry | None:
        shard.write(_ZERO_BLOCK * 2)
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        if shard.samples == 0 and not shard.skipped:
            shard.tmp.unlink(missing_ok=True)
            return None
        name = shard_name(shard.index)
        final = self.out_dir / name
        entry = ShardEntry(name, shard.samples, shard.bytes, shard.digest.hexdigest())
        if final.exists():
            existing = sha256_file(final)
            if existing != entry.sha256:
                shard.tmp.unlink(missing_ok=True)
                raise ShardError(
                    f"{final}: already exists with different content (sha256 {existing[:16]}... != "
                    f"{entry.sha256[:16]}... just written); remove it or write to a new folder"
                )
        sidecar = {
            "schema_version": SCHEMA_VERSION,
            "index": shard.index,
            "name": name,
            "samples": shard.samples,
            "bytes": shard.bytes,
            "sha256": entry.sha256,
            "kind": self.kind,
            "source": self.source,
            "classes": self.classes,
            "members": self.members or [],
            "views": {
                k: {"ext": v.ext, "dtype": v.dtype, "shape": list(v.shape)}
                for k, v in (self.views or {}).items()
            },
            "stats": {k: s.to_json() for k, s in shard.stats.items()},
            "skipped": shard.skipped,
        }
        _atomic_write_json(self.out_dir / sidecar_name(shard.index), sidecar)
        if final.exists():
            shard.tmp.unlink(missing_ok=True)  # identical bytes: the rerun changes nothing
        else:
            os.replace(shard.tmp, final)
        self.written.append(entry)
        return entry

    # -- samples -----------------------------------------------------------

    def _ensure_open(self) -> _OpenShard:
        if self._open is None:
            self._start(self.next_index)
        return self._open

    def write(self, sample: Mapping[str, Any]) -> None:
        """Append one sample; raises ValueError naming the key on a bad or inconsistent sample."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"sample key {key!r} must be a non-empty str of letters, digits, _ - /"
            )
        members = sorted(k for k in sample if not k.startswith("__"))
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        encoded = []
        arrays = {}
        for suffix in members:
            try:
                data, array = encode_member(suffix, sample[suffix], self.png_level)
            except ValueError as exc:
                raise ValueError(f"sample {key!r}, member {suffix!r}: {exc}") from exc
            name = f"{key}.{suffix}"
            if len(name.encode()) > 100:
                raise ValueError(f"sample {key!r}: member name {name!r} longer than 100 bytes")
            encoded.append((name, data))
            if array is not None:
                arrays[suffix.split(".", 1)[0]] = (suffix.rsplit(".", 1)[-1], array)
        self._check_consistent(key, members, arrays)
        size = sum(_BLOCK + len(d) + len(_padding(len(d))) for _, d in encoded)
        if (
            not self._explicit
            and self._open is not None
            and self._open.samples > 0
            and self._open.bytes + size > self.max_bytes
        ):
            self._finish_auto()
        shard = self._ensure_open()
        if key in shard.keys:
            raise ValueError(f"sample key {key!r} appears twice in {shard_name(shard.index)}")
        shard.keys.add(key)
        for name, data in encoded:
            shard.write(tar_header(name, len(data)))
            shard.write(data)
            shard.write(_padding(len(data)))
        for view, (_, array) in arrays.items():
            shard.stats.setdefault(view, RunningStats()).add(array)
        shard.samples += 1
        if not self._explicit and (
            shard.samples >= self.max_samples or shard.bytes >= self.max_bytes
        ):
            self._finish_auto()

    def _finish_auto(self) -> None:
        shard, self._open = self._open, None
        self._finish(shard)

    def _check_consistent(
        self, key: str, members: list[str], arrays: dict[str, tuple[str, np.ndarray]]
    ) -> None:
        for view, (_, array) in arrays.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"sample {key!r}, view {view!r}: contains NaN or infinity")
        views = {
            view: ViewSpec(ext, np.dtype(array.dtype).name, tuple(int(s) for s in array.shape))
            for view, (ext, array) in arrays.items()
        }
        if self.views is None:
            self.views, self.members = views, members
            return
        if members != self.members:
            raise ValueError(
                f"sample {key!r} has members {members}, earlier samples {self.members}"
            )
        for view, spec in views.items():
            if spec != self.views[view]:
                raise ValueError(
                    f"sample {key!r}, view {view!r}: {spec.dtype} {spec.shape}, earlier samples "
                    f"{self.views[view].dtype} {self.views[view].shape}"
                )

    def skip(self, key: str, reason: str) -> None:
        """Record an input that made no sample (listed in the skip report beside the manifest)."""
        self._ensure_open().skipped.append({"key": str(key), "reason": str(reason)})

    def close(
        self, *, manifest: bool = True, expected_shards: int | None = None
    ) -> Manifest | None:
        """Finish the open shard and (by default) write manifest.json from every sidecar in the folder."""
        if self._open is not None:
            self._finish_auto()
        if not manifest:
            return None
        return merge_manifest(
            self.out_dir,
            config=self.config,
            source=self.source,
            kind=self.kind,
            classes=self.classes,
            expected_shards=expected_shards,
        )

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def merge_manifest(
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    source: str | None = None,
    kind: str | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
    expected_shards: int | None = None,
) -> Manifest:
    """Assemble manifest.json and the skip report from the shard sidecars in `out_dir`.

    Works for shards written by any number of processes. Raises ShardError
    listing every problem: a shard without a sidecar, sidecars that disagree
    (source, kind, classes, views), or with `expected_shards`, missing indices.
    `source`, `kind`, `classes` default to those of the sidecars.
    """
    root = Path(out_dir)
    problems = []
    sidecars = []
    for path in sorted(root.glob("shard-*.stats.json")):
        tar = root / path.name.replace(".stats.json", ".tar")
        if not tar.is_file():
            continue  # written just before a crash, before its shard was renamed into place
        try:
            info = json.loads(path.read_text())
            info["index"] = int(info["index"])
            for key in (
                "name",
                "samples",
                "bytes",
                "sha256",
                "kind",
                "source",
                "classes",
                "views",
                "stats",
            ):
                info[key]  # noqa: B018 (presence check)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path}: unreadable sidecar ({exc!r})")
            continue
        stale = _stale_sidecar(path, info)
        if stale:
            problems.append(stale)
            continue
        if tar.stat().st_size != info["bytes"]:
            problems.append(f"{tar}: {tar.stat().st_size} bytes, its sidecar says {info['bytes']}")
        sidecars.append(info)
    for tar in sorted(root.glob("shard-*.tar")):
        sidecar = root / tar.name.replace(".tar", ".stats.json")
        if not sidecar.exists():
            problems.append(f"{tar}: no sidecar {sidecar.name}")
    if not sidecars and not problems:
        raise ShardError(f"{root}: no complete shards to list in a manifest")
    reference = {
        "kind": kind if kind is not None else (sidecars[0]["kind"] if sidecars else ""),
        "source": source if source is not None else (sidecars[0]["source"] if sidecars else ""),
        "classes": list(classes)
        if classes is not None
        else (sidecars[0]["classes"] if sidecars else []),
    }
    views: dict[str, Any] | None = None
    members: list[str] | None = None
    for info in sidecars:
        for field_name, expected in reference.items():
            if info[field_name] != expected:
                problems.append(
                    f"{root / info['name']}: {field_name} {info[field_name]!r}, expected {expected!r}"
                )
        if info["samples"] == 0:
            continue  # an empty shard (only skips) sets no views
        if views is None:
            views, members = info["views"], info.get("members", [])
        elif info["views"] != views or info.get("members", []) != members:
            problems.append(f"{root / info['name']}: views {info['views']} differ from {views}")
    indices = {info["index"] for info in sidecars}
    if expected_shards is not None:
        missing = [shard_name(i) for i in range(expected_shards) if i not in indices]
        if missing:
            problems.append(
                f"{root}: {len(missing)} shard(s) not written yet: {', '.join(missing[:10])}"
            )
    if problems:
        lines = "\n  ".join(problems)
        raise ShardError(
            f"{root}: cannot write the manifest, {len(problems)} problem(s):\n  {lines}"
        )
    sidecars.sort(key=lambda info: info["index"])
    stats: dict[str, RunningStats] = {}
    skipped = []
    for info in sidecars:
        for view, data in info["stats"].items():
            stats.setdefault(view, RunningStats()).merge(RunningStats.from_json(data))
        skipped += [{"shard": info["name"], **entry} for entry in info["skipped"]]
    shards = [
        {"name": i["name"], "samples": i["samples"], "bytes": i["bytes"], "sha256": i["sha256"]}
        for i in sidecars
    ]
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": reference["kind"],
        "source": reference["source"],
        "config": _plain_config(config),
        "classes": reference["classes"],
        "views": views or {},
        "members": members or [],
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "stats": {
            view: {"mean": s.mean.tolist(), "std": s.std.tolist()}
            for view, s in sorted(stats.items())
            if s.n
        },
        "skipped": len(skipped),
        "report": REPORT_NAME,
    }
    _atomic_write_json(root / REPORT_NAME, {"skipped": skipped, "count": len(skipped)})
    _atomic_write_json(root / MANIFEST_NAME, data)
    return read_manifest(root)


def view_stats_arrays(manifest: Manifest, view: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) of a view as float32 arrays; std 0 becomes 1 (constant channel)."""
    stats = manifest.stats.get(view)
    if stats is None:
        return None
    mean = np.asarray(stats.mean, np.float32)
    std = np.asarray(stats.std, np.float32)
    std = np.where((std > 0) & np.isfinite(std), std, 1.0).astype(np.float32)
    return mean, std


__all__ = [
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SCHEMA_VERSION",
    "Manifest",
    "NpyHeader",
    "RunningStats",
    "ShardEntry",
    "ShardError",
    "ShardSetWriter",
    "TarError",
    "ViewSpec",
    "ViewStats",
    "decode_npy",
    "decode_png",
    "encode_json",
    "encode_npy",
    "encode_png",
    "ensure_valid",
    "iter_shard_samples",
    "merge_manifest",
    "read_manifest",
    "sha256_file",
    "shard_name",
    "shard_problems",
    "unlisted_shards",
    "verify",
]
