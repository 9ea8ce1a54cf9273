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


# --- cluster coherence: k-NN and silhouette of embeddings -----------------------------------


def two_clusters(n: int = 200, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters around opposite directions; labels 0 / 1."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    labels = np.arange(n) % 2
    x = np.where(labels[:, None] == 0, centre, -centre) + 0.01 * rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def test_well_separated_clusters_score_knn_1_and_silhouette_near_1():
    x, labels = two_clusters()
    m = metrics.cluster_metrics(x, labels, "multiclass")
    assert m["knn_acc"] == 1.0 and m["knn_k"] == 20
    assert m["silhouette"] > 0.99


def test_random_labels_score_chance_and_silhouette_near_0():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    labels = rng.integers(0, 4, 2000)
    m = metrics.cluster_metrics(x, labels, "multiclass")
    assert abs(m["knn_acc"] - 0.25) < 0.05
    assert abs(m["silhouette"]) < 0.05


def test_silhouette_equals_sklearns_cosine_silhouette_and_knn_a_brute_force_vote():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)) + np.repeat(rng.normal(size=(3, 8)) * 2, 100, axis=0)
    labels = np.repeat([0, 1, 2], 100)
    labels[:1] = 3  # a cluster of one scores 0, as in sklearn
    expected = sklearn_metrics.silhouette_score(x, labels, metric="cosine")
    assert metrics.silhouette_cosine(x, labels) == pytest.approx(expected, abs=1e-6)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1)[:, :5]
    votes = np.array([np.bincount(labels[row], minlength=4) for row in near])
    clear = np.sort(votes, axis=1)[:, -1] > np.sort(votes, axis=1)[:, -2]  # no tied vote
    pred = votes.argmax(axis=1)
    knn = metrics.knn_neighbours(x, 5)[0]
    np.testing.assert_array_equal(np.sort(knn, axis=1), np.sort(near, axis=1))
    acc = metrics.knn_accuracy(x, labels, k=5)
    assert clear.sum() > 250
    assert acc >= np.mean((pred == labels) & clear)


def test_multilabel_knn_map_and_dominant_label():
    # Two groups of samples: group A carries labels {0, 1}, group B label {2}; label 1 also
    # on 10 B samples. Embeddings separate the groups, so the neighbours' label shares rank
    # every true (sample, label) above the false ones except label 1 inside group B.
    x, group = two_clusters(100)
    target = np.zeros((100, 3), int)
    target[group == 0, 0] = target[group == 0, 1] = 1
    target[group == 1, 2] = 1
    assert metrics.knn_map(x, target) == pytest.approx(1.0)
    assert metrics.cluster_metrics(x, target, "multilabel")["silhouette"] > 0.99
    target[np.flatnonzero(group == 1)[:10], 1] = 1  # label 1: 60 samples, label 0: 50
    dominant = metrics.dominant_label(target)
    assert set(dominant[group == 0]) == {1}  # label 1 is the more frequent (60 vs 50)
    assert (dominant[group == 1] == 1).sum() == 10 and (dominant[group == 1] == 2).sum() == 40
    assert metrics.dominant_label(np.zeros((2, 3), int)).tolist() == [-1, -1]
    m = metrics.cluster_metrics(x, target, "multilabel")
    # 10 B samples now have label 1 as their dominant label, the label of group A's cluster.
    assert m["knn_map"] < 1.0 and 0.3 < m["silhouette"] < 0.9
    assert metrics.cluster_metrics(x, target, "forecast") == {}


def test_chunking_gives_the_same_answer_and_the_subsample_is_seeded():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(700, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 700)
    multi = (rng.random((700, 4)) < 0.3).astype(int)
    whole = {c: metrics.cluster_metrics(x, labels, "multiclass", chunk=c) for c in (7, 700, 4096)}
    assert whole[7] == pytest.approx(whole[700]) and whole[700] == pytest.approx(whole[4096])
    ml = [metrics.cluster_metrics(x, multi, "multilabel", chunk=c) for c in (13, 1000)]
    assert ml[0] == pytest.approx(ml[1])
    small = [metrics.silhouette_cosine(x, labels, max_points=200, seed=s) for s in (0, 0, 1)]
    assert small[0] == small[1] != small[2]
    assert metrics.cluster_metrics(x, labels, "multiclass", max_points=200)["silhouette_n"] == 200
