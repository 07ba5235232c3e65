"""Subject-grouped cross-validation folds.

Every fold keeps all rows of a subject on one side: a subject's nights (and
the windows of those nights) are never both trained on and tested on, which
would inflate every figure by letting the probe recognise the person.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fold:
    """Row indices of one fold: fit on ``train``, score ``test``.

    ``val`` (optional) are rows inside ``train`` that a model with a
    training budget may hold out to choose when to stop (early stopping);
    a probe without one fits on all of ``train``.
    """

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray | None = None


def held_out_fold(splits: np.ndarray) -> Fold:
    """The held-out protocol as one fold: fit on ``train`` and ``val`` subjects, score ``test`` subjects.

    ``splits`` is each row's subject split (``train``/``val``/``test``,
    :mod:`s2v_core.splits`). ``Fold.val`` are the ``val`` rows, for early stopping.

    Raises
    ------
    ValueError
        When no row is a ``test`` subject or none can be fitted on.
    """
    splits = np.asarray(splits)
    rows = np.arange(len(splits))
    test = rows[splits == "test"]
    train = rows[(splits == "train") | (splits == "val")]
    if len(test) == 0:
        raise ValueError(
            "held-out evaluation: no window belongs to a test subject (see `s2v split --data STORE`); nothing to score"
        )
    if len(train) == 0:
        raise ValueError("held-out evaluation: no window belongs to a train or val subject; nothing to fit on")
    return Fold(train=train, test=test, val=rows[splits == "val"])


def grouped_folds(
    groups: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> list[Fold]:
    """Split rows into ``folds`` folds with no group (subject) on both sides.

    Parameters
    ----------
    groups : array of str or int, shape ``(rows,)``
        Group of each row (``subject_id``).
    folds : int
        Number of folds; at least 2 and at most the number of groups.
    seed : int
        Seed of the shuffle of groups over folds.
    labels : array, shape ``(rows,)``, optional
        Class labels; when given, folds are stratified by label as far as the
        grouping allows (``StratifiedGroupKFold``), else ``GroupKFold``.

    Raises
    ------
    ValueError
        When ``folds`` is below 2 or exceeds the number of distinct groups.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, got {folds}")
    if n_groups < folds:
        raise ValueError(
            f"--folds {folds} needs at least {folds} subjects, found {n_groups}; use fewer folds or more subjects"
        )
    rows = np.arange(len(groups))
    if labels is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(rows, np.asarray(labels), groups)
    else:
        splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = splitter.split(rows, groups=groups)
    result = [Fold(train=np.sort(train), test=np.sort(test)) for train, test in splits]
    check_no_leak(result, groups)
    return result


def check_no_leak(folds: list[Fold], groups: np.ndarray) -> None:
    """Raise ``ValueError`` if a group appears on both sides of a fold or a row is never tested."""
    groups = np.asarray(groups)
    tested = np.zeros(len(groups), dtype=int)
    for i, fold in enumerate(folds):
        shared = set(groups[fold.train]) & set(groups[fold.test])
        if shared:
            raise ValueError(f"fold {i} leaks subjects {sorted(shared)[:5]} into train and test")
        tested[fold.test] += 1
    if not (tested == 1).all():
        raise ValueError("folds must test every row exactly once")


def subsample_groups(
    rows: np.ndarray,
    groups: np.ndarray,
    *,
    fraction: float,
    seed: int = 0,
) -> np.ndarray:
    """Rows of a random ``fraction`` of the groups present in ``rows`` (at least one group).

    Used for label efficiency, where ``groups`` are nights: the probe sees
    every window of the chosen nights and none of the others.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    rows = np.asarray(rows)
    present = np.unique(np.asarray(groups)[rows])
    keep_count = max(1, int(round(fraction * len(present))))
    chosen = np.random.default_rng(seed).choice(present, size=keep_count, replace=False)
    return rows[np.isin(np.asarray(groups)[rows], chosen)]
