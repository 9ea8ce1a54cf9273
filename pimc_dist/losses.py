"""Contrastive losses gathered across data-parallel ranks.

CLIP/InfoNCE between two views (`ClipLoss`), NT-Xent between two augmentations of one view
(`NTXentLoss`), multi-label supervised contrastive (`SupConLoss`), sigmoid pairwise (`SigLipLoss`)
and their MoSAiC combination (`MosaicLoss`).

Conventions shared by every loss here:

- Features are ``(B, D)`` per rank, the same ``B`` on every rank (the data pipeline drops
  partial batches). They are L2-normalised inside the loss unless ``normalize=False``.
- bfloat16/float16 inputs are computed in float32; float64 stays float64.
- ``logit_scale`` is the learnable parameter as CLIP stores it: the *log* of the multiplier
  applied to cosine similarities (``log(1 / 0.07)`` at start, see `logit_scale_parameter`).
  The loss applies ``exp`` and clamps the multiplier at ``max_logit_scale`` (100 like CLIP);
  above the clamp its gradient is zero, so the scale stops growing. open_clip's losses take
  the multiplier itself (``model.logit_scale.exp()``): a first value above
  ``log(max_logit_scale)``, which can only be a multiplier, warns (once per process).
- Gathering uses ``torch.distributed`` when a process group is initialised; without one (or with
  world size 1) every loss is the plain single-process loss. Features are gathered after the
  float32 cast, so gradients are summed across ranks in float32.
- What a rank returns: with ``local_loss`` its share ``L_r`` of the global loss (the mean over
  ranks is the global loss: all-reduce it before logging); the full form returns the global
  loss itself on every rank.

Gradient contract: after data-parallel gradient averaging (mean over ranks, what DDP and
DeepSpeed do), parameter gradients equal those of the same loss computed in one process over the
global batch. Which settings meet it exactly:

==============  ==================  ======================================================
local_loss      gather_with_grad    exact?
==============  ==================  ======================================================
True (default)  True (default)      yes; each rank builds B x (B*W) logits (linear memory)
False           True                yes; each rank builds the (B*W)^2 logits
False           False               yes; the local slice's gradient is scaled by W instead
                                    of summing the other ranks' copies (same value)
True            False               NO: other ranks' gradients to this rank's features are
                                    dropped (only its own rows and its own columns of
                                    the logits reach it); loss values and the logit-scale
                                    gradient are still exact
==============  ==================  ======================================================

Why averaging works: with ``local_loss`` rank r returns ``L_r`` whose mean over ranks is the
global loss ``L``. The gathered copies of rank r's features carry gradient back to rank r
summed over all ranks, so rank r's feature gradient is ``d(sum_s L_s)/dx_r = W dL/dx_r``, and
the mean over ranks of the parameter gradients is ``dL/dtheta``. The logit scale is replicated
and only seen locally, so its averaged gradient is ``mean_r dL_r/ds = dL/ds``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_MAX_LOGIT_SCALE = 100.0
POSITIVE_MODES = ("any", "weighted")


def logit_scale_parameter(temperature: float = 0.07) -> nn.Parameter:
    """Learnable log logit scale initialised to ``log(1 / temperature)`` (CLIP's init)."""
    return nn.Parameter(torch.tensor(math.log(1.0 / temperature)))


def logit_bias_parameter(init: float = -10.0) -> nn.Parameter:
    """Learnable logit bias for `SigLipLoss` (SigLIP initialises it to -10)."""
    return nn.Parameter(torch.tensor(float(init)))


def dist_rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# Newer torch renames all_gather_into_tensor/reduce_scatter_tensor; use whichever exists.
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None
)


