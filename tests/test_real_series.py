"""bench/real_series.py on the real labelled series of `../shared/realdata` (dl4sits, UCR Crop).

The data lives beside the checkout, not in it: on a fresh clone these tests skip with the
reason. The smoke run (a tiny subset, one seed, short training: a few minutes on 2 cores)
goes the whole way (long table, shards, pretraining on 2 local ranks, probes, fine-tuning,
baselines) and must score every method with finite numbers; the table test checks the
splits the bench gives dl4sits (no polygon in two splits).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import real_series  # noqa: E402

needs_data = pytest.mark.skipif(
    not (real_series.REALDATA / "README.md").is_file(),
    reason=f"no real data at {real_series.REALDATA} (../shared/realdata beside the checkout; "
    "a fresh clone has none)",
)


def test_bench_stops_with_a_message_without_the_data(tmp_path, capsys):
    assert real_series.main(["--data", str(tmp_path / "absent"), "--work", str(tmp_path)]) == 2
    assert "no real data at" in capsys.readouterr().err


@needs_data
def test_dl4sits_table_never_splits_a_polygon(tmp_path):
    info = real_series.dl4sits_table(real_series.REALDATA, tmp_path / "points.csv")
    splits_of: dict[str, set[str]] = {}
    dates: dict[str, int] = {}
    with open(tmp_path / "points.csv", newline="") as f:
        for row in csv.DictReader(f):
            splits_of.setdefault(row["group"], set()).add(row["split"])
            dates[row["sample_id"]] = dates.get(row["sample_id"], 0) + 1
    assert all(len(s) == 1 for s in splits_of.values()), "a polygon in two splits"
    assert set(dates.values()) == {73}  # the 5-day grid of one year
    counts = info["samples"]
    assert counts["train"] + counts["val"] == 400  # the train file, split by polygon
    # The given test shares polygons with the train file; their pixels are left out.
    assert counts["test"] + counts["test_dropped_shared_polygon"] == 400
    assert info["polygons"]["shared"] > 0 and counts["test"] > 0


@needs_data
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smoke_run_scores_every_method(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn: the bench extra, pip install -e .[bench]")
    out_json = tmp_path / "result.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_series.py"), "--smoke",
         "--work", str(tmp_path), "--out", str(out_json)],
        cwd=REPO, capture_output=True, text=True, timeout=1100,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert result["smoke"] and result["machine"]
    assert [d["dataset"] for d in result["datasets"]] == list(real_series.DATASETS)
    for dataset in result["datasets"]:
        assert set(dataset["rows"]) == set(real_series.METHODS)
        for method, row in dataset["rows"].items():
            for metric in ("oa", "macro_f1"):
                value = row[metric]["mean"]
                assert math.isfinite(value) and 0.0 <= value <= 1.0, (dataset["dataset"], method)
