"""Tests for pimc_dist.losses: formulas against naive loops, edge cases, and the gradient
contract on 2 gloo ranks (averaged gradients == single-process gradients over the global batch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_on_ranks
from torch import nn

from pimc_dist.losses import (
    ClipLoss,
    MosaicLoss,
    NTXentLoss,
    SigLipLoss,
    SupConLoss,
    gather_features,
    logit_scale_parameter,
)

WORLD = 2
IN_DIM = 5
EMBED_DIM = 4
NUM_CLASSES = 3
LOG_SCALE = math.log(1 / 0.2)


# --------------------------------------------------------------------------- naive references


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def naive_clip(a, b, scale):
    a, b = _unit(a), _unit(b)
    n = len(a)
    total = 0.0
    for i in range(n):
        for x, y in ((a, b), (b, a)):
            logits = [scale * (x[i] @ y[j]) for j in range(n)]
            total += -(logits[i] - torch.logsumexp(torch.stack(logits), 0))
    return total / (2 * n)


def naive_ntxent(a, b, scale):
    z = _unit(torch.cat([a, b]))
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        others = torch.stack([scale * (z[i] @ z[k]) for k in range(n2) if k != i])
        total += -(scale * (z[i] @ z[positive]) - torch.logsumexp(others, 0))
    return total / n2


def naive_supcon(f, labels, scale, mode, has_label=None):
    f = _unit(f)
    n = len(f)
    sets = [
        set(torch.nonzero(labels[i]).flatten().tolist())
        if has_label is None or bool(has_label[i])
        else set()
        for i in range(n)
    ]
    anchors_terms = []
    for i in range(n):
        if not sets[i]:
            continue
        others = [k for k in range(n) if k != i and sets[k]]
        positives = [p for p in others if sets[i] & sets[p]]
        if not positives:
            continue
        log_norm = torch.logsumexp(torch.stack([scale * (f[i] @ f[k]) for k in others]), 0)
        weights = [
            1.0 if mode == "any" else len(sets[i] & sets[p]) / len(sets[i] | sets[p])
            for p in positives
        ]
        term = sum(
            w * (scale * (f[i] @ f[p]) - log_norm) for w, p in zip(weights, positives, strict=True)
        )
        anchors_terms.append(-term / sum(weights))
    return sum(anchors_terms) / len(anchors_terms) if anchors_terms else torch.tensor(0.0)


def naive_siglip(a, b, scale, bias):
    a, b = _unit(a), _unit(b)
    n = len(a)
    total = 0.0
    for i in range(n):
        for j in range(n):
            sign = 1.0 if i == j else -1.0
            total += -F.logsigmoid(sign * (scale * (a[i] @ b[j]) + bias))
    return total / n


def _random(n, *, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, EMBED_DIM, generator=gen, dtype=dtype)


def _labels(n, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, NUM_CLASSES, generator=gen) < 0.4).to(torch.float64)
    labels[1] = 0  # an unlabelled sample
    labels[2] = torch.tensor([1.0, 0.0, 0.0])
    labels[3] = torch.tensor([1.0, 1.0, 0.0])  # overlaps with 2: Jaccard 1/2
    return labels


# --------------------------------------------------------------------------- formulas


def test_clip_loss_matches_naive_infonce():
    a, b = _random(7, seed=1), _random(7, seed=2)
    scale = math.exp(LOG_SCALE)
    torch.testing.assert_close(ClipLoss()(a, b, LOG_SCALE), naive_clip(a, b, scale))


def test_ntxent_loss_matches_naive_simclr():
    a, b = _random(6, seed=3), _random(6, seed=4)
    scale = math.exp(LOG_SCALE)
    torch.testing.assert_close(NTXentLoss()(a, b, LOG_SCALE), naive_ntxent(a, b, scale))


@pytest.mark.parametrize("mode", ["any", "weighted"])
def test_supcon_loss_matches_naive_multilabel_supcon(mode):
    f, labels = _random(10, seed=5), _labels(10, seed=6)
    has_label = torch.ones(10, dtype=torch.bool)
    has_label[4] = False
    scale = math.exp(LOG_SCALE)
    expected = naive_supcon(f, labels, scale, mode, has_label)
    got = SupConLoss(positives=mode)(f, labels, LOG_SCALE, has_label=has_label)
    torch.testing.assert_close(got, expected)


def test_supcon_weighted_differs_from_any_when_overlaps_are_partial():
    f, labels = _random(10, seed=5), _labels(10, seed=6)
    any_loss = SupConLoss(positives="any")(f, labels, LOG_SCALE)
    weighted_loss = SupConLoss(positives="weighted")(f, labels, LOG_SCALE)
    assert not torch.isclose(any_loss, weighted_loss)


def test_supcon_unlabelled_samples_do_not_change_the_loss():
    f, labels = _random(10, seed=7), _labels(10, seed=8)
    labels[1] = torch.tensor([1.0, 0.0, 0.0])  # give sample 1 a label, then hide it
    has_label = torch.ones(10, dtype=torch.bool)
    has_label[1] = False
    keep = [i for i in range(10) if i != 1]
    full = SupConLoss()(f, labels, LOG_SCALE, has_label=has_label)
    without = SupConLoss()(f[keep], labels[keep], LOG_SCALE)
    torch.testing.assert_close(full, without)


def test_siglip_loss_matches_naive_sigmoid_loss():
    a, b = _random(6, seed=9), _random(6, seed=10)
    scale = math.exp(LOG_SCALE)
    got = SigLipLoss()(a, b, LOG_SCALE, -3.0)
    torch.testing.assert_close(got, naive_siglip(a, b, scale, -3.0))


def test_mosaic_total_is_weighted_sum_of_reported_terms():
    s2a, s2b, s1a, s1b = (_random(6, seed=s) for s in range(11, 15))
    labels = _labels(6, seed=15)
    loss = MosaicLoss(w_intra=0.5, w_inter=2.0, w_sup=0.25)
    total, terms = loss(s2a, s2b, s1a, s1b, labels, LOG_SCALE)
    assert set(terms) == {"intra_s2", "intra_s1", "inter", "sup"}
    expected = 0.5 * (terms["intra_s2"] + terms["intra_s1"]) + 2.0 * terms["inter"]
    expected = expected + 0.25 * terms["sup"]
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["inter"], ClipLoss()(s2a, s1a, LOG_SCALE))
    sup = SupConLoss()(torch.cat([s2a, s1a]), torch.cat([labels, labels]), LOG_SCALE)
    torch.testing.assert_close(terms["sup"], sup)
    assert all(not t.requires_grad for t in terms.values())


def test_mosaic_sup_term_counts_other_modality_as_positive():
    # Every sample has its own label: the only positive of s2_i is s1_i.
    s2a, s2b, s1a, s1b = (_random(4, seed=s) for s in range(16, 20))
    labels = torch.eye(4, dtype=torch.float64)
    _, terms = MosaicLoss()(s2a, s2b, s1a, s1b, labels, LOG_SCALE)
    f = _unit(torch.cat([s2a, s1a]))
    logits = math.exp(LOG_SCALE) * f @ f.T
    logits.fill_diagonal_(-math.inf)
    positive = (torch.arange(8) + 4) % 8
    torch.testing.assert_close(terms["sup"], F.cross_entropy(logits, positive))


def test_mosaic_zero_weight_term_is_skipped():
    s2a, s2b, s1a, s1b = (_random(4, seed=s) for s in range(20, 24))
    total, terms = MosaicLoss(w_sup=0.0)(s2a, s2b, s1a, s1b, None, LOG_SCALE)
    assert set(terms) == {"intra_s2", "intra_s1", "inter"}
    assert torch.isfinite(total)


def test_gather_features_without_process_group_is_identity():
    assert not dist.is_initialized()
    x, y = _random(3, seed=1), _random(3, seed=2)
    gx, gy = gather_features(x, y, local_loss=False, gather_with_grad=False)
    assert gx is x and gy is y


def test_logit_scale_parameter_starts_at_log_inverse_temperature():
    param = logit_scale_parameter(0.07)
    assert param.requires_grad
    assert param.item() == pytest.approx(math.log(1 / 0.07))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("loss", [ClipLoss(), NTXentLoss()])
def test_batch_of_one_gives_zero_loss_with_finite_gradient(loss):
    a = _random(1, seed=1).requires_grad_()
    b = _random(1, seed=2).requires_grad_()
    scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    value = loss(a, b, scale)
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(a.grad).all() and torch.isfinite(scale.grad)


def test_supcon_all_samples_sharing_one_label():
    f = _random(6, seed=3)
    labels = torch.ones(6, 1, dtype=torch.float64)
    any_loss = SupConLoss(positives="any")(f, labels, LOG_SCALE)
    torch.testing.assert_close(any_loss, SupConLoss(positives="weighted")(f, labels, LOG_SCALE))
    # Identical embeddings: each anchor's 5 positives are equally likely, loss = log 5.
    same = torch.ones(6, EMBED_DIM, dtype=torch.float64)
    assert SupConLoss()(same, labels, LOG_SCALE).item() == pytest.approx(math.log(5))


@pytest.mark.parametrize("how", ["zero_rows", "has_label_mask", "single_sample"])
def test_supcon_without_labelled_anchors_is_zero_with_zero_gradient(how):
    n = 1 if how == "single_sample" else 5
    f = _random(n, seed=4).requires_grad_()
    labels = torch.ones(n, NUM_CLASSES) if how != "zero_rows" else torch.zeros(n, NUM_CLASSES)
    has_label = torch.zeros(n, dtype=torch.bool) if how == "has_label_mask" else None
    scale = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    value = SupConLoss()(f, labels, scale, has_label=has_label)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(f.grad, torch.zeros_like(f)) and scale.grad.item() == 0.0


def test_bfloat16_inputs_are_computed_in_float32():
    a32, b32 = _random(8, seed=5, dtype=torch.float32), _random(8, seed=6, dtype=torch.float32)
    a = a32.bfloat16().requires_grad_()
    b = b32.bfloat16().requires_grad_()
    labels = _labels(8, seed=7)
    for value, reference in [
        (ClipLoss()(a, b, LOG_SCALE), ClipLoss()(a.float(), b.float(), LOG_SCALE)),
        (NTXentLoss()(a, b, LOG_SCALE), NTXentLoss()(a.float(), b.float(), LOG_SCALE)),
        (SupConLoss()(a, labels, LOG_SCALE), SupConLoss()(a.float(), labels, LOG_SCALE)),
        (SigLipLoss()(a, b, LOG_SCALE, -2.0), SigLipLoss()(a.float(), b.float(), LOG_SCALE, -2.0)),
    ]:
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, reference.detach())
        value.backward()
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad.float()).all()


def test_bfloat16_logits_would_be_caught_by_the_float32_comparison():
    """The float32 path is what makes the test above pass: InfoNCE on logits rounded to
    bfloat16 (what a loss without the cast computes) misses the float32 value by far more
    than assert_close allows, at a CLIP-like scale on a batch of 64."""
    a = _random(64, seed=5).bfloat16()
    b = _random(64, seed=6).bfloat16()
    scale = 1 / 0.07
    reference = ClipLoss()(a, b, math.log(scale))
    na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)  # bfloat16 throughout
    logits = (scale * na @ nb.T).float()
    targets = torch.arange(64)
    in_bf16 = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert reference.dtype == torch.float32
    assert abs(in_bf16.item() - reference.item()) > 1e-3


@pytest.fixture
def fresh_scale_warning(monkeypatch):
    """The log-vs-multiplier warning is once per process: start each test without it."""
    from pimc_dist import losses

    monkeypatch.setattr(losses, "_warned_multiplier", False)


def test_a_multiplier_passed_as_logit_scale_warns_once_naming_both_conventions(
    fresh_scale_warning,
):
    import warnings

    a, b = _random(6, seed=1), _random(6, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClipLoss()(a, b, LOG_SCALE)  # a log: silent
        ClipLoss()(a, b, math.log(100.0))  # the clamp itself: still a possible log
        assert not caught
        value = ClipLoss()(a, b, torch.tensor([1 / 0.07]))  # open_clip's multiplier
        ClipLoss()(a, b, 1 / 0.07)  # once per process
        NTXentLoss()(a, b, 50.0)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "multiplier" in message and "log" in message and "open_clip" in message
    assert "14.29" in message and "4.605" in message  # the value, log(max_logit_scale)
    # The log convention stays: the multiplier 14.29 is taken as a log and clamped at 100.
    torch.testing.assert_close(value, ClipLoss()(a, b, math.log(100.0)))


def test_the_scale_check_runs_on_the_first_call_of_a_loss_only(fresh_scale_warning):
    """A learned scale that drifts past the clamp later in training does not warn (and the
    check costs one device sync per loss module, not one per step)."""
    import warnings

    a, b = _random(6, seed=1), _random(6, seed=2)
    loss = ClipLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(a, b, LOG_SCALE)
        loss(a, b, math.log(100.0) + 0.01)
    assert not caught


@pytest.mark.filterwarnings("ignore:logit_scale=")
@pytest.mark.parametrize("loss_name", ["clip", "ntxent", "supcon", "siglip"])
def test_logit_scale_above_the_clamp_acts_as_the_clamp_and_stops_growing(loss_name):
    a, b, labels = _random(6, seed=8), _random(6, seed=9), _labels(6, seed=10)
    calls = {
        "clip": lambda s: ClipLoss()(a, b, s),
        "ntxent": lambda s: NTXentLoss()(a, b, s),
        "supcon": lambda s: SupConLoss()(a, labels, s),
        "siglip": lambda s: SigLipLoss()(a, b, s, -5.0),
    }
    huge = torch.tensor(math.log(1e6), dtype=torch.float64, requires_grad=True)
    value = calls[loss_name](huge)
    value.backward()
    torch.testing.assert_close(value, calls[loss_name](math.log(100.0)))
    assert torch.isfinite(value) and huge.grad.item() == 0.0


def test_tiny_logit_scale_gives_uniform_predictions():
    a, b = _random(6, seed=11), _random(6, seed=12)
    tiny = math.log(1e-8)
    assert ClipLoss()(a, b, tiny).item() == pytest.approx(math.log(6), abs=1e-6)
    assert NTXentLoss()(a, b, tiny).item() == pytest.approx(math.log(11), abs=1e-6)


def test_invalid_inputs_raise_clear_errors():
    a = _random(4)
    with pytest.raises(ValueError, match="differ in shape"):
        ClipLoss()(a, _random(5), LOG_SCALE)
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        NTXentLoss()(a[0], a[0], LOG_SCALE)
    with pytest.raises(ValueError, match="labels must be"):
        SupConLoss()(a, torch.ones(3, 2), LOG_SCALE)
    with pytest.raises(ValueError, match="has_label"):
        SupConLoss()(a, torch.ones(4, 2), LOG_SCALE, has_label=torch.ones(3))
    with pytest.raises(ValueError, match="positives"):
        SupConLoss(positives="all")
    with pytest.raises(ValueError, match="weights"):
        MosaicLoss(w_intra=0, w_inter=0, w_sup=0)
    with pytest.raises(ValueError, match="needs labels"):
        MosaicLoss()(a, a, a, a, None, LOG_SCALE)


# --------------------------------------------------------------------------- gradient contract


class TinyTwoTower(nn.Module):
    """Two linear encoders, a log logit scale and a bias: the parameters the contract is about."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc_a = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.enc_b = nn.Linear(IN_DIM, EMBED_DIM).double()
        self.logit_scale = nn.Parameter(torch.tensor(LOG_SCALE, dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))

    def loss(self, kind: str, options: dict, batch: dict) -> torch.Tensor:
        a, b = self.enc_a(batch["xa"]), self.enc_b(batch["xb"])
        if kind == "clip":
            return ClipLoss(**options)(a, b, self.logit_scale)
        if kind == "ntxent":
            return NTXentLoss(**options)(a, self.enc_a(batch["xb"]), self.logit_scale)
        if kind == "siglip":
            return SigLipLoss(**options)(a, b, self.logit_scale, self.logit_bias)
        if kind == "supcon":
            return SupConLoss(**options)(a, batch["labels"], self.logit_scale, batch["has_label"])
        if kind == "mosaic":
            a2, b2 = self.enc_a(batch["xa2"]), self.enc_b(batch["xb2"])
            total, _ = MosaicLoss(w_intra=0.5, w_inter=1.0, w_sup=2.0, **options)(
                a, a2, b, b2, batch["labels"], self.logit_scale, batch["has_label"]
            )
            return total
        raise ValueError(kind)


