"""Loader stage 3: check and decode raw samples, cheaply, one at a time.

Per sample only what must be done per sample: check the .npy headers against
the manifest, inflate the PNG rows (the filters are undone later for the whole
batch), parse the JSON. An undecodable sample is skipped, counted and logged.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pimc_dist.shardset.codec import decode_png, npy_header_length, parse_npy_header
from pimc_dist.shardset.errors import LoaderError
from pimc_dist.shardset.manifest import ViewSpec
from pimc_dist.shardset.reader import LoaderStats, ShardHealth

try:  # libdeflate through imagecodecs inflates about 1.6x faster than zlib
    from imagecodecs import deflate_decode as _deflate_decode
except ImportError:  # pragma: no cover - imagecodecs is a dependency
    _deflate_decode = None

_JSON = json.JSONDecoder()  # raw_decode on text: json.loads without its per-call checks


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _inflate(data: bytes, size: int) -> bytes:
    if _deflate_decode is not None:
        return _deflate_decode(
            data, out=size + 1
        )  # one spare byte: more data shows as a wrong size
    return zlib.decompress(data, bufsize=size + 1)


class SampleDecoder:
    """Checks and decodes one raw sample; cheap because every sample of a view looks alike.

    Returns a dict: for .npy views a memoryview of the data (header checked),
    for PNG views the inflated filtered rows (bytes), "__meta__" the parsed JSON
    and "__json__" its raw bytes (what batches carry, see MetaList). Ids of the
    manifest's metadata tables (`tables`) are checked, not replaced: the parsed
    JSON serves for labels, MetaList restores the values when read.
    Raises _Skip(reason, detail) for a sample that cannot be used.
    """

    def __init__(
        self,
        specs: dict[str, ViewSpec],
        meta: bool,
        tables: dict[str, dict[str, Any]] | None = None,
    ):
        self.specs = specs
        self.meta = meta
        self.tables = tables or {}
        self.suffixes = {view: f"{view}.{spec.ext}" for view, spec in specs.items()}
        self._npy_headers: dict[bytes, int] = {}
        self._png: dict[str, tuple[bytes, int, int]] = {}
        self._png_filters: dict[str, dict[int, bytes]] = {}
        for view, spec in specs.items():
            if spec.ext == "png":
                channels, height, width = spec.shape
                color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
                ihdr = np.array([width, height], ">u4").tobytes() + bytes([8, color, 0, 0, 0])
                stride = 1 + width * channels
                self._png[view] = (ihdr, height, stride)
                self._png_filters[view] = {k: bytes([k]) * height for k in (0, 1, 2)}

    def member_suffixes(self) -> frozenset[str]:
        return frozenset(self.suffixes.values()) | ({"json"} if self.meta else frozenset())

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": sample["__key__"]}
        for view, suffix in self.suffixes.items():
            data = sample.get(suffix)
            if data is None:
                raise _Skip("missing", f"no member '{suffix}'")
            if self.specs[view].ext == "npy":
                out[view] = self._npy(view, data)
            else:
                out[view] = self._png_rows(view, data)
        if self.meta:
            data = sample.get("json")
            if data is None:
                raise _Skip("missing", "no member 'json'")
            try:
                text = data.decode()
                if text[:1].isspace():
                    text = text.strip()
                meta, end = _JSON.raw_decode(text)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Skip("decode", f"json: {exc}") from None
            if end != len(text) and text[end:].strip():
                raise _Skip("decode", f"json: extra data at char {end}")
            if not isinstance(meta, dict):
                raise _Skip("decode", "json: not an object")
            for key, table in self.tables.items():
                if key in meta and meta[key] not in table:
                    raise _Skip("decode", f"json: {key} id {meta[key]!r} not in the manifest")
            out["__meta__"] = meta
            out["__json__"] = data
        return out

    def _npy(self, view: str, data: bytes) -> memoryview:
        try:
            length = npy_header_length(data)
        except ValueError as exc:
            raise _Skip("decode", f"{view}.npy: {exc}") from None
        header = data[:length]
        nbytes = self._npy_headers.get(header)
        if nbytes is None:
            spec = self.specs[view]
            try:
                parsed = parse_npy_header(header)
            except ValueError as exc:
                raise _Skip("decode", f"{view}.npy: {exc}") from None
            if parsed.dtype != np.dtype(spec.dtype) or parsed.shape != spec.shape:
                raise _Skip(
                    "shape",
                    f"{view}.npy: {parsed.dtype} {parsed.shape}, manifest says {spec.dtype} {spec.shape}",
                )
            nbytes = parsed.nbytes
            if len(self._npy_headers) < 64:
                self._npy_headers[header] = nbytes
        if len(data) - length != nbytes:
            raise _Skip(
                "decode", f"{view}.npy: {len(data) - length} data bytes, header says {nbytes}"
            )
        return memoryview(data)[length:]

    def _png_rows(self, view: str, data: bytes) -> bytes:
        ihdr, height, stride = self._png[view]
        size = height * stride
        # Our own PNGs: IHDR as expected, then a single IDAT chunk.
        if data[16:29] == ihdr and data[:8] == b"\x89PNG\r\n\x1a\n" and data[37:41] == b"IDAT":
            length = int.from_bytes(data[33:37], "big")
            try:
                raw = _inflate(data[41 : 41 + length], size)
            except Exception as exc:  # zlib.error / DeflateError: corrupt stream
                raise _Skip("decode", f"{view}.png: {exc}") from None
            if len(raw) != size:
                raise _Skip("decode", f"{view}.png: {len(raw)} bytes of rows, expected {size}")
            kind = raw[0]
            if kind <= 2 and raw[::stride] == self._png_filters[view][kind]:
                return raw
        return self._png_slow(view, data)

    def _png_slow(self, view: str, data: bytes) -> bytes:
        """Any other PNG: decode fully, re-express as unfiltered rows."""
        try:
            image = decode_png(data)
        except Exception as exc:  # PIL raises many kinds
            raise _Skip("decode", f"{view}.png: {exc}") from None
        spec = self.specs[view]
        if image.shape != spec.shape:
            raise _Skip("shape", f"{view}.png: {image.shape}, manifest says {spec.shape}")
        channels, height, width = image.shape
        rows = np.zeros((height, 1 + width * channels), np.uint8)
        rows[:, 1:] = image.transpose(1, 2, 0).reshape(height, -1)
        return rows.tobytes()


def decode(
    samples: Iterable[dict[str, Any]],
    decoder: SampleDecoder,
    *,
    stats: LoaderStats,
    warn: Callable[..., None],
    max_failures: int = 10_000,
    health: ShardHealth | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples; undecodable ones are counted and logged with their shard and key
    (and told to `health`, which may leave their shard out).

    `max_failures` undecodable samples in a row raise LoaderError: that is a
    broken shard set, not a few bad samples.
    """
    failures = 0
    for sample in samples:
        try:
            out = decoder(sample)
        except _Skip as skip:
            warn(
                stats, skip.reason, f"{sample.get('__url__')}: sample '{sample['__key__']}': {skip}"
            )
            if health is not None:
                health.lost(sample.get("__url__"))
            failures += 1
            if failures >= max_failures:
                raise LoaderError(
                    f"{failures} undecodable samples in a row; last: {skip}"
                ) from None
            continue
        failures = 0
        yield out
