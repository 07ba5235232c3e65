"""Is the encoder learning? Held-out cross-modal alignment next to its chance level.

Two figures per modality pair ``(a, b)``, both measured on windows of subjects
the encoder never trained on:

contrastive loss / chance
    The symmetric InfoNCE of ``a`` against ``b`` at every epoch position
    (plain weights, the encoder's own temperature, windows of the same night
    masked as negatives), over fixed batches that mix nights. Its chance level
    is ``log(candidates)``, the mean number of candidates (the positive plus
    the negatives) per anchor: what an encoder whose embeddings carry no
    information scores. A ratio of 1 is chance; 0 is perfect.
retrieval top-k
    Window embeddings of each modality (the mean of its per-epoch projections,
    re-normalised) over all ``N`` windows holding both modalities: for each
    window's ``a`` embedding, is its own ``b`` embedding among the ``k``
    nearest (cosine) of all ``N``? Both directions are averaged. Chance is
    ``k / N``; report ``N`` with every figure, since it sets the difficulty.

This module needs torch and numpy only (no Ray), so pretraining validation,
``s2v evaluate`` and ``benchmarks/bench_learning.py`` share it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from s2v_core.modalities import MODALITY_KEYS

#: Pairs named by the learning benchmark: two that share physiology only
#: (ecg-hr, eeg-eog), two harder ones, and one that shares a waveform.
NAMED_PAIRS = (("ecg", "hr"), ("eeg", "eog"), ("eeg", "ecg"), ("spo2", "airflow"), ("airflow", "thorax"))


def pair_name(a: str, b: str) -> str:
    return f"{a}-{b}"


def all_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    """Unordered pairs of ``modalities`` in registry order."""
    ordered = [k for k in MODALITY_KEYS if k in set(modalities)]
    return list(itertools.combinations(ordered, 2))


def retrieval(query: np.ndarray, gallery: np.ndarray, *, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval of row ``i`` of ``gallery`` by row ``i`` of ``query`` (cosine, both L2-normalised).

    Parameters
    ----------
    query, gallery : ndarray ``(N, P)``
        Row ``i`` of both belongs to the same window.
    ks : sequence of int
        The ``k`` of each top-k figure.

    Returns
    -------
    dict
        ``top{k}`` (fraction of rows whose partner ranks in the top k, both
        directions averaged), ``chance_top{k}`` (``min(k, N) / N``) and ``n``.
    """
    query, gallery = np.asarray(query, dtype=np.float32), np.asarray(gallery, dtype=np.float32)
    if query.shape != gallery.shape or query.ndim != 2:
        raise ValueError(f"retrieval: expected two (N, P) arrays of one shape, found {query.shape} and {gallery.shape}")
    n = query.shape[0]
    out: dict[str, float] = {"n": float(n)}
    if n == 0:
        return {**out, **{f"top{k}": math.nan for k in ks}, **{f"chance_top{k}": math.nan for k in ks}}
    similarity = query @ gallery.T
    own = np.diag(similarity)
    # Ties are broken at random, in expectation: with `higher` candidates above the
    # partner and `tied` level with it, P(rank < k) = clip((k - higher) / (tied + 1), 0, 1).
    # An encoder with constant embeddings then scores chance, not a perfect 1.
    directions = [
        ((similarity > own[:, None]).sum(axis=1), (similarity == own[:, None]).sum(axis=1) - 1),
        ((similarity > own[None, :]).sum(axis=0), (similarity == own[None, :]).sum(axis=0) - 1),
    ]
    for k in ks:
        hits = [np.clip((k - higher) / (tied + 1.0), 0.0, 1.0).mean() for higher, tied in directions]
        out[f"top{k}"] = float(np.mean(hits))
        out[f"chance_top{k}"] = min(k, n) / n
    return out


def window_means(per_epoch: torch.Tensor) -> torch.Tensor:
    """``(B, E, P)`` per-epoch embeddings → ``(B, P)`` re-normalised means (zero rows stay zero)."""
    return F.normalize(per_epoch.float().mean(dim=1), dim=-1)


