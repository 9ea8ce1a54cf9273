"""Member codecs: PNG, NPY and JSON bytes of one sample member, both ways.

PNG is written with the "Up" filter on every row (what the loader undoes for a
whole batch at once); .npy without pickle, C order; JSON compact with sorted
keys, so the same sample gives the same bytes on every run.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # PNG colour type -> channels


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, level: int = 0) -> bytes:
    """Encode a (C, H, W) or (H, W) uint8 image (C in 1..4) as PNG.

    Level 0, the default, stores the rows as they are (filter None, deflate's stored
    blocks): inflating a 3x48x48 plot deflated at level 1 (2.5 KiB instead of 6.8 KiB)
    costs a loader worker about 20 us per sample, a quarter of all its work, to save 16 %
    of a PIMC sample's bytes (the int16 crop is most of them); bench/loader.py measures
    both. Deflated levels (1-9) use the "Up" filter on every row: on recurrence plots it
    compresses best of the simple filters, and the loader undoes it for a whole batch at
    once; level 1 is about 10 % larger than level 6 and writes 4x faster.
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
    if level == 0:
        rows[:, 0] = 0  # None filter: nothing to compress, nothing to undo
        rows[:, 1:] = hwc
    else:
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


def encode_member(suffix: str, value: Any, png_level: int = 0) -> tuple[bytes, np.ndarray | None]:
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
