"""DASH-InfoNCE: metadata-weighted, multi-modality InfoNCE with cross-worker negatives.

The contrastive batch
    For every ordered pair of modalities ``(a, b)`` (``a != b``) and every epoch
    position ``e``, an *anchor* is a local window ``i`` in which both ``a`` and
    ``b`` are present; its *candidates* are the epochs ``e`` of modality ``b``
    of every window ``j`` of the **global** batch (all workers) in which ``b``
    is present. The positive is ``j = i`` (same window, same epoch, other
    modality). Negatives are the candidates of other nights: windows of the
    same night (``night_id``) are never negatives (they share the subject, so
    pushing them apart would be wrong). Both directions ``a → b`` and
    ``b → a`` are anchors, so the loss is the symmetric InfoNCE of CLIP.
    Comparing only the same epoch position keeps the problem ``E`` times
    smaller than comparing every epoch with every epoch and is what the
    backbone's position embeddings make meaningful.

DASH weighting
    The logit of negative ``j`` for anchor ``i`` is shifted by ``log w_ij``,
    i.e. the negative counts ``w_ij`` times in the denominator (the
    importance-weighted InfoNCE of hard-negative sampling). ``w_ij`` is a
    product of factors, each 1 (neutral) when the metadata is missing on
    either side::

        w_ij = f_sex * f_age * f_site * f_history
        f_sex  = same_sex_factor  | other_sex_factor
        f_site = same_site_factor | other_site_factor
        f_age  = age_factor ** (2 * exp(-|age_i - age_j| / age_sigma_years) - 1)
        f_history = history_factor ** (2 * agreement - 1)

    so nights that are alike in **D**emography, **A**ge, **S**ite and
    **H**istory are harder negatives: the model cannot separate them by a
    cohort shortcut. ``f_age`` runs from ``age_factor`` (same age) through 1
    (``|Δage| = σ ln 2``) to ``1/age_factor`` (very different ages);
    ``agreement`` is the fraction of history flags known for both nights that
    agree (flags binarised at 0.5). Each anchor's weights over its negatives
    are normalised to mean 1, so with all weights equal the loss is exactly
    the standard InfoNCE.

Cross-worker negatives
    The caller passes ``rank``, ``world_size`` and ``gather`` (concatenate a
    tensor over ranks along dim 0, in rank order, with gradient for the
    embeddings, e.g. ``torch.distributed.nn.functional.all_gather``). Each
    worker scores its local anchors against the gathered global batch. The
    per-worker loss is ``world_size * (sum of local anchor losses) / (global
    number of anchors)``: its mean over workers — which is what averaging
    gradients over workers optimises — is exactly the single-process loss of
    the concatenated batch, even when workers hold different numbers of
    anchors. With ``world_size == 1`` no collective runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from s2v_core.modalities import MODALITY_KEYS

META_KEYS = ("age", "sex", "site_id", "night_id", "history")


@dataclass(frozen=True)
class DashConfig:
    """Constants of DASH-InfoNCE (see the module docstring for the formula)."""

    enabled: bool = True  # False → every w_ij = 1: plain InfoNCE (same-night masking stays)
    age_sigma_years: float = 10.0  # age kernel scale: |Δage| = σ ln 2 ≈ 7 years is neutral
    age_factor: float = 1.5  # weight of a same-age negative; very different ages get 1/1.5
    same_site_factor: float = 2.0  # site is the strongest shortcut (montage, amplifier, scorer)
    other_site_factor: float = 0.5  # = 1/same_site_factor: other-site nights are easy negatives
    same_sex_factor: float = 1.25  # sex shapes EEG power and respiration modestly
    other_sex_factor: float = 0.8  # = 1/same_sex_factor
    history_factor: float = 1.25  # all known history flags agree → 1.25, all disagree → 0.8
    history_threshold: float = 0.5  # a history value above this counts as a positive flag
    max_logit_scale: float = 100.0  # CLIP's clamp of 1/temperature, keeps logits bounded

    def __post_init__(self) -> None:
        for name in ("age_sigma_years", "age_factor", "same_site_factor", "other_site_factor",
                     "same_sex_factor", "other_sex_factor", "history_factor", "max_logit_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DashConfig.{name} must be a finite number > 0, found {value!r}")


@dataclass
class LossOutput:
    """Result of :func:`dash_infonce`.

    ``stats`` (plain floats, for logging): ``loss``, ``temperature``,
    ``pairs`` (unordered modality pairs with at least one anchor in the global
    batch), ``anchors`` (local anchors, all pairs, directions and epochs),
    ``global_batch`` (windows), ``negatives_per_anchor`` (mean over local
    anchors), and the mean weight of the negatives by category, with each
    anchor's weights normalised to mean 1 over all other-night windows of the
    global batch: ``weight_same_site``, ``weight_other_site``,
    ``weight_same_sex``, ``weight_other_sex`` (NaN when a category is empty;
    all 1 with DASH disabled).
    """

    loss: Tensor
    stats: dict[str, float]


def _column(meta: Mapping[str, Tensor], key: str, rows: int, device: torch.device) -> Tensor:
    if key == "history":
        value = meta.get("history")
        if value is None:
            return torch.zeros(rows, 0, device=device)
        value = torch.as_tensor(value, device=device, dtype=torch.float32)
        return value.reshape(rows, -1)
    if key not in meta:
        if key in ("site_id", "night_id"):
            raise ValueError(f"dash_infonce: meta lacks {key!r}; expected keys {', '.join(META_KEYS)}")
        return torch.full((rows,), float("nan"), device=device)
    dtype = torch.int64 if key in ("site_id", "night_id") else torch.float32
    value = torch.as_tensor(meta[key], device=device, dtype=dtype)
    if value.shape != (rows,):
        raise ValueError(f"dash_infonce: meta[{key!r}] must have shape ({rows},), found {tuple(value.shape)}")
    return value


def _meta_columns(meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All of :data:`META_KEYS` as tensors (numpy arrays accepted), missing ones as unknown."""
    if "night_id" not in meta:
        raise ValueError(f"dash_infonce: meta lacks 'night_id'; expected keys {', '.join(META_KEYS)}")
    nights = meta["night_id"]
    device = nights.device if isinstance(nights, Tensor) else torch.device("cpu")
    return {k: _column(meta, k, len(nights), device) for k in META_KEYS}


