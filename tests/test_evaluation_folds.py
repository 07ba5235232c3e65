"""Subject-grouped folds never leak a subject between train and test."""

import numpy as np
import pytest

from s2v_core.evaluation.folds import Fold, check_no_leak, grouped_folds, subsample_groups


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_no_subject_in_both_train_and_test(stratified, seed):
    rng = np.random.default_rng(seed)
    subjects = np.repeat([f"s{i}" for i in range(13)], rng.integers(1, 9, 13))
    labels = rng.integers(0, 2, len(subjects)) if stratified else None
    folds = grouped_folds(subjects, folds=5, seed=seed, labels=labels)
    assert len(folds) == 5
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(len(subjects)))
    for fold in folds:
        assert not set(subjects[fold.train]) & set(subjects[fold.test])
        assert len(fold.train) + len(fold.test) == len(subjects)


def test_too_few_subjects_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least 5 subjects, found 3"):
        grouped_folds(np.array(["a", "b", "c", "a"]), folds=5)
    with pytest.raises(ValueError, match=">= 2"):
        grouped_folds(np.array(["a", "b"]), folds=1)


def test_leak_checker_catches_a_shared_subject():
    groups = np.array(["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="leaks"):
        check_no_leak([Fold(train=np.array([0, 2]), test=np.array([1, 3]))], groups)


def test_subsample_keeps_whole_nights_and_at_least_one():
    nights = np.repeat(np.arange(20), 3)
    rows = np.arange(60)
    picked = subsample_groups(rows, nights, fraction=0.1, seed=0)
    assert len(np.unique(nights[picked])) == 2
    assert all((nights == n).sum() == (nights[picked] == n).sum() for n in np.unique(nights[picked]))
    assert len(np.unique(nights[subsample_groups(rows, nights, fraction=0.01)])) == 1
    assert len(subsample_groups(rows, nights, fraction=1.0)) == 60
    with pytest.raises(ValueError, match="fraction"):
        subsample_groups(rows, nights, fraction=0.0)
