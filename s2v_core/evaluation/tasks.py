"""Downstream tasks as data: one table of task definitions, their targets, losses and metrics.

A task says what is predicted (per 30-s epoch or per night), from which store
column, with which loss and which figures are reported. Adding a task is one
entry in :data:`TASKS` (or one prefix in :data:`TASK_FAMILIES` for tasks
parametrised by a column name, such as ``outcome:hypertension``): ``s2v
finetune`` trains it, and ``s2v evaluate`` scores it with frozen-embedding
probes when its level and kind have one (``pipelines.evaluate_config.SECTIONS``).

=================  =======  ==============  =============================================
task               level    kind            reported figures
=================  =======  ==============  =============================================
``staging``        epoch    classification  macro-F1, Cohen's κ, accuracy, per-class F1,
                                            confusion (W / N1 / N2 / N3 / REM)
``staging4``       epoch    classification  same, W / light (N1+N2) / deep (N3) / REM
``staging3``       epoch    classification  same, W / NREM / REM
``events``         epoch    binary          AUROC, AUPRC of "a respiratory event (apnoea or
                                            hypopnoea) overlaps this epoch", from the store's
                                            ``events`` labels; ``s2v finetune`` adds the AHI
                                            from detected events per night (see
                                            :mod:`s2v_core.evaluation.events`)
``arousal``        epoch    binary          AUROC, AUPRC of "an arousal overlaps this epoch"
``events:K[,K]``   epoch    binary          any of the event kinds K (apnea, hypopnea,
                                            desaturation, arousal) overlaps this epoch
``age``            night    regression      MAE (years), Pearson r
``sex``            night    binary          AUROC, AUPRC
``ahi``            night    regression      MAE (events/h), Pearson r, ICC(2,1), severity κ
                                            (normal < 5 ≤ mild < 15 ≤ moderate < 30 ≤ severe);
                                            ``ahi:COL`` reads another outcome (``ahi:ahi_scored``)
``outcome:COL``    night    binary          AUROC, AUPRC of the store outcome ``COL`` (0/1)
``survival:E,T``   night    survival        Harrell's C-index; trained with the Cox partial
                                            likelihood; ``E`` the event (0/1) and ``T`` the
                                            time-to-event (or censoring) outcome columns
=================  =======  ==============  =============================================

Pure numpy / scipy / scikit-learn / torch: no Ray, no MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from s2v_core.evaluation.metrics import confusion, staging_metrics_from_confusion
from s2v_core.io.events import EVENT_FLAGS
from s2v_core.store import EVENTS_COLUMN, STAGE_NAMES, UNKNOWN_EVENTS, UNKNOWN_STAGE

#: AASM apnoea-hypopnoea index cut-offs (events/h): normal < 5 ≤ mild < 15 ≤ moderate < 30 ≤ severe.
AHI_SEVERITY_THRESHOLDS = (5.0, 15.0, 30.0)
AHI_SEVERITY_NAMES = ("normal", "mild", "moderate", "severe")

LEVELS = ("epoch", "night")
KINDS = ("classification", "regression", "binary", "survival")


@dataclass(frozen=True)
class Task:
    """One downstream task (see the module table).

    Parameters
    ----------
    name : str
        What ``--task`` takes (``staging``, ``ahi``, ``outcome:hypertension`` …).
    level : str
        ``epoch`` (one target per 30-s epoch, from the store's ``stages`` or
        ``events``) or ``night`` (one target per recording, from
        ``age``/``sex``/``outcomes``).
    kind : str
        ``classification``, ``regression``, ``binary`` or ``survival``.
    columns : tuple of str
        Store columns the target comes from: ``("stages",)``, ``("age",)``,
        an outcome name, or (event, time) for survival.
    classes : tuple of str
        Class names of a classification task (empty otherwise).
    stage_map : tuple of int
        For staging tasks: the class of each AASM stage W, N1, N2, N3, REM.
    unit : str
        Unit of a regression target (years, events/h).
    event_bits : int
        For event tasks (epoch level, binary, column ``events``): the bits of
        :data:`s2v_core.io.events.EVENT_FLAGS` that make an epoch positive.
    """

    name: str
    level: str
    kind: str
    columns: tuple[str, ...]
    classes: tuple[str, ...] = ()
    stage_map: tuple[int, ...] = ()
    unit: str = ""
    event_bits: int = 0

    def __post_init__(self) -> None:
        if (self.columns == (EVENTS_COLUMN,)) != (self.event_bits > 0) or (
            self.event_bits and (self.level, self.kind) != ("epoch", "binary")
        ):
            raise ValueError(
                f"task {self.name!r}: an event task reads the column {EVENTS_COLUMN!r} with event_bits > 0 "
                f"at epoch level, kind binary; found columns {self.columns}, event_bits {self.event_bits}, "
                f"level {self.level!r}, kind {self.kind!r}"
            )
        if self.level not in LEVELS:
            raise ValueError(f"task {self.name!r}: level must be one of {', '.join(LEVELS)}, found {self.level!r}")
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, found {self.kind!r}")
        if self.stage_map and (
            len(self.stage_map) != len(STAGE_NAMES) or sorted(set(self.stage_map)) != list(range(len(self.classes)))
        ):
            raise ValueError(
                f"task {self.name!r}: stage_map must give each of {', '.join(STAGE_NAMES)} a class "
                f"in 0..{len(self.classes) - 1} and use every class, found {self.stage_map}"
            )

    @property
    def outputs(self) -> int:
        """Width of the head's output: the number of classes, else 1 (a value, a logit, a log-risk)."""
        return len(self.classes) if self.kind == "classification" else 1

    def stage_targets(self, stages: np.ndarray) -> np.ndarray:
        """AASM stage codes (W=0 … REM=4, −1 unknown) → this task's classes (−1 stays −1)."""
        return map_stages(stages, self.stage_map)

    def event_targets(self, events: np.ndarray) -> np.ndarray:
        """Per-epoch event bits (−1: no scored events) → float64 1.0 / 0.0, NaN where unknown."""
        events = np.asarray(events, dtype=np.int64)
        return np.where(events == UNKNOWN_EVENTS, np.nan, ((events & self.event_bits) > 0).astype(np.float64))

    @property
    def store_columns(self) -> tuple[str, ...]:
        """Store columns the target needs beyond those every batch reads (the ``events`` labels)."""
        return (EVENTS_COLUMN,) if self.event_bits else ()

    @property
    def primary(self) -> tuple[str, float]:
        """The figure that chooses between models (early stopping): its name and sign (+1: higher is better)."""
        return PRIMARY_METRICS[self.kind]

    @property
    def outcome_columns(self) -> tuple[str, ...]:
        """The store ``outcomes`` entries the target needs (``age``/``sex``/``stages`` are columns of their own)."""
        return tuple(c for c in self.columns if c not in ("stages", "age", "sex", EVENTS_COLUMN))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (see :data:`LOSSES`); rows whose target is unknown are ignored."""
        return LOSSES[self.kind](output, target)

    def metrics(self, target: np.ndarray, prediction: np.ndarray) -> dict:
        """The task's figures (see :data:`METRICS`) from targets and head outputs (logits, values or log-risks)."""
        return METRICS[self.kind](self, np.asarray(target), np.asarray(prediction))


