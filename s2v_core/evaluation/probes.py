"""Probes over frozen embeddings: linear (scikit-learn) and a small temporal head (torch).

Every probe is run through :func:`cross_validate_staging` (or its outcome /
site counterparts) on subject-grouped folds, so that a figure in a report is
always an out-of-fold figure. A probe is a ``fit_predict(train_rows,
test_rows) -> predictions`` callable over row indices of the window table;
that makes the label-efficiency curve and the supervised-from-scratch peer
run through exactly the same folds and metrics as the probes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from s2v_core.evaluation.folds import Fold, grouped_folds, held_out_fold, subsample_groups
from s2v_core.evaluation.metrics import (
    N_STAGES,
    binary_metrics,
    confusion,
    majority_baseline,
    regression_metrics,
    staging_metrics,
    staging_metrics_from_confusion,
    summarise,
)
from s2v_core.store import STAGE_NAMES, UNKNOWN_STAGE

logger = logging.getLogger(__name__)

#: ``fit_predict(train_rows, test_rows, val_rows=None) -> stage predictions (len(test_rows), E)``;
#: ``val_rows`` (a subset of nothing else: rows held out of training) serve early stopping.
StagingProbe = Callable[..., np.ndarray]


def _linear_model(seed: int, *, max_iter: int = 1000, regression: bool = False, impute: bool = False):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Standardisation first: embedding dimensions differ in scale and the
    # L2 penalty of the probe should treat them alike.
    head = Ridge(alpha=1.0) if regression else LogisticRegression(max_iter=max_iter, random_state=seed)
    if impute:
        # Features of absent modalities are NaN: the training mean plus a missing-value indicator.
        return make_pipeline(
            SimpleImputer(strategy="mean", add_indicator=True, keep_empty_features=True), StandardScaler(), head
        )
    return make_pipeline(StandardScaler(), head)


def fit_linear_stager(
    epoch_embeddings: np.ndarray,
    stages: np.ndarray,
    rows: np.ndarray,
    *,
    seed: int = 0,
    max_train_epochs: int = 100_000,
    impute: bool = False,
):
    """Fit the per-epoch logistic-regression stager on ``rows`` of ``(N, E, P)`` embeddings.

    Returns a fitted scikit-learn pipeline, or the single stage code when the
    training rows hold fewer than two stages (a tiny label fraction may).
    ``impute`` handles NaN inputs (hand-crafted features of absent modalities).
    """
    dim = epoch_embeddings.shape[-1]
    x = epoch_embeddings[rows].reshape(-1, dim)
    y = stages[rows].reshape(-1)
    known = np.flatnonzero(y != UNKNOWN_STAGE)
    if known.size > max_train_epochs:
        known = np.random.default_rng(seed).choice(known, size=max_train_epochs, replace=False)
    classes = np.unique(y[known])
    if classes.size < 2:
        return int(classes[0]) if classes.size else 0
    return _linear_model(seed, impute=impute).fit(x[known], y[known])


def predict_stages(model, epoch_embeddings: np.ndarray) -> np.ndarray:
    """Stage codes ``(N, E)`` of :func:`fit_linear_stager`'s model for ``(N, E, P)`` embeddings."""
    windows, epochs, dim = epoch_embeddings.shape
    if isinstance(model, int):
        return np.full((windows, epochs), model, dtype=np.int64)
    if windows == 0:
        return np.zeros((0, epochs), dtype=np.int64)
    return model.predict(epoch_embeddings.reshape(-1, dim)).reshape(windows, epochs).astype(np.int64)


def linear_staging_probe(
    epoch_embeddings: np.ndarray,
    stages: np.ndarray,
    *,
    seed: int = 0,
    max_train_epochs: int = 100_000,
    impute: bool = False,
) -> StagingProbe:
    """A per-epoch logistic-regression probe over ``epoch_embeddings`` ``(N, E, P)``.

    Unknown stages (-1) are excluded from training. At most
    ``max_train_epochs`` randomly chosen training epochs are used, which keeps
    the probe's cost bounded on large stores. ``impute`` fills NaN inputs
    (see :func:`fit_linear_stager`).
    """

    def fit_predict(train_rows: np.ndarray, test_rows: np.ndarray, val_rows: np.ndarray | None = None) -> np.ndarray:
        model = fit_linear_stager(
            epoch_embeddings, stages, train_rows, seed=seed, max_train_epochs=max_train_epochs, impute=impute
        )
        return predict_stages(model, epoch_embeddings[test_rows])

    return fit_predict