def plain_pair_loss(
    za: torch.Tensor, zb: torch.Tensor, nights: torch.Tensor, *, scale: float
) -> tuple[float, float, float]:
    """Symmetric InfoNCE of one modality pair over one batch, per epoch position.

    Parameters
    ----------
    za, zb : Tensor ``(B, E, P)``
        L2-normalised per-epoch embeddings of the windows holding both modalities.
    nights : Tensor ``(B,)``
        Night of each window; other windows of the same night are not negatives.
    scale : float
        ``1 / temperature``.

    Returns
    -------
    (loss_sum, anchors, log_candidates_sum)
        Summed over anchors (both directions, every epoch), so batches can be pooled.
    """
    rows, epochs = za.shape[0], za.shape[1]
    if rows < 2:
        return 0.0, 0.0, 0.0
    allowed = (nights[:, None] != nights[None, :]) | torch.eye(rows, dtype=torch.bool, device=za.device)
    candidates = allowed.sum(dim=1).double()  # (B,) positive + negatives
    total = 0.0
    for query, key in ((za, zb), (zb, za)):
        logits = scale * torch.einsum("iep,jep->eij", query.float(), key.float())
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        log_prob = torch.log_softmax(logits, dim=-1)
        total += float(-log_prob.diagonal(dim1=1, dim2=2).sum())
    anchors = 2.0 * rows * epochs
    log_candidates = float(2.0 * epochs * torch.log(candidates).sum())
    return total, anchors, log_candidates


class AlignmentMeter:
    """Accumulates held-out alignment over batches; :meth:`result` gives the figures per pair.

    Feed it each batch's :class:`~s2v_core.model.EncoderOutput` (eval mode,
    every pair's modalities encoded) with the batch's ``night_id``.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], *, scale: float) -> None:
        self.pairs = [tuple(p) for p in pairs]
        self.scale = float(scale)
        self.loss = {p: [0.0, 0.0, 0.0] for p in self.pairs}  # loss sum, anchors, log-candidates sum
        self.windows: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in self.pairs}

    def add(self, per_modality: Mapping[str, torch.Tensor], present: torch.Tensor, nights: torch.Tensor) -> None:
        present = present.bool()
        for a, b in self.pairs:
            if a not in per_modality or b not in per_modality:
                continue
            both = present[:, MODALITY_KEYS.index(a)] & present[:, MODALITY_KEYS.index(b)]
            rows = both.nonzero().squeeze(1)  # evaluation only: data-dependent rows are fine here
            if rows.numel() == 0:
                continue
            za, zb = per_modality[a][rows], per_modality[b][rows]
            loss, anchors, log_candidates = plain_pair_loss(za, zb, nights[rows], scale=self.scale)
            totals = self.loss[(a, b)]
            totals[0] += loss
            totals[1] += anchors
            totals[2] += log_candidates
            self.windows[(a, b)].append((window_means(za).cpu().numpy(), window_means(zb).cpu().numpy()))

    def result(self) -> dict[str, dict[str, float]]:
        """Per pair ``"a-b"``: ``loss``, ``chance_loss``, ``loss_ratio``, ``top1``/``top5`` and their chance, ``n``."""
        out: dict[str, dict[str, float]] = {}
        for pair in self.pairs:
            loss, anchors, log_candidates = self.loss[pair]
            parts = self.windows[pair]
            if anchors == 0 or not parts:
                continue
            query = np.concatenate([q for q, _ in parts])
            gallery = np.concatenate([g for _, g in parts])
            figures = {"loss": loss / anchors, "chance_loss": log_candidates / anchors}
            figures["loss_ratio"] = figures["loss"] / figures["chance_loss"] if figures["chance_loss"] > 0 else math.nan
            figures.update(retrieval(query, gallery))
            figures["top1_over_chance"] = figures["top1"] / figures["chance_top1"]
            out[pair_name(*pair)] = figures
        return out


def summarise_pairs(figures: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Means over pairs of the loss ratio and top-1 over chance (the progress line's figures)."""

    def mean(name: str) -> float:
        # A pair whose batches held one night only has no negatives: no chance level, no ratio.
        values = [f[name] for f in figures.values() if math.isfinite(f[name])]
        return float(np.mean(values)) if values else math.nan

    return {"loss_ratio_mean": mean("loss_ratio"), "top1_over_chance_mean": mean("top1_over_chance")}
