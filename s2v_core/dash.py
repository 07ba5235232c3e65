"""DASH negative weights: how much each negative counts in the InfoNCE denominator.

For anchor ``i`` and candidate ``j`` (another window of the batch), the logit
of ``j`` is shifted by ``log w_ij``, i.e. the negative counts ``w_ij`` times
(the importance-weighted InfoNCE of hard-negative sampling): nights that are
alike in **D**emography, **A**ge, **S**ite and **H**istory are harder
negatives, so the model cannot separate them by a cohort shortcut. Two
formulas, chosen by the objective (``s2v_core.objective``):

``project`` (:class:`DashConfig`, :func:`dash_log_weights`)
    A product of factors, each 1 (neutral) when the metadata is missing on
    either side::

        w_ij = f_sex * f_age * f_site * f_history
        f_sex  = same_sex_factor  | other_sex_factor
        f_site = same_site_factor | other_site_factor
        f_age  = age_factor ** (2 * exp(-|age_i - age_j| / age_sigma_years) - 1)
        f_history = history_factor ** (2 * agreement - 1)

    ``f_age`` runs from ``age_factor`` (same age) through 1 (``|Δage| = σ ln 2``)
    to ``1/age_factor``; ``agreement`` is the fraction of history flags known
    for both nights that agree (flags binarised at 0.5). Windows of the same
    night are never candidates. Each anchor's weights over its negatives are
    normalised to mean 1, so with all weights equal the loss is exactly the
    standard InfoNCE.

``paper`` (:class:`PaperDashConfig`, :func:`paper_dash_weights`) — the authors' public code
    ::

        k_ij = clamp(exp(-|age_i - age_j| / 20) * s_ij, 0, 1)   s_ij = 1 same sex, 0.8 other
        k_ij = 0 when age or sex is unknown on either side (NaN or negative age, sex not 0/1)
        g_ij = 1.3 same site (source dataset), 0.8 other
        w_ij = k_ij * g_ij + 1e-6

    Other windows of the same night (``h_ij = 1``) stay candidates with
    ``w_ij = 1e-6`` and a logit margin ``-0.10 * h_ij / τ``. Each row is
    normalised to mean 1 over its valid negatives (other nights), dividing by
    ``count + 1e-6`` and clamping the mean at 1e-6 as they do; a row with no
    valid negative falls back to its raw weights over every other candidate
    (same-night windows included). The loss then uses ``log(max(w_ij, 1e-6))``;
    there is no history term.

``meta`` mappings hold ``age`` (years, NaN unknown), ``sex`` (0/1, NaN
unknown), ``site_id`` and ``night_id`` (int64) of shape ``(rows,)`` and
optionally ``history`` ``(rows, H)`` (0/1 flags, NaN unknown); numpy arrays
are accepted. Everything here is shape-static tensor code: no host-device
synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

META_KEYS = ("age", "sex", "site_id", "night_id", "history")


@dataclass(frozen=True)
class DashConfig:
    """Constants of the project's DASH weights (see the module docstring for the formula)."""

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
        for name in (
            "age_sigma_years",
            "age_factor",
            "same_site_factor",
            "other_site_factor",
            "same_sex_factor",
            "other_sex_factor",
            "history_factor",
            "max_logit_scale",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DashConfig.{name} must be a finite number > 0, found {value!r}")


@dataclass(frozen=True)
class PaperDashConfig:
    """Constants of the authors' DASH weights (see the module docstring; defaults are theirs)."""

    age_sigma_years: float = 20.0  # age kernel exp(-|Δage| / σ)
    other_sex_factor: float = 0.8  # s_ij of a different-sex pair (same sex: 1)
    same_site_gate: float = 1.3  # g_ij of a pair from the same source dataset
    other_site_gate: float = 0.8  # g_ij of a pair from different source datasets
    epsilon: float = 1e-6  # added to every weight, weight of a same-night window, floor of log w
    same_night_margin: float = 0.10  # logit margin -margin * h_ij / τ on same-night windows
    max_logit_scale: float = 100.0  # clamp of 1/temperature (τ = 0.2 gives 5, far below)

    def __post_init__(self) -> None:
        for name in (
            "age_sigma_years",
            "other_sex_factor",
            "same_site_gate",
            "other_site_gate",
            "epsilon",
            "max_logit_scale",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"PaperDashConfig.{name} must be a finite number > 0, found {value!r}")
        if not (math.isfinite(self.same_night_margin) and self.same_night_margin >= 0):
            raise ValueError(
                f"PaperDashConfig.same_night_margin must be a finite number >= 0, found {self.same_night_margin!r}"
            )


def meta_column(meta: Mapping[str, Tensor], key: str, rows: int, device: torch.device) -> Tensor:
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


def meta_columns(meta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All of :data:`META_KEYS` as tensors (numpy arrays accepted), missing ones as unknown."""
    if "night_id" not in meta:
        raise ValueError(f"dash_infonce: meta lacks 'night_id'; expected keys {', '.join(META_KEYS)}")
    nights = meta["night_id"]
    device = nights.device if isinstance(nights, Tensor) else torch.device("cpu")
    return {k: meta_column(meta, k, len(nights), device) for k in META_KEYS}


def dash_log_weights(meta_anchor: Mapping[str, Tensor], meta_all: Mapping[str, Tensor], config: DashConfig) -> Tensor:
    """Unnormalised ``log w_ij`` ``(A, N)`` of anchors vs candidates (symmetric in i, j).

    Same inputs as :func:`dash_weights`; all zeros when ``config.enabled`` is false.
    """
    a, b = meta_columns(meta_anchor), meta_columns(meta_all)
    log_w = torch.zeros(len(a["night_id"]), len(b["night_id"]), device=a["night_id"].device)
    if not config.enabled:
        return log_w
    if a["history"].shape[1] != b["history"].shape[1]:
        raise ValueError(
            f"dash_weights: anchors have {a['history'].shape[1]} history columns, candidates {b['history'].shape[1]}"
        )

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


def dash_weights(
    meta_anchor: Mapping[str, Tensor],
    meta_all: Mapping[str, Tensor],
    config: DashConfig = DashConfig(),
    *,
    normalise: bool = True,
) -> Tensor:
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
    nights_a, nights_b = meta_columns(meta_anchor)["night_id"], meta_columns(meta_all)["night_id"]
    negative = nights_a[:, None] != nights_b[None, :]
    weights = weights * negative
    mean = weights.sum(1, keepdim=True) / negative.sum(1, keepdim=True).clamp(min=1)
    return weights / mean.clamp(min=torch.finfo(weights.dtype).tiny)


def _paper_raw(a: Mapping[str, Tensor], b: Mapping[str, Tensor], config: PaperDashConfig) -> Tensor:
    """``w_raw = k_ij * g_ij + eps`` ``(A, N)`` from two sets of :func:`meta_columns`."""
    age_known = (a["age"] >= 0)[:, None] & (b["age"] >= 0)[None, :]  # NaN >= 0 is false
    age_gap = (a["age"][:, None] - b["age"][None, :]).abs()
    age_sim = torch.where(age_known, torch.exp(-age_gap / config.age_sigma_years), 0.0)
    sex_a, sex_b = a["sex"][:, None], b["sex"][None, :]
    sex_known = ((sex_a == 0) | (sex_a == 1)) & ((sex_b == 0) | (sex_b == 1))
    sex_coef = torch.where(sex_known, torch.where(sex_a == sex_b, 1.0, config.other_sex_factor), 0.0)
    k = (age_sim * sex_coef).clamp(0.0, 1.0)
    gate = torch.where(a["site_id"][:, None] == b["site_id"][None, :], config.same_site_gate, config.other_site_gate)
    return k * gate + config.epsilon


def _paper_normalise(
    raw: Tensor, same_night: Tensor, positive: Tensor, candidates: Tensor, config: PaperDashConfig
) -> Tensor:
    """The authors' row normalisation of ``raw`` ``(…, A, N)``, per candidate mask ``(…, 1 or A, N)``."""
    eps = config.epsilon
    off = ~positive & candidates
    same_off = same_night & ~positive
    valid = off & ~same_night
    fallback = ~valid.any(dim=-1, keepdim=True)  # no valid negative: raw weights over every candidate
    weights = torch.where(fallback, raw, torch.where(same_off, eps, raw))
    mask = torch.where(fallback, off, valid)
    mean = (weights * mask).sum(-1, keepdim=True) / (mask.sum(-1, keepdim=True) + eps)
    return weights / mean.clamp(min=eps)


def paper_dash_weights(
    meta_anchor: Mapping[str, Tensor],
    meta_all: Mapping[str, Tensor],
    config: PaperDashConfig = PaperDashConfig(),
    *,
    positive: Tensor | None = None,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The authors' normalised weights ``w`` and same-night indicator ``h`` of anchors against candidates.

    Parameters
    ----------
    meta_anchor, meta_all : mapping
        Metadata of the anchors ``(A,)`` and the candidates ``(N,)`` (module docstring).
    config : PaperDashConfig
    positive : Tensor ``(A, N)`` bool, optional
        Each anchor's own window among the candidates; default the diagonal (``A == N``).
    candidates : Tensor ``(N,)`` bool, optional
        Windows that can be candidates at all (e.g. those holding the other
        modality of the pair); default every window.

    Returns
    -------
    w : Tensor ``(A, N)`` float32
        Normalised weights; 1 at the positive (its logit is not shifted).
    h : Tensor ``(A, N)`` float32
        1 where the candidate is another window of the anchor's night.
    """
    a, b = meta_columns(meta_anchor), meta_columns(meta_all)
    rows, cols = len(a["night_id"]), len(b["night_id"])
    if positive is None:
        if rows != cols:
            raise ValueError(f"paper_dash_weights: pass positive= when anchors ({rows}) and candidates ({cols}) differ")
        positive = torch.eye(rows, dtype=torch.bool, device=a["night_id"].device)
    if candidates is None:
        candidates = torch.ones(cols, dtype=torch.bool, device=positive.device)
    same_night = a["night_id"][:, None] == b["night_id"][None, :]
    weights = _paper_normalise(_paper_raw(a, b, config), same_night, positive, candidates[None, :], config)
    return torch.where(positive, 1.0, weights), (same_night & ~positive).float()