def dash_log_weights(meta_anchor: Mapping[str, Tensor], meta_all: Mapping[str, Tensor],
                     config: DashConfig) -> Tensor:
    """Unnormalised ``log w_ij`` ``(A, N)`` of anchors vs candidates (symmetric in i, j).

    Same inputs as :func:`dash_weights`; all zeros when ``config.enabled`` is false.
    """
    a, b = _meta_columns(meta_anchor), _meta_columns(meta_all)
    log_w = torch.zeros(len(a["night_id"]), len(b["night_id"]), device=a["night_id"].device)
    if not config.enabled:
        return log_w
    if a["history"].shape[1] != b["history"].shape[1]:
        raise ValueError(f"dash_weights: anchors have {a['history'].shape[1]} history columns, "
                         f"candidates {b['history'].shape[1]}")

    same_site = a["site_id"][:, None] == b["site_id"][None, :]
    log_w += torch.where(same_site, math.log(config.same_site_factor), math.log(config.other_site_factor))

    sex_known = ~torch.isnan(a["sex"])[:, None] & ~torch.isnan(b["sex"])[None, :]
    same_sex = a["sex"][:, None] == b["sex"][None, :]
    sex_term = torch.where(same_sex, math.log(config.same_sex_factor), math.log(config.other_sex_factor))
    log_w += torch.where(sex_known, sex_term, 0.0)

    age_gap = (a["age"][:, None] - b["age"][None, :]).abs()
    kernel = torch.exp(-age_gap / config.age_sigma_years)
    age_term = math.log(config.age_factor) * (2.0 * kernel - 1.0)
    log_w += torch.nan_to_num(age_term, nan=0.0)  # NaN age on either side → neutral

    if a["history"].shape[1]:
        ha, hb = a["history"], b["history"]
        known = (~torch.isnan(ha)).float() @ (~torch.isnan(hb)).float().T  # flags known on both sides
        pa, pb = (ha > config.history_threshold).float(), (hb > config.history_threshold).float()
        na = (~torch.isnan(ha)).float() - pa  # known and negative (NaN > x is False)
        nb = (~torch.isnan(hb)).float() - pb
        agree = pa @ pb.T + na @ nb.T
        agreement = torch.where(known > 0, agree / known.clamp(min=1), 0.5)  # 0.5 → neutral
        log_w += math.log(config.history_factor) * (2.0 * agreement - 1.0)
    return log_w


