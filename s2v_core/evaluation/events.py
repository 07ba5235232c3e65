"""Event indices from per-epoch event detections: AHI from detected events next to the scored AHI.

An event detector (the ``events`` task of :mod:`s2v_core.evaluation.tasks`)
says, per 30-s epoch, whether a respiratory event (apnoea or hypopnoea)
overlaps it. An index is counted from the positive epochs that lie in sleep,
divided by the hours of sleep. Each run of ``k`` consecutive positive epochs
counts as ``max(1, k x events_per_epoch)`` events::

    index = sum over runs of max(1, k x events_per_epoch) / (sleep epochs x 30 s / 3600)   (events/h)

With ``events_per_epoch = 0`` every run is one event, the way a scorer
counts isolated events; but at high event rates (an apnoea every 40-60 s)
events fill whole stretches of epochs and a run count collapses a severe
night into a few long runs. :func:`choose_counting` fits the threshold and
``events_per_epoch`` (:class:`EventCounting`) on the validation nights, where
the scored AHI is known, and the test nights are counted with them.
:func:`ahi_agreement` reports the same count on the **scored** epoch labels
(``from_scored_labels``, its own rate fitted on the same nights) so that what
the 30-s resolution alone loses against the scored AHI is visible beside the
detector's figures.

Sleep is given per epoch (N1, N2, N3, REM); :func:`night_event_predictions`
uses the night's scored stages from the store, so the index divides by the
scored total sleep time.

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


def run_lengths(positive: np.ndarray) -> np.ndarray:
    """Lengths of the runs of consecutive true values in a 1-D boolean array (``[1,1,0,1]`` → ``[2, 1]``)."""
    positive = np.asarray(positive, dtype=bool).ravel()
    edges = np.diff(np.r_[0, positive.astype(np.int8), 0])
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def count_runs(positive: np.ndarray) -> int:
    """Number of runs of consecutive true values in a 1-D boolean array (``[1,1,0,1]`` → 2)."""
    return int(run_lengths(positive).size)


def count_events(positive: np.ndarray, *, events_per_epoch: float = 0.0) -> float:
    """Events in per-epoch flags: each run of ``k`` positive epochs counts ``max(1, k x events_per_epoch)``."""
    if events_per_epoch < 0 or not np.isfinite(events_per_epoch):
        raise ValueError(f"events_per_epoch: expected a finite number >= 0, found {events_per_epoch!r}")
    return float(np.maximum(1.0, run_lengths(positive) * events_per_epoch).sum())


def index_from_epochs(positive: np.ndarray, asleep: np.ndarray, *, events_per_epoch: float = 0.0) -> float | None:
    """Events per hour of sleep from per-epoch event flags (see the module docstring).

    Parameters
    ----------
    positive : ndarray of bool, ``(epochs,)``
        Whether an event overlaps each 30-s epoch, in night order.
    asleep : ndarray of bool, ``(epochs,)``
        Whether each epoch is sleep (N1, N2, N3 or REM).
    events_per_epoch : float
        Events a run counts per positive epoch, at least one per run; 0 counts runs.

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
    return count_events(positive & asleep, events_per_epoch=events_per_epoch) / hours


@dataclass(frozen=True)
class EventCounting:
    """How per-epoch event probabilities become an index: the threshold and the events per positive epoch.

    The default (0.5, 0) counts each run of epochs above 0.5 as one event.
    """

    threshold: float = DEFAULT_THRESHOLD
    events_per_epoch: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"event threshold: expected a probability in [0, 1], found {self.threshold!r}")
        if not (np.isfinite(self.events_per_epoch) and self.events_per_epoch >= 0):
            raise ValueError(f"events_per_epoch: expected a finite number >= 0, found {self.events_per_epoch!r}")

    def index(self, probability: np.ndarray, asleep: np.ndarray) -> float | None:
        """Events/h of sleep from P(event) per epoch (NaN counts as no event)."""
        positive = np.nan_to_num(np.asarray(probability, dtype=np.float64), nan=0.0) > self.threshold
        return index_from_epochs(positive, asleep, events_per_epoch=self.events_per_epoch)


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


def _asleep(night: NightEvents) -> np.ndarray:
    return (night.stages >= 1) & (night.stages <= 4)


