"""The vision track's losses: contrastive ones for self-supervised pretraining (SimCLR's NT-Xent, the margin loss,
MoCo v3's InfoNCE) and the semi-supervised ones of the semi stage (FixMatch, SimCLRv2's distillation).

All are pure functions of the embeddings. Under `torchrun` the InfoNCE losses take their negatives from every
process: each process keeps its own anchors and compares them with the gathered embeddings of the global
batch, in which rank r's samples occupy rows r*B:(r+1)*B (the order of `all_gather`). The mean of the per-rank
losses is then the loss one process computes on the global batch, and DDP's gradient averaging gives its
gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor

from pipeline_lib.core import dist


def _check_pair(name1: str, x1: Tensor, name2: str, x2: Tensor) -> None:
    if x1.ndim != 2:
        raise ValueError(f"{name1} must be (B, D) embeddings, got shape {tuple(x1.shape)}")
    if x1.shape != x2.shape:
        raise ValueError(f"{name1} and {name2} must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _full_precision(x: Tensor) -> torch.autocast:
    """Compute similarities in float32 even inside a bf16/fp16 autocast region: logits of unit vectors divided
    by a small temperature lose too much in half precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows (an all-reduce, then this
    rank's slice), as SimCLR's reference implementation does. `torch.distributed.nn.functional.all_gather` is
    deprecated, and with gloo its processes can abort at exit."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rows = len(x)
        return _gather_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch_dist.all_reduce(grad)
        start = dist.rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _gather_with_grad(x: Tensor) -> Tensor:
    """(B, D) per rank -> (W*B, D), rank-major; gradients flow back to every rank's rows."""
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def _gather_no_grad(x: Tensor) -> Tensor:
    """(B, D) per rank -> (W*B, D), rank-major, detached."""
    parts = [torch.empty_like(x) for _ in range(dist.world_size())]
    torch_dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.1, gather: bool = True) -> Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (NT-Xent / InfoNCE).

    Reference: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020 (https://arxiv.org/abs/2002.05709), equation 1.

    Each of the 2B embeddings is an anchor whose positive is the other view of its image and whose negatives are
    the remaining 2B - 2 embeddings (itself excluded); logits are cosine similarities / temperature and the loss
    is the mean cross-entropy over the anchors.

    With `gather` and an initialised process group of W > 1 ranks, the candidates are the global batch:
    `[z1 of rank 0, ..., z1 of rank W-1, z2 of rank 0, ..., z2 of rank W-1]`, gathered with autograd so other
    ranks' anchors push gradients back to this rank's embeddings. Every rank must pass the same B. The mean of
    the per-rank losses equals this function on the concatenated (W*B, D) batches in one process.

    Args:
        z1: (B, D) projections of the first view.
        z2: (B, D) projections of the second view of the same B images, in the same order.
        temperature: softmax temperature, > 0.
        gather: take negatives from all ranks when running distributed.

    Returns:
        Scalar loss.

    Examples:
        >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = nt_xent(z1, z2, temperature=0.2)
        >>> loss.shape
        torch.Size([])
    """
    _check_pair("z1", z1, "z2", z2)
    _check_temperature(temperature)
    B = z1.shape[0]
    world, rank = (dist.world_size(), dist.rank()) if gather else (1, 0)
    with _full_precision(z1):
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        if world > 1:
            all1, all2 = _gather_with_grad(z1), _gather_with_grad(z2)  # (W*B, D) each
        else:
            all1, all2 = z1, z2
        N = all1.shape[0]  # global batch W*B
        anchors = torch.cat([z1, z2])  # (2B, D)
        candidates = torch.cat([all1, all2])  # (2N, D)
        logits = anchors @ candidates.T / temperature  # (2B, 2N)
        own = torch.arange(B, device=z1.device) + rank * B  # each local image's row in the global batch
        self_index = torch.cat([own, own + N])  # (2B,) where each anchor sits among the candidates
        positive_index = torch.cat([own + N, own])  # (2B,) its other view
        logits[torch.arange(2 * B, device=z1.device), self_index] = float("-inf")
        return F.cross_entropy(logits, positive_index)


def margin_contrastive(x1: Tensor, x2: Tensor, same: Tensor, *, margin: float = 1.0) -> Tensor:
    """Pairwise margin contrastive loss.

    Reference: Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006,
    equation 4 (with y = 1 for similar pairs, the opposite of the paper's label convention):

        L = 1/(2N) Σ_i [ y_i d_i² + (1 - y_i) max(margin - d_i, 0)² ],   d_i = ||x1[i] - x2[i]||₂

    Similar pairs are pulled together; dissimilar pairs are pushed apart until they are `margin` away.

    Args:
        x1: (N, D) first elements of the pairs.
        x2: (N, D) second elements.
        same: (N,) 1 (or True) for a similar pair, 0 for a dissimilar one.
        margin: distance beyond which dissimilar pairs cost nothing, > 0.

    Returns:
        Scalar loss.

    Examples:
        >>> x1, x2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> margin_contrastive(x1, x2, torch.tensor([1, 0]), margin=1.0)  # (25 + 0.5²) / 4
        tensor(6.3125)
    """
    _check_pair("x1", x1, "x2", x2)
    if same.shape != x1.shape[:1]:
        raise ValueError(f"same must have shape ({x1.shape[0]},) (one label per pair), got {tuple(same.shape)}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    y = same.to(x1.dtype)
    squared = (x1 - x2).pow(2).sum(dim=1)  # (N,) d²
    distance = squared.clamp_min(1e-12).sqrt()  # clamp: finite gradient for coinciding dissimilar pairs
    per_pair = y * squared + (1 - y) * (margin - distance).clamp_min(0).pow(2)
    return per_pair.sum() / (2 * x1.shape[0])


def margin_contrastive_views(z1: Tensor, z2: Tensor, *, margin: float = 1.0, normalize: bool = True) -> Tensor:
    """The margin loss on two views of a batch, over all B² cross-view pairs.

    Reference: Hadsell, Chopra, LeCun 2006 (see `margin_contrastive`), with SimCLR-style pairs.

    Positives are (z1[i], z2[i]); negatives are every (z1[i], z2[j]) with j != i. All B² pairs weigh the same,
    so there are B - 1 negatives per positive; negatives stop contributing once farther apart than `margin`.
    By default the embeddings are first L2-normalised, as NT-Xent's cosine similarities are: distances are
    then in [0, 2] whatever the projection's scale, so `margin` means the same for every model (orthogonal
    embeddings are √2 apart). The pairs are materialised, (B², D) per side: fine for contrastive batch sizes
    of a few hundred. Local to this process (no cross-rank negatives).

    Args:
        z1: (B, D) embeddings of the first view.
        z2: (B, D) embeddings of the second view of the same images.
        margin: distance beyond which dissimilar pairs cost nothing, > 0.
        normalize: compare unit vectors (True) or the raw embeddings (False, the paper's setting).

    Returns:
        Scalar loss.

    Examples:
        >>> z1 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> margin_contrastive_views(z1, z1.clone(), margin=1.0)  # views coincide, images 2 apart
        tensor(0.)
    """
    _check_pair("z1", z1, "z2", z2)
    if normalize:
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    B = z1.shape[0]
    first = torch.arange(B, device=z1.device).repeat_interleave(B)  # (B²,) i of pair (i, j), row-major
    second = torch.arange(B, device=z1.device).repeat(B)  # (B²,) j
    return margin_contrastive(z1[first], z2[second], first == second, margin=margin)


def _mocov3_ctr(q: Tensor, k: Tensor, *, temperature: float, gather: bool) -> Tensor:
    """InfoNCE of (B, D) queries against the keys of the global batch; the positive of q[i] is its own key."""
    B = q.shape[0]
    world, rank = (dist.world_size(), dist.rank()) if gather else (1, 0)
    with _full_precision(q):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
        keys = _gather_no_grad(k) if world > 1 else k  # (W*B, D), rank-major
        logits = q @ keys.T / temperature  # (B, W*B)
        labels = torch.arange(B, device=q.device) + rank * B
        return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, *, temperature: float = 0.2,
                gather: bool = True) -> Tensor:
    """MoCo v3's symmetrised InfoNCE: ctr(q1, k2) + ctr(q2, k1).

    Reference: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021
    (https://arxiv.org/abs/2104.02057), Algorithm 1. ctr(q, k) is the cross-entropy of the cosine similarities
    q·kᵀ / temperature with each query's own key as the target, scaled by 2 * temperature as in the paper's code.

    Keys come from the momentum encoder and are treated as constants (detached). With `gather` and W > 1 ranks
    the keys are gathered rank-major (no autograd needed) and rank r's labels are offset by r*B, so the mean of
    the per-rank losses equals this function on the global batch in one process.

    Args:
        q1: (B, D) predictor outputs of the online encoder for view 1.
        q2: (B, D) same for view 2.
        k1: (B, D) momentum-encoder projections of view 1.
        k2: (B, D) same for view 2.
        temperature: softmax temperature, > 0.
        gather: take negative keys from all ranks when running distributed.

    Returns:
        Scalar loss.

    Examples:
        >>> q1, q2, k1, k2 = (torch.randn(8, 16) for _ in range(4))
        >>> loss = mocov3_loss(q1, q2, k1, k2, temperature=0.2)
        >>> loss.shape
        torch.Size([])
    """
    for name, x in (("q2", q2), ("k1", k1), ("k2", k2)):
        _check_pair("q1", q1, name, x)
    _check_temperature(temperature)
    return (_mocov3_ctr(q1, k2, temperature=temperature, gather=gather)
            + _mocov3_ctr(q2, k1, temperature=temperature, gather=gather))


CONTRASTIVE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "nt_xent": nt_xent,
    "margin": margin_contrastive_views,
}
"""SimCLR two-view losses by `pretrain.loss` name: `CONTRASTIVE_LOSSES[name](z1, z2, **hyperparameters)`."""


def fixmatch_loss(weak_logits: Tensor, strong_logits: Tensor, *, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch's unlabeled loss: the weak view's confident predictions are the strong view's hard targets.

    Reference: Sohn et al., "FixMatch", NeurIPS 2020 (https://arxiv.org/abs/2001.07685), eq. (4): the mean over
    all B unlabeled images of 1[max p_weak >= threshold] * H(argmax p_weak, p_strong). The weak view's logits are
    targets, never differentiated.

    Args:
        weak_logits: (B, K) logits of the weakly augmented images.
        strong_logits: (B, K) logits of the strongly augmented views of the same images.
        threshold: the confidence a pseudo-label needs, in (0, 1].

    Returns:
        The scalar loss, and the share of images whose pseudo-label passed (the mask rate).

    Examples:
        >>> loss, mask_rate = fixmatch_loss(torch.randn(8, 10), torch.randn(8, 10), threshold=0.95)
    """
    _check_pair("weak_logits", weak_logits, "strong_logits", strong_logits)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: a confidence must be in (0, 1]")
    with _full_precision(strong_logits):
        confidence, pseudo = torch.softmax(weak_logits.detach().float(), dim=1).max(dim=1)  # (B,), (B,)
        mask = (confidence >= threshold).float()
        loss = (F.cross_entropy(strong_logits.float(), pseudo, reduction="none") * mask).mean()
    return loss, mask.mean()


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """SimCLRv2's distillation loss: cross-entropy of the student against the teacher, both at `temperature`.

    Reference: Chen et al., "Big Self-Supervised Models are Strong Semi-Supervised Learners", NeurIPS 2020
    (https://arxiv.org/abs/2006.10029), eq. (3): -sum_y P_T(y | x; tau) log P_S(y | x; tau), averaged over the
    batch. The teacher's logits are constants.

    Args:
        student_logits: (B, K).
        teacher_logits: (B, K), of the same images.
        temperature: tau, > 0.

    Examples:
        >>> loss = distillation_loss(torch.randn(8, 10), torch.randn(8, 10), temperature=1.0)
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_temperature(temperature)
    with _full_precision(student_logits):
        targets = torch.softmax(teacher_logits.detach().float() / temperature, dim=1)
        log_probs = torch.log_softmax(student_logits.float() / temperature, dim=1)
        return -(targets * log_probs).sum(dim=1).mean()