def dash_weights(meta_anchor: Mapping[str, Tensor], meta_all: Mapping[str, Tensor],
                 config: DashConfig = DashConfig(), *, normalise: bool = True) -> Tensor:
    """DASH negative weights ``w_ij`` of anchors (rows) against candidates (columns).

    Parameters
    ----------
    meta_anchor, meta_all : mapping
        ``age`` (years, NaN unknown), ``sex`` (0/1, NaN unknown), ``site_id``
        and ``night_id`` (int64) of shape ``(rows,)``, and optionally
        ``history`` ``(rows, H)`` (0/1 flags, NaN unknown).
    config : DashConfig
    normalise : bool
        If true (default), zero the same-night entries and scale each row to
        mean 1 over its negatives (other nights); otherwise return the raw,
        symmetric product of factors.

    Returns
    -------
    Tensor ``(A, N)`` float32.
    """
    weights = dash_log_weights(meta_anchor, meta_all, config).exp()
    if not normalise:
        return weights
    nights_a, nights_b = _meta_columns(meta_anchor)["night_id"], _meta_columns(meta_all)["night_id"]
    negative = nights_a[:, None] != nights_b[None, :]
    weights = weights * negative
    mean = weights.sum(1, keepdim=True) / negative.sum(1, keepdim=True).clamp(min=1)
    return weights / mean.clamp(min=torch.finfo(weights.dtype).tiny)


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


def _gather_meta(meta: Mapping[str, Tensor], present: Tensor, gather: Callable[[Tensor], Tensor] | None,
                 world_size: int) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    rows = present.shape[0]
    local = {k: _column(meta, k, rows, present.device) for k in META_KEYS}
    if world_size == 1:
        return local, local, present
    # Two collectives: one float block (age, sex, present, history), one int64 block (ids).
    floats = torch.cat([local["age"][:, None], local["sex"][:, None], present.float(), local["history"]], 1)
    ints = torch.stack([local["site_id"], local["night_id"]], 1)
    floats_all, ints_all = gather(floats.contiguous()), gather(ints.contiguous())
    nine = len(MODALITY_KEYS)
    everyone = {"age": floats_all[:, 0], "sex": floats_all[:, 1], "history": floats_all[:, 2 + nine:],
                "site_id": ints_all[:, 0], "night_id": ints_all[:, 1]}
    return local, everyone, floats_all[:, 2:2 + nine] > 0.5


