"""SEN12MS (Schmitt et al. 2019; CC-BY-4.0).

180,662 co-registered triplets of 256x256 px at 10 m: Sentinel-1 GRD,
Sentinel-2 L1C and MODIS land cover, from 252 scenes in four seasons.

Layout under `root`:

    ROIs<season>/{s1,s2,lc}_<scene>/ROIs<season>_<s1|s2|lc>_<scene>_p<n>.tif

with seasons `ROIs1158_spring`, `ROIs1868_summer`, `ROIs1970_fall`,
`ROIs2017_winter`. Files (GeoTIFF):

- s2: 13 bands B01-B08, B8A, B09, B10, B11, B12 (L1C digital numbers, uint16).
- s1: 2 bands VV, VH (sigma nought backscatter in dB, float32).
- lc: 4 layers (uint16): IGBP (values 1-17) first, then LCCS land cover,
  LCCS land use, LCCS surface hydrology.

Labels: the authors' multi-label benchmark (schmitt-muc/SEN12MS,
classification/dataset.py) sums the per-patch IGBP class fractions into the
simplified 10-class scheme and marks a class present when its fraction is
`>= threshold`, with threshold 0.1. We compute the fractions from the IGBP
layer's pixels (the authors ship them precomputed in a pickle); pixels outside
1-17 are left out of the fractions and counted in `meta["igbp_invalid_pixels"]`.

Splits: the authors' lists (`val_list.txt`, `test_list.txt`, from
schmitt-muc/SEN12MS `splits/`, copied into `root`) of S2 file names; "train"
is every other patch unless a `train_list.txt` is there.

Records carry S2 as the L1C digital numbers of the file (uint16; reflectance =
DN / 10000, the record's `s2_dn_scale`) and S1 as dB (float32);
`normalize_s2` (on reflectance) / `normalize_s1` are the authors' usual
preprocessing. The one
known broken sample (`ROIs1868_summer_s2_146_p202`, NaN in S1, also dropped by
the authors) is left out by default; any other non-finite S1 raises.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pimc_dist.sources.base import MultimodalPatch, SourceError, expected_image_shape
from pimc_dist.sources.tiff_io import read_tiff, tiff_shape

SEASONS: tuple[str, ...] = (
    "ROIs1158_spring",
    "ROIs1868_summer",
    "ROIs1970_fall",
    "ROIs2017_winter",
)
S2_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
S1_BANDS: tuple[str, ...] = ("VV", "VH")
LC_LAYERS: tuple[str, ...] = ("IGBP", "LCCS_LC", "LCCS_LU", "LCCS_SH")
IGBP_CLASSES: tuple[str, ...] = (
    "Evergreen Needleleaf Forests",  # 1
    "Evergreen Broadleaf Forests",
    "Deciduous Needleleaf Forests",
    "Deciduous Broadleaf Forests",
    "Mixed Forests",  # 5
    "Closed Shrublands",
    "Open Shrublands",
    "Woody Savannas",
    "Savannas",
    "Grasslands",  # 10
    "Permanent Wetlands",
    "Croplands",
    "Urban and Built-Up Lands",
    "Cropland/Natural Vegetation Mosaics",
    "Permanent Snow and Ice",  # 15
    "Barren",
    "Water Bodies",  # 17
)
CLASSES: tuple[str, ...] = (
    "Forest",
    "Shrubland",
    "Savanna",
    "Grassland",
    "Wetland",
    "Cropland",
    "Urban/Built-up",
    "Snow/Ice",
    "Barren",
    "Water",
)
# IGBP value (index) -> simplified class index; -1 for values outside 1-17.
IGBP_TO_SIMPLIFIED = np.array(
    [-1, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9], dtype=np.int64
)
BROKEN_PATCHES: tuple[str, ...] = ("ROIs1868_summer_146_p202",)
DEFAULT_THRESHOLD = 0.1
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_LIST = "{}_list.txt"

_S2_FILE = re.compile(r"^(?P<season>ROIs\d{4}_[a-z]+)_s2_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$")
_ID = re.compile(
    r"^(?P<season>ROIs\d{4}_[a-z]+)_(?:s[12]_|lc_)?(?P<scene>\d+)_p(?P<patch>\d+)(\.tif)?$"
)


def normalize_s2(reflectance: np.ndarray) -> np.ndarray:
    """Authors' S2 scaling: clip DN to [0, 10000] / 10000, i.e. reflectance clipped to [0, 1]."""
    return np.clip(reflectance, 0.0, 1.0).astype(np.float32)


