"""End to end through the CLI: synth -> ingest -> pretrain tiny -> embed -> evaluate.

The cohort also holds what hospitals hand over: a folder and a file named after a
patient, with the birth date in the name. No byte of any output may carry them.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from pipelines.cli import main as s2v
from tests.test_io_edf import write_edf
from tests.test_recording import _hypnogram, _night

pytestmark = pytest.mark.integration
PATIENT, BORN = "Doe_John", "1961-02-03"


def _clinic(cohort) -> None:
    """A site as a hospital exports it: ``clinic/Doe_John/Doe_John_1961-02-03.edf``, hypnogram and table."""
    clinic = cohort / "clinic"
    (clinic / PATIENT).mkdir(parents=True)
    (clinic / "site.toml").write_text(
        'name = "clinic"\nignore_channels = ["Position"]\n'
        '[hypnogram]\nformat = "csv"\npattern = "{stem}.csv"\n'
        '[metadata]\nfile = "patients.csv"\nsubject_column = "patient"\n'
    )
    night = f"{PATIENT}_{BORN}"
    write_edf(clinic / PATIENT / f"{night}.edf", _night(1800, seed=7), file_type="edf+")
    _hypnogram(clinic / PATIENT / f"{night}.csv", 60, seed=7)
    (clinic / "patients.csv").write_text(f"recording_id,patient,age,sex\n{night},{PATIENT},93,M\n")


def test_synthetic_cohort_staging_beats_majority(ray_local, tmp_path, monkeypatch, capsys, caplog, pseudonym_key_file):
    # The evaluation run must land in the pretraining run's own MLflow store (RUN_DIR/mlflow.db).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # no command may leave MLflow artifacts (mlruns/) here
    caplog.set_level(logging.INFO)
    cohort, store, run_dir = tmp_path / "cohort", tmp_path / "store", tmp_path / "run"
    emb, report = tmp_path / "emb", tmp_path / "eval" / "REPORT.json"
    assert (
        s2v(["synth", str(cohort), "--sites", "3", "--recordings-per-site", "2", "--hours", "0.5", "--seed", "0"]) == 0
    )
    _clinic(cohort)
    assert (
        s2v(
            [
                "ingest",
                "--input",
                str(cohort),
                "--output",
                str(store),
                "--epochs-per-window",
                "5",
                "--pseudonym-key-file",
                str(pseudonym_key_file),
            ]
        )
        == 0
    )  # fixed key: the same splits every run
    assert (
        s2v(
            [
                "pretrain",
                "--data",
                str(store),
                "--output",
                str(run_dir),
                "--model",
                "tiny",
                "--workers",
                "2",
                "--steps",
                "20",
                "--global-batch",
                "16",
                "--modalities",
                "eeg,eog,emg,ecg,spo2",
            ]
        )
        == 0
    )
    assert (
        s2v(["embed", "--checkpoint", str(run_dir), "--data", str(store), "--output", str(emb), "--batch-size", "16"])
        == 0
    )
    printed_before = capsys.readouterr()
    assert (
        s2v(["evaluate", "--embeddings", str(emb), "--task", "staging", "--report", str(report), "--folds", "3"]) == 0
    )

    result = json.loads(report.read_text())
    assert set(result) >= {"report_format", "task", "embeddings", "protocol", "staging", "plots", "mlflow"}
    assert result["embeddings"]["modalities"] == ["eeg", "eog", "emg", "ecg", "spo2"]
    staging = result["staging"]
    assert staging["n_subjects"] >= 4 and staging["n_epochs_scored"] > 0
    majority = staging["majority"]["summary"]["macro_f1"]["mean"]
    for head in ("linear", "temporal"):
        assert staging[head]["summary"]["macro_f1"]["mean"] > majority + 0.15, head
    assert all((report.parent / p.split("/")[-1]).is_file() for p in result["plots"])
    pretrain_run = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert result["mlflow"]["pretrain_run_id"] == pretrain_run
    assert result["mlflow"]["parent_run_id"] == pretrain_run

    # Privacy: the patient's name and birth date, and the pseudonym key, are in no output byte:
    # store, manifest, run dir and checkpoints, MLflow store and artifacts, embeddings, report,
    # plots, printed text and logs.
    printed = capsys.readouterr()
    blobs = [
        p.read_bytes()
        for folder in (store, run_dir, emb, report.parent, tmp_path / "cwd")
        for p in folder.rglob("*")
        if p.is_file()
    ]
    blobs += [(printed_before.out + printed_before.err + printed.out + printed.err + caplog.text).encode()]
    key = pseudonym_key_file.read_text().strip()
    for secret in (PATIENT, BORN, PATIENT.upper(), key):
        assert not any(secret.encode() in blob for blob in blobs), secret
    assert "clinic" in (store / "manifest.jsonl").read_text()  # the night is in (under its site name)
    assert os.listdir(tmp_path / "cwd") == []  # no mlruns/, nothing at all
