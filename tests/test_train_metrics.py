"""Rank 0's MLflow writer: buffered step metrics and MLflow's system metrics in the run's own store."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

import pipelines.runtime as runtime
import pipelines.train_loop as train_loop


def test_metric_log_writes_steps_and_samples_system_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "SYSTEM_METRICS_SECONDS", 0.2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("metrics", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    log = train_loop._MetricLog({"tracking_uri": uri, "run_id": run_id}, enabled=True)
    log.add({"loss": 2.5, "not_finite": float("nan")}, step=1)
    deadline = time.monotonic() + 60
    while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
        assert time.monotonic() < deadline, "no system metric sampled within a minute"
        time.sleep(0.2)
    log.close()

    metrics = client.get_run(run_id).data.metrics
    assert metrics["loss"] == 2.5 and "not_finite" not in metrics
    assert {"system/system_memory_usage_megabytes", "system/cpu_utilization_percentage"} <= set(metrics)
    assert log.monitor is None


def test_metric_log_is_silent_off_rank_zero():
    log = train_loop._MetricLog({"tracking_uri": "sqlite:///unused.db", "run_id": "x"}, enabled=False)
    log.add({"loss": 1.0}, step=1)
    log.close()
    assert log.client is None and log.monitor is None and log.rows == []