def normalize_s1(db: np.ndarray) -> np.ndarray:
    """Authors' S1 scaling: NaN -> 0, clip dB to [-25, 0], / 25 + 1 (so into [0, 1])."""
    return (np.clip(np.nan_to_num(db), -25.0, 0.0) / 25.0 + 1.0).astype(np.float32)


def igbp_fractions(igbp: np.ndarray) -> tuple[np.ndarray, int]:
    """Fraction of valid pixels per IGBP class 1-17 -> ((17,) float64, invalid pixel count)."""
    counts = np.bincount(igbp.ravel().astype(np.int64).clip(0, 18), minlength=19)
    valid = counts[1:18]
    invalid = int(counts[0] + counts[18])
    total = valid.sum()
    return (valid / total if total else np.zeros(17)), invalid


def simplified_fractions(igbp_frac: np.ndarray) -> np.ndarray:
    """Sum 17 IGBP fractions into the 10 simplified classes (authors' grouping)."""
    out = np.zeros(len(CLASSES))
    np.add.at(out, IGBP_TO_SIMPLIFIED[1:], igbp_frac)
    return out


def multi_hot(fractions: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """(10,) uint8: classes whose fraction is >= threshold."""
    return (fractions >= threshold).astype(np.uint8)


def patch_id(season: str, scene: int, patch: int) -> str:
    """Modality-free id `ROIs1158_spring_<scene>_p<n>` of one triplet."""
    return f"{season}_{scene}_p{patch}"


def triplet_paths(root: str | os.PathLike, season: str, scene: int, patch: int) -> dict[str, Path]:
    """Paths of the s1, s2 and lc files of one triplet."""
    base = Path(root) / season
    return {
        m: base / f"{m}_{scene}" / f"{season}_{m}_{scene}_p{patch}.tif" for m in ("s1", "s2", "lc")
    }


def _parse_seasons(seasons: Sequence[str] | None) -> tuple[str, ...]:
    if seasons is None:
        return SEASONS
    out = []
    for s in seasons:
        match = [full for full in SEASONS if s in (full, full.split("_", 1)[1])]
        if not match:
            raise ValueError(f"unknown SEN12MS season {s!r}; expected one of {SEASONS}")
        out.append(match[0])
    return tuple(out)


class Sen12MSSource:
    """SEN12MS triplets as `MultimodalPatch` records with simplified-IGBP multi-labels.

    `seasons`: subset of `SEASONS` (full names or "spring", "summer", ...);
    with None, every season folder present is read.

    `split` ("train", "val", "test") keeps the patches of the authors' split
    list `root/<split>_list.txt` (S2 file names such as
    `ROIs1158_spring_s2_1_p30.tif`, from schmitt-muc/SEN12MS `splits/`); with
    no `train_list.txt`, "train" is every patch in neither `val_list.txt` nor
    `test_list.txt` (how the authors built it). `split_file` names a list
    explicitly instead.

    Every image must be `image_size` px square (256 in the release); None takes
    the size of the first S2 file in reading order. A file of another size
    raises SourceError naming it and its shape.
    """

    dataset = "sen12ms"
    classes = CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        seasons: Sequence[str] | None = None,
        label_threshold: float = DEFAULT_THRESHOLD,
        split: str | None = None,
        split_file: str | os.PathLike | None = None,
        drop_known_broken: bool = True,
        image_size: int | None = None,
    ) -> None:
        if not 0.0 < label_threshold <= 1.0:
            raise ValueError(f"label_threshold must be in (0, 1], not {label_threshold}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown SEN12MS split {split!r}; expected one of {SPLITS}")
        self.root = Path(root)
        self.label_threshold = float(label_threshold)
        self.split = split
        self.seasons = _parse_seasons(seasons)
        if not self.root.is_dir():
            raise SourceError(self.root, "SEN12MS root folder not found")
        triplets = self._scan(explicit=seasons is not None)
        if split_file is not None:
            triplets = self._keep_listed(triplets, Path(split_file))
        elif split is not None:
            listed = self.root / SPLIT_LIST.format(split)
            others = [self.root / SPLIT_LIST.format(s) for s in ("val", "test")]
            if listed.is_file() or split != "train":
                triplets = self._keep_listed(triplets, listed)
            elif all(p.is_file() for p in others):
                held_out = set().union(*(self._read_split_file(p) for p in others))
                triplets = [t for t in triplets if patch_id(*t) not in held_out]
            else:
                raise SourceError(listed, "split list not found, nor val_list.txt + test_list.txt")
        if drop_known_broken:
            triplets = [t for t in triplets if patch_id(*t) not in BROKEN_PATCHES]
        self.triplets: list[tuple[str, int, int]] = triplets
        self.ids: list[str] = [patch_id(*t) for t in triplets]
        self.image_shape = expected_image_shape(
            image_size, (self.paths(i)["s2"] for i in range(len(self))), tiff_shape
        )

    def _keep_listed(self, triplets: list[tuple[str, int, int]], path: Path) -> list:
        wanted = self._read_split_file(path)
        found = {patch_id(*t) for t in triplets}
        in_seasons = {w for w in wanted if _ID.match(w)["season"] in self.seasons}
        missing = sorted(in_seasons - found - set(BROKEN_PATCHES))
        if missing:
            raise SourceError(path, f"{len(missing)} listed patches not found, e.g. {missing[0]}")
        return [t for t in triplets if patch_id(*t) in wanted]

    def _scan(self, explicit: bool) -> list[tuple[str, int, int]]:
        triplets = []
        for season in self.seasons:
            season_dir = self.root / season
            if not season_dir.is_dir():
                if explicit:
                    raise SourceError(season_dir, "season folder not found")
                continue
            found = []
            for scene_dir in season_dir.glob("s2_*"):
                for path in scene_dir.iterdir():
                    match = _S2_FILE.match(path.name)
                    if match and match["season"] == season:
                        found.append((season, int(match["scene"]), int(match["patch"])))
            for t in found:
                for modality, path in triplet_paths(self.root, *t).items():
                    if not path.is_file():
                        raise SourceError(path, f"{modality} file of {patch_id(*t)} missing")
            triplets += sorted(found)
        if not triplets:
            raise SourceError(self.root, f"no SEN12MS s2 patches under {list(self.seasons)}")
        return triplets

    @staticmethod
    def _read_split_file(path: Path) -> set[str]:
        if not path.is_file():
            raise SourceError(path, "split file not found")
        wanted = set()
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            match = _ID.match(line)
            if not match:
                raise SourceError(path, f"line {line_no}: {line!r} is not a SEN12MS patch name")
            wanted.add(patch_id(match["season"], int(match["scene"]), int(match["patch"])))
        return wanted

    def paths(self, index: int) -> dict[str, Path]:
        """s1, s2 and lc files of record `index`."""
        return triplet_paths(self.root, *self.triplets[index])

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, index: int) -> MultimodalPatch:
        season, scene, patch = self.triplets[index]
        paths = self.paths(index)
        size = self.image_shape
        s2 = read_tiff(paths["s2"], bands=len(S2_BANDS), dtype=np.uint16, size=size)
        s1 = read_tiff(paths["s1"], bands=len(S1_BANDS), dtype=np.float32, size=size)
        lc = read_tiff(paths["lc"], bands=len(LC_LAYERS), size=size)
        if not np.issubdtype(lc.dtype, np.integer):
            raise SourceError(paths["lc"], f"expected integer land cover, found {lc.dtype}")
        if not np.isfinite(s1).all():
            raise SourceError(paths["s1"], "holds NaN or infinite values")
        igbp_frac, invalid = igbp_fractions(lc[0])
        if invalid == lc[0].size:
            raise SourceError(paths["lc"], "IGBP layer has no value in 1-17")
        simple = simplified_fractions(igbp_frac)
        labels = multi_hot(simple, self.label_threshold)
        return MultimodalPatch(
            patch_id=patch_id(season, scene, patch),
            s2=s2,
            s2_bands=list(S2_BANDS),
            s2_dn_scale=10000.0,
            s1=s1,
            s1_bands=list(S1_BANDS),
            labels=labels,
            dataset=self.dataset,
            split=self.split,
            meta={
                "season": season,
                "scene": scene,
                "patch": patch,
                "igbp_fractions": igbp_frac.round(6).tolist(),
                "class_fractions": simple.round(6).tolist(),
                "igbp_invalid_pixels": invalid,
                "label_names": [CLASSES[i] for i in np.flatnonzero(labels)],
            },
        )

    def __iter__(self) -> Iterator[MultimodalPatch]:
        for index in range(len(self)):
            yield self[index]
