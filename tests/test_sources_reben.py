"""reBEN (BigEarthNet v2) reader on the 24 real patches shipped in the configilm wheel."""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from fixtures_scenes import write_reben_geotiff
from safetensors.numpy import load as load_safetensors

from pimc_dist.sources import reben
from pimc_dist.sources.base import SourceError
from pimc_dist.sources.tiff_io import write_geotiff

MOCK = reben.configilm_mock_root()
pytestmark = pytest.mark.skipif(
    MOCK is None, reason="configilm mock data missing: pip install --no-deps configilm==0.7.1"
)


def _metadata_rows() -> list[dict]:
    rows = pq.read_table(MOCK / reben.METADATA_FILE).to_pylist()
    return rows + pq.read_table(MOCK / reben.SNOW_CLOUD_FILE).to_pylist()


def _raw(key: str) -> dict[str, np.ndarray]:
    """One safetensors blob straight from the mock LMDB (py-lmdb allows one handle per process)."""
    with reben.open_lmdb(MOCK / reben.LMDB_DIR).begin() as txn:
        return load_safetensors(txn.get(key.encode()))


def _copy_dataset(dst, *, lmdb=True):
    dst.mkdir(parents=True, exist_ok=True)
    for name in (reben.METADATA_FILE, reben.SNOW_CLOUD_FILE):
        shutil.copy(MOCK / name, dst / name)
    if lmdb:
        shutil.copytree(MOCK / reben.LMDB_DIR, dst / reben.LMDB_DIR)
    return dst


def _rewrite_lmdb(dst, change):
    """Copy the mock LMDB into `dst`, passing every (key, value) through `change` (None drops)."""
    import lmdb

    env = lmdb.open(str(dst / reben.LMDB_DIR), map_size=64 << 20)
    with reben.open_lmdb(MOCK / reben.LMDB_DIR).begin() as src, env.begin(write=True) as txn:
        for key, value in src.cursor():
            new = change(key.decode(), bytes(value))
            if new is not None:
                txn.put(key, new)
    env.close()


@pytest.fixture(scope="module")
def records():
    return list(reben.BigEarthNetV2Source(MOCK))


def test_reads_all_24_real_patches_as_12_band_s2_and_vv_vh_s1(records):
    assert len(records) == 24
    ids = [r.patch_id for r in records]
    assert ids == sorted(ids) and len(set(ids)) == 24
    for r in records:
        assert r.s2.shape == (12, 120, 120) and r.s2.dtype == np.uint16  # the stored DN
        assert r.s1.shape == (2, 120, 120) and r.s1.dtype == np.float32
        assert r.s2_bands == list(reben.S2_BANDS) and "B10" not in r.s2_bands
        assert r.s1_bands == ["VV", "VH"]
        assert r.labels.shape == (19,) and r.labels.dtype == np.uint8 and r.labels.sum() >= 1
        assert r.s2_dn_scale == 10000.0 and 0.0 < r.s2.mean() / r.s2_dn_scale < 1.0
        assert -40.0 < r.s1.mean() < 5.0  # backscatter in dB
        assert r.dataset == "reben"


def test_label_vectors_match_metadata_label_names(records):
    by_id = {row["patch_id"]: row for row in _metadata_rows()}
    for r in records:
        row = by_id[r.patch_id]
        assert {reben.CLASSES[i] for i in np.flatnonzero(r.labels)} == set(row["labels"])
        assert r.meta["s1_name"] == row["s1_name"] and r.meta["country"] == row["country"]


def test_class_order_is_the_nomenclature_order_not_configilms_alphabetical_default():
    source = (MOCK.parents[2] / "extra" / "BENv2_utils.py").read_text()
    tree = ast.parse(source)
    original = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and getattr(node.targets[0], "id", None) == "NEW_LABELS_ORIGINAL_ORDER"
    )
    assert reben.CLASSES == tuple(original)
    assert list(reben.CLASSES) != sorted(reben.CLASSES)