def _all_gather_rows(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 (rank order), without autograd."""
    _, world = dist_rank_and_world(group)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows forward; backward sums each rank's gradient for our slice over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        ctx.rows = x.shape[0]
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        rank, _ = dist_rank_and_world(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep our rows.
        summed = grad.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        return summed[rank * ctx.rows : (rank + 1) * ctx.rows], None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def gather_features(
    *features: Tensor,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, ...]:
    """Concatenate each tensor's rows over all ranks (rank order); identity without a group.

    With ``gather_with_grad`` the gradient of every gathered copy flows back to the rank that
    owns it (summed over ranks). Without it the gather carries no gradient except through this
    rank's own slice, which is the input itself; for the full loss (``local_loss=False``) that
    slice's gradient is multiplied by the world size, which equals the sum over ranks because
    every rank computes the same full loss. With ``local_loss=True`` and no gradient gather the
    other ranks' gradient terms are lost (see the module docstring).
    """
    rank, world = dist_rank_and_world(group)
    if world == 1:
        return tuple(features)
    gathered = []
    for x in features:
        if gather_with_grad:
            gathered.append(_AllGatherWithGrad.apply(x, group))
            continue
        with torch.no_grad():
            everyone = _all_gather_rows(x, group)
        own = x if local_loss else _ScaleGrad.apply(x, float(world))
        rows = x.shape[0]
        gathered.append(
            torch.cat([everyone[: rank * rows], own, everyone[(rank + 1) * rows :]], dim=0)
        )
    return tuple(gathered)


def _compute_dtype_features(x: Tensor, normalize: bool) -> Tensor:
    # Half-precision logits lose the small differences InfoNCE lives on; compute in float32.
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, dim=-1) if normalize else x


def _logit_multiplier(logit_scale: Tensor | float, max_logit_scale: float, like: Tensor) -> Tensor:
    log_scale = torch.as_tensor(logit_scale, device=like.device).to(like.dtype)
    return log_scale.exp().clamp(max=max_logit_scale)


_warned_multiplier = False  # the log-vs-multiplier warning, once per process


def _check_log_scale(logit_scale: Tensor | float, max_logit_scale: float) -> None:
    """Warn (once per process) when `logit_scale` looks like a multiplier, not its log."""
    global _warned_multiplier
    if _warned_multiplier:
        return
    if isinstance(logit_scale, Tensor):
        if logit_scale.device.type == "meta" or logit_scale.numel() == 0:
            return
        value = float(logit_scale.detach().max())
    else:
        value = float(logit_scale)
    limit = math.log(max_logit_scale)
    if value > limit:
        _warned_multiplier = True
        warnings.warn(
            f"logit_scale={value:.4g} is above log(max_logit_scale)={limit:.4g}: it looks like the "
            "multiplier of the similarities (open_clip's convention: pass "
            "model.logit_scale.exp()), but pimc_dist losses take its log (CLIP's parameter "
            f"as stored, e.g. log(1/0.07) = {math.log(1 / 0.07):.4g}) and apply exp themselves; "
            "pass the log (the multiplier is then clamped at max_logit_scale).",
            UserWarning,
            stacklevel=3,
        )


def _check_features(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (batch, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def _check_pair(a: Tensor, b: Tensor) -> None:
    _check_features("first view", a)
    _check_features("second view", b)
    if a.shape != b.shape:
        raise ValueError(f"the two views differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def _masked(logits: Tensor, mask: Tensor) -> Tensor:
    # A finite fill (not -inf) keeps fully masked rows NaN-free; exp(min - max) is still 0.
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


class _GatheredLoss(nn.Module):
    """Options shared by the gathered losses."""

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        normalize: bool = True,
        max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.normalize = normalize
        self.max_logit_scale = max_logit_scale
        self.group = group

    def _scale(self, logit_scale: Tensor | float, like: Tensor) -> Tensor:
        """The clamped multiplier from the log scale; the first call of each loss module also
        checks (one device sync) that it was given the log, not the multiplier."""
        if not getattr(self, "_scale_checked", False):
            self._scale_checked = True
            _check_log_scale(logit_scale, self.max_logit_scale)
        return _logit_multiplier(logit_scale, self.max_logit_scale, like)

    def _gather(self, *features: Tensor) -> tuple[Tensor, ...]:
        return gather_features(
            *features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            group=self.group,
        )

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"normalize={self.normalize}, max_logit_scale={self.max_logit_scale}"
        )


class ClipLoss(_GatheredLoss):
    """Symmetric InfoNCE between two views of the same samples (CLIP), gathered over ranks.

    ``loss(a, b, logit_scale)``: row i of ``a`` and row i of ``b`` are a positive pair, every
    other row of the global batch is a negative; the loss is the mean of the a->b and b->a
    cross-entropies over the global batch (with ``local_loss``, over this rank's rows).
    """

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
        _check_pair(a, b)
        a = _compute_dtype_features(a, self.normalize)
        b = _compute_dtype_features(b, self.normalize)
        scale = self._scale(logit_scale, a)
        rank, world = dist_rank_and_world(self.group)
        all_a, all_b = self._gather(a, b)
        if self.local_loss and world > 1:
            targets = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
            logits_ab = scale * a @ all_b.T
            logits_ba = scale * b @ all_a.T
        else:  # one matrix serves both directions (also the cheaper path on one rank)
            targets = torch.arange(all_a.shape[0], device=a.device)
            logits_ab = scale * all_a @ all_b.T
            logits_ba = logits_ab.T
        return (F.cross_entropy(logits_ab, targets) + F.cross_entropy(logits_ba, targets)) / 2


class NTXentLoss(_GatheredLoss):
    """NT-Xent (SimCLR) between two augmentations of one view, gathered over ranks.

    ``loss(a, b, logit_scale)``: the 2N embeddings of the global batch (N = B * world size) are
    each an anchor; its positive is the other augmentation of the same sample, the other 2N - 2
    are negatives, itself is masked. Mean over the 2N anchors (with ``local_loss``, over this
    rank's 2B anchors). SimCLR's temperature tau is ``logit_scale = log(1 / tau)``.
    """

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor | float) -> Tensor:
        _check_pair(a, b)
        a = _compute_dtype_features(a, self.normalize)
        b = _compute_dtype_features(b, self.normalize)
        scale = self._scale(logit_scale, a)
        rank, world = dist_rank_and_world(self.group)
        rows_per_rank = a.shape[0]
        n_global = rows_per_rank * world
        all_a, all_b = self._gather(a, b)
        columns = torch.cat([all_a, all_b])  # global index: a rows 0..N-1, b rows N..2N-1
        if self.local_loss:
            anchors = torch.cat([a, b])
            own = torch.arange(rows_per_rank, device=a.device) + rank * rows_per_rank
            anchor_index = torch.cat([own, own + n_global])
        else:
            anchors = columns
            anchor_index = torch.arange(2 * n_global, device=a.device)
        positive_index = (anchor_index + n_global) % (2 * n_global)
        logits = scale * anchors @ columns.T
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(len(anchor_index), device=a.device), anchor_index] = True
        return F.cross_entropy(_masked(logits, is_self), positive_index)


class SupConLoss(_GatheredLoss):
    """Multi-label supervised contrastive loss (SupCon, L_out form), gathered over ranks.

    ``loss(features, labels, logit_scale, has_label=None)`` with ``labels`` a ``(B, C)``
    multi-hot matrix. For anchor i the positives are the other samples sharing at least one
    label; with ``positives="any"`` each has weight 1, with ``"weighted"`` its weight is the
    Jaccard overlap of the two label sets. The anchor's term is
    ``-sum_p w_ip log softmax_i(p) / sum_p w_ip`` where the softmax runs over all other
    labelled samples.

    Samples without labels (an all-zero row, or ``has_label`` False) take no part at all: not
    anchors, not positives, not negatives (an unlabelled sample may share the anchor's classes,
    so calling it a negative would be a guess). Anchors without positives are left out of the
    mean; with no valid anchor anywhere the loss is 0 with a graph (zero gradients, not NaN).
    The mean is over valid anchors of the *global* batch: with ``local_loss`` each rank scales
    its sum by ``world / n_valid_global`` (one scalar all-reduce), so the contract holds even
    when ranks hold different numbers of labelled samples.

    Fed two modalities of the same samples (as `MosaicLoss` does, labels repeated), a sample's
    other-modality embedding shares all its labels and so counts as a positive (Jaccard 1).
    """

    def __init__(self, positives: str = "any", **options) -> None:
        super().__init__(**options)
        if positives not in POSITIVE_MODES:
            raise ValueError(f"positives must be one of {POSITIVE_MODES}, got {positives!r}")
        self.positives = positives

    def forward(
        self,
        features: Tensor,
        labels: Tensor,
        logit_scale: Tensor | float,
        has_label: Tensor | None = None,
    ) -> Tensor:
        _check_features("features", features)
        rows = features.shape[0]
        if labels.dim() != 2 or labels.shape[0] != rows:
            raise ValueError(
                f"labels must be (batch, classes) multi-hot with batch {rows}, "
                f"got shape {tuple(labels.shape)}"
            )
        if has_label is not None and tuple(has_label.shape) != (rows,):
            raise ValueError(f"has_label must have shape ({rows},), got {tuple(has_label.shape)}")
        features = _compute_dtype_features(features, self.normalize)
        scale = self._scale(logit_scale, features)
        rank, world = dist_rank_and_world(self.group)

        labels = (labels > 0).to(features.dtype)
        if has_label is not None:
            labels = labels * has_label.to(device=labels.device, dtype=labels.dtype)[:, None]
        (all_features,) = self._gather(features)
        all_labels = _all_gather_rows(labels, self.group) if world > 1 else labels

        if self.local_loss:
            anchors, anchor_labels = features, labels
            anchor_index = torch.arange(rows, device=features.device) + rank * rows
        else:
            anchors, anchor_labels = all_features, all_labels
            anchor_index = torch.arange(all_features.shape[0], device=features.device)
        anchor_range = torch.arange(len(anchor_index), device=features.device)

        shared = anchor_labels @ all_labels.T  # labels in common, per anchor and column
        if self.positives == "weighted":
            union = anchor_labels.sum(1, keepdim=True) + all_labels.sum(1) - shared
            weight = shared / union.clamp_min(1)
        else:
            weight = (shared > 0).to(shared.dtype)
        weight[anchor_range, anchor_index] = 0  # a sample is not its own positive

        excluded = (all_labels.sum(1) == 0).expand(len(anchor_index), -1).clone()
        excluded[anchor_range, anchor_index] = True
        logits = _masked(scale * anchors @ all_features.T, excluded)
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)

        weight_sum = weight.sum(1)
        valid = weight_sum > 0
        per_anchor = -(weight * log_prob).sum(1) / weight_sum.clamp_min(1e-12)
        total = torch.where(valid, per_anchor, torch.zeros_like(per_anchor)).sum()

        n_valid = valid.sum().to(total.dtype)
        if self.local_loss and world > 1:
            dist.all_reduce(n_valid, group=self.group)
            return total * world / n_valid.clamp_min(1)
        return total / n_valid.clamp_min(1)


class SigLipLoss(_GatheredLoss):
    """Sigmoid pairwise loss (SigLIP), gathered over ranks by all-gather.

    ``loss(a, b, logit_scale, logit_bias)``: every (a_i, b_j) pair of the global batch is a
    binary problem, positive when i == j; the loss is
    ``-sum_ij log sigmoid(z_ij (s a_i.b_j + bias)) / N`` (with ``local_loss``, this rank's rows
    divided by B; only ``b`` is gathered then). SigLIP's init: `logit_scale_parameter(0.1)`,
    `logit_bias_parameter(-10)`.
    """

    def forward(
        self, a: Tensor, b: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float
    ) -> Tensor:
        _check_pair(a, b)
        a = _compute_dtype_features(a, self.normalize)
        b = _compute_dtype_features(b, self.normalize)
        scale = self._scale(logit_scale, a)
        bias = torch.as_tensor(logit_bias, device=a.device).to(a.dtype)
        rank, _ = dist_rank_and_world(self.group)
        if self.local_loss:
            (all_b,) = self._gather(b)
            anchors = a
            anchor_index = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
        else:
            anchors, all_b = self._gather(a, b)
            anchor_index = torch.arange(anchors.shape[0], device=a.device)
        logits = scale * anchors @ all_b.T + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(len(anchor_index), device=a.device), anchor_index] = 1
        return -F.logsigmoid(signs * logits).sum() / anchors.shape[0]


class MosaicLoss(nn.Module):
    """MoSAiC pretraining loss over optical (S2) and SAR (S1) views, two augmentations each.

    ``total = w_intra * (NTXent(s2_a, s2_b) + NTXent(s1_a, s1_b)) + w_inter * Clip(s2_a, s1_a)
    + w_sup * SupCon([s2_a; s1_a], [labels; labels])``.

    The inter-modality and supervised terms use the first augmentation (``*_a``) of each
    modality; the second only feeds the intra-modality terms, so every term sees each sample
    once per modality. All terms share one learnable ``logit_scale`` (log multiplier). A term
    with weight 0 is not computed and not reported. ``forward`` returns the total and the
    unweighted, detached terms for logging: ``intra_s2``, ``intra_s1``, ``inter``, ``sup``.
    """

    def __init__(
        self,
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        w_sup: float = 1.0,
        positives: str = "any",
        local_loss: bool = True,
        gather_with_grad: bool = True,
        normalize: bool = True,
        max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        weights = {"w_intra": w_intra, "w_inter": w_inter, "w_sup": w_sup}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {weights}")
        self.w_intra, self.w_inter, self.w_sup = w_intra, w_inter, w_sup
        options = dict(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            normalize=normalize,
            max_logit_scale=max_logit_scale,
            group=group,
        )
        self.intra = NTXentLoss(**options)
        self.inter = ClipLoss(**options)
        self.sup = SupConLoss(positives=positives, **options)

    def forward(
        self,
        s2_a: Tensor,
        s2_b: Tensor,
        s1_a: Tensor,
        s1_b: Tensor,
        labels: Tensor | None,
        logit_scale: Tensor | float,
        has_label: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        total = 0.0
        if self.w_intra > 0:
            terms["intra_s2"] = self.intra(s2_a, s2_b, logit_scale)
            terms["intra_s1"] = self.intra(s1_a, s1_b, logit_scale)
            total = total + self.w_intra * (terms["intra_s2"] + terms["intra_s1"])
        if self.w_inter > 0:
            terms["inter"] = self.inter(s2_a, s1_a, logit_scale)
            total = total + self.w_inter * terms["inter"]
        if self.w_sup > 0:
            if labels is None:
                # Every rank must join the same collectives: pass zero rows, not None.
                raise ValueError("w_sup > 0 needs labels; mark unlabelled samples with zero rows")
            both_labels = torch.cat([labels, labels])
            both_has = None if has_label is None else torch.cat([has_label, has_label])
            terms["sup"] = self.sup(torch.cat([s2_a, s1_a]), both_labels, logit_scale, both_has)
            total = total + self.w_sup * terms["sup"]
        return total, {name: value.detach() for name, value in terms.items()}