def map_stages(stages: np.ndarray, stage_map: Sequence[int]) -> np.ndarray:
    """Map AASM stage codes (W=0, N1=1, N2=2, N3=3, REM=4) through ``stage_map``; −1 (unknown) stays −1.

    Raises ``ValueError`` for a code outside −1..4.
    """
    stages = np.asarray(stages, dtype=np.int64)
    if stages.size and (stages.min() < UNKNOWN_STAGE or stages.max() >= len(STAGE_NAMES)):
        bad = sorted(set(stages[(stages < UNKNOWN_STAGE) | (stages >= len(STAGE_NAMES))].tolist()))
        raise ValueError(f"stage codes must lie in -1..{len(STAGE_NAMES) - 1}, found {bad}")
    table = np.asarray([*stage_map, UNKNOWN_STAGE], dtype=np.int64)  # index -1 → the appended −1
    return table[stages]


# -- metrics ----------------------------------------------------------------------------------------
def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Pearson correlation; ``None`` when either side is constant (undefined)."""
    from scipy.stats import pearsonr

    y_true, y_pred = np.asarray(y_true, float).ravel(), np.asarray(y_pred, float).ravel()
    if y_true.size < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0:
        return None
    return float(pearsonr(y_true, y_pred).statistic)


def icc(ratings: np.ndarray) -> float | None:
    """ICC(2,1) of Shrout & Fleiss (1979): two-way random effects, absolute agreement, one rater.

    Parameters
    ----------
    ratings : ndarray, ``(n_targets, k_raters)``
        E.g. ``np.column_stack([ahi_true, ahi_predicted])``. Unlike Pearson's r,
        a constant offset or a scale error between raters lowers the ICC.

    Returns
    -------
    float or None
        ``None`` when every rating is the same (undefined).
    """
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 2 or ratings.shape[0] < 2 or ratings.shape[1] < 2:
        raise ValueError(f"icc: expected ratings of shape (targets >= 2, raters >= 2), found {ratings.shape}")
    n, k = ratings.shape
    grand = ratings.mean()
    between_targets = k * ((ratings.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    between_raters = n * ((ratings.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    total = ((ratings - grand) ** 2).sum()
    residual = (total - between_targets * (n - 1) - between_raters * (k - 1)) / ((n - 1) * (k - 1))
    denominator = between_targets + (k - 1) * residual + k * (between_raters - residual) / n
    if denominator == 0:
        return None
    return float((between_targets - residual) / denominator)


def severity_classes(ahi: np.ndarray, thresholds: Sequence[float] = AHI_SEVERITY_THRESHOLDS) -> np.ndarray:
    """AHI (events/h) → severity class 0 normal, 1 mild, 2 moderate, 3 severe (a value at a cut-off goes up)."""
    return np.digitize(np.asarray(ahi, dtype=np.float64), thresholds, right=False)


def severity_kappa(
    ahi_true: np.ndarray, ahi_pred: np.ndarray, thresholds: Sequence[float] = AHI_SEVERITY_THRESHOLDS
) -> float | None:
    """Cohen's κ between the severity classes of true and predicted AHI; ``None`` if undefined."""
    from sklearn.metrics import cohen_kappa_score

    true, pred = severity_classes(ahi_true, thresholds), severity_classes(ahi_pred, thresholds)
    if len(np.unique(np.concatenate([true, pred]))) < 2:
        return None  # both raters put everything in one class: chance agreement is total
    return float(cohen_kappa_score(true, pred))


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float | None:
    """Harrell's C-index of a risk score (higher risk, earlier event).

    A pair is comparable when the subject with the shorter time had the event
    (pairs with equal times are not comparable); it is concordant when that
    subject has the higher risk, and counts one half when risks tie.

    Parameters
    ----------
    time : ndarray ``(n,)``
        Time to event or censoring (any unit, e.g. years).
    event : ndarray ``(n,)``
        1 if the event was observed, 0 if censored.
    risk : ndarray ``(n,)``
        Predicted risk (e.g. the Cox log-risk).

    Returns
    -------
    float or None
        ``None`` when no pair is comparable.
    """
    time = np.asarray(time, dtype=np.float64).ravel()
    event = np.asarray(event, dtype=bool).ravel()
    risk = np.asarray(risk, dtype=np.float64).ravel()
    if not (time.shape == event.shape == risk.shape):
        raise ValueError(
            f"concordance_index: time, event and risk differ in length: {time.size}, {event.size}, {risk.size}"
        )
    earlier = (time[:, None] < time[None, :]) & event[:, None]  # i failed before j was last seen
    comparable = earlier.sum()
    if comparable == 0:
        return None
    concordant = (earlier & (risk[:, None] > risk[None, :])).sum()
    tied = (earlier & (risk[:, None] == risk[None, :])).sum()
    return float((concordant + 0.5 * tied) / comparable)


