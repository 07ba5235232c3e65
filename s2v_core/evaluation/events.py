"""Event indices from per-epoch event detections: AHI from detected events next to the scored AHI.

An event detector (the ``events`` task of :mod:`s2v_core.evaluation.tasks`)
says, per 30-s epoch, whether a respiratory event (apnoea or hypopnoea)
overlaps it. An index is counted from those epochs the way a scorer counts
events: each run of consecutive positive epochs is one event, counted when it
lies in sleep, divided by the hours of sleep::

    index = runs of positive epochs within sleep epochs / (sleep epochs x 30 s / 3600)   (events/h)

Sleep is given per epoch (N1, N2, N3, REM); :func:`night_event_predictions`
uses the night's scored stages from the store, so the index divides by the
scored total sleep time. Two events in one or two adjacent epochs count as
one run, so at high event rates an epoch-level count under-counts: the same
count on the **scored** epoch labels (:func:`ahi_agreement` reports it as
``from_scored_labels``) shows how much of the gap to the scored AHI is this
resolution rather than the detector.

Pure numpy / torch: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from s2v_core.evaluation.tasks import Task, icc, pearson_r, severity_kappa
from s2v_core.io.events import EVENT_FLAGS
from s2v_core.modalities import EPOCH_SECONDS

#: Probability above which an epoch counts as holding an event.
DEFAULT_THRESHOLD = 0.5
#: The event bits an apnoea-hypopnoea index counts: apnoeas and hypopnoeas.
AHI_BITS = EVENT_FLAGS["apnea"][1] | EVENT_FLAGS["hypopnea"][1]


def counts_ahi(task: Task) -> bool:
    """Whether ``task`` detects what an AHI counts (apnoea and/or hypopnoea bits, nothing else)."""
    return bool(task.event_bits) and not task.event_bits & ~AHI_BITS


def count_runs(positive: np.ndarray) -> int:
    """Number of runs of consecutive true values in a 1-D boolean array (``[1,1,0,1]`` → 2)."""
    positive = np.asarray(positive, dtype=bool).ravel()
    if positive.size == 0:
        return 0
    return int(positive[0]) + int(np.count_nonzero(positive[1:] & ~positive[:-1]))


def index_from_epochs(positive: np.ndarray, asleep: np.ndarray) -> float | None:
    """Events per hour of sleep from per-epoch event flags (see the module docstring).

    Parameters
    ----------
    positive : ndarray of bool, ``(epochs,)``
        Whether an event overlaps each 30-s epoch, in night order.
    asleep : ndarray of bool, ``(epochs,)``
        Whether each epoch is sleep (N1, N2, N3 or REM).

    Returns
    -------
    float or None
        Events/h; ``None`` without a sleep epoch.
    """
    positive, asleep = np.asarray(positive, dtype=bool), np.asarray(asleep, dtype=bool)
    if positive.shape != asleep.shape:
        raise ValueError(f"index_from_epochs: positive {positive.shape} and asleep {asleep.shape} differ in shape")
    hours = asleep.sum() * EPOCH_SECONDS / 3600.0
    if hours == 0:
        return None
    return count_runs(positive & asleep) / hours


@dataclass(frozen=True)
class NightEvents:
    """One night's per-epoch event probabilities, scored labels and stages, in night order.

    Epochs the store has no window for (dropped as unusable) hold NaN
    probabilities and labels and stage −1 (neither sleep nor an event).
    """

    probability: np.ndarray  # float64 (epochs,): the detector's P(event in epoch)
    scored: np.ndarray  # float64 (epochs,): the scored labels, 1/0, NaN unknown
    stages: np.ndarray  # int64 (epochs,): W=0 … REM=4, −1 unknown
    reference: float  # the night's scored index (e.g. ahi_scored, events/h); NaN if absent


def night_event_predictions(
    model, batches: Iterable[Mapping[str, np.ndarray]], *, reference: str = "ahi_scored", device="cpu"
) -> list[NightEvents]:
    """Run an event detector over whole nights (eval mode, no gradient).

    Parameters
    ----------
    model : s2v_core.finetuning.FineTunedModel
        A model of an event task (binary, epoch level).
    batches : iterable of dict
        :func:`s2v_core.store.table_to_batch` batches holding ``events``,
        ``window_index`` and ``history`` with the ``reference`` outcome first.
    reference : str
        Name of that outcome (only for the error message).
    """
    import torch

    from s2v_core.finetuning import batch_targets
    from s2v_core.model import batch_to_tensors

    task = model.task
    if not task.event_bits:
        raise ValueError(f"night_event_predictions: task {task.name!r} is not an event task")
    was_training = model.training
    model.eval()
    parts: dict[int, list] = {}
    with torch.no_grad():
        for batch in batches:
            if "window_index" not in batch or batch["history"].shape[1] < 1:
                raise ValueError(f"night_event_predictions: batches need window_index and the {reference!r} outcome")
            logits = model(batch_to_tensors(batch, device)).float().cpu().numpy()[..., 0]
            probability = 1.0 / (1.0 + np.exp(-logits))
            scored = batch_targets(task, batch)
            for row, night in enumerate(batch["night_id"].tolist()):
                parts.setdefault(night, []).append(
                    (
                        int(batch["window_index"][row]),
                        probability[row],
                        scored[row],
                        batch["stages"][row],
                        float(batch["history"][row, 0]),
                    )
                )
    model.train(was_training)
    nights = []
    for rows in parts.values():
        width = rows[0][1].size
        length = (max(r[0] for r in rows) + 1) * width
        probability, scored = np.full(length, np.nan), np.full(length, np.nan)
        stages = np.full(length, -1, dtype=np.int64)
        for window, p, s, st, _ in rows:
            probability[window * width : (window + 1) * width] = p
            scored[window * width : (window + 1) * width] = s
            stages[window * width : (window + 1) * width] = st
        nights.append(NightEvents(probability, scored, stages, rows[0][4]))
    return nights


def _agreement(reference: np.ndarray, estimate: np.ndarray) -> dict:
    return {
        "pearson_r": pearson_r(reference, estimate),
        "icc": icc(np.column_stack([reference, estimate])) if reference.size >= 2 else None,
        "severity_kappa": severity_kappa(reference, estimate),
        "mae": float(np.abs(reference - estimate).mean()),
    }


def choose_threshold(nights: Iterable[NightEvents], *, candidates: Iterable[float] | None = None) -> float | None:
    """The detection threshold whose AHI from detected events is closest (MAE) to the scored one on ``nights``.

    Meant for the validation nights: a detector trained on a rare positive
    class (events overlap ~10-20 % of epochs) may rank epochs well (AUROC)
    and still rarely pass 0.5. ``candidates`` default to 0.05, 0.10 … 0.95;
    ties go to the threshold nearest 0.5. ``None`` when no night has a
    reference, scored labels and sleep.
    """
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if candidates is None else np.asarray(list(candidates), float)
    usable = [
        night
        for night in nights
        if np.isfinite(night.reference)
        and np.isfinite(night.scored).any()
        and ((night.stages >= 1) & (night.stages <= 4)).any()
    ]
    if not usable:
        return None
    errors = []
    for threshold in grid:
        detected = [
            index_from_epochs(np.nan_to_num(n.probability, nan=0.0) > threshold, (n.stages >= 1) & (n.stages <= 4))
            for n in usable
        ]
        errors.append(np.mean([abs(d - n.reference) for d, n in zip(detected, usable)]))
    errors = np.asarray(errors)
    best = np.flatnonzero(errors == errors.min())
    return float(grid[best[np.argmin(np.abs(grid[best] - DEFAULT_THRESHOLD))]])


def ahi_agreement(nights: Iterable[NightEvents], *, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Per-night AHI from detected events and from the scored epoch labels, against the scored AHI.

    Nights without a scored reference, without scored labels or without sleep
    are left out. Returns ``nights`` (how many were scored), ``threshold``,
    ``detected`` and ``from_scored_labels`` (Pearson r, ICC(2,1), severity κ
    at 5/15/30 events/h, MAE in events/h, each against the reference) and
    ``per_night``: ``[reference, detected, from scored labels]`` per night,
    events/h.
    """
    rows = []
    for night in nights:
        asleep = (night.stages >= 1) & (night.stages <= 4)
        labelled = np.isfinite(night.scored)
        if not np.isfinite(night.reference) or not labelled.any():
            continue
        detected = index_from_epochs(np.nan_to_num(night.probability, nan=0.0) > threshold, asleep)
        from_labels = index_from_epochs(np.nan_to_num(night.scored, nan=0.0) > 0.5, asleep)
        if detected is None or from_labels is None:
            continue
        rows.append((night.reference, detected, from_labels))
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    report: dict = {"nights": len(rows), "threshold": threshold, "unit": "events/h"}
    if len(rows) >= 2:
        report["detected"] = _agreement(table[:, 0], table[:, 1])
        report["from_scored_labels"] = _agreement(table[:, 0], table[:, 2])
    report["per_night"] = [[round(float(v), 2) for v in row] for row in table]
    return report
