"""EuroSAT scene classification (Helber et al. 2019; MIT licence).

27,000 Sentinel-2 L1C patches of 64x64 px at 10 m, one land-use class each.

Layout under `root` (the archives' own folder names):

- multispectral (EuroSATallBands.zip):
  `ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<n>.tif`,
  13-band uint16 GeoTIFF (digital numbers, reflectance x 10000). Band order IN
  THE FILE is B01-B08, B09, B10, B11, B12 and then B8A LAST (as torchgeo lists
  it); `reorder_bands` puts it in the standard order B01-B08, B8A, B09-B12.
- RGB (EuroSAT.zip): `2750/<Class>/<Class>_<n>.jpg`, 8-bit B04, B03, B02.
- splits (Neumann et al., as torchgeo uses them): `eurosat-{train,val,test}.txt`,
  16,200 / 5,400 / 5,400 lines, each an image name `<Class>_<n>.jpg` (mapped to
  `.tif` for the multispectral images; `.tif` lines are accepted too).

Labels are indices into `CLASSES`, the alphabetical folder order (torchgeo's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pimc_dist.sources.base import ScenePatch, SourceError, expected_image_shape
from pimc_dist.sources.tiff_io import read_tiff, tiff_shape

CLASSES: tuple[str, ...] = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
FILE_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A",
)  # fmt: skip
STANDARD_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
MS_DIR = os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif")
RGB_DIR = "2750"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILE = "eurosat-{}.txt"

_NAME = re.compile(r"^(?P<cls>[A-Za-z]+)_(?P<n>\d+)$")


def reorder_bands(
    image: np.ndarray,
    band_names: list[str] | tuple[str, ...],
    order: tuple[str, ...] = STANDARD_BANDS,
) -> np.ndarray:
    """Return `image` (C, H, W) with its bands in `order` (default: standard S2 order)."""
    index = {name: i for i, name in enumerate(band_names)}
    missing = [b for b in order if b not in index]
    if missing:
        raise ValueError(f"bands {missing} not in {list(band_names)}")
    return image[[index[b] for b in order]]


def split_file(root: str | os.PathLike, split: str) -> Path:
    """Path of the official split list for `split` ("train", "val" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"unknown EuroSAT split {split!r}; expected one of {SPLITS}")
    return Path(root) / SPLIT_FILE.format(split)


class EuroSATSource:
    """EuroSAT images as `ScenePatch` records (random access and iteration).

    `multispectral=True` reads the 13-band GeoTIFFs (uint16 digital numbers,
    bands in FILE order unless `band_order="standard"`); False reads the RGB
    JPEGs (uint8, B04 B03 B02). `split=None` takes every image in the class
    folders; otherwise the official split list, whose every entry must exist.
    `image_dir` (relative to `root`, or absolute) replaces the archive's folder
    for re-packaged copies such as `EuroSAT_MS/` or `EuroSAT_RGB/`.
    Every image must be `image_size` px square (64 in the release); None takes
    the size of the first image in reading order. Reading an image of another
    size raises SourceError naming the file and its shape.
    """

    dataset = "eurosat"
    classes = CLASSES

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: str | None = None,
        multispectral: bool = True,
        band_order: str = "file",
        image_dir: str | os.PathLike | None = None,
        image_size: int | None = None,
    ) -> None:
        if band_order not in ("file", "standard"):
            raise ValueError(f"band_order must be 'file' or 'standard', not {band_order!r}")
        self.root = Path(root)
        self.split = split
        self.multispectral = multispectral
        self.band_order = band_order
        default_dir = MS_DIR if multispectral else RGB_DIR
        self.image_dir = self.root / (default_dir if image_dir is None else image_dir)
        self.suffix = ".tif" if multispectral else ".jpg"
        if not self.image_dir.is_dir():
            raise SourceError(self.image_dir, "EuroSAT image folder not found")
        names = self._names_from_split(split) if split else self._names_from_folders()
        self.ids: list[str] = [name for name, _ in names]
        self.labels: list[int] = [label for _, label in names]
        if multispectral:
            self.band_names = list(FILE_BANDS if band_order == "file" else STANDARD_BANDS)
        else:
            self.band_names = list(RGB_BANDS)
        read_shape = tiff_shape if multispectral else _jpeg_shape
        self.image_shape = expected_image_shape(
            image_size, (self.path(i) for i in range(len(self))), read_shape
        )

    def _names_from_folders(self) -> list[tuple[str, int]]:
        names = []
        for label, cls in enumerate(CLASSES):
            folder = self.image_dir / cls
            if not folder.is_dir():
                raise SourceError(folder, "class folder missing")
            numbered = []
            for p in folder.iterdir():
                match = _NAME.match(p.stem)
                if p.suffix == self.suffix and match and match["cls"] == cls:
                    numbered.append((int(match["n"]), p.stem))
            names += [(stem, label) for _, stem in sorted(numbered)]
        return names

    def _names_from_split(self, split: str) -> list[tuple[str, int]]:
        path = split_file(self.root, split)
        if not path.is_file():
            raise SourceError(path, f"split file for {split!r} not found")
        names = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            stem, ext = os.path.splitext(line)
            match = _NAME.match(stem)
            if ext not in (".jpg", ".tif") or not match or match["cls"] not in CLASSES:
                raise SourceError(path, f"line {line_no}: {line!r} is not <Class>_<n>.jpg")
            image = self.image_dir / match["cls"] / (stem + self.suffix)
            if not image.is_file():
                raise SourceError(image, f"listed in {path.name} line {line_no} but missing")
            names.append((stem, CLASSES.index(match["cls"])))
        return names

    def path(self, index: int) -> Path:
        """File of record `index`."""
        name = self.ids[index]
        return self.image_dir / CLASSES[self.labels[index]] / (name + self.suffix)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> ScenePatch:
        path = self.path(index)
        if self.multispectral:
            image = read_tiff(path, bands=len(FILE_BANDS), dtype=np.uint16, size=self.image_shape)
            if self.band_order == "standard":
                image = reorder_bands(image, FILE_BANDS)
        else:
            image = read_rgb(path, size=self.image_shape)
        return ScenePatch(
            patch_id=self.ids[index],
            image=image,
            band_names=list(self.band_names),
            label=self.labels[index],
            dataset=self.dataset,
            split=self.split,
            meta={
                "class_name": CLASSES[self.labels[index]],
                "file": str(path.relative_to(self.root)),
            },
        )

    def __iter__(self) -> Iterator[ScenePatch]:
        for index in range(len(self)):
            yield self[index]


def _jpeg_shape(path: str | os.PathLike) -> tuple[int, int]:
    with Image.open(path) as img:
        width, height = img.size
    return int(height), int(width)


def read_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an 8-bit RGB image (JPEG/PNG) as a (3, H, W) uint8 array; (H, W) must be `size` if given."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()  # decodes now, so a truncated JPEG fails here
            if img.mode != "RGB":
                raise SourceError(path, f"expected an RGB image, found mode {img.mode}")
            array = np.asarray(img)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if size is not None and array.shape[:2] != tuple(size):
        raise SourceError(path, f"expected {size[0]}x{size[1]} pixels, found {array.shape[:2]}")
    return np.ascontiguousarray(array.transpose(2, 0, 1))
