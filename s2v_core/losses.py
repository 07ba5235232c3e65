"""DASH-InfoNCE: metadata-weighted, multi-modality InfoNCE with cross-worker negatives.

The contrastive batch
    For every ordered pair of the encoded modalities ``(a, b)`` (``a != b``;
    with the random-pair objective the step encodes two, so one pair in both
    directions) and every epoch position ``e``, an *anchor* is a local window
    ``i`` in which both ``a`` and ``b`` are present; its *candidates* are the
    epochs ``e`` of modality ``b`` of every window ``j`` of the batch — the
    **global** batch of all workers (``negatives="global"``) or the worker's
    own (``"local"``, what the authors do) — in which ``b`` is present. The
    positive is ``j = i`` (same window, same epoch, other modality). Both
    directions are anchors, so the loss is the symmetric InfoNCE of CLIP.
    Comparing only the same epoch position keeps the problem ``E`` times
    smaller than comparing every epoch with every epoch.

DASH weighting
    The logit of candidate ``j`` for anchor ``i`` is
    ``scale * (s_ij - margin * h_ij) + log w_ij`` with ``scale = 1/τ``: the
    weights and the same-night handling come from ``s2v_core.dash`` — the
    project's formula (:class:`DashConfig`: same-night windows are not
    candidates, no margin; ``enabled=False`` gives plain InfoNCE) or the
    authors' (:class:`PaperDashConfig`: same-night windows stay with a tiny
    weight and a margin). Each anchor's weights are normalised over the
    candidates that hold modality ``b``.

Cross-worker negatives
    The caller passes ``rank``, ``world_size`` and ``gather`` (concatenate a
    tensor over ranks along dim 0, in rank order, with gradient for the
    embeddings, e.g. ``torch.distributed.nn.functional.all_gather``). Each
    worker scores its local anchors against the gathered global batch. The
    per-worker loss is ``world_size * (sum of local anchor losses) / (global
    number of anchors)``: its mean over workers — which is what averaging
    gradients over workers optimises — is exactly the single-process loss of
    the concatenated batch, even when workers hold different numbers of
    anchors. With ``world_size == 1`` or ``negatives="local"`` no collective
    runs, and a local loss is the mean over the worker's own anchors.

Long context
    With ``epoch_chunk`` the logits are computed ``epoch_chunk`` epoch
    positions at a time under activation checkpointing: 120-epoch windows at
    a large global batch never hold every logit at once, and the loss and its
    gradient equal the unchunked ones.

The function is shape-static: no ``nonzero``, boolean indexing, ``.item()``
or host-to-device copy, so a CUDA step never waits on the host; statistics
are 0-dim tensors, read once per logging interval with :meth:`LossOutput.to_floats`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from s2v_core.dash import (  # noqa: F401 - re-exported: callers import the weights from here
    META_KEYS,
    DashConfig,
    PaperDashConfig,
    _paper_normalise,
    _paper_raw,
    dash_log_weights,
    dash_weights,
    meta_column,
    paper_dash_weights,
)
from s2v_core.modalities import MODALITY_KEYS

NEGATIVES = ("global", "local")


@dataclass
class LossOutput:
    """Result of :func:`dash_infonce`.

    ``stats`` holds 0-dim tensors on the loss's device (reading one would
    synchronise with the device; :meth:`to_floats` reads them all in one
    transfer): ``loss``, ``temperature``, ``pairs`` (unordered modality
    pairs with at least one anchor in the batch of candidates),
    ``anchors`` (local anchors, all pairs, directions and epochs),
    ``global_batch`` (windows of candidates), ``negatives_per_anchor`` (mean
    over local anchors), and the mean weight of the negatives by category,
    each anchor's weights normalised to mean 1 over all other-night windows:
    ``weight_same_site``, ``weight_other_site``, ``weight_same_sex``,
    ``weight_other_sex`` (NaN when a category is empty; all 1 with DASH disabled).
    """

    loss: Tensor
    stats: dict[str, Tensor]

    def to_floats(self) -> dict[str, float]:
        """``stats`` as Python floats, copied to the host in one transfer."""
        keys = list(self.stats)
        if not keys:
            return {}
        values = torch.stack([self.stats[k].detach().reshape(()).float() for k in keys]).cpu().tolist()
        return dict(zip(keys, values))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    The similarities read the gathered embeddings through a permute, so their
    gradient arrives with permuted strides. ``torch.distributed.nn``'s
    all_gather backward on gloo scatters into ``empty_like(grad)`` buffers,
    which keep those strides, and gloo's scatter fills non-contiguous outputs
    wrongly (pytorch/pytorch#192920, seen here with torch 2.13): the gradients
    come back scrambled. A contiguous gradient is safe with every gather.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: D102 - autograd plumbing
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


def _gather_meta(
    meta: Mapping[str, Tensor], present: Tensor, gather: Callable[[Tensor], Tensor] | None, world_size: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    rows = present.shape[0]
    local = {k: meta_column(meta, k, rows, present.device) for k in META_KEYS}
    if world_size == 1:
        return local, local, present
    # Two collectives: one float block (age, sex, present, history), one int64 block (ids).
    floats = torch.cat([local["age"][:, None], local["sex"][:, None], present.float(), local["history"]], 1)
    ints = torch.stack([local["site_id"], local["night_id"]], 1)
    floats_all, ints_all = gather(floats.contiguous()), gather(ints.contiguous())
    nine = len(MODALITY_KEYS)
    everyone = {
        "age": floats_all[:, 0],
        "sex": floats_all[:, 1],
        "history": floats_all[:, 2 + nine :],
        "site_id": ints_all[:, 0],
        "night_id": ints_all[:, 1],
    }
    return local, everyone, floats_all[:, 2 : 2 + nine] > 0.5


def _negative_terms(
    config: DashConfig | PaperDashConfig,
    meta_local: Mapping[str, Tensor],
    meta_all: Mapping[str, Tensor],
    there: Tensor,
    positive: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Logit shifts per candidate modality and what the statistics need (no gradient).

    Returns ``shift`` ``(M, B, N)`` (``log w``, 0 at the positive, ``-inf`` where
    not a candidate of modality ``m``), ``margin`` ``(B, N)`` or ``None``,
    ``negatives`` ``(M, B)`` (candidates per anchor, positive excluded), and the
    modality-free row weights ``(B, N)`` with their other-night mask for the
    weight statistics.
    """
    candidates = there.T[:, None, :]  # (M, 1, N)
    other_night = meta_local["night_id"][:, None] != meta_all["night_id"][None, :]
    if isinstance(config, PaperDashConfig):
        raw = _paper_raw(meta_local, meta_all, config)
        same_night = ~other_night
        weights = _paper_normalise(raw[None], same_night[None], positive[None], candidates, config)
        allowed = (candidates & ~positive[None]) | positive[None]
        log_w = weights.clamp(min=config.epsilon).log()
        margin = config.same_night_margin * (same_night & ~positive).float()
        every = torch.ones_like(there[:, 0])
        row_weights = _paper_normalise(raw, same_night, positive, every[None, :], config)
    else:
        tiny = torch.finfo(torch.float32).tiny
        raw = dash_log_weights(meta_local, meta_all, config).exp() * other_night
        there_f = there.float()
        mean = (raw @ there_f) / (other_night.float() @ there_f).clamp(min=1)  # (B, M)
        log_w = raw.clamp(min=tiny).log()[None] - mean.clamp(min=tiny).log().T[:, :, None]
        allowed = (other_night[None] & candidates) | positive[None]
        margin = None
        row_mean = raw.sum(1, keepdim=True) / other_night.sum(1, keepdim=True).clamp(min=1)
        row_weights = raw / row_mean.clamp(min=1e-30)
    shift = torch.where(positive[None], 0.0, log_w).masked_fill(~allowed, float("-inf"))
    negatives = (allowed & ~positive[None]).sum(-1)
    return shift, margin, negatives, row_weights, other_night