def test_splits_have_eight_patches_each_six_without_snow_and_cloud():
    sizes = {s: len(reben.BigEarthNetV2Source(MOCK, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 8, "test": 8}
    clean = {
        s: reben.BigEarthNetV2Source(MOCK, split=s, drop_snow_cloud=True).ids
        for s in ("train", "validation", "test")
    }
    assert [len(v) for v in clean.values()] == [6, 6, 6]
    flagged = {row["patch_id"] for row in pq.read_table(MOCK / reben.SNOW_CLOUD_FILE).to_pylist()}
    assert len(flagged) == 6 and not flagged & {i for ids in clean.values() for i in ids}
    val = reben.BigEarthNetV2Source(MOCK, split="val")
    assert val.ids == reben.BigEarthNetV2Source(MOCK, split="validation").ids
    assert {val[i].split for i in range(len(val))} == {"val"}


def test_s2_is_the_stored_dn_with_nearest_upsampling_by_pixel_repetition(records):
    record = records[0]
    raw = _raw(record.patch_id)
    for band, factor in (("B02", 1), ("B05", 2), ("B01", 6), ("B12", 2), ("B09", 6)):
        expected = np.kron(raw[band], np.ones((factor, factor), np.uint16))
        got = record.s2[record.s2_bands.index(band)]
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, expected)
    s1 = _raw(record.meta["s1_name"])
    np.testing.assert_array_equal(record.s1, np.stack([s1["VV"], s1["VH"]]))


def test_bilinear_keeps_10m_bands_and_preserves_band_means(records):
    nearest = records[3]
    src = reben.BigEarthNetV2Source(MOCK, resample="bilinear")
    bilinear = src[src.ids.index(nearest.patch_id)]
    b02, b05 = reben.S2_BANDS.index("B02"), reben.S2_BANDS.index("B05")
    assert bilinear.s2.dtype == np.float32  # interpolated DN: not rounded back to uint16
    np.testing.assert_array_equal(bilinear.s2[b02], nearest.s2[b02])
    assert not np.array_equal(bilinear.s2[b05], nearest.s2[b05])
    np.testing.assert_allclose(
        bilinear.s2.mean(axis=(1, 2)), nearest.s2.mean(axis=(1, 2), dtype=np.float64), rtol=0.02
    )


def test_other_grid_sizes_resample_s2_and_s1_together(records):
    src = reben.BigEarthNetV2Source(MOCK, s2_size=60)
    record = src[src.ids.index(records[0].patch_id)]
    assert record.s2.shape == (12, 60, 60) and record.s1.shape == (2, 60, 60)
    raw = _raw(record.patch_id)
    b05 = reben.S2_BANDS.index("B05")
    np.testing.assert_array_equal(record.s2[b05], raw["B05"])  # native 60 px


def test_geotiff_encoding_gives_identical_records(records, tmp_path):
    by_id = {r.patch_id: r for r in records}
    flagged = pq.read_table(MOCK / reben.SNOW_CLOUD_FILE).column("patch_id").to_pylist()
    chosen = [records[0].patch_id, flagged[0]]  # one clean, one snow/cloud patch
    write_reben_geotiff(MOCK, tmp_path, chosen)
    band = tmp_path / "BigEarthNet-S2" / reben.s2_tile_dir(chosen[0]) / chosen[0]
    with tifffile.TiffFile(band / f"{chosen[0]}_B01.tif") as f:
        assert f.pages[0].shape == (20, 20) and f.geotiff_metadata["ModelPixelScale"][0] == 60.0
    src = reben.BigEarthNetV2Source(tmp_path)
    assert src.encoding == "geotiff" and src.ids == sorted(chosen)
    for record in src:
        reference = by_id[record.patch_id]
        np.testing.assert_array_equal(record.s2, reference.s2)
        np.testing.assert_array_equal(record.s1, reference.s1)
        np.testing.assert_array_equal(record.labels, reference.labels)
        assert (record.split, record.meta) == (reference.split, reference.meta)


@pytest.mark.parametrize("size", [120, 64, 60, 30])
def test_resampling_matches_torch_interpolate(size):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(size)
    for native in (120, 60, 20):
        stack = rng.integers(0, 10000, (2, native, native)).astype(np.float32)
        bands = {"a": stack[0], "b": stack[1]}
        x = torch.from_numpy(stack)[None]
        nearest = F.interpolate(x, size=(size, size), mode="nearest-exact")[0].numpy()
        bilinear = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < native
        )[0].numpy()
        np.testing.assert_array_equal(reben.resample_bands(bands, ("a", "b"), size), nearest)
        ours = reben.resample_bands(bands, ("a", "b"), size, mode="bilinear")
        np.testing.assert_allclose(ours, bilinear, rtol=1e-5, atol=0.05)


FORKED_READ = """
import os, pickle, sys
import numpy as np
from pimc_dist.sources import reben

src = reben.BigEarthNetV2Source(reben.configilm_mock_root(), split="test")
src[0]  # the parent holds the LMDB handle now
clone = pickle.loads(pickle.dumps(src))
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.write(write, repr(float(clone[1].s2.sum(dtype=np.float64))).encode())
    os._exit(0)
os.close(write)
forked = float(os.read(read, 64))
_, status = os.waitpid(child, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print(forked, float(src[1].s2.sum(dtype=np.float64)))
"""


def test_source_reads_in_a_forked_worker_after_the_parent_read(records):
    # In a fresh interpreter of its own session: a fork of the pytest process would copy
    # whatever earlier tests left there (threads holding locks, signal handlers), and a
    # child stuck on those once kept CI's output pipe open after pytest had ended.
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKED_READ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the forked child too, if it hangs
        proc.wait()
    assert proc.returncode == 0, err
    forked, parent = map(float, out.split())
    assert forked == pytest.approx(parent) and parent > 0