def choose_counting(
    nights: Iterable[NightEvents],
    *,
    labels: bool = False,
    thresholds: Iterable[float] | None = None,
    rates: Iterable[float] | None = None,
) -> EventCounting | None:
    """The counting whose index is closest (mean absolute error) to the scored one on ``nights``.

    Meant for the validation nights. A detector trained on a rare positive
    class (events overlap ~10-20 % of epochs) may rank epochs well (AUROC) and
    still rarely pass 0.5, and a run count under-counts dense events (see the
    module docstring), so both the threshold and the events per positive epoch
    are searched: ``thresholds`` default to 0.05, 0.10 … 0.95, ``rates`` to
    0, 0.05 … 1.5. Ties go to the threshold nearest 0.5, then to the smallest
    rate. With ``labels`` the nights' scored epoch labels are counted instead
    of the detector's probabilities (threshold 0.5: they are 0 or 1). ``None``
    when no night has a reference, scored labels and sleep.
    """
    if labels:
        grid = np.array([DEFAULT_THRESHOLD])
    else:
        grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if thresholds is None else np.asarray(list(thresholds), float)
    rates = np.round(np.arange(0.0, 1.501, 0.05), 2) if rates is None else np.asarray(list(rates), float)
    usable = [n for n in nights if np.isfinite(n.reference) and np.isfinite(n.scored).any() and _asleep(n).any()]
    if not usable:
        return None
    references = np.array([n.reference for n in usable])
    hours = np.array([_asleep(n).sum() * EPOCH_SECONDS / 3600.0 for n in usable])
    errors = np.empty((grid.size, rates.size))
    for i, threshold in enumerate(grid):
        counts = np.empty((len(usable), rates.size))
        for j, night in enumerate(usable):
            source = night.scored if labels else night.probability
            lengths = run_lengths((np.nan_to_num(source, nan=0.0) > threshold) & _asleep(night))
            counts[j] = np.maximum(1.0, lengths[:, None] * rates[None, :]).sum(axis=0)
        errors[i] = np.abs(counts / hours[:, None] - references[:, None]).mean(axis=0)
    best = np.argwhere(np.isclose(errors, errors.min(), rtol=0, atol=1e-9))
    # argwhere is row-major: among the thresholds nearest 0.5, the first row holds the smallest rate.
    nearest = np.abs(grid[best[:, 0]] - DEFAULT_THRESHOLD)
    i, j = best[np.flatnonzero(nearest == nearest.min())[0]]
    return EventCounting(float(grid[i]), float(rates[j]))


def ahi_agreement(
    nights: Iterable[NightEvents],
    *,
    counting: EventCounting = EventCounting(),
    label_counting: EventCounting | None = None,
) -> dict:
    """Per-night AHI from detected events and from the scored epoch labels, against the scored AHI.

    ``counting`` turns the detector's probabilities into an index,
    ``label_counting`` (default: ``counting``'s rate) the scored labels.
    Nights without a scored reference, without scored labels or without sleep
    are left out. Returns ``nights`` (how many were scored), ``threshold``,
    ``events_per_epoch``, ``label_events_per_epoch``, ``detected`` and
    ``from_scored_labels`` (Pearson r, ICC(2,1), severity κ at 5/15/30
    events/h, MAE in events/h, each against the reference) and ``per_night``:
    ``[reference, detected, from scored labels]`` per night, events/h.
    """
    if label_counting is None:
        label_counting = EventCounting(DEFAULT_THRESHOLD, counting.events_per_epoch)
    rows = []
    for night in nights:
        asleep = _asleep(night)
        if not np.isfinite(night.reference) or not np.isfinite(night.scored).any():
            continue
        detected = counting.index(night.probability, asleep)
        from_labels = label_counting.index(night.scored, asleep)
        if detected is None or from_labels is None:
            continue
        rows.append((night.reference, detected, from_labels))
    table = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    report: dict = {
        "nights": len(rows),
        "threshold": counting.threshold,
        "events_per_epoch": counting.events_per_epoch,
        "label_events_per_epoch": label_counting.events_per_epoch,
        "unit": "events/h",
    }
    if len(rows) >= 2:
        report["detected"] = _agreement(table[:, 0], table[:, 1])
        report["from_scored_labels"] = _agreement(table[:, 0], table[:, 2])
    report["per_night"] = [[round(float(v), 2) for v in row] for row in table]
    return report
