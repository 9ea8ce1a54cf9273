"""Tables of labelled point time series (long format): one row per sample and date.

Most labelled crop and land-cover data comes as points, not rasters. This reader takes a
CSV (also `.csv.gz`) or parquet table with the columns

- `sample_id`: the point (any text); its rows form one series
- `date`: ISO date (YYYY-MM-DD; YYYYMMDD and parquet date columns work too)
- the band columns named in `data.band_names`, e.g. B02, B04, B08 (digital numbers, scaled
  by `data.dn_scale` like pixels) or NDVI / EVI / SAVI (index values, taken as given; NDVI
  alone gives one-channel recurrence plots)
- optional `label` (a class name, or an integer: the position in `data.class_names`),
  `split` (train / val / test; training, validation, dev, testing are read as those), `group` (parcel, polygon: samples of one group always
  share a split)

Every column name is configurable (`data.id_column`, `data.date_column`,
`data.label_column`, `data.split_column`, `data.group_column`); other columns are ignored.
Empty cells, NaN and `data.nodata` are gaps (for index columns `nodata` counts only when it
lies outside [-1, 1], where no index value can be), filled later like cloudy pixel dates.
Rows need no order; two rows of one sample on one day are merged (per band, the mean of the
values present: `base.merge_same_day`) and counted in `same_day_merged`.

Each sample becomes one `TimeSeriesPatch` of 1 x 1 pixel with `has_image=False` (no crop
view), `patch_id` = the sample id, its own dates, and label / split / group; the sharder
then makes the same cleaned, regularly gridded series and recurrence plots as for pixels.
Samples whose label is listed in `data.label_ignore` are left out (counted in `ignored`).
The split of a sample is its split column's value, else `hash_split` of its group (else of
its id). Bad tables (a missing column, an unparsable date or number, a sample without one
valid date, a label without a name) raise `SourceError` naming the file and the row or
sample, before any shard is written.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pimc_dist.sources.base import (
    SourceError,
    TimeSeriesPatch,
    UnnamedLabelError,
    hash_split,
    hash_split_settings,
    merge_same_day,
)
from pimc_dist.sources.geotiff_stack import parse_date

DATASET = "point_series"
INDEX_COLUMNS = ("NDVI", "EVI", "SAVI")  # band names taken as given index values
BLUE_RED_NIR = ("B02", "B04", "B08")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Split column spellings read as the split names of data.split / data.hash_split.
SPLIT_NAMES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
    "dev": "val", "test": "test", "testing": "test",
}  # fmt: skip


def _canonical(name: str) -> str:
    """'B2' / 'b02' -> 'B02', 'ndvi' -> 'NDVI' (the rule of pimc_dist.indices)."""
    upper = str(name).strip().upper()
    if len(upper) >= 2 and upper[0] == "B" and upper[1:].rstrip("A").isdigit():
        number, suffix = int(upper[1:].rstrip("A")), "A" if upper.endswith("A") else ""
        return f"B{number}A" if suffix else f"B{number:02d}"
    return upper


def table_format(path: Path) -> str:
    """'parquet' or 'csv' (plain or gzip) from the file name."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "csv"
    raise SourceError(path, "unknown table format: name it .csv, .csv.gz or .parquet")