def _weight_stats(
    weights: Tensor, negative: Tensor, meta_local: Mapping[str, Tensor], meta_all: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Mean normalised weight of the negatives, split by same/other site and sex (NaN when empty)."""

    def mean_where(mask: Tensor) -> Tensor:
        mask = (mask & negative).float()
        return (weights * mask).sum() / mask.sum()  # 0 / 0 = NaN for an empty category

    same_site = meta_local["site_id"][:, None] == meta_all["site_id"][None, :]
    sex_a, sex_b = meta_local["sex"][:, None], meta_all["sex"][None, :]
    sex_known = ~torch.isnan(sex_a) & ~torch.isnan(sex_b)
    return {
        "weight_same_site": mean_where(same_site),
        "weight_other_site": mean_where(~same_site),
        "weight_same_sex": mean_where(sex_known & (sex_a == sex_b)),
        "weight_other_sex": mean_where(sex_known & (sex_a != sex_b)),
    }


def _chunk_loss(
    q: Tensor, k: Tensor, shift: Tensor, margin: Tensor | None, scale: Tensor, weight: Tensor, offset: int
) -> Tensor:
    """Negative log-likelihood summed over the anchors of one chunk of epoch positions.

    ``q`` ``(E', M, B, P)`` anchors of each modality, ``k`` ``(E', M, N, P)`` the
    candidates of each anchor modality's partner, ``shift`` ``(M, B, N)``,
    ``margin`` ``(B, N)``, ``weight`` ``(M, B)`` 1 for real anchors; the
    positive of local row ``i`` is candidate ``offset + i``.
    """
    sim = torch.matmul(q, k.transpose(-1, -2))  # (E', M, B, N), float32
    if margin is not None:
        sim = sim - margin
    log_prob = torch.log_softmax(scale * sim + shift, dim=-1)
    rows = q.shape[2]
    picked = log_prob[..., offset : offset + rows].diagonal(dim1=-2, dim2=-1)  # (E', M, B)
    return -(picked * weight).sum()


def dash_infonce(
    per_modality: Mapping[str, Tensor],
    present: Tensor,
    meta: Mapping[str, Tensor],
    *,
    logit_scale: Tensor,
    config: DashConfig | PaperDashConfig = DashConfig(),
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Tensor], Tensor] | None = None,
    negatives: str = "global",
    epoch_chunk: int | None = None,
) -> LossOutput:
    """DASH-InfoNCE over all pairs of the given modalities and all epoch positions (module docstring).

    Parameters
    ----------
    per_modality : mapping of str to Tensor ``(B, E, P)``
        L2-normalised projections of the local batch (``EncoderOutput.per_modality``);
        similarities are computed in float32 whatever their dtype.
    present : Tensor ``(B, 9)`` bool
        Modalities used per window (``EncoderOutput.present``).
    meta : mapping
        Local ``age``, ``sex``, ``site_id``, ``night_id`` ``(B,)`` and ``history``
        ``(B, H)``; extra keys (a whole batch) are ignored.
    logit_scale : Tensor, scalar
        ``log(1/temperature)`` (``EncoderOutput.logit_scale``).
    config : DashConfig or PaperDashConfig
        Which DASH formula, with its constants (``s2v_core.dash``).
    rank, world_size : int
        This worker and the number of workers; every worker must hold the same
        number of windows ``B``.
    gather : callable, optional
        Concatenates a tensor over ranks along dim 0; must carry gradient.
        Required when ``world_size > 1`` and ``negatives == "global"``.
    negatives : {"global", "local"}
        Candidates from every worker's batch, or from this worker's only (no collective).
    epoch_chunk : int, optional
        Epoch positions per chunk of logits (checkpointed); ``None`` computes all at once.

    Returns
    -------
    LossOutput
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"dash_infonce: need 0 <= rank < world_size, found rank={rank}, world_size={world_size}")
    if negatives not in NEGATIVES:
        raise ValueError(f"dash_infonce: negatives must be one of {', '.join(NEGATIVES)}, found {negatives!r}")
    if epoch_chunk is not None and (not isinstance(epoch_chunk, int) or epoch_chunk < 1):
        raise ValueError(f"dash_infonce: epoch_chunk must be an integer >= 1 or None, found {epoch_chunk!r}")
    if not isinstance(config, (DashConfig, PaperDashConfig)):
        raise TypeError(f"dash_infonce: config must be a DashConfig or PaperDashConfig, found {type(config).__name__}")
    if negatives == "local":
        rank, world_size, gather = 0, 1, None
    if world_size > 1 and gather is None:
        raise ValueError("dash_infonce: world_size > 1 needs a gather function")
    keys = [k for k in MODALITY_KEYS if k in per_modality]
    if not keys:
        raise ValueError("dash_infonce: per_modality is empty")
    # float32 similarities even inside a bf16/fp16 autocast region (softmax over many negatives).
    with torch.autocast(device_type=present.device.type, enabled=False):
        return _infonce(
            per_modality,
            keys,
            present.bool(),
            meta,
            logit_scale=logit_scale,
            config=config,
            rank=rank,
            world_size=world_size,
            gather=gather,
            epoch_chunk=epoch_chunk,
        )


