"""Staging and outcome metrics agree with scikit-learn on known inputs."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
)

from s2v_core.evaluation.metrics import (
    binary_metrics,
    majority_baseline,
    regression_metrics,
    staging_metrics,
    summarise,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staging_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    metrics = staging_metrics(y_true, y_pred)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y_true, y_pred))
    per_class = f1_score(y_true, y_pred, average=None, labels=range(5))
    assert [metrics["per_class_f1"][s] for s in ("W", "N1", "N2", "N3", "REM")] == pytest.approx(per_class)
    assert metrics["confusion"] == confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


def test_unknown_stages_are_not_scored_and_absent_classes_follow_sklearn():
    y_true = np.array([0, 0, 2, 2, -1, -1, 4])
    y_pred = np.array([0, 2, 2, 2, 3, 3, 0])
    metrics = staging_metrics(y_true, y_pred)
    keep = y_true != -1
    assert metrics["n_epochs"] == 5
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true[keep], y_pred[keep], average="macro"))
    assert metrics["kappa"] == pytest.approx(cohen_kappa_score(y_true[keep], y_pred[keep]))
    assert metrics["per_class_f1"]["N1"] is None


def test_staging_metrics_reject_bad_codes_and_empty_input():
    with pytest.raises(ValueError, match="stage codes"):
        staging_metrics(np.array([0, 7]), np.array([0, 1]))
    with pytest.raises(ValueError, match="no scored epochs"):
        staging_metrics(np.array([-1, -1]), np.array([0, 1]))


def test_majority_baseline_predicts_most_frequent_training_stage():
    metrics = majority_baseline(np.array([2, 2, 2, 0, -1]), np.array([2, 0, 2, 2]))
    assert metrics["accuracy"] == pytest.approx(0.75)


def test_binary_and_regression_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    score = y + rng.normal(size=100)
    metrics = binary_metrics(y, score)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(y, score))
    assert metrics["auprc"] == pytest.approx(average_precision_score(y, score))
    assert binary_metrics(np.ones(5), np.arange(5))["auroc"] is None
    target = rng.normal(40, 10, 50)
    predicted = target + rng.normal(0, 5, 50)
    reg = regression_metrics(target, predicted)
    assert reg["mae"] == pytest.approx(mean_absolute_error(target, predicted))
    assert reg["r2"] == pytest.approx(r2_score(target, predicted))


def test_summarise_reports_mean_and_sample_sd_skipping_undefined_folds():
    summary = summarise([{"auroc": 0.6, "n": 3}, {"auroc": 0.8, "n": 5}, {"auroc": None, "n": 1}])
    assert summary["auroc"]["mean"] == pytest.approx(0.7)
    assert summary["auroc"]["sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert summary["auroc"]["n_folds"] == 2