@contextlib.contextmanager
def single_thread_torch() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous setting.

    The heads here are tiny: with several threads the per-op synchronisation
    dominates (a 10x slowdown on a busy 2-core machine), and one thread also
    makes the results independent of the core count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TemporalHead(nn.Module):
    """A 1-layer bidirectional GRU over the epochs of a window, then a per-epoch linear classifier."""

    def __init__(self, dim: int, *, hidden: int = 32, n_classes: int = N_STAGES) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, n_classes)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """``(B, E, P)`` embeddings -> ``(B, E, n_classes)`` logits."""
        hidden, _ = self.gru(windows)
        return self.out(hidden)


def temporal_staging_probe(
    epoch_embeddings: np.ndarray,
    stages: np.ndarray,
    *,
    seed: int = 0,
    hidden: int = 32,
    steps: int = 300,
    batch_windows: int = 64,
    learning_rate: float = 3e-3,
    n_classes: int = N_STAGES,
) -> StagingProbe:
    """A small bi-GRU head trained on the windows' epoch embeddings ``(N, E, P)``.

    Trained with Adam for ``steps`` mini-batches of ``batch_windows`` windows;
    cross-entropy ignores unknown stages. ``n_classes``: the stage codes
    ``0..n_classes-1`` of ``stages`` (5 AASM stages, or a grouping of them).
    """

    def fit_predict(train_rows: np.ndarray, test_rows: np.ndarray, val_rows: np.ndarray | None = None) -> np.ndarray:
        with single_thread_torch():
            return _fit_predict(train_rows, test_rows)

    def _fit_predict(train_rows: np.ndarray, test_rows: np.ndarray) -> np.ndarray:
        x = epoch_embeddings[train_rows]
        mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
        scale = x.reshape(-1, x.shape[-1]).std(axis=0) + 1e-6
        x = torch.from_numpy(((x - mean) / scale).astype(np.float32))
        y = torch.from_numpy(stages[train_rows].astype(np.int64))
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        head = TemporalHead(x.shape[-1], hidden=hidden, n_classes=n_classes)
        optimiser = torch.optim.Adam(head.parameters(), lr=learning_rate)
        loss_fn = nn.CrossEntropyLoss(ignore_index=UNKNOWN_STAGE)
        head.train()
        if (y != UNKNOWN_STAGE).any():
            for _ in range(steps):
                pick = torch.randint(0, len(x), (min(batch_windows, len(x)),), generator=generator)
                logits = head(x[pick])
                loss = loss_fn(logits.reshape(-1, n_classes), y[pick].reshape(-1))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        head.eval()
        test = torch.from_numpy(((epoch_embeddings[test_rows] - mean) / scale).astype(np.float32))
        with torch.no_grad():
            return head(test).argmax(dim=-1).numpy().astype(np.int64)

    return fit_predict


def cross_validate_staging(
    probe: StagingProbe,
    stages: np.ndarray,
    folds: Sequence[Fold],
    *,
    class_names: Sequence[str] = STAGE_NAMES,
) -> dict:
    """Out-of-fold staging metrics of ``probe`` over ``folds``.

    Returns ``per_fold`` (metrics of each test fold), ``summary`` (mean ± sd
    over folds), ``pooled`` (metrics of all out-of-fold predictions with their
    confusion matrix) and ``predictions`` (``int64 (N, E)``, out-of-fold; not
    JSON — callers drop it from reports). ``class_names`` names the codes of
    ``stages`` (the AASM stages, or a grouping of them).
    """
    predictions = np.full(stages.shape, UNKNOWN_STAGE, dtype=np.int64)
    per_fold = []
    for fold in folds:
        predicted = probe(fold.train, fold.test, fold.val)
        predictions[fold.test] = predicted
        metrics = staging_metrics(stages[fold.test], predicted, class_names=class_names)
        metrics.pop("confusion")
        per_fold.append(metrics)
    scored = np.unique(np.concatenate([fold.test for fold in folds]))  # a held-out fold scores only its test rows
    matrix = confusion(stages[scored], predictions[scored], n_classes=len(class_names))
    return {
        "per_fold": per_fold,
        "summary": summarise(per_fold),
        "pooled": {**staging_metrics_from_confusion(matrix, class_names=class_names), "confusion": matrix.tolist()},
        "predictions": predictions,
    }


def majority_staging(stages: np.ndarray, folds: Sequence[Fold], *, class_names: Sequence[str] = STAGE_NAMES) -> dict:
    """Fold-wise metrics of predicting the most frequent training stage (the floor to beat)."""
    per_fold = []
    for fold in folds:
        metrics = majority_baseline(stages[fold.train], stages[fold.test], class_names=class_names)
        metrics.pop("confusion")
        per_fold.append(metrics)
    return {"per_fold": per_fold, "summary": summarise(per_fold)}