def dash_infonce(per_modality: Mapping[str, Tensor], present: Tensor, meta: Mapping[str, Tensor], *,
                 logit_scale: Tensor, config: DashConfig = DashConfig(), rank: int = 0,
                 world_size: int = 1, gather: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """DASH-InfoNCE over all modality pairs and epoch positions (see the module docstring).

    Parameters
    ----------
    per_modality : mapping of str to Tensor ``(B, E, P)``
        L2-normalised projections of the local batch (``EncoderOutput.per_modality``).
    present : Tensor ``(B, 9)`` bool
        Modalities used per window (``EncoderOutput.present``).
    meta : mapping
        Local ``age``, ``sex``, ``site_id``, ``night_id`` ``(B,)`` and ``history``
        ``(B, H)``; extra keys (a whole batch) are ignored.
    logit_scale : Tensor, scalar
        ``log(1/temperature)`` (``SleepEncoder.logit_scale``).
    config : DashConfig
    rank, world_size : int
        This worker and the number of workers; every worker must hold the same
        number of windows ``B``.
    gather : callable, optional
        Concatenates a tensor over ranks along dim 0; must carry gradient.
        Required when ``world_size > 1``.

    Returns
    -------
    LossOutput
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"dash_infonce: need 0 <= rank < world_size, found rank={rank}, world_size={world_size}")
    if world_size > 1 and gather is None:
        raise ValueError("dash_infonce: world_size > 1 needs a gather function")
    keys = [k for k in MODALITY_KEYS if k in per_modality]
    if not keys:
        raise ValueError("dash_infonce: per_modality is empty")
    present = present.bool()
    # float32 similarities even when the encoder runs in bf16/fp16 (softmax over many negatives).
    local_z = torch.stack([per_modality[k] for k in keys], 1).float()  # (B, M, E, P)
    rows, n_mod, epochs, _ = local_z.shape
    all_z = _ContiguousGrad.apply(gather(local_z.contiguous())) if world_size > 1 else local_z
    if all_z.shape[0] != rows * world_size:
        raise ValueError(f"dash_infonce: gathered {all_z.shape[0]} windows, expected world_size * B = "
                         f"{world_size} * {rows}; every worker must hold the same batch size")
    meta_local, meta_all, present_all = _gather_meta(meta, present, gather, world_size)
    columns = torch.tensor([MODALITY_KEYS.index(k) for k in keys], device=present.device)
    here, there = present[:, columns], present_all[:, columns]  # (B, M), (N, M)

    # Ordered pairs a != b; anchors need both modalities, candidates need b.
    a_idx, b_idx = torch.triu_indices(n_mod, n_mod, 1, device=present.device)
    a_idx, b_idx = torch.cat([a_idx, b_idx]), torch.cat([b_idx, a_idx])
    anchor_ok = (here[:, a_idx] & here[:, b_idx]).T  # (K, B)
    global_anchors = (there[:, a_idx] & there[:, b_idx]).sum() * epochs
    pairs = int((there[:, a_idx] & there[:, b_idx]).any(0).sum()) // 2
    scale = logit_scale.exp().clamp(max=config.max_logit_scale)
    stats = {"temperature": float(1.0 / scale.detach()), "pairs": float(pairs),
             "global_batch": float(all_z.shape[0])}

    with torch.no_grad():
        positive = torch.zeros(rows, all_z.shape[0], dtype=torch.bool, device=present.device)
        local_rows = torch.arange(rows, device=present.device)
        positive[local_rows, rank * rows + local_rows] = True
        negative = meta_local["night_id"][:, None] != meta_all["night_id"][None, :]  # (B, N)
        raw = dash_log_weights(meta_local, meta_all, config).exp() * negative
        # Normalise each anchor's weights to mean 1 over its negatives of candidate modality b.
        cand = there.float()  # (N, M)
        mean = (raw @ cand) / (negative.float() @ cand).clamp(min=1)  # (B, M)
        log_w = raw.clamp(min=torch.finfo(raw.dtype).tiny).log()[None] - \
            mean.clamp(min=torch.finfo(raw.dtype).tiny).log().T[b_idx][:, :, None]  # (K, B, N)
        allowed = (negative[None] & there.T[b_idx][:, None, :]) | positive[None]  # (K, B, N)
        shift = torch.where(positive[None], 0.0, log_w).masked_fill(~allowed, float("-inf"))
        counts = (allowed & ~positive[None]).sum(2)  # negatives per anchor, (K, B)
        row_mean = raw.sum(1, keepdim=True) / negative.sum(1, keepdim=True).clamp(min=1)
        stats.update(_weight_stats(raw / row_mean.clamp(min=1e-30), negative, meta_local, meta_all))

    if global_anchors == 0:
        # Nothing to align (a single modality): a zero that still belongs to the graph.
        stats.update(loss=0.0, anchors=0.0, negatives_per_anchor=0.0)
        return LossOutput(loss=local_z.sum() * 0.0 + scale * 0.0, stats=stats)

    # One bmm over epoch positions: (E, B*M, P) @ (E, P, N*M) → similarities of every pair.
    q = local_z.permute(2, 0, 1, 3).reshape(epochs, rows * n_mod, -1)
    k = all_z.permute(2, 0, 1, 3).reshape(epochs, all_z.shape[0] * n_mod, -1)
    sim = torch.bmm(q, k.transpose(1, 2)).reshape(epochs, rows, n_mod, all_z.shape[0], n_mod)
    sim = sim[:, :, a_idx, :, b_idx]  # (K, E, B, N) via advanced indexing on dims 2 and 4
    logits = scale * sim + shift[:, None]
    log_prob = torch.log_softmax(logits, dim=-1)
    picked = log_prob[..., local_rows, rank * rows + local_rows]  # positives' log-probabilities, (K, E, B)
    weight = anchor_ok[:, None, :].to(picked.dtype)
    local_sum = -(picked * weight).sum()
    loss = local_sum * world_size / global_anchors.to(local_sum.dtype)
    n_anchor = float(anchor_ok.sum() * epochs)
    stats.update(loss=float(loss.detach()), anchors=n_anchor,
                 negatives_per_anchor=float((counts * anchor_ok).sum() * epochs / max(n_anchor, 1.0)))
    return LossOutput(loss=loss, stats=stats)


def _weight_stats(weights: Tensor, negative: Tensor, meta_local: Mapping[str, Tensor],
                  meta_all: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean normalised weight of the negatives, split by same/other site and sex."""
    def mean_where(mask: Tensor) -> float:
        mask = mask & negative
        return float(weights[mask].mean()) if mask.any() else float("nan")

    same_site = meta_local["site_id"][:, None] == meta_all["site_id"][None, :]
    sex_a, sex_b = meta_local["sex"][:, None], meta_all["sex"][None, :]
    sex_known = ~torch.isnan(sex_a) & ~torch.isnan(sex_b)
    return {"weight_same_site": mean_where(same_site), "weight_other_site": mean_where(~same_site),
            "weight_same_sex": mean_where(sex_known & (sex_a == sex_b)),
            "weight_other_sex": mean_where(sex_known & (sex_a != sex_b))}