LOCAL_GRAD = {"local_loss": True, "gather_with_grad": True}
FULL_GRAD = {"local_loss": False, "gather_with_grad": True}
FULL_NO_GRAD = {"local_loss": False, "gather_with_grad": False}
LOCAL_NO_GRAD = {"local_loss": True, "gather_with_grad": False}

# name: (loss kind, options, rows per rank, label pattern); LOCAL_NO_GRAD cases are the
# documented inexact ones and are checked separately.
CASES = {
    "clip_local": ("clip", LOCAL_GRAD, 3, None),
    "clip_full": ("clip", FULL_GRAD, 3, None),
    "clip_full_no_grad_gather": ("clip", FULL_NO_GRAD, 3, None),
    "clip_local_batch_of_one": ("clip", LOCAL_GRAD, 1, None),
    "clip_local_clamped_scale": ("clip", {**LOCAL_GRAD, "max_logit_scale": 2.0}, 3, None),
    "ntxent_local": ("ntxent", LOCAL_GRAD, 3, None),
    "ntxent_full": ("ntxent", FULL_GRAD, 3, None),
    "ntxent_full_no_grad_gather": ("ntxent", FULL_NO_GRAD, 3, None),
    "ntxent_local_batch_of_one": ("ntxent", LOCAL_GRAD, 1, None),
    "siglip_local": ("siglip", LOCAL_GRAD, 3, None),
    "siglip_full": ("siglip", FULL_GRAD, 3, None),
    "siglip_full_no_grad_gather": ("siglip", FULL_NO_GRAD, 3, None),
    "siglip_local_batch_of_one": ("siglip", LOCAL_GRAD, 1, None),
    "supcon_any_local_uneven_labels": ("supcon", LOCAL_GRAD, 4, "uneven"),
    "supcon_weighted_local_uneven_labels": (
        "supcon",
        {**LOCAL_GRAD, "positives": "weighted"},
        4,
        "uneven",
    ),
    "supcon_weighted_full": ("supcon", {**FULL_GRAD, "positives": "weighted"}, 4, "uneven"),
    "supcon_full_no_grad_gather": ("supcon", FULL_NO_GRAD, 4, "uneven"),
    "supcon_local_one_shared_label": ("supcon", LOCAL_GRAD, 3, "shared"),
    "supcon_local_no_labels": ("supcon", LOCAL_GRAD, 3, "none"),
    "supcon_local_batch_of_one": ("supcon", LOCAL_GRAD, 1, "shared"),
    "mosaic_local": ("mosaic", LOCAL_GRAD, 3, "uneven"),
    "mosaic_local_batch_of_one": ("mosaic", LOCAL_GRAD, 1, "shared"),
    "mosaic_full_weighted": ("mosaic", {**FULL_GRAD, "positives": "weighted"}, 3, "uneven"),
    "clip_local_no_grad_gather": ("clip", LOCAL_NO_GRAD, 3, None),
    "ntxent_local_no_grad_gather": ("ntxent", LOCAL_NO_GRAD, 3, None),
    "siglip_local_no_grad_gather": ("siglip", LOCAL_NO_GRAD, 3, None),
    "supcon_local_no_grad_gather": ("supcon", LOCAL_NO_GRAD, 4, "uneven"),
}
EXACT = [name for name, case in CASES.items() if case[1] is not LOCAL_NO_GRAD]
INEXACT = [name for name, case in CASES.items() if case[1] is LOCAL_NO_GRAD]


