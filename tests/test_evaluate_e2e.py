"""End to end through the CLI: synth -> ingest -> pretrain tiny -> embed -> evaluate."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main as s2v

pytestmark = pytest.mark.integration


def test_synthetic_cohort_staging_beats_majority(ray_local, tmp_path, monkeypatch, capsys):
    # The evaluation run must land in the pretraining run's own MLflow store (RUN_DIR/mlflow.db).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort, store, run_dir = tmp_path / "cohort", tmp_path / "store", tmp_path / "run"
    emb, report = tmp_path / "emb", tmp_path / "eval" / "REPORT.json"
    assert s2v(["synth", str(cohort), "--sites", "3", "--recordings-per-site", "2", "--hours", "0.5",
                "--seed", "0"]) == 0
    assert s2v(["ingest", "--input", str(cohort), "--output", str(store), "--epochs-per-window", "5"]) == 0
    assert s2v(["pretrain", "--data", str(store), "--output", str(run_dir), "--model", "tiny",
                "--workers", "2", "--steps", "20", "--global-batch", "16",
                "--modalities", "eeg,eog,emg,ecg,spo2"]) == 0
    assert s2v(["embed", "--checkpoint", str(run_dir), "--data", str(store), "--output", str(emb),
                "--batch-size", "16"]) == 0
    capsys.readouterr()
    assert s2v(["evaluate", "--embeddings", str(emb), "--task", "staging", "--report", str(report),
                "--folds", "3"]) == 0

    result = json.loads(report.read_text())
    assert set(result) >= {"report_format", "task", "embeddings", "protocol", "staging", "plots", "mlflow"}
    assert result["embeddings"]["modalities"] == ["eeg", "eog", "emg", "ecg", "spo2"]
    staging = result["staging"]
    assert staging["n_subjects"] >= 3 and staging["n_epochs_scored"] > 0
    majority = staging["majority"]["summary"]["macro_f1"]["mean"]
    for head in ("linear", "temporal"):
        assert staging[head]["summary"]["macro_f1"]["mean"] > majority + 0.15, head
    assert all((report.parent / p.split("/")[-1]).is_file() for p in result["plots"])
    pretrain_run = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert result["mlflow"]["pretrain_run_id"] == pretrain_run
    assert result["mlflow"]["parent_run_id"] == pretrain_run