def _classification_metrics(task: Task, target: np.ndarray, prediction: np.ndarray) -> dict:
    predicted = prediction.argmax(axis=-1) if prediction.ndim == target.ndim + 1 else prediction
    matrix = confusion(target, predicted, n_classes=len(task.classes))
    return {**staging_metrics_from_confusion(matrix, class_names=task.classes), "confusion": matrix.tolist()}


def _known(target: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction = prediction.reshape(len(target), -1)[:, 0] if prediction.ndim > 1 else prediction
    keep = np.isfinite(target.astype(np.float64))
    if not keep.any():
        raise ValueError("no row with a known target to score")
    return target[keep].astype(np.float64), prediction[keep].astype(np.float64)


def _regression_metrics(task: Task, target: np.ndarray, prediction: np.ndarray) -> dict:
    target, prediction = _known(target, prediction)
    figures = {
        "mae": float(np.abs(target - prediction).mean()),
        "pearson_r": pearson_r(target, prediction),
        "n": int(target.size),
        "unit": task.unit,
    }
    if task.name.partition(":")[0] == "ahi":  # ahi, or ahi:COLUMN (e.g. ahi:ahi_scored)
        figures["icc"] = icc(np.column_stack([target, prediction]))
        figures["severity_kappa"] = severity_kappa(target, prediction)
        matrix = confusion(severity_classes(target), severity_classes(prediction), n_classes=len(AHI_SEVERITY_NAMES))
        figures["severity_confusion"] = matrix.tolist()
    return figures


def _binary_metrics(task: Task, target: np.ndarray, prediction: np.ndarray) -> dict:
    from s2v_core.evaluation.metrics import binary_metrics

    target, prediction = _known(target, prediction)
    return binary_metrics(target.astype(np.int64), prediction)


def _survival_metrics(task: Task, target: np.ndarray, prediction: np.ndarray) -> dict:
    """``target`` is ``(n, 2)``: event (0/1), time."""
    target = np.asarray(target, dtype=np.float64).reshape(-1, 2)
    risk = prediction.reshape(len(target), -1)[:, 0].astype(np.float64)
    keep = np.isfinite(target).all(axis=1)
    return {
        "c_index": concordance_index(target[keep, 1], target[keep, 0], risk[keep]),
        "events": int(target[keep, 0].sum()),
        "n": int(keep.sum()),
    }


#: kind → figures from (task, targets, head outputs).
METRICS: dict[str, Callable[[Task, np.ndarray, np.ndarray], dict]] = {
    "classification": _classification_metrics,
    "regression": _regression_metrics,
    "binary": _binary_metrics,
    "survival": _survival_metrics,
}


#: kind → (figure used to choose between models, +1 if higher is better, -1 if lower is).
PRIMARY_METRICS: dict[str, tuple[str, float]] = {
    "classification": ("kappa", 1.0),
    "regression": ("mae", -1.0),
    "binary": ("auroc", 1.0),
    "survival": ("c_index", 1.0),
}


# -- losses -----------------------------------------------------------------------------------------
def cox_partial_likelihood(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow's handling of tied times), mean over events.

    ``-(1/d) Σ_{i: event} [log_risk_i − log Σ_{j: time_j ≥ time_i} exp(log_risk_j)]``
    with ``d`` the number of events. A batch without an event gives 0 (with
    a gradient path, so data-parallel workers stay in step).

    Parameters
    ----------
    log_risk : Tensor ``(n,)``
        Predicted log hazard ratio of each subject.
    time : Tensor ``(n,)``
        Time to event or censoring.
    event : Tensor ``(n,)``
        1 if the event was observed, 0 if censored.
    """
    log_risk, time, event = log_risk.reshape(-1), time.reshape(-1).to(log_risk.dtype), event.reshape(-1).bool()
    at_risk = time[None, :] >= time[:, None]  # row i: who was still at risk when i failed
    log_denominator = torch.logsumexp(log_risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    terms = (log_risk - log_denominator)[event]
    if terms.numel() == 0:
        return log_risk.sum() * 0.0
    return -terms.mean()


def _classification_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = output.reshape(-1, output.shape[-1])
    target = target.reshape(-1).long()
    if not (target != UNKNOWN_STAGE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=UNKNOWN_STAGE)


def _masked(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    output, target = output.reshape(-1), target.reshape(-1).to(output.dtype)
    known = torch.isfinite(target)
    return output, torch.where(known, target, 0.0), known


def _regression_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    output, target, known = _masked(output, target)
    squared = torch.where(known, (output - target) ** 2, 0.0)
    return squared.sum() / known.sum().clamp(min=1)


def _binary_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    output, target, known = _masked(output, target)
    loss = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    return torch.where(known, loss, 0.0).sum() / known.sum().clamp(min=1)


def _survival_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.reshape(-1, 2)
    known = torch.isfinite(target).all(dim=1)
    return cox_partial_likelihood(output.reshape(-1)[known], target[known, 1], target[known, 0])


#: kind → loss(head output, target); targets that are unknown (−1 stages, NaN values) are ignored.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classification": _classification_loss,
    "regression": _regression_loss,
    "binary": _binary_loss,
    "survival": _survival_loss,
}


# -- the table ----------------------------------------------------------------------------------------
def _event_bits(kinds: Sequence[str]) -> int:
    unknown = [k for k in kinds if k not in EVENT_FLAGS]
    if not kinds or unknown:
        raise ValueError(
            f"--task events:KIND[,KIND]: expected kinds among {', '.join(EVENT_FLAGS)}, "
            f"found {', '.join(unknown) or 'none'}"
        )
    bits = 0
    for kind in kinds:
        bits |= EVENT_FLAGS[kind][1]
    return bits


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("staging", "epoch", "classification", ("stages",), classes=STAGE_NAMES, stage_map=(0, 1, 2, 3, 4)),
        # Light sleep = N1 + N2, deep = N3 (the consumer-wearable grouping).
        Task(
            "staging4",
            "epoch",
            "classification",
            ("stages",),
            classes=("W", "light", "deep", "REM"),
            stage_map=(0, 1, 1, 2, 3),
        ),
        Task(
            "staging3", "epoch", "classification", ("stages",), classes=("W", "NREM", "REM"), stage_map=(0, 1, 1, 1, 2)
        ),
        # What an AHI is counted from: apnoeas and hypopnoeas (AASM), not desaturations alone.
        Task("events", "epoch", "binary", (EVENTS_COLUMN,), event_bits=_event_bits(("apnea", "hypopnea"))),
        Task("arousal", "epoch", "binary", (EVENTS_COLUMN,), event_bits=_event_bits(("arousal",))),
        Task("age", "night", "regression", ("age",), unit="years"),
        Task("sex", "night", "binary", ("sex",)),
        Task("ahi", "night", "regression", ("ahi",), unit="events/h"),
    )
}


def _outcome_task(argument: str) -> Task:
    return Task(f"outcome:{argument}", "night", "binary", (argument,))


def _ahi_task(argument: str) -> Task:
    return Task(f"ahi:{argument}", "night", "regression", (argument,), unit="events/h")


def _events_task(argument: str) -> Task:
    kinds = tuple(dict.fromkeys(k.strip() for k in argument.split(",") if k.strip()))
    return Task(f"events:{','.join(kinds)}", "epoch", "binary", (EVENTS_COLUMN,), event_bits=_event_bits(kinds))


def _survival_task(argument: str) -> Task:
    parts = [p.strip() for p in argument.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"--task survival:{argument}: expected survival:EVENT,TIME (two outcome columns), found {argument!r}"
        )
    return Task(f"survival:{parts[0]},{parts[1]}", "night", "survival", tuple(parts))


#: Tasks parametrised by store columns: ``prefix:ARGUMENT``.
TASK_FAMILIES: dict[str, Callable[[str], Task]] = {
    "outcome": _outcome_task,
    "ahi": _ahi_task,
    "survival": _survival_task,
    "events": _events_task,
}


def get_task(name: str) -> Task:
    """The task called ``name`` (a :data:`TASKS` key or ``outcome:COL`` / ``survival:EVENT,TIME``)."""
    if name in TASKS:
        return TASKS[name]
    prefix, _, argument = name.partition(":")
    if prefix in TASK_FAMILIES and argument.strip():
        return TASK_FAMILIES[prefix](argument.strip())
    raise ValueError(
        f"--task: expected one of {', '.join(TASKS)} or {', '.join(f'{p}:…' for p in TASK_FAMILIES)}, found {name!r}"
    )


def night_targets(task: Task, *, age: np.ndarray, sex: np.ndarray, outcomes: Mapping[str, np.ndarray]) -> np.ndarray:
    """A night-level task's targets from per-row ``age`` (years), ``sex`` (0/1) and outcome columns.

    Returns float64 ``(n,)`` (NaN unknown), or ``(n, 2)`` (event, time) for survival.
    """
    if task.level != "night":
        raise ValueError(f"night_targets: task {task.name!r} is an epoch-level task")
    sources = {"age": np.asarray(age, np.float64), "sex": np.asarray(sex, np.float64)}

    def column(name: str) -> np.ndarray:
        if name in sources:
            return sources[name]
        if name not in outcomes:
            raise ValueError(
                f"--task {task.name}: the store has no outcome column {name!r}; "
                f"found {', '.join(sorted(outcomes)) or 'none'}"
            )
        return np.asarray(outcomes[name], np.float64)

    values = [column(name) for name in task.columns]
    return np.column_stack(values) if task.kind == "survival" else values[0]