def global_batch(name: str) -> dict:
    """The global batch of a case; rank r holds rows [r * B, (r + 1) * B)."""
    _, _, rows, pattern = CASES[name]
    n = rows * WORLD
    gen = torch.Generator().manual_seed(len(name))
    batch = {k: torch.randn(n, IN_DIM, generator=gen, dtype=torch.float64) for k in ("xa", "xb")}
    batch.update(
        {k: torch.randn(n, IN_DIM, generator=gen, dtype=torch.float64) for k in ("xa2", "xb2")}
    )
    labels = (torch.rand(n, NUM_CLASSES, generator=gen) < 0.5).to(torch.float64)
    has_label = torch.ones(n, dtype=torch.bool)
    if pattern == "uneven":  # rank 1 holds fewer labelled samples than rank 0
        labels[rows + 1 :] = 0
        labels[0] = torch.tensor([1.0, 1.0, 0.0])
        labels[rows] = torch.tensor([0.0, 1.0, 1.0])
        has_label[1] = False
    elif pattern == "shared":
        labels = torch.ones(n, 1, dtype=torch.float64)
    elif pattern == "none":
        labels.zero_()
    batch.update(labels=labels, has_label=has_label)
    return batch


def loss_and_grads(name: str, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    kind, options, _, _ = CASES[name]
    model = TinyTwoTower()
    loss = model.loss(kind, options, batch)
    loss.backward()
    grads = {
        k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for k, p in model.named_parameters()
    }
    return loss.item(), grads


def _all_cases_on_rank(rank: int, world: int) -> dict:
    """On each rank: local loss and gradients averaged over ranks, as DDP/DeepSpeed do."""
    results = {}
    for name in CASES:
        rows = CASES[name][2]
        local = {k: v[rank * rows : (rank + 1) * rows] for k, v in global_batch(name).items()}
        value, grads = loss_and_grads(name, local)
        for grad in grads.values():
            dist.all_reduce(grad)
            grad /= world
        results[name] = (value, grads)
    # gather_features itself: values in rank order, gradient summed over ranks to the owner.
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    (gathered,) = gather_features(x, gather_with_grad=True)
    weights = torch.arange(12, dtype=torch.float64).reshape(4, 3) * (rank + 1)
    (gathered * weights).sum().backward()
    results["gather"] = (gathered.detach(), x.grad)
    return results


@pytest.fixture(scope="module")
def on_two_ranks() -> list[dict]:
    return run_on_ranks(_all_cases_on_rank, WORLD)


@pytest.fixture(scope="module")
def single_process() -> dict:
    return {name: loss_and_grads(name, global_batch(name)) for name in CASES}


def test_gather_features_concatenates_in_rank_order_and_sums_gradients(on_two_ranks):
    for rank, results in enumerate(on_two_ranks):
        gathered, grad = results["gather"]
        expected = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)[:, None].expand(4, 3)
        torch.testing.assert_close(gathered, expected)
        weights = torch.arange(12, dtype=torch.float64).reshape(4, 3)
        # d/dx of sum_s (s + 1) * weights . gathered, at this rank's rows
        torch.testing.assert_close(grad, 3 * weights[2 * rank : 2 * rank + 2])


