"""viz: sample grids, training curves and sweep plots as PNG files; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pimc_dist import viz
from pimc_dist.shardio import ShardSetWriter


@pytest.fixture
def pimc_shards(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "shards"
    with ShardSetWriter(out, classes=["Background", "Meadow"], source="test") as writer:
        for i in range(6):
            writer.write(
                {
                    "__key__": f"p{i}",
                    "rp.png": rng.integers(0, 255, (3, 12, 12), dtype=np.uint8),
                    "series.npy": rng.random((3, 12)).astype(np.float16),
                    "rsi.npy": rng.integers(0, 3000, (10, 8, 8)).astype(np.int16),
                    "json": {"label": i % 2},
                }
            )
    return out


def png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_samples_grid_has_a_row_per_sample(tmp_path, pimc_shards):
    small = viz.plot_samples(pimc_shards, tmp_path / "a.png", n=2)
    large = viz.plot_samples(pimc_shards, tmp_path / "b.png", n=5)
    (w2, h2), (w5, h5) = png_size(small), png_size(large)
    assert w2 == w5 and h5 > 2 * h2


def test_curves_from_metrics_jsonl(tmp_path):
    rows = [
        {"step": s, "loss": 2.0 / s, "loss/inter": 1.0 / s, "lr": 1e-3, "samples_per_s": 100.0}
        for s in range(1, 20)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert viz.main(["curves", str(tmp_path)]) == 0
    assert png_size(tmp_path / "curves.png")[0] > 500


def test_sweep_plot_from_results_csv(tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text(
        "task,protocol,seed,accuracy\ncls,linear,0,0.8\ncls,linear,1,0.7\ncls,random,0,0.4\n"
    )
    assert viz.main(["sweep", str(csv), "--out", str(tmp_path / "s.png")]) == 0
    png_size(tmp_path / "s.png")


def test_bad_inputs_give_a_clear_error_and_exit_1(tmp_path, capsys):
    assert viz.main(["samples", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 1
    assert "manifest" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert viz.main(["curves", str(tmp_path)]) == 1
    assert "no training rows" in capsys.readouterr().err
    (tmp_path / "r.csv").write_text("task,protocol\ncls,linear\n")
    assert viz.main(["sweep", str(tmp_path / "r.csv")]) == 1
    assert "no numeric metric" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
