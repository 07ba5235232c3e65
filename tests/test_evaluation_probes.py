"""Probes learn a separable stage signal, on out-of-fold predictions only."""

import numpy as np
import pytest

from s2v_core.evaluation.folds import grouped_folds
from s2v_core.evaluation.plots import plot_confusion, plot_hypnogram, plot_label_efficiency, plot_robustness
from s2v_core.evaluation.probes import (
    cross_validate_outcome,
    cross_validate_site,
    cross_validate_staging,
    label_efficiency,
    linear_staging_probe,
    majority_staging,
    temporal_staging_probe,
)


def _embeddings(seed=0, windows=120, epochs=6, dim=8):
    rng = np.random.default_rng(seed)
    stages = rng.integers(0, 5, (windows, epochs))
    stages[0, 0] = -1
    centres = rng.normal(size=(5, dim)) * 2
    x = centres[stages.clip(0)] + rng.normal(size=(windows, epochs, dim))
    subjects = np.repeat(np.arange(windows // 4), 4)
    return x.astype(np.float32), stages, subjects


def test_linear_and_temporal_probes_beat_majority():
    x, stages, subjects = _embeddings()
    folds = grouped_folds(subjects, folds=3, seed=0)
    majority = majority_staging(stages, folds)["summary"]["macro_f1"]["mean"]
    linear = cross_validate_staging(linear_staging_probe(x, stages), stages, folds)
    temporal = cross_validate_staging(temporal_staging_probe(x, stages, steps=150), stages, folds)
    assert linear["summary"]["macro_f1"]["mean"] > majority + 0.4
    assert temporal["summary"]["macro_f1"]["mean"] > majority + 0.3
    assert linear["predictions"].shape == stages.shape
    assert np.array(linear["pooled"]["confusion"]).sum() == (stages != -1).sum()


def test_temporal_probe_is_deterministic_for_a_seed():
    x, stages, subjects = _embeddings(windows=40)
    folds = grouped_folds(subjects, folds=2, seed=0)
    first = cross_validate_staging(temporal_staging_probe(x, stages, steps=20), stages, folds)
    second = cross_validate_staging(temporal_staging_probe(x, stages, steps=20), stages, folds)
    np.testing.assert_array_equal(first["predictions"], second["predictions"])


def test_label_efficiency_trains_on_fewer_nights():
    x, stages, subjects = _embeddings()
    nights = np.repeat(np.arange(60), 2)
    folds = grouped_folds(subjects, folds=3, seed=0)
    curves = label_efficiency({"linear": linear_staging_probe(x, stages)}, stages, nights, folds, fractions=(0.05, 1.0))
    assert set(curves["linear"]) == {"0.05", "1.0"}
    assert curves["linear"]["0.05"]["train_nights"][0] == 2
    assert curves["linear"]["1.0"]["train_nights"][0] == 40


def test_outcome_probe_picks_classification_or_regression():
    rng = np.random.default_rng(0)
    target = rng.normal(50, 10, 60)
    x = np.c_[target + rng.normal(0, 2, 60), rng.normal(size=(60, 3))]
    subjects = np.arange(60) // 2
    regression = cross_validate_outcome(x, target, subjects, folds=3)
    assert regression["kind"] == "regression"
    assert regression["summary"]["r2"]["mean"] > 0.8
    binary = (target > 50).astype(float)
    binary[:3] = np.nan
    classification = cross_validate_outcome(x, binary, subjects, folds=3)
    assert classification["kind"] == "classification" and classification["n_nights"] == 57
    assert classification["summary"]["auroc"]["mean"] > 0.8
    with pytest.raises(ValueError, match="both classes"):
        cross_validate_outcome(x, np.zeros(60), subjects, folds=3)


def test_site_probe_detects_a_site_offset():
    rng = np.random.default_rng(0)
    sites = np.repeat(["a", "b", "c"], 20)
    x = rng.normal(size=(60, 4)) + (sites == "b")[:, None] * 3.0
    result = cross_validate_site(x, sites, np.arange(60), folds=3)
    assert result["chance_balanced"] == pytest.approx(1 / 3)
    assert result["summary"]["balanced_accuracy"]["mean"] > 0.5
    with pytest.raises(ValueError, match="at least 2 sites"):
        cross_validate_site(x, np.repeat("a", 60), np.arange(60), folds=3)


def test_plots_write_png_files(tmp_path):
    matrix = np.eye(5, dtype=int) * 10 + 1
    paths = [
        plot_confusion(matrix, tmp_path / "c.png"),
        plot_hypnogram(np.array([0, 1, 2, 3, 4, -1]), np.array([0, 2, 2, 3, 4, 0]), tmp_path / "h.png"),
        plot_robustness(
            {
                "psg": {"macro_f1": 0.7, "kappa": 0.6, "accuracy": 0.8},
                "eeg": {"macro_f1": 0.6, "kappa": 0.5, "accuracy": 0.7},
            },
            tmp_path / "r.png",
        ),
        plot_label_efficiency(
            {
                "probe": {
                    "0.1": {"summary": {"macro_f1": {"mean": 0.5, "sd": 0.1}}},
                    "1.0": {"summary": {"macro_f1": {"mean": 0.7, "sd": 0.05}}},
                }
            },
            tmp_path / "l.png",
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
