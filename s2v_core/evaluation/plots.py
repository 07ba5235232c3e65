"""PNG figures of an evaluation report (matplotlib, non-interactive backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from s2v_core.store import STAGE_NAMES, UNKNOWN_STAGE


def _pyplot():
    import matplotlib

    # Agg writes files without a display (servers, CI, Ray workers).
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    matrix: Sequence[Sequence[int]],
    path: str | Path,
    *,
    title: str = "Sleep staging",
    class_names: Sequence[str] = STAGE_NAMES,
) -> Path:
    """Row-normalised confusion matrix (true stage rows, predicted columns) with counts."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                f"{share[i, j]:.2f}\n({int(counts[i, j])})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_hypnogram(
    true: np.ndarray,
    predicted: np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    class_names: Sequence[str] = STAGE_NAMES,
) -> Path:
    """True and predicted hypnogram of one night (one value per 30-s epoch, hours on x).

    ``class_names`` names the codes (the AASM stages, or a grouping of them such as W / light / deep / REM).
    """
    plt = _pyplot()
    # Clinical hypnograms draw W at the top and the deepest sleep at the bottom, REM just below W.
    drawn = [name for name in ("W", "REM") if name in class_names]
    drawn += [name for name in class_names if name not in drawn]
    height = {class_names.index(name): len(drawn) - 1 - row for row, name in enumerate(drawn)}
    hours = np.arange(len(true)) * 30 / 3600
    fig, axes = plt.subplots(2, 1, figsize=(8, 3.5), sharex=True, sharey=True)
    for ax, stages, label in zip(axes, (true, predicted), ("true", "predicted")):
        y = np.array([height.get(int(s), np.nan) for s in stages], dtype=float)
        y[np.asarray(stages) == UNKNOWN_STAGE] = np.nan
        ax.step(hours, y, where="post", lw=1)
        ax.set_yticks([height[class_names.index(name)] for name in drawn], drawn)
        ax.set_ylabel(label)
    axes[-1].set_xlabel("time from first window (h)")
    axes[0].set_title(title)
    return _save(fig, path)


def plot_robustness(
    matrix: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("macro_f1", "kappa", "accuracy"),
) -> Path:
    """Heat-map: one row per modality scenario, one column per staging metric."""
    plt = _pyplot()
    scenarios = list(matrix)
    values = np.array([[matrix[s].get(m, np.nan) for m in metrics] for s in scenarios], dtype=float)
    fig, ax = plt.subplots(figsize=(4 + 0.6 * len(metrics), 1.2 + 0.3 * len(scenarios)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(
                j,
                i,
                f"{values[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if values[i, j] > 0.5 else "white",
            )
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_yticks(range(len(scenarios)), scenarios)
    ax.set_title("Any-subset robustness (staging, linear probe)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_label_efficiency(
    curves: Mapping[str, Mapping[str, Mapping]], path: str | Path, *, metric: str = "macro_f1"
) -> Path:
    """Metric (mean ± sd over folds) against the fraction of labelled training nights, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by_fraction in curves.items():
        fractions = sorted(by_fraction, key=float)
        x = [100 * float(f) for f in fractions]
        mean = [by_fraction[f]["summary"].get(metric, {}).get("mean", np.nan) for f in fractions]
        sd = [by_fraction[f]["summary"].get(metric, {}).get("sd", 0.0) for f in fractions]
        ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training nights (%)")
    ax.set_ylabel(metric)
    ax.set_title("Label efficiency")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_predicted_hypnogram(
    stages: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    events: np.ndarray | None = None,
) -> Path:
    """A predicted hypnogram (one class per 30-s epoch, hours on x) above its class probabilities.

    ``stages`` holds class indices into ``classes`` (−1: unscored, left blank);
    ``probabilities`` is ``(epochs, len(classes))``. Wake is drawn at the top.
    ``events`` (bool per epoch) marks epochs with a detected respiratory event
    as red ticks on the hypnogram.
    """
    plt = _pyplot()
    stages = np.asarray(stages)
    hours = np.arange(len(stages) + 1) * 30 / 3600
    # Clinical convention: W on top, REM next, then lighter to deeper NREM.
    order = [
        0,
        *([len(classes) - 1] if classes[-1] == "REM" else []),
        *[i for i in range(1, len(classes)) if classes[i] != "REM"],
    ]
    height = {c: len(order) - 1 - rank for rank, c in enumerate(order)}
    y = np.array([height.get(int(s), np.nan) for s in stages], dtype=float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4), sharex=True, height_ratios=(2, 1))
    top.step(hours, np.append(y, y[-1:]), where="post", lw=1)
    top.set_yticks([height[c] for c in order], [classes[c] for c in order])
    top.set_title(title)
    if events is not None and np.any(events):
        at = np.flatnonzero(events)
        top.plot(hours[at] + 15 / 3600, y[at], "|", color="tab:red", ms=8, label="respiratory event")
        top.legend(loc="upper right", fontsize=6)
    shown = np.where((stages >= 0)[:, None], probabilities, 0.0)
    bottom.stackplot(hours[:-1], shown.T, labels=list(classes), step="post")
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("probability")
    bottom.set_xlabel("time from recording start (h)")
    bottom.legend(loc="upper right", fontsize=6, ncol=len(classes))
    return _save(fig, path)