def label_efficiency(
    probes: dict[str, StagingProbe],
    stages: np.ndarray,
    nights: np.ndarray,
    folds: Sequence[Fold],
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
) -> dict:
    """Staging metrics of each probe trained on a fraction of the training nights.

    The same nights are drawn for every probe (same ``seed`` per fold and
    fraction), so the curves compare models on identical labels. A fold's
    ``val`` rows are never among the drawn training nights: they stay whole
    for the probes that stop early on them. Returns
    ``{probe: {fraction: {"summary": …, "per_fold": …, "train_nights": [..]}}}``.
    """
    out: dict[str, dict] = {name: {} for name in probes}
    for fraction in fractions:
        pools = [f.train if f.val is None else np.setdiff1d(f.train, f.val) for f in folds]
        subsets = [subsample_groups(pool, nights, fraction=fraction, seed=seed + i) for i, pool in enumerate(pools)]
        reduced = [Fold(train=s, test=f.test, val=f.val) for s, f in zip(subsets, folds)]
        train_nights = [int(len(np.unique(nights[s]))) for s in subsets]
        for name, probe in probes.items():
            logger.info("label efficiency: %s on %.0f%% of training nights", name, 100 * fraction)
            result = cross_validate_staging(probe, stages, reduced)
            out[name][str(fraction)] = {
                "summary": result["summary"],
                "per_fold": result["per_fold"],
                "train_nights": train_nights,
            }
    return out


def cross_validate_outcome(
    features: np.ndarray,
    target: np.ndarray,
    subjects: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    splits: np.ndarray | None = None,
) -> dict:
    """Per-night outcome probe: logistic regression for 0/1 targets, ridge regression otherwise.

    Nights with a missing target (NaN) are dropped first. A 0/1 target is
    scored by AUROC/AUPRC, any other by MAE (unit of the target) and R².
    With ``splits`` (each night's subject split) the probe fits on train/val
    subjects and scores test subjects (:func:`~s2v_core.evaluation.folds.held_out_fold`);
    otherwise subject-grouped ``folds``-fold cross-validation.
    """
    target = np.asarray(target, dtype=np.float64)
    keep = ~np.isnan(target)
    features, target, subjects = features[keep], target[keep], np.asarray(subjects)[keep]
    if target.size == 0:
        raise ValueError("the outcome is missing for every night")
    binary = set(np.unique(target)) <= {0.0, 1.0}
    if binary and len(np.unique(target)) < 2:
        raise ValueError(f"a binary outcome needs both classes; every night has value {target[0]:g}")
    split = (
        [held_out_fold(np.asarray(splits)[keep])]
        if splits is not None
        else grouped_folds(subjects, folds=folds, seed=seed, labels=target if binary else None)
    )
    per_fold = []
    for fold in split:
        model = _linear_model(seed, regression=not binary)
        y_train = target[fold.train].astype(np.int64) if binary else target[fold.train]
        if binary and len(np.unique(y_train)) < 2:
            score = np.full(len(fold.test), float(y_train[0]))
        else:
            model.fit(features[fold.train], y_train)
            score = model.predict_proba(features[fold.test])[:, 1] if binary else model.predict(features[fold.test])
        per_fold.append(
            binary_metrics(target[fold.test], score) if binary else regression_metrics(target[fold.test], score)
        )
    return {
        "kind": "classification" if binary else "regression",
        "n_nights": int(target.size),
        "per_fold": per_fold,
        "summary": summarise(per_fold),
    }


def cross_validate_site(
    features: np.ndarray,
    sites: np.ndarray,
    subjects: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    splits: np.ndarray | None = None,
) -> dict:
    """How well the recording site is predicted from embeddings (the DASH shortcut check).

    A multinomial logistic regression on subject-grouped, site-stratified
    folds (or, with ``splits``, fitted on train/val subjects and scored on
    test subjects); reports accuracy, balanced accuracy and the chance levels
    (majority site share, ``1 / n_sites``). Lower is better for an encoder
    meant to ignore site shortcuts.
    """
    from sklearn.metrics import balanced_accuracy_score

    sites = np.asarray(sites)
    names, codes = np.unique(sites, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"the site probe needs at least 2 sites; the embeddings hold only {names.tolist()}")
    split = (
        [held_out_fold(splits)] if splits is not None else grouped_folds(subjects, folds=folds, seed=seed, labels=codes)
    )
    per_fold = []
    for fold in split:
        model = _linear_model(seed)
        if len(np.unique(codes[fold.train])) < 2:
            predicted = np.full(len(fold.test), codes[fold.train][0])
        else:
            predicted = model.fit(features[fold.train], codes[fold.train]).predict(features[fold.test])
        per_fold.append(
            {
                "accuracy": float((predicted == codes[fold.test]).mean()),
                "balanced_accuracy": float(balanced_accuracy_score(codes[fold.test], predicted)),
            }
        )
    return {
        "sites": names.tolist(),
        "chance_majority": float(np.bincount(codes).max() / codes.size),
        "chance_balanced": 1.0 / len(names),
        "per_fold": per_fold,
        "summary": summarise(per_fold),
    }