@pytest.mark.parametrize("name", EXACT)
def test_averaged_gradients_equal_single_process_gradients(name, on_two_ranks, single_process):
    _, expected = single_process[name]
    for rank, results in enumerate(on_two_ranks):
        _, grads = results[name]
        for param, grad in grads.items():
            torch.testing.assert_close(
                grad, expected[param], rtol=1e-9, atol=1e-12, msg=f"{name} {param} rank {rank}"
            )


@pytest.mark.parametrize("name", EXACT + INEXACT)
def test_rank_losses_match_single_process_loss(name, on_two_ranks, single_process):
    expected, _ = single_process[name]
    values = [results[name][0] for results in on_two_ranks]
    if CASES[name][1]["local_loss"]:
        # Each rank reports its share; their mean is the global loss.
        assert sum(values) / WORLD == pytest.approx(expected, rel=1e-12, abs=1e-12)
    else:
        assert values == pytest.approx([expected] * WORLD, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", INEXACT)
def test_local_loss_without_gradient_gather_is_inexact_except_logit_scale(
    name, on_two_ranks, single_process
):
    _, expected = single_process[name]
    _, grads = on_two_ranks[0][name]
    torch.testing.assert_close(grads["logit_scale"], expected["logit_scale"], rtol=1e-9, atol=0)
    error = max(
        (grads[p] - expected[p]).abs().max().item() for p in ("enc_a.weight", "enc_b.weight")
    )
    assert error > 1e-6, "documented as inexact; if it became exact, update the docs"


def test_no_labels_anywhere_gives_zero_loss_and_zero_gradients(on_two_ranks):
    for results in on_two_ranks:
        value, grads = results["supcon_local_no_labels"]
        assert value == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_clamped_logit_scale_gets_no_gradient_on_ranks(on_two_ranks):
    for results in on_two_ranks:
        _, grads = results["clip_local_clamped_scale"]
        assert grads["logit_scale"].item() == 0.0
        assert grads["enc_a.weight"].abs().max() > 0
