"""The MLflow side of ``s2v pretrain`` on the driver: the run, its params and configs, the final encoder.

Rank 0 of the workers logs the per-step metrics (:mod:`pipelines.train_loop`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from pipelines.model_io import ENCODER_ARTIFACT
from pipelines.runtime import file_type, mlflow_experiment, read_text, tracking_uri_scope, write_text
from pipelines.train_config import config_to_dict
from s2v_core.config import to_mapping
from s2v_core.locations import join, redact, redact_values, resolve
from s2v_core.run_layout import DS_CONFIG_FILE, MLFLOW_RUN_FILE, PRETRAIN_CONFIG_FILE

if TYPE_CHECKING:
    from pipelines.pretrain import PreparedRun

#: Name of the MLflow model of the final encoder in a run (its directory is logged at
#: :data:`pipelines.model_io.ENCODER_ARTIFACT`, where ``--checkpoint runs:/…`` looks for it).
MLFLOW_MODEL_NAME = "model"


def start_mlflow_run(prepared: PreparedRun) -> PreparedRun:
    """Create (or, on resume, continue) the run's MLflow run and log its params and configs."""
    from mlflow.tracking import MlflowClient

    from pipelines.runtime import mlflow_tracking_uri

    run_file = join(prepared.run_dir, MLFLOW_RUN_FILE)
    uri = mlflow_tracking_uri(prepared.run_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = None
    if file_type(run_file) == pafs.FileType.File:
        recorded = json.loads(read_text(run_file))
        if recorded.get("tracking_uri") == redact(uri):
            run_id = recorded["run_id"]
    if run_id is None:
        experiment_id = mlflow_experiment(client, uri, prepared.config.mlflow_experiment)
        run = client.create_run(
            experiment_id,
            run_name=posixpath.basename(resolve(prepared.run_dir)[1]),
            tags={"s2v.command": "pretrain", "s2v.run_dir": redact(prepared.run_dir)},
        )
        run_id = run.info.run_id
        params = _flatten(
            {
                "pretrain": config_to_dict(prepared.config),
                "model": to_mapping(prepared.model_config),
                "store": {
                    "windows": prepared.store.windows,
                    "usable_windows": prepared.store.usable_windows,
                    "epochs_per_window": prepared.store.epochs_per_window,
                },
                "derived": {"per_worker_batch": prepared.config.per_worker_batch, "on_gpu": prepared.on_gpu},
            }
        )
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run_id, params=items[start : start + 100])
        # The same JSON as the run dir's files, logged from memory: the run dir may be a URI.
        client.log_dict(run_id, prepared.ds_config, DS_CONFIG_FILE)
        client.log_dict(run_id, redact_values(config_to_dict(prepared.config)), PRETRAIN_CONFIG_FILE)
        write_text(run_file, json.dumps({"tracking_uri": redact(uri), "run_id": run_id}, indent=2) + "\n")
    return dataclasses.replace(prepared, mlflow_tracking_uri=uri, mlflow_run_id=run_id)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return flat


def log_final_model(prepared: PreparedRun, encoder_dir: str, result_metrics: dict[str, float]) -> None:
    """Log the final encoder: its directory as artifacts and an ``mlflow.pytorch`` model.

    ``encoder_dir`` is a local directory (MLflow and ``torch.load`` read local files).
    """
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from s2v_core.model import load_encoder

    client = MlflowClient(tracking_uri=prepared.mlflow_tracking_uri)
    client.log_artifacts(prepared.mlflow_run_id, encoder_dir, artifact_path=ENCODER_ARTIFACT)
    with tracking_uri_scope(prepared.mlflow_tracking_uri), mlflow.start_run(run_id=prepared.mlflow_run_id):
        mlflow.pytorch.log_model(
            load_encoder(encoder_dir),
            name=MLFLOW_MODEL_NAME,
            # Explicit requirements: skips MLflow's slow import-tracing inference.
            pip_requirements=["sleep2vec", f"torch=={torch.__version__.split('+')[0]}"],
            # A pickled SleepEncoder (class from the installed package): its forward takes
            # a dict of masked tensors, which the traced "pt2" format cannot export.
            serialization_format="pickle",
            metadata={
                "s2v_model_config": to_mapping(prepared.model_config),
                "s2v_modalities": list(prepared.config.modalities),
            },
        )
        mlflow.set_tag("s2v.final_loss", f"{result_metrics.get('loss', math.nan):.6f}")
    client.set_terminated(prepared.mlflow_run_id, "FINISHED")
