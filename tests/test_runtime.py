"""Shared runtime policies: credentials redacted from everything shown, MLflow artifacts next to their store."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from pipelines.runtime import RedactingFilter, mlflow_artifact_location, mlflow_experiment
from s2v_core.locations import redact, redact_values

SECRET = "wJalrXUtnFEMI-K7MDENG"


@pytest.mark.parametrize(
    "location, shown",
    [
        (f"s3://AKIAEXAMPLE:{SECRET}@bucket/store", "s3://***@bucket/store"),
        (
            f"s3://bucket/store?endpoint_override=10.0.0.5:9000&scheme=http&secret_key={SECRET}",
            "s3://bucket/store?endpoint_override=10.0.0.5:9000&scheme=http&secret_key=***",
        ),
        (f"gs://bucket/store?access_token={SECRET}", "gs://bucket/store?access_token=***"),
        (f"https://user:{SECRET}@mlflow.example.org", "https://***@mlflow.example.org"),
        (f"https://blob/x?sv=2022&sig={SECRET}", "https://blob/x?sv=2022&sig=***"),
        (
            f"https://b/k?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}&X-Amz-Date=1",
            "https://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        ),
        ("s3://bucket/store?endpoint_override=h:9000", "s3://bucket/store?endpoint_override=h:9000"),
        ("/data/cohort/shhs", "/data/cohort/shhs"),
    ],
)
def test_credentials_in_uris_are_redacted_and_nothing_else(location, shown):
    assert redact(location) == shown
    assert redact(f"--data {location} failed") == f"--data {shown} failed"


def test_nested_values_and_log_lines_are_redacted(caplog):
    config = {"data": f"s3://K:{SECRET}@b/s", "steps": 3, "modalities": ["eeg", f"x?token={SECRET}"]}
    assert SECRET not in json.dumps(redact_values(config)) and redact_values(config)["steps"] == 3
    logger = logging.getLogger("test_runtime.redaction")
    handler = logging.Handler()
    records = []
    handler.emit = lambda record: records.append(handler.format(record))
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("reading %s", f"s3://K:{SECRET}@bucket/store")
    finally:
        logger.removeHandler(handler)
    assert records == ["reading s3://***@bucket/store"]


def test_artifacts_live_next_to_the_tracking_store(tmp_path, monkeypatch):
    monkeypatch.delenv("S2V_MLFLOW_ARTIFACT_ROOT", raising=False)
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (
        mlflow_artifact_location(store, "s2v evaluate") == (tmp_path / "runs" / "mlartifacts" / "s2v_evaluate").as_uri()
    )
    assert mlflow_artifact_location("http://127.0.0.1:5000", "x") is None  # the server's --artifacts-destination
    assert mlflow_artifact_location(str(tmp_path / "mlruns"), "x") is None  # a file store keeps them inside
    with pytest.raises(ValueError, match="S2V_MLFLOW_ARTIFACT_ROOT"):
        mlflow_artifact_location(f"postgresql://u:{SECRET}@db/mlflow", "x")
    try:
        mlflow_artifact_location(f"postgresql://u:{SECRET}@db/mlflow", "x")
    except ValueError as exc:
        assert SECRET not in str(exc)
    monkeypatch.setenv("S2V_MLFLOW_ARTIFACT_ROOT", "s3://bucket/mlflow-artifacts")
    assert mlflow_artifact_location(store, "x") == "s3://bucket/mlflow-artifacts/x"


def test_an_experiment_keeps_its_artifacts_next_to_its_store_not_in_the_current_directory(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("S2V_MLFLOW_ARTIFACT_ROOT", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(tracking_uri=uri)
    experiment = mlflow_experiment(client, uri, "s2v-test")
    assert mlflow_experiment(client, uri, "s2v-test") == experiment  # found, not created twice
    run = client.create_run(experiment).info.run_id
    client.log_text(run, "report", "report.txt")
    assert list((tmp_path / "store" / "mlartifacts").rglob("report.txt"))
    assert not (tmp_path / "cwd" / "mlruns").exists()


def test_pretraining_logs_locations_without_their_credentials(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.pretrain import setup
    from pipelines.pretrain_mlflow import start_mlflow_run
    from pipelines.train_config import PretrainConfig
    from s2v_core.toystore import write_toy_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "hr"),
    )
    prepared = setup(PretrainConfig(data=str(store), output=str(tmp_path / "run"), workers=2, global_batch=8))
    # As if --data had been s3://KEY:SECRET@bucket/store (the store itself was read locally above).
    secret_data = f"s3://AKIAEXAMPLE:{SECRET}@bucket/store?endpoint_override=h:9000"
    prepared = dataclasses.replace(prepared, config=dataclasses.replace(prepared.config, data=secret_data))
    started = start_mlflow_run(prepared)
    client = MlflowClient(tracking_uri=started.mlflow_tracking_uri)
    run = client.get_run(started.mlflow_run_id)
    assert run.data.params["pretrain.data"] == "s3://***@bucket/store?endpoint_override=h:9000"
    logged = client.download_artifacts(started.mlflow_run_id, "pretrain_config.json", str(tmp_path / "dl"))
    files = [Path(logged), *(Path(prepared.run_dir).glob("*.json"))]
    assert all(SECRET not in f.read_text() for f in files)
    assert list((tmp_path / "run" / "mlartifacts").rglob("pretrain_config.json"))
    assert not (tmp_path / "mlruns").exists()