def _infonce(
    per_modality: Mapping[str, Tensor],
    keys: list[str],
    present: Tensor,
    meta: Mapping[str, Tensor],
    *,
    logit_scale: Tensor,
    config: DashConfig | PaperDashConfig,
    rank: int,
    world_size: int,
    gather: Callable[[Tensor], Tensor] | None,
    epoch_chunk: int | None,
) -> LossOutput:
    local_z = torch.stack([per_modality[k] for k in keys], 1).float()  # (B, M, E, P)
    rows, n_mod, epochs, _ = local_z.shape
    all_z = _ContiguousGrad.apply(gather(local_z.contiguous())) if world_size > 1 else local_z
    if all_z.shape[0] != rows * world_size:
        raise ValueError(
            f"dash_infonce: gathered {all_z.shape[0]} windows, expected world_size * B = "
            f"{world_size} * {rows}; every worker must hold the same batch size"
        )
    meta_local, meta_all, present_all = _gather_meta(meta, present, gather, world_size)
    columns = [MODALITY_KEYS.index(k) for k in keys]
    here = torch.stack([present[:, c] for c in columns], 1)  # (B, M)
    there = torch.stack([present_all[:, c] for c in columns], 1)  # (N, M)
    total = all_z.shape[0]
    offset = rank * rows
    scale = logit_scale.float().reshape(()).exp().clamp(max=config.max_logit_scale)

    with torch.no_grad():
        positive = (
            torch.arange(total, device=present.device)[None, :]
            == offset + torch.arange(rows, device=present.device)[:, None]
        )  # (B, N)
        shift, margin, negatives_of, row_weights, other_night = _negative_terms(
            config, meta_local, meta_all, there, positive
        )
        stats = _weight_stats(row_weights, other_night, meta_local, meta_all)

    # The partner of anchor modality a is (a + s) mod M for s = 1 … M-1: rolling the
    # candidates by s pairs every modality with one partner in one batched matmul.
    q = local_z.permute(2, 1, 0, 3).contiguous()  # (E, M, B, P)
    k = all_z.permute(2, 1, 0, 3)  # (E, M, N, P)
    chunk = epochs if epoch_chunk is None else min(epoch_chunk, epochs)
    local_sum = local_z.sum() * 0.0 + scale * 0.0  # in the graph even without a pair
    local_anchors = here.new_zeros((), dtype=torch.float32)
    global_anchors = here.new_zeros((), dtype=torch.float32)
    negatives_sum = here.new_zeros((), dtype=torch.float32)
    for step in range(1, n_mod):
        partner_k = torch.roll(k, -step, dims=1)
        partner_shift = torch.roll(shift, -step, dims=0)
        anchor = (here & torch.roll(here, -step, dims=1)).T.float()  # (M, B)
        local_anchors = local_anchors + anchor.sum()
        global_anchors = global_anchors + (there & torch.roll(there, -step, dims=1)).sum()
        negatives_sum = negatives_sum + (torch.roll(negatives_of, -step, dims=0) * anchor).sum()
        for start in range(0, epochs, chunk):
            part = (
                q[start : start + chunk],
                partner_k[start : start + chunk],
                partner_shift,
                margin,
                scale,
                anchor,
                offset,
            )
            if chunk < epochs:
                local_sum = local_sum + checkpoint(_chunk_loss, *part, use_reentrant=False, preserve_rng_state=False)
            else:
                local_sum = local_sum + _chunk_loss(*part)
    local_anchors, global_anchors = local_anchors * epochs, global_anchors * epochs
    if world_size > 1:
        loss = local_sum * world_size / global_anchors.clamp(min=1.0)
    else:
        loss = local_sum / local_anchors.clamp(min=1.0)
    there_f = there.float()
    pairs = torch.triu((there_f.T @ there_f) > 0, diagonal=1).sum()
    stats.update(
        loss=loss.detach(),
        temperature=(1.0 / scale).detach(),
        pairs=pairs.float(),
        anchors=local_anchors,
        global_batch=local_z.new_full((), float(total)),
        negatives_per_anchor=negatives_sum * epochs / local_anchors.clamp(min=1.0),
    )
    return LossOutput(loss=loss, stats=stats)
