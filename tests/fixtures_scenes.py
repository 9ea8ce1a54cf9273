"""Fixture writers for the scene datasets: EuroSAT, SEN12MS, and reBEN as GeoTIFFs.

Each writer produces the real on-disk layout (folder and file names, dtypes,
band counts, GeoTIFF georeferencing tags) with synthetic values, so the real
reader code is what tests and quick starts run. Values carry a class signal
(per-class spectra and backscatter) so a model can learn something from them.
`write_reben_geotiff` instead converts real LMDB-encoded reBEN patches (e.g.
configilm's 24 mock patches) to the release's per-band GeoTIFF folders.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pimc_dist.sources import eurosat, reben, sen12ms
from pimc_dist.sources.tiff_io import write_geotiff

# Rough top-of-atmosphere reflectance of a few surface types over the 13 S2
# bands in standard order (B01-B08, B8A, B09, B10, B11, B12).
_SPECTRA = {
    "water": [0.10, 0.08, 0.06, 0.04, 0.03, 0.02, 0.02, 0.02, 0.02, 0.01, 0.002, 0.01, 0.005],
    "forest": [0.08, 0.06, 0.05, 0.03, 0.07, 0.22, 0.28, 0.30, 0.31, 0.10, 0.004, 0.14, 0.06],
    "crop": [0.09, 0.07, 0.08, 0.06, 0.11, 0.25, 0.31, 0.33, 0.35, 0.11, 0.005, 0.22, 0.12],
    "grass": [0.09, 0.07, 0.07, 0.06, 0.10, 0.20, 0.24, 0.26, 0.27, 0.09, 0.005, 0.24, 0.14],
    "bare": [0.13, 0.12, 0.14, 0.18, 0.21, 0.24, 0.26, 0.27, 0.28, 0.10, 0.006, 0.34, 0.27],
    "urban": [0.14, 0.13, 0.13, 0.14, 0.15, 0.17, 0.18, 0.19, 0.19, 0.08, 0.006, 0.22, 0.19],
    "snow": [0.80, 0.78, 0.77, 0.75, 0.74, 0.70, 0.68, 0.66, 0.64, 0.30, 0.020, 0.08, 0.06],
    "shrub": [0.10, 0.08, 0.09, 0.09, 0.13, 0.18, 0.21, 0.22, 0.23, 0.08, 0.005, 0.27, 0.18],
    "wetland": [0.09, 0.07, 0.06, 0.05, 0.07, 0.13, 0.16, 0.17, 0.17, 0.06, 0.004, 0.10, 0.05],
}
_EUROSAT_SURFACE = {
    "AnnualCrop": "crop",
    "Forest": "forest",
    "HerbaceousVegetation": "grass",
    "Highway": "urban",
    "Industrial": "urban",
    "Pasture": "grass",
    "PermanentCrop": "shrub",
    "Residential": "urban",
    "River": "water",
    "SeaLake": "water",
}
_SEN12MS_SURFACE = (  # per simplified class, sen12ms.CLASSES order
    "forest", "shrub", "grass", "grass", "wetland", "crop", "urban", "snow", "bare", "water",
)  # fmt: skip
_SEN12MS_VV_DB = (-8.0, -10.0, -11.0, -12.0, -14.0, -11.0, -4.0, -9.0, -13.0, -21.0)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random field in about [-1, 1], so images are not pure noise."""
    coarse = rng.standard_normal((size // 8 + 2, size // 8 + 2))
    field = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    return np.clip(field / 2.0, -1.0, 1.0)


def _eurosat_reflectance(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    """(13, size, size) reflectance in standard band order for one EuroSAT class."""
    # Classes sharing a surface type (e.g. Highway, Industrial, Residential) differ by brightness.
    surface = _EUROSAT_SURFACE[cls]
    same_surface = [c for c in eurosat.CLASSES if _EUROSAT_SURFACE[c] == surface]
    gain = 1.0 + 0.2 * same_surface.index(cls)
    spectrum = np.array(_SPECTRA[surface])
    texture = _texture(rng, size)
    noise = rng.normal(0.0, 0.02, (13, size, size))
    return spectrum[:, None, None] * gain * (1.0 + 0.2 * texture[None] + noise)


def write_eurosat(
    root: str | os.PathLike,
    *,
    per_class: int = 3,
    multispectral: bool = True,
    rgb: bool = True,
    size: int = 64,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Write a small EuroSAT (MS GeoTIFFs, RGB JPEGs, split files); return split -> jpg names.

    Splits take 60/20/20 % of each class (at least one image in val and test
    once a class has three images), like the official 16,200/5,400/5,400.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {s: [] for s in eurosat.SPLITS}
    for c, cls in enumerate(eurosat.CLASSES):
        n_eval = max(1, round(0.2 * per_class)) if per_class >= 3 else 0
        order = rng.permutation(per_class)
        for k in range(per_class):
            name = f"{cls}_{k + 1}"
            refl = _eurosat_reflectance(rng, cls, size)
            if multispectral:
                dn = np.clip(refl * 10000.0, 0, 65535).astype(np.uint16)
                write_geotiff(
                    root / eurosat.MS_DIR / cls / f"{name}.tif",
                    eurosat.reorder_bands(dn, eurosat.STANDARD_BANDS, eurosat.FILE_BANDS),
                    epsg=32631 + c % 5,
                    origin=(400000.0 + 1000.0 * k, 5500000.0 - 1000.0 * c),
                    pixel_size=10.0,
                )
            if rgb:
                red_green_blue = refl[[3, 2, 1]]  # B04, B03, B02
                rgb8 = np.clip(red_green_blue / 0.3 * 255.0, 0, 255).astype(np.uint8)
                path = root / eurosat.RGB_DIR / cls / f"{name}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb8.transpose(1, 2, 0)).save(path, quality=95)
            rank = order[k]
            split = "val" if rank < n_eval else "test" if rank < 2 * n_eval else "train"
            splits[split].append(f"{name}.jpg")
    for split, names in splits.items():
        eurosat.split_file(root, split).write_text("".join(f"{n}\n" for n in names))
    return splits


def _sen12ms_igbp(rng: np.random.Generator, size: int) -> np.ndarray:
    """IGBP map (values 1-17) of 1-3 classes in coarse blocks, like the upsampled 500 m MODIS map."""
    classes = rng.choice(np.arange(1, 18), size=rng.integers(1, 4), replace=False)
    block = max(1, size // 4)
    coarse = rng.choice(classes, size=(size // block + 1, size // block + 1))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:size, :size]


def write_sen12ms(
    root: str | os.PathLike,
    *,
    scenes: Sequence[tuple[str, int]] = (
        ("ROIs1158_spring", 1),
        ("ROIs1868_summer", 2),
        ("ROIs1970_fall", 3),
        ("ROIs2017_winter", 4),
    ),
    patches_per_scene: int = 2,
    size: int = 64,
    seed: int = 0,
) -> list[str]:
    """Write SEN12MS triplets (s1, s2, lc GeoTIFFs) for `scenes`; return the patch ids.

    Real patches are 256 px; the default here is 64 to keep tests fast. Patch
    numbers step by 3 (p1, p4, p7, ...) like the gaps in the real numbering.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ids = []
    for s, (season, scene) in enumerate(scenes):
        if season not in sen12ms.SEASONS:
            raise ValueError(f"unknown season {season!r}; expected one of {sen12ms.SEASONS}")
        for k in range(patches_per_scene):
            patch = 1 + 3 * k
            igbp = _sen12ms_igbp(rng, size)
            simple = sen12ms.IGBP_TO_SIMPLIFIED[igbp]
            spectra = np.array([_SPECTRA[_SEN12MS_SURFACE[c]] for c in range(10)])  # (10, 13)
            texture = _texture(rng, size)
            refl = spectra[simple].transpose(2, 0, 1) * (1.0 + 0.1 * texture[None])
            refl += rng.normal(0.0, 0.01, refl.shape)
            s2 = np.clip(refl * 10000.0, 0, 65535).astype(np.uint16)
            vv = np.array(_SEN12MS_VV_DB)[simple] + 1.5 * rng.standard_normal((size, size))
            vh = vv - 7.0 + 1.0 * rng.standard_normal((size, size))
            s1 = np.stack([vv, vh]).astype(np.float32)
            lccs = [(igbp * m + o) % 40 + 1 for m, o in ((2, 1), (3, 5), (1, 11))]
            lc = np.stack([igbp, *lccs]).astype(np.uint16)
            geo = {
                "epsg": 32601 + (7 * s + scene) % 60,
                "origin": (300000.0 + 2560.0 * patch, 4000000.0 + 2560.0 * scene),
                "pixel_size": 10.0,
            }
            paths = sen12ms.triplet_paths(root, season, scene, patch)
            write_geotiff(paths["s2"], s2, **geo)
            write_geotiff(paths["s1"], s1, **geo)
            write_geotiff(paths["lc"], lc, **geo)
            ids.append(sen12ms.patch_id(season, scene, patch))
    return ids


def write_reben_geotiff(
    src_root: str | os.PathLike,
    dst_root: str | os.PathLike,
    patch_ids: Sequence[str] | None = None,
) -> list[str]:
    """Copy reBEN patches from an LMDB-encoded `src_root` to the GeoTIFF layout in `dst_root`.

    Writes `BigEarthNet-S2/...` and `BigEarthNet-S1/...` band files at their
    native sizes and the two metadata parquets restricted to the copied
    patches; returns the copied patch ids.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = reben.BigEarthNetV2Source(src_root, encoding="lmdb")
    dst_root = Path(dst_root)
    wanted = set(src.ids if patch_ids is None else patch_ids)
    unknown = wanted - set(src.ids)
    if unknown:
        raise ValueError(f"patches not in {src_root}: {sorted(unknown)}")
    for index, pid in enumerate(src.ids):
        if pid not in wanted:
            continue
        s2, s1 = src.read_bands(index)
        row = src.rows[index]
        target = reben.geotiff_band_paths(dst_root, row["patch_id"], row["s1_name"])
        for band, array in {**s2, **s1}.items():
            write_geotiff(
                target[band],
                array,
                epsg=32633,
                origin=(500000.0, 5000000.0),
                pixel_size=1200.0 / array.shape[0],
                compression="zlib",
            )
    for name in (reben.METADATA_FILE, reben.SNOW_CLOUD_FILE):
        path = Path(src_root) / name
        if path.is_file():
            table = pq.read_table(path)  # keeps every column and the schema, even with 0 rows
            keep = pa.array([pid in wanted for pid in table.column("patch_id").to_pylist()])
            pq.write_table(table.filter(keep), dst_root / name)
    return sorted(wanted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fixtures_scenes",
        description="Write a synthetic EuroSAT or SEN12MS dataset in the real layout, or copy "
        "real LMDB-encoded reBEN patches to the per-band GeoTIFF layout.",
        epilog="examples:\n"
        "  python -m fixtures_scenes eurosat --out /tmp/EuroSAT --per-class 5\n"
        "  python -m fixtures_scenes sen12ms --out /tmp/SEN12MS --size 64\n"
        "  python -m fixtures_scenes reben-geotiff --src <reBEN root> "
        "--out /tmp/reBEN-tif",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=["eurosat", "sen12ms", "reben-geotiff"])
    parser.add_argument("--out", required=True, help="folder to write (becomes the dataset root)")
    parser.add_argument("--per-class", type=int, default=3, help="EuroSAT images per class")
    parser.add_argument(
        "--patches-per-scene", type=int, default=2, help="SEN12MS patches per scene"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in px (default 64; real: EuroSAT 64, SEN12MS 256)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--src", help="reben-geotiff: LMDB-encoded reBEN root (default: configilm's)"
    )
    args = parser.parse_args(argv)
    if args.dataset == "eurosat":
        splits = write_eurosat(
            args.out, per_class=args.per_class, size=args.size or 64, seed=args.seed
        )
        counts = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        print(f"wrote EuroSAT ({counts}) to {args.out}")
    elif args.dataset == "sen12ms":
        ids = write_sen12ms(
            args.out, patches_per_scene=args.patches_per_scene, size=args.size or 64, seed=args.seed
        )
        print(f"wrote {len(ids)} SEN12MS triplets to {args.out}")
    else:
        src = args.src or reben.configilm_mock_root()
        if src is None:
            parser.error("--src is required (configilm's mock reBEN data is not installed)")
        ids = write_reben_geotiff(src, args.out)
        print(f"wrote {len(ids)} reBEN patches as GeoTIFFs to {args.out}")


if __name__ == "__main__":
    main()