def _read_csv(path: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """(header, the `wanted` columns present) of a CSV or gzipped CSV, as lists of text."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise SourceError(path, f"cannot read the table: {err}") from err
    first_line = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first_line.count)  # comma, or the semicolon / tab it uses
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise SourceError(path, "empty table (no header row)") from None
    positions = {name: header.index(name) for name in wanted if name in header}
    columns: dict[str, list[Any]] = {name: [] for name in positions}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise SourceError(path, f"line {line}: {len(row)} fields, the header has {len(header)}")
        for name, pos in positions.items():
            columns[name].append(row[pos])
    return header, columns


def _read_parquet(path: Path, wanted: Sequence[str]) -> tuple[list[str], dict[str, list[Any]]]:
    """(header, the `wanted` columns present) of a parquet file, as Python lists."""
    # pyarrow is optional (the `reben` and `test` extras): imported only for parquet tables.
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(
            path, "reading parquet needs pyarrow (pip install pyarrow), or write a CSV"
        ) from None
    try:
        schema = pq.read_schema(path)
        header = list(schema.names)
        present = [name for name in wanted if name in header]
        table = pq.read_table(path, columns=present)
    except Exception as err:  # ArrowInvalid, OSError, ...: pyarrow raises many types
        raise SourceError(path, f"not a readable parquet file: {err}") from err
    return header, {name: table.column(name).to_pylist() for name in present}


def _numbers(values: list[Any], path: Path, column: str, row_name) -> np.ndarray:
    """float64 array of a column; empty cells and None are NaN; SourceError names a bad cell."""
    array = np.array(["nan" if v is None or v == "" else v for v in values], dtype=object)
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError):
        for i, value in enumerate(array):
            try:
                float(value)
            except (TypeError, ValueError):
                raise SourceError(
                    path, f"{row_name(i)}: {value!r} in column {column!r} is not a number"
                ) from None
        raise


def _first_per_sample(
    values: list[Any], order: np.ndarray, starts: np.ndarray, ids: list[str], path, column: str
) -> list[str]:
    """The one non-empty value of `column` each sample's rows hold ('' when none)."""
    out = []
    for k, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        seen = {str(values[i]).strip() for i in order[a:b] if values[i] not in (None, "")}
        seen.discard("")
        if len(seen) > 1:
            shown = ", ".join(sorted(seen)[:3])
            raise SourceError(path, f"sample {ids[k]!r}: its rows disagree on {column} ({shown})")
        out.append(seen.pop() if seen else "")
    return out


def _ranges(values: list[int]) -> str:
    """Sorted integers as runs: [0, 3, 4, 5] -> '0, 3..5'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _as_int(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number == int(number) else None


class PointSeriesSource:
    """Read a long-format table of point time series as 1 x 1 `TimeSeriesPatch` records.

    With `common_range` (the sharder's choice when `data.grid_length` is not set) every
    record starts on the table's first day and ends on its last, the days a sample lacks
    added as gaps: every sample then gets the same regular grid (its ends take the nearest
    observed value). Without it each sample keeps its own dates (and a grid of
    `data.grid_length` steps from its own first date: tables of several seasons).

    The whole table is read, checked and indexed when the source is made; each record is
    cut from it when read. `classes` is `class_names`, or when that is empty the label
    names in sorted order (integer labels: "0" .. the largest). `same_day_merged` counts
    rows merged into another row of their sample and day; `ignored` the samples left out
    for a label in `label_ignore`.
    """

    def __init__(
        self,
        path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        band_names: Sequence[str],
        id_column: str = "sample_id",
        date_column: str = "date",
        label_column: str = "label",
        split_column: str = "split",
        group_column: str = "group",
        nodata: float | None = None,
        dn_scale: float = 10000.0,
        dn_offset: float = 0.0,
        class_names: Sequence[str] = (),
        label_ignore: Sequence[int] = (),
        split: str | None = None,
        hash_fractions: dict[str, float] | None = None,
        split_seed: int = 0,
        common_range: bool = True,
        dataset: str = DATASET,
    ) -> None:
        if isinstance(path_or_paths, (str, os.PathLike)):
            self.paths = [Path(path_or_paths)]
        else:
            self.paths = [Path(p) for p in path_or_paths]
        if not self.paths:
            raise ValueError("no table paths given")
        self.band_names = [str(b).strip() for b in band_names]
        if not self.band_names:
            raise ValueError("data.band_names must name the band (or index) columns")
        canonical = [_canonical(b) for b in self.band_names]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"a band is named twice in data.band_names {self.band_names}")
        given = [c for c in canonical if c in INDEX_COLUMNS]
        if given:  # the indices the plots are made of: these columns, as given
            self._used = [canonical.index(c) for c in given]
            self._index_cols = self._used
        else:
            missing = [b for b in BLUE_RED_NIR if b not in canonical]
            if missing:
                raise ValueError(
                    f"data.band_names {self.band_names} lacks {', '.join(missing)}: NDVI/EVI/SAVI "
                    "come from B02, B04 and B08, or name NDVI / EVI / SAVI columns"
                )
            self._used = [canonical.index(b) for b in BLUE_RED_NIR]
            self._index_cols = []
        self.columns = dict(
            id=id_column, date=date_column, label=label_column, split=split_column,
            group=group_column,
        )  # fmt: skip
        self.nodata = nodata
        self.dn_scale = float(dn_scale)
        self.dn_offset = float(dn_offset)
        self.class_names = [str(c) for c in class_names]
        self.label_ignore = {int(v) for v in label_ignore}
        self.hash_fractions, self.split_seed, self.split = hash_split_settings(
            hash_fractions, split_seed, split
        )
        self.dataset = dataset
        self.common_range = common_range
        self.first_date: dt.date | None = None  # of the whole table (all its samples)
        self.last_date: dt.date | None = None
        self.same_day_merged = 0
        self.ignored = 0
        self.classes: list[str] = list(self.class_names)
        # Oddities that are no error but likely a mistake (empty classes, a stretched grid):
        # the sharder prints them as warnings.
        self.notes: list[str] = []

        self._ids: list[str] = []
        self._values: list[np.ndarray] = []  # per table: (rows, C) float32, sorted
        self._days: list[np.ndarray] = []  # per table: (rows,) date ordinals
        self._samples: list[tuple[int, int, int]] = []  # (table, first row, end row)
        self._labels: list[int] = []
        self._splits: list[str] = []
        self._groups: list[str] = []
        self._where: list[Path] = []
        tables = [self._read_table(p) for p in self.paths]
        self.first_date = dt.date.fromordinal(int(min(t["days"].min() for t in tables)))
        self.last_date = dt.date.fromordinal(int(max(t["days"].max() for t in tables)))
        self._index_samples(tables)

    # -- reading --------------------------------------------------------------------------

    def _read_table(self, path: Path) -> dict[str, Any]:
        if path.is_dir():
            names = [f.name.lower() for f in path.iterdir()]
            suffixes = (".csv", ".csv.gz", ".tsv", ".txt", ".parquet", ".pq")
            found = [x for x in suffixes if any(n.endswith(x) for n in names)] or [".csv"]
            raise SourceError(
                path,
                "is a folder, not a table: give a table file (.csv, .csv.gz, .parquet) or a "
                f"glob of tables, e.g. data.root='{path}/*{found[0]}'",
            )
        if not path.is_file():
            raise SourceError(path, "missing")
        cols = self.columns
        wanted = [cols["id"], cols["date"], *self.band_names, cols["label"], cols["split"]]
        wanted.append(cols["group"])
        fmt = table_format(path)
        header, data = (_read_parquet if fmt == "parquet" else _read_csv)(path, wanted)
        required = [cols["id"], cols["date"], *self.band_names]
        missing = [name for name in required if name not in data]
        if missing:
            shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
            raise SourceError(
                path,
                f"missing column(s) {', '.join(repr(m) for m in missing)} (the table has: "
                f"{shown}); name them with data.id_column / data.date_column / data.band_names",
            )
        n_rows = len(data[cols["id"]])
        if n_rows == 0:
            raise SourceError(path, "the table has no rows")

        def row_name(i: int) -> str:
            return f"row {i + 1} (line {i + 2})" if fmt == "csv" else f"row {i + 1}"

        ids = [str(v).strip() if v is not None else "" for v in data[cols["id"]]]
        for i, sid in enumerate(ids):
            if not sid:
                raise SourceError(path, f"{row_name(i)}: empty {cols['id']!r}")
        days = np.empty(n_rows, dtype=np.int64)
        parsed: dict[Any, int] = {}
        for i, value in enumerate(data[cols["date"]]):
            day = parsed.get(value)
            if day is None:
                try:
                    day = parse_date(value).toordinal()
                except (TypeError, ValueError):
                    raise SourceError(
                        path,
                        f"{row_name(i)}: {value!r} in column {cols['date']!r} is not a date "
                        "(YYYY-MM-DD)",
                    ) from None
                parsed[value] = day
            days[i] = day
        values = np.stack([_numbers(data[b], path, b, row_name) for b in self.band_names], axis=1)
        gaps = ~np.isfinite(values)
        if self.nodata is not None:
            is_nodata = values == self.nodata
            if -1.0 <= self.nodata <= 1.0:  # a possible index value: a gap only in bands
                is_nodata[:, self._index_cols] = False
            gaps |= is_nodata
        values[gaps] = np.nan
        return dict(
            path=path, fmt=fmt, ids=ids, days=days, values=values.astype(np.float32),
            data=data, row_name=row_name,
        )  # fmt: skip

    def _usable(self, used: np.ndarray) -> np.ndarray:
        """Dates (axis 0) that give an index: B02, B04 and B08 all present, or (given
        indices) any of them."""
        finite = np.isfinite(used)
        return finite.any(axis=1) if self._index_cols else finite.all(axis=1)

    def _index_samples(self, tables: list[dict[str, Any]]) -> None:
        cols = self.columns
        seen: dict[str, Path] = {}
        label_info = []
        firsts, lasts = [], []  # per sample: its first and last day
        for t, table in enumerate(tables):
            path, ids = table["path"], table["ids"]
            unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
            rank = np.empty(len(unique), dtype=np.int64)  # samples in order of first row
            rank[np.argsort(first, kind="stable")] = np.arange(len(unique))
            sample_of_row = rank[inverse]
            order = np.lexsort((table["days"], sample_of_row))
            counts = np.bincount(sample_of_row, minlength=len(unique))
            starts = np.concatenate([[0], np.cumsum(counts)])
            sample_ids = [str(s) for s in unique[np.argsort(first, kind="stable")]]
            for sid in sample_ids:
                if sid in seen:
                    raise SourceError(path, f"sample {sid!r} is also in {seen[sid]}")
                seen[sid] = path
            days = table["days"][order]
            values = table["values"][order]
            firsts += days[starts[:-1]].tolist()
            lasts += days[starts[1:] - 1].tolist()
            # Rows of one sample on one day: merged when read (counted here, printed once).
            same = (np.diff(days) == 0) & (np.diff(sample_of_row[order]) == 0)
            self.same_day_merged += int(same.sum())
            usable = self._usable(values[:, self._used])
            valid_dates = np.add.reduceat(usable.astype(np.int64), starts[:-1])
            empty = np.flatnonzero(valid_dates == 0)
            if empty.size:
                used = ", ".join(self.band_names[i] for i in self._used)
                raise SourceError(
                    path,
                    f"sample {sample_ids[empty[0]]!r} has no valid date: every one of its "
                    f"{counts[empty[0]]} rows lacks {used} "
                    f"(empty, NaN or data.nodata); {empty.size} sample(s) like it",
                )

            texts = {}
            for key in ("label", "split", "group"):
                column = cols[key]
                texts[key] = (
                    _first_per_sample(
                        table["data"][column], order, starts, sample_ids, path, column
                    )
                    if column in table["data"]
                    else [""] * len(sample_ids)
                )
            label_text = texts["label"]
            label_info.append((path, label_text))
            self._values.append(values)
            self._days.append(days)
            for k, sid in enumerate(sample_ids):
                self._samples.append((t, int(starts[k]), int(starts[k + 1])))
                self._ids.append(sid)
                self._where.append(path)
            self._splits += [SPLIT_NAMES.get(t.lower(), t) for t in texts["split"]]
            self._groups += texts["group"]
        self._labels = self._label_values(label_info)
        self.notes = self._empty_class_notes() + self._stretch_notes(firsts, lasts)
        self.notes += self._negative_notes()

        keep = []
        for k, sid in enumerate(self._ids):
            split = self._splits[k] or hash_split(
                self._groups[k] or sid, self.split_seed, self.hash_fractions
            )
            self._splits[k] = split
            if self._labels[k] in self.label_ignore:
                self.ignored += 1
                continue
            if self.split is None or split == self.split:
                keep.append(k)
        for name in ("_ids", "_samples", "_labels", "_splits", "_groups", "_where"):
            items = getattr(self, name)
            setattr(self, name, [items[k] for k in keep])

    def _label_values(self, label_info: list[tuple[Path, list[str]]]) -> list[int]:
        """Per sample: the class index, -1 when unlabelled (ignored values kept as they are)."""
        texts = [text for _, lab in label_info for text in lab]
        present = [t for t in texts if t]
        numeric = bool(present) and all(_as_int(t) is not None for t in present)
        if not self.class_names and present:
            if numeric:
                values = {_as_int(t) for t in present} - self.label_ignore
                top = max(values, default=-1)
                self.classes = [str(v) for v in range(top + 1)]
            else:
                self.classes = sorted(set(present))
        index = {name: i for i, name in enumerate(self.classes)}
        out = []
        for path, lab in label_info:
            for text in lab:
                if not text:
                    out.append(-1)
                    continue
                if numeric:
                    value = _as_int(text)
                    if value in self.label_ignore or 0 <= value < len(self.classes):
                        out.append(value)
                        continue
                elif text in index:
                    out.append(index[text])
                    continue
                sid = self._ids[len(out)]
                column = self.columns["label"]
                raise UnnamedLabelError(
                    path,
                    f"sample {sid!r}: label value {text!r} (column {column!r}) has no name in "
                    f"data.class_names ({len(self.classes)} names: {', '.join(self.classes[:6])}"
                    f"{', ...' if len(self.classes) > 6 else ''}); name it, or list it in "
                    "data.label_ignore",
                )
        return out

    def _empty_class_notes(self) -> list[str]:
        """A note naming the classes no sample has (typo labels make such gaps)."""
        present = {v for v in self._labels if v >= 0}
        if not present:  # no label at all: nothing to say
            return []
        empty = [
            i for i in range(len(self.classes)) if i not in present and i not in self.label_ignore
        ]
        if not empty:
            return []
        if all(self.classes[i] == str(i) for i in empty):
            shown = _ranges(empty)
        else:
            shown = ", ".join(repr(self.classes[i]) for i in empty[:6])
            shown += ", ..." if len(empty) > 6 else ""
        what = f"class {shown} has" if len(empty) == 1 else f"classes {shown} have"
        hint = (
            "data.class_names names classes this table lacks?"
            if self.class_names
            else f"integer labels make classes 0 .. the largest: a typo in the "
            f"{self.columns['label']!r} column?"
        )
        return [f"{what} no sample (of {len(self.classes)} classes): {hint}"]

    def _negative_notes(self) -> list[str]:
        """A note on negative band values: reflectances are not negative. L2A's offset
        (BOA_ADD_OFFSET, -1000 in digital numbers) makes a few dark pixels slightly negative,
        so only many of them, or values below -1000 (a nodata value such as -9999), are
        named."""
        if self._index_cols or not self._values:
            return []
        used = np.concatenate([v[:, self._used] for v in self._values])
        with np.errstate(invalid="ignore"):
            negative = used < 0  # NaN (gaps) compares False
        count = int(negative.sum())
        if not count:
            return []
        lowest = float(np.nanmin(used))  # a negative value exists: not all NaN
        if count <= 0.01 * negative.size and lowest >= -1000:
            return []
        worst = self.band_names[self._used[int(negative.sum(axis=0).argmax())]]
        return [
            f"{count} of {negative.size} band values are negative (most in {worst}, lowest "
            f"{lowest:g}): digital numbers of reflectance are not; list a nodata value in "
            "data.nodata, or check that the columns hold reflectance x data.dn_scale"
        ]

    def _stretch_notes(self, firsts: list[int], lasts: list[int]) -> list[str]:
        """A note when the one grid of all samples is much longer than a typical sample's
        span, naming the samples far outside the others' dates (a wrong date?)."""
        if not self.common_range or not firsts:
            return []
        first, last = np.array(firsts), np.array(lasts)
        typical = max(float(np.median(last - first)), 1.0)
        whole = int(last.max() - first.min())
        if whole <= 2 * typical:
            return []
        far = np.flatnonzero(
            (first < np.median(first) - typical) | (last > np.median(last) + typical)
        )
        named = ", ".join(
            f"{self._ids[k]!r} ({dt.date.fromordinal(int(first[k]))} .. "
            f"{dt.date.fromordinal(int(last[k]))})"
            for k in far[:3]
        )
        by = f"; stretched by sample(s) {named}" if far.size else ""
        by += f" and {far.size - 3} more" if far.size > 3 else ""
        return [
            f"the common time grid spans {self.first_date} .. {self.last_date} ({whole} days), "
            f"more than twice a typical sample's {typical:.0f} days{by}: a wrong date? For a "
            "table of several seasons set data.grid_length (each sample's grid then starts on "
            "its own first date)"
        ]

    # -- records ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def patch_ids(self) -> list[str]:
        """Sample ids in reading order (tables in order, samples by their first row)."""
        return list(self._ids)

    def __getitem__(self, index: int) -> TimeSeriesPatch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index %= len(self)
        t, a, b = self._samples[index]
        dates = [dt.date.fromordinal(int(d)) for d in self._days[t][a:b]]
        bands = self._values[t][a:b, :, None, None]  # (rows, C, 1, 1)
        merge = merge_same_day(bands, dates)
        bands, dates = merge.bands, merge.dates
        if self.common_range:  # the table's first and last day as gaps: one grid for all
            before = [self.first_date] if dates[0] > self.first_date else []
            after = [self.last_date] if dates[-1] < self.last_date else []
            gap = np.full((1, *bands.shape[1:]), np.nan, dtype=bands.dtype)
            bands = np.concatenate([gap] * len(before) + [bands] + [gap] * len(after))
            dates = before + dates + after
        valid = self._usable(bands[:, self._used])  # (T', 1, 1)
        label = self._labels[index]
        return TimeSeriesPatch(
            patch_id=self._ids[index],
            bands=bands,
            band_names=list(self.band_names),
            dates=dates,
            dataset=self.dataset,
            split=self._splits[index],
            labels=None if label < 0 else np.full((1, 1), label, dtype=np.int64),
            valid=valid,
            dn_scale=self.dn_scale,
            dn_offset=self.dn_offset,
            meta={
                "path": str(self._where[index]),
                "group": self._groups[index] or None,
                "same_day_merged": merge.merged,
            },
            has_image=False,
        )

    def __iter__(self) -> Iterator[TimeSeriesPatch]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (
            f"PointSeriesSource({len(self.paths)} table(s), {len(self)} samples, "
            f"bands {self.band_names}, {len(self.classes)} classes)"
        )
