"""Metrics for sleep staging and clinical outcomes, and fold summaries.

Staging metrics are computed from one confusion matrix so that every figure
of a report (accuracy, macro-F1, Cohen's kappa, per-class F1) is consistent
with the matrix that is plotted; they agree with scikit-learn's
``accuracy_score``, ``f1_score(average="macro")`` and ``cohen_kappa_score``
(a unit test checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from s2v_core.store import STAGE_NAMES, UNKNOWN_STAGE

#: Number of sleep stages scored (W, N1, N2, N3, REM).
N_STAGES = len(STAGE_NAMES)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, *, n_classes: int = N_STAGES) -> np.ndarray:
    """Confusion matrix ``C[true, predicted]`` (int64, ``n_classes x n_classes``).

    Epochs whose true stage is unknown (``-1``) are dropped.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    keep = y_true != UNKNOWN_STAGE
    y_true, y_pred = y_true[keep], y_pred[keep]
    bad = (y_true < 0) | (y_true >= n_classes) | (y_pred < 0) | (y_pred >= n_classes)
    if bad.any():
        raise ValueError(
            f"stage codes must lie in 0..{n_classes - 1} (or -1 unknown); "
            f"found {sorted(set(y_true[bad]) | set(y_pred[bad]))}"
        )
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)


def staging_metrics_from_confusion(matrix: np.ndarray, *, class_names: Sequence[str] = STAGE_NAMES) -> dict:
    """Accuracy, macro-F1, Cohen's kappa and per-class F1 of a confusion matrix.

    Macro-F1 averages over the classes that occur in the truth or the
    predictions (scikit-learn's convention with ``labels=None``); a class
    absent from both has F1 ``None`` in ``per_class_f1``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    if total == 0:
        raise ValueError("no scored epochs: every true stage is unknown (-1)")
    diagonal = np.diag(matrix)
    true_counts, predicted_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    accuracy = diagonal.sum() / total
    observed = (true_counts + predicted_counts) > 0
    denominator = true_counts + predicted_counts
    f1 = np.divide(2 * diagonal, denominator, out=np.zeros_like(diagonal), where=denominator > 0)
    expected = (true_counts * predicted_counts).sum() / total**2
    kappa = 0.0 if expected == 1 else (accuracy - expected) / (1 - expected)
    return {
        "accuracy": float(accuracy),
        "macro_f1": float(f1[observed].mean()),
        "kappa": float(kappa),
        "per_class_f1": {name: (float(f1[i]) if observed[i] else None) for i, name in enumerate(class_names)},
        "n_epochs": int(total),
    }


def staging_metrics(y_true: np.ndarray, y_pred: np.ndarray, *, class_names: Sequence[str] = STAGE_NAMES) -> dict:
    """Staging metrics of per-epoch stage codes (W=0 … REM=4; true ``-1`` ignored).

    Returns accuracy, macro-F1, Cohen's kappa, per-class F1, the number of
    scored epochs and the confusion matrix (``confusion[true][predicted]``).
    ``class_names`` names codes ``0..len(class_names)-1`` of another grouping
    of the stages (``s2v_core.evaluation.tasks``: W / light / deep / REM …).
    """
    matrix = confusion(y_true, y_pred, n_classes=len(class_names))
    return {**staging_metrics_from_confusion(matrix, class_names=class_names), "confusion": matrix.tolist()}


def majority_baseline(y_train: np.ndarray, y_test: np.ndarray, *, class_names: Sequence[str] = STAGE_NAMES) -> dict:
    """Staging metrics of always predicting the most frequent training stage (of ``class_names``)."""
    y_train = np.asarray(y_train).ravel()
    known = y_train[y_train != UNKNOWN_STAGE]
    if known.size == 0:
        raise ValueError("no scored training epochs for the majority baseline")
    majority = int(np.bincount(known, minlength=len(class_names)).argmax())
    return staging_metrics(y_test, np.full(np.asarray(y_test).shape, majority), class_names=class_names)


def binary_metrics(y_true: np.ndarray, score: np.ndarray) -> dict:
    """AUROC and AUPRC (average precision) of a score for a 0/1 outcome.

    AUROC is ``None`` when the test fold holds a single class (it is undefined).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    single_class = len(np.unique(y_true)) < 2
    return {
        "auroc": None if single_class else float(roc_auc_score(y_true, score)),
        "auprc": None if single_class else float(average_precision_score(y_true, score)),
        "prevalence": float(y_true.mean()),
        "n": int(y_true.size),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Mean absolute error (unit of the target) and coefficient of determination R²."""
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    residual = ((y_true - y_pred) ** 2).sum()
    spread = ((y_true - y_true.mean()) ** 2).sum()
    return {
        "mae": float(np.abs(y_true - y_pred).mean()),
        # R² of a constant truth is undefined; report None rather than -inf.
        "r2": None if spread == 0 else float(1 - residual / spread),
        "n": int(y_true.size),
    }


def summarise(per_fold: Sequence[Mapping[str, object]]) -> dict:
    """Mean and sample standard deviation over folds of every scalar metric.

    Returns ``{name: {"mean": m, "sd": s, "n_folds": k}}``; folds where a
    metric is ``None`` (undefined there) are left out of that metric.
    """
    names = [k for k, v in per_fold[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {}
    for name in names:
        values = np.array([f[name] for f in per_fold if f.get(name) is not None], dtype=np.float64)
        if values.size:
            out[name] = {
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                "n_folds": int(values.size),
            }
    return out
