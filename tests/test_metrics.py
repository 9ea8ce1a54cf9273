"""Downstream metrics against hand-computed values (and sklearn where it defines the same thing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pimc_dist.eval import metrics

NAMES4 = ["a", "b", "c", "d"]


def test_confusion_matrix_counts_rows_true_columns_predicted_and_drops_ignored():
    cm = metrics.confusion_matrix([0, 0, 1, 2, 19], [0, 1, 1, 0, 3], 4, ignore_index=19)
    expected = np.zeros((4, 4), int)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 0] = 1
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_rejects_a_class_outside_the_range():
    with pytest.raises(ValueError, match="outside 0..3"):
        metrics.confusion_matrix([0, 4], [0, 0], 4)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.confusion_matrix([0, 1], [0], 4)


def test_classification_metrics_by_hand_with_void_ignored_and_absent_class_left_out():
    # Class 0: tp 1, fp 1 (a true 2), fn 1 -> F1 2/4, IoU 1/3.
    # Class 1: tp 2, fp 1 (a true 0), fn 0 -> F1 4/5, IoU 2/3.
    # Class 2: tp 0, fn 1 -> F1 0, IoU 0.  Class 3: never true, never predicted -> left out.
    target = [0, 0, 1, 1, 2, 19, 19]
    pred = [0, 1, 1, 1, 0, 3, 3]  # predictions for void targets do not count
    m = metrics.classification_metrics(target, pred, NAMES4, ignore_index=19)
    assert m["n"] == 5
    assert m["oa"] == pytest.approx(3 / 5)
    assert m["per_class_f1"]["a"] == pytest.approx(0.5)
    assert m["per_class_f1"]["b"] == pytest.approx(0.8)
    assert m["per_class_f1"]["c"] == 0.0
    assert math.isnan(m["per_class_f1"]["d"]) and math.isnan(m["per_class_iou"]["d"])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)


def test_macro_f1_matches_sklearn_and_counts_a_class_that_is_only_predicted():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 200)  # class 3 never occurs ...
    pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, 4, 200))  # ... but is predicted
    m = metrics.classification_metrics(target, pred, NAMES4)
    assert m["per_class_f1"]["d"] == 0.0
    assert m["macro_f1"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert m["oa"] == pytest.approx(np.mean(target == pred))


def test_average_precision_by_hand():
    # Ranked: + - + -: precision 1 at recall 1/2, 2/3 at recall 1.
    assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == pytest.approx(
        0.5 * 1 + 0.5 * 2 / 3
    )
    # Tied scores form one threshold: {+,-} at 0.5 (P 1/2, R 1/2), then + at 0.1 (P 2/3, R 1).
    assert metrics.average_precision([1, 0, 1], [0.5, 0.5, 0.1]) == pytest.approx(
        0.5 * 0.5 + 0.5 * 2 / 3
    )
    assert metrics.average_precision([1, 1], [0.2, 0.1]) == 1.0


def test_average_precision_equals_sklearn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    target = rng.random(300) < 0.3
    scores = np.round(rng.random(300), 1)  # many ties
    assert metrics.average_precision(target, scores) == pytest.approx(
        average_precision_score(target, scores)
    )


def test_average_precision_without_positives_is_undefined():
    assert math.isnan(metrics.average_precision([0, 0, 0], [0.9, 0.1, 0.4]))


def test_multilabel_class_without_positives_is_left_out_of_macro_map():
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.7], [0.1, 0.8, 0.1], [0.6, 0.3, 0.2], [0.4, 0.1, 0.05]])
    m = metrics.multilabel_metrics(target, scores, ["x", "y", "z"])
    ap_x = 1.0  # positives ranked 1st and 2nd
    ap_y = 0.5 * 1 + 0.5 * 2 / 3  # positives ranked 1st and 3rd
    assert m["per_class_ap"]["x"] == pytest.approx(ap_x)
    assert m["per_class_ap"]["y"] == pytest.approx(ap_y)
    assert math.isnan(m["per_class_ap"]["z"])
    assert m["n_classes_scored"] == 2
    assert m["map_macro"] == pytest.approx((ap_x + ap_y) / 2)
    # Class z has one false positive at 0.5 (0.7) and no positive target: F1 0, counted.
    # x: tp 2 (0.9, 0.6) -> 1.0;  y: tp 1 (0.8), fp 1 (0.5), fn 1 (0.3) -> 2/4.
    assert m["per_class_f1"]["z"] == 0.0
    assert m["f1_macro"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    tp, fp, fn = 3, 2, 1
    assert m["f1_micro"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_multilabel_f1_leaves_out_a_class_with_no_positive_and_no_prediction():
    target = np.array([[1, 0], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.3]])
    m = metrics.multilabel_metrics(target, scores, ["x", "y"])
    assert math.isnan(m["per_class_f1"]["y"])
    assert m["f1_macro"] == 1.0


def test_multilabel_micro_map_matches_sklearn_and_all_negative_is_nan():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(2)
    target = (rng.random((50, 5)) < 0.3).astype(int)
    target[:, 4] = 0  # a class with no positive
    scores = rng.random((50, 5))
    m = metrics.multilabel_metrics(target, scores, list("abcde"))
    assert m["map_micro"] == pytest.approx(average_precision_score(target, scores, average="micro"))
    assert m["map_macro"] == pytest.approx(
        np.mean([average_precision_score(target[:, j], scores[:, j]) for j in range(4)])
    )
    empty = metrics.multilabel_metrics(np.zeros((3, 2), int), np.full((3, 2), 0.2), ["a", "b"])
    assert math.isnan(empty["map_macro"]) and math.isnan(empty["map_micro"])
    assert empty["n_classes_scored"] == 0


def test_multilabel_rejects_bad_shapes_and_non_binary_targets():
    with pytest.raises(ValueError, match="need \\(N, K\\)"):
        metrics.multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.multilabel_metrics(np.full((2, 2), 2), np.zeros((2, 2)), ["a", "b"])


def test_forecast_rmse_per_index_overall_and_per_step():
    target = np.zeros((2, 3, 2))
    pred = np.zeros((2, 3, 2))
    pred[:, 0, :] = 0.3  # NDVI off by 0.3 everywhere
    pred[0, 2, 1] = 0.4  # one SAVI value off by 0.4
    m = metrics.forecast_metrics(target, pred, ["NDVI", "EVI", "SAVI"])
    assert m["rmse_ndvi"] == pytest.approx(0.3)
    assert m["rmse_evi"] == 0.0
    assert m["rmse_savi"] == pytest.approx(math.sqrt(0.16 / 4))
    assert m["rmse"] == pytest.approx(math.sqrt((4 * 0.09 + 0.16) / 12))
    assert m["rmse_by_step"][0] == pytest.approx(math.sqrt(2 * 0.09 / 6))
    with pytest.raises(ValueError, match="no samples"):
        metrics.forecast_metrics(np.zeros((0, 3, 2)), np.zeros((0, 3, 2)), ["a", "b", "c"])


def test_confusion_matrix_plot_is_a_png(tmp_path):
    cm = metrics.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 2], 3)
    path = metrics.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm" / "plot.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