# -- bad input ------------------------------------------------------------------------------


def test_truncated_lmdb_is_reported_not_a_crash(tmp_path):
    root = _copy_dataset(tmp_path)
    data = root / reben.LMDB_DIR / "data.mdb"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    src = reben.BigEarthNetV2Source(root)
    with pytest.raises(SourceError, match=r"data\.mdb: truncated LMDB"):
        src[0]


def test_lmdb_that_is_not_an_lmdb_is_named(tmp_path):
    root = _copy_dataset(tmp_path)
    data = root / reben.LMDB_DIR / "data.mdb"
    data.write_bytes(np.random.default_rng(0).bytes(3 * 4096))
    with pytest.raises(SourceError, match=r"data\.mdb: unreadable LMDB"):
        reben.BigEarthNetV2Source(root)[0]


def test_missing_lmdb_key_is_named_with_the_path(tmp_path):
    root = _copy_dataset(tmp_path, lmdb=False)
    victim = sorted(r["s1_name"] for r in _metadata_rows())[2]
    _rewrite_lmdb(root, lambda key, value: None if key == victim else value)
    src = reben.BigEarthNetV2Source(root)
    index = next(i for i, row in enumerate(src.rows) if row["s1_name"] == victim)
    with pytest.raises(SourceError, match=rf"{reben.LMDB_DIR}/data\.mdb: key '{victim}' not in"):
        src[index]
    src[(index + 1) % len(src)]  # the rest still read


def test_corrupt_safetensors_blob_is_named(tmp_path):
    root = _copy_dataset(tmp_path, lmdb=False)
    victim = sorted(r["patch_id"] for r in _metadata_rows())[5]
    _rewrite_lmdb(root, lambda key, value: value[: len(value) // 3] if key == victim else value)
    src = reben.BigEarthNetV2Source(root)
    with pytest.raises(SourceError, match=rf"key '{victim}': corrupt safetensors blob"):
        src[src.ids.index(victim)]


def test_blob_missing_a_band_is_named(tmp_path):
    from safetensors.numpy import save

    root = _copy_dataset(tmp_path, lmdb=False)
    victim = sorted(r["patch_id"] for r in _metadata_rows())[1]

    def drop_b8a(key, value):
        if key != victim:
            return value
        arrays = load_safetensors(value)
        del arrays["B8A"]
        return save(arrays)

    _rewrite_lmdb(root, drop_b8a)
    with pytest.raises(SourceError, match=rf"key '{victim}': bands \['B8A'\] missing"):
        reben.BigEarthNetV2Source(root)[1]


def test_corrupt_metadata_parquet_is_named(tmp_path):
    root = _copy_dataset(tmp_path)
    path = root / reben.METADATA_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SourceError, match=r"metadata\.parquet: unreadable parquet"):
        reben.BigEarthNetV2Source(root)


def test_unknown_label_is_named_with_file_and_label(tmp_path):
    root = _copy_dataset(tmp_path)
    rows = pq.read_table(MOCK / reben.SNOW_CLOUD_FILE).to_pylist()
    rows[2]["labels"] = ["Coniferous forest", "Rice fields"]  # a 43-class name, not in the 19
    pq.write_table(pa.Table.from_pylist(rows), root / reben.SNOW_CLOUD_FILE)
    with pytest.raises(SourceError, match=r"snow_cloud_or_shadow\.parquet: row 2 .*'Rice fields'"):
        reben.BigEarthNetV2Source(root)


def test_metadata_without_a_required_column_is_named(tmp_path):
    root = _copy_dataset(tmp_path)
    table = pq.read_table(MOCK / reben.METADATA_FILE).drop_columns(["s1_name"])
    pq.write_table(table, root / reben.METADATA_FILE)
    with pytest.raises(SourceError, match=r"metadata\.parquet: missing columns \['s1_name'\]"):
        reben.BigEarthNetV2Source(root)


def test_geotiff_band_of_wrong_size_or_missing_is_named(tmp_path):
    patch = sorted(r["patch_id"] for r in _metadata_rows())[0]
    write_reben_geotiff(MOCK, tmp_path, [patch])
    src = reben.BigEarthNetV2Source(tmp_path, encoding="geotiff")
    paths = src.band_paths(0)
    write_geotiff(paths["B05"], np.zeros((59, 60), np.uint16))
    with pytest.raises(SourceError, match=rf"{patch}_B05\.tif: band B05 is \(59, 60\)"):
        src[0]
    paths["VH"].unlink()
    with pytest.raises(SourceError, match=r"_VH\.tif: file not found"):
        src[0]


def test_root_without_images_is_named(tmp_path):
    root = _copy_dataset(tmp_path, lmdb=False)
    with pytest.raises(SourceError, match="no reBEN images"):
        reben.BigEarthNetV2Source(root)
    with pytest.raises(SourceError, match="LMDB not found"):
        reben.BigEarthNetV2Source(root, encoding="lmdb")
