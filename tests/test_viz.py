"""viz: sample grids, training curves and sweep plots as PNG files; bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pimc_dist import viz
from pimc_dist.shardset import ShardSetWriter


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


def test_curves_from_metrics_jsonl_of_pretraining_and_of_fine_tuning(tmp_path):
    rows = [
        {"step": s, "loss": 2.0 / s, "loss/inter": 1.0 / s, "lr": 1e-3, "samples_per_s": 100.0}
        for s in range(1, 20)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert viz.main(["curves", str(tmp_path)]) == 0
    pretrain_width = png_size(tmp_path / "curves.png")[0]
    # Fine-tuning: loss and a validation score per epoch, then a test summary row.
    epochs = [{"step": e, "finetune/loss": 1.0 / e, "val/miou": 0.1 * e} for e in (1, 2, 3)]
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*epochs, {"step": 3, "test/miou": 0.3}])
    )
    assert viz.main(["curves", str(ft)]) == 0
    # Three panels (loss, lr, samples/s) against two (loss, validation).
    assert pretrain_width == pytest.approx(1.5 * png_size(ft / "curves.png")[0], rel=0.02)


def _sweep_rows() -> list[dict]:
    """Rows as eval.results.result_rows makes them: val_miou comes before the test metrics."""
    rows = []
    for init, test, val in (("pretrained", (0.5, 0.7), 0.9), ("random", (0.1, 0.3), 0.95)):
        for seed, miou in enumerate(test):
            rows.append(
                {
                    "cell": f"pastis_pixel_cls__linear-{init}__seed-{seed}",
                    "task": "pastis_pixel_cls", "protocol": "linear", "init": init,
                    "lr": "grid", "label_fraction": 1.0, "seed": seed, "primary": "miou",
                    "val_miou": val, "val_primary": val, "oa": miou + 0.2, "miou": miou,
                    "selected_lr": 0.1, "total_s": 3.0,
                }
            )  # fmt: skip
    forecast = {
        "task": "pastis_forecast", "label_fraction": 1.0, "seed": 0, "primary": "rmse", "lr": "-",
    }  # fmt: skip
    rows.append({**forecast, "protocol": "linear", "init": "pretrained", "rmse": 0.14})
    rows.append({**forecast, "protocol": "persistence", "init": "-", "rmse": 0.2})
    return rows


def test_sweep_plot_keeps_inits_apart_and_shows_the_primary_test_metric(tmp_path):
    from pimc_dist.eval import results

    path = results.write_csv(_sweep_rows(), tmp_path / "results.csv")
    with open(path, newline="") as f:
        groups = viz.sweep_groups(list(csv.DictReader(f)))
    metric, settings = groups["pastis_pixel_cls"]
    assert metric == "miou"
    assert settings == {
        "linear/pretrained frac 1": [0.5, 0.7],
        "linear/random frac 1": [0.1, 0.3],
    }
    assert groups["pastis_forecast"] == (
        "rmse",
        {"linear/pretrained frac 1": [0.14], "persistence/- frac 1": [0.2]},
    )
    assert viz.main(["sweep", str(path), "--out", str(tmp_path / "s.png")]) == 0
    png_size(tmp_path / "s.png")
    assert viz.main(["sweep", str(path), "--metric", "oa", "--out", str(tmp_path / "o.png")]) == 0


def test_png_files_go_to_the_tracker_as_rgb_arrays(tmp_path):
    class Recorder:
        def log_images(self, images, step):
            self.images, self.step = images, step

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "finetune/loss": 1.0}\n')
    png = viz.plot_curves(tmp_path, tmp_path / "c.png")
    tracker = Recorder()
    viz.log_pngs(tracker, {"curves": png, "absent": None}, step=3)
    assert list(tracker.images) == ["curves"] and tracker.step == 3
    image = tracker.images["curves"]
    assert image.dtype == np.uint8 and image.shape == (*png_size(png)[::-1], 3)


def test_bad_inputs_give_a_clear_error_and_exit_1(tmp_path, capsys):
    assert viz.main(["samples", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 1
    assert "manifest" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert viz.main(["curves", str(tmp_path)]) == 1
    assert "no training rows" in capsys.readouterr().err
    (tmp_path / "r.csv").write_text("task,protocol\ncls,linear\n")
    assert viz.main(["sweep", str(tmp_path / "r.csv")]) == 1
    assert "name no primary metric; pass --metric" in capsys.readouterr().err
    assert viz.main(["sweep", str(tmp_path / "r.csv"), "--metric", "oa"]) == 1
    assert "no numeric value of oa" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        viz.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "example: python -m pimc_dist.viz samples shards/demo" in out
    assert "{samples,curves,sweep}" in out


def test_the_printed_path_is_the_file_written(tmp_path, pimc_shards, capsys):
    assert viz.main(["samples", str(pimc_shards), "--n", "2", "--out", str(tmp_path / "x")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'x.png'}"
    assert png_size(tmp_path / "x.png")
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert viz.main(["samples", str(pimc_shards), "--n", "2", "--out", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {folder / 'samples.png'}"
    assert png_size(folder / "samples.png")


def test_an_out_suffix_matplotlib_cannot_write_is_named_before_drawing(
    tmp_path, pimc_shards, capsys
):
    out = tmp_path / "samples.v2"
    assert viz.main(["samples", str(pimc_shards), "--n", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{out}: matplotlib cannot write .v2 files" in err and ".png" in err and ".svg" in err
    assert not out.exists()
    assert (
        viz.main(["samples", str(pimc_shards), "--n", "2", "--out", str(tmp_path / "a.SVG")]) == 0
    )
    assert (tmp_path / "a.SVG").read_bytes().lstrip().startswith(b"<?xml")


def test_curves_name_the_run_folder_that_lacks_metrics(tmp_path, capsys):
    assert viz.main(["curves", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "nowhere: no such run folder" in err and "Errno" not in err, err
    assert viz.main(["curves", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}: no metrics.jsonl in this run folder" in err and "Errno" not in err, err


def test_sweep_takes_the_sweep_folder_or_says_what_to_pass(tmp_path, capsys):
    from pimc_dist.eval import results

    results.write_csv(_sweep_rows(), tmp_path / "results.csv")
    assert viz.main(["sweep", str(tmp_path), "--out", str(tmp_path / "s.png")]) == 0
    assert png_size(tmp_path / "s.png")
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert viz.main(["sweep", str(empty)]) == 1
    err = capsys.readouterr().err
    assert f"{empty}: no results.csv in this folder" in err and "Errno" not in err, err
    assert viz.main(["sweep", str(tmp_path / "nope.csv")]) == 1
    err = capsys.readouterr().err
    assert "nope.csv: no such file" in err and "Errno" not in err, err
