"""One trial of ``s2v sweep``: pretrain on the training side, score on the held-out side.

:func:`run_trial` is the Tune trainable. Following Ray Train V2's Tune
integration it is a *function* that builds a ``TorchTrainer`` and runs it
with ``s2v pretrain``'s own :func:`pipelines.pretrain.build_trainer`
(``TuneReportCallback`` forwards the per-step metrics to Tune, hence to the
trial's MLflow run), then loads the trained encoder and computes

``val_loss``
    :func:`pipelines.validation.evaluate_contrastive_loss`: DASH-InfoNCE
    (the pretraining objective, default :class:`DashConfig`) on the
    validation store in eval mode, in fixed batches of ``validation_batch``
    windows taken in store order, averaged over anchors. The batch size
    fixes the number of negatives, so every trial of a sweep is scored on
    the same problem. Pairs are those among the trial's own modalities, so
    a larger M also averages over more (and harder) pairs.
``staging_macro_f1``
    The evaluation package's linear staging probe
    (:func:`s2v_core.evaluation.probes.linear_staging_probe` through
    :func:`cross_validate_staging`) trained on the training side's fused
    epoch embeddings and tested on the validation side's: one
    subject-disjoint fold.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from ray.air.integrations.mlflow import MLflowLoggerCallback

logger = logging.getLogger(__name__)


def run_trial(config: dict) -> None:
    """Tune trainable: train one grid point, validate it, report the metrics."""
    from ray import tune

    trial, settings = config["trial"], config["settings"]
    log_event(settings["output"], trial["key"], "start")
    started = time.monotonic()
    encoder_dir, train_metrics = pretrain_trial(trial, settings)
    train_seconds = time.monotonic() - started
    metrics = validate_encoder(encoder_dir, train_store=trial["train_store"],
                               validation_store=trial["validation_store"], modalities=trial["modalities"],
                               validation_batch=settings["validation_batch"], seed=settings["seed"])
    metrics.update(train_loss=train_metrics.get("loss", float("nan")), steps=train_metrics.get("step", 0),
                   train_seconds=train_seconds, n_params=trial["n_params"])
    log_event(settings["output"], trial["key"], "finish", val_loss=metrics["val_loss"])
    tune.report(metrics)


def log_event(output: str, key: str, event: str, **extra) -> None:
    """Append ``{"key", "event", "time", ...}`` to ``SWEEP_DIR/trial_log.jsonl``.

    One short line per write with ``O_APPEND``, so concurrent trials on one
    filesystem do not interleave; tests count the starts of each trial here.
    """
    line = json.dumps({"key": key, "event": event, "time": time.time(), "pid": os.getpid(), **extra}) + "\n"
    fd = os.open(Path(output) / "trial_log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# -- training --------------------------------------------------------------------------------------

def pretrain_trial(trial: dict, settings: dict) -> tuple[Path, dict]:
    """Pretrain one grid point with ``s2v pretrain``'s trainer; return ``(encoder_dir, last_metrics)``.

    The run is :func:`pipelines.pretrain.setup` → :func:`~pipelines.pretrain.build_trainer`
    (DeepSpeed, DASH-InfoNCE, cross-worker negatives) with Tune's
    ``TuneReportCallback`` → :func:`~pipelines.pretrain.cleanup`, in
    ``SWEEP_DIR/train/<trial key>``. MLflow logging is the sweep's (one
    nested run per trial), so the pretraining run opens none of its own.
    A retried trial starts its run dir afresh.
    """
    import shutil

    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import build_trainer, cleanup, setup
    from pipelines.train_config import PretrainConfig

    run_dir = Path(settings["output"]) / "train" / trial["key"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = PretrainConfig(
        data=trial["train_store"], output=str(run_dir), workers=settings["workers"], model=settings["model"],
        width=trial["width"], depth=trial["depth"], modalities=tuple(trial["modalities"]),
        steps=settings["steps"], global_batch=settings["global_batch"], seed=settings["seed"],
        checkpoint_every=settings["steps"], keep_checkpoints=1, max_failures=0,
    )
    prepared = setup(config)
    result = build_trainer(prepared, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error
    final = cleanup(prepared, Path(result.checkpoint.path), log_model=False)
    return final.encoder_dir, {"loss": final.final_loss, "step": final.steps, **final.metrics}


# -- validation ------------------------------------------------------------------------------------

def validate_encoder(encoder_dir, *, train_store: str, validation_store: str, modalities,
                     validation_batch: int = 32, seed: int = 0) -> dict:
    """Held-out DASH-InfoNCE loss and staging macro-F1 of a saved encoder (see the module docstring)."""
    import pyarrow.dataset as ds
    import torch

    from s2v_core.evaluation.metrics import staging_metrics
    from s2v_core.evaluation.probes import linear_staging_probe
    from pipelines.validation import evaluate_contrastive_loss
    from s2v_core.model import batch_to_tensors, load_encoder
    from s2v_core.store import schema_info, table_to_batch

    model = load_encoder(encoder_dir).eval()
    loss = evaluate_contrastive_loss(model, validation_store, modalities=modalities, batch_size=validation_batch)
    embeddings, stages = {}, {}
    for side, store in (("train", train_store), ("validation", validation_store)):
        dataset = ds.dataset(store, format="parquet", partitioning="hive")
        _, epochs_per_window = schema_info(dataset.schema)
        table = dataset.to_table().sort_by([("recording_id", "ascending"), ("window_index", "ascending")])
        fused, labels = [], []
        with torch.no_grad():
            for start in range(0, table.num_rows, validation_batch):
                part = table.slice(start, validation_batch)
                batch = batch_to_tensors(table_to_batch(part, modalities=modalities,
                                                        epochs_per_window=epochs_per_window))
                out = model.encode(batch)
                fused.append(out.fused.numpy())
                labels.append(batch["stages"].numpy())
        embeddings[side], stages[side] = np.concatenate(fused), np.concatenate(labels)
    rows = {side: len(stages[side]) for side in stages}
    train_rows, test_rows = np.arange(rows["train"]), rows["train"] + np.arange(rows["validation"])
    all_embeddings = np.concatenate([embeddings["train"], embeddings["validation"]])
    all_stages = np.concatenate([stages["train"], stages["validation"]])
    # The evaluation package's probe and metrics on one fixed fold (train side ->
    # validation side). cross_validate_staging pools a confusion over all rows,
    # which needs folds that cover every row, so the one fold is scored directly.
    predicted = linear_staging_probe(all_embeddings, all_stages, seed=seed)(train_rows, test_rows)
    scores = staging_metrics(all_stages[test_rows], predicted)
    return {"val_loss": loss["loss"], "staging_macro_f1": float(scores["macro_f1"]),
            "validation_windows": rows["validation"]}


# -- MLflow -----------------------------------------------------------------------------------------

class SweepMLflowCallback(MLflowLoggerCallback):
    """Tune's MLflow logger, plus the error of a failed trial as a tag of its run.

    Each trial is a run tagged ``mlflow.parentRunId`` (given in ``tags`` by
    :func:`tune.sweep.sweep`), which MLflow shows nested under the sweep's
    parent run; params are the trial's config, metrics its reports.
    """

    def log_trial_end(self, trial, failed: bool = False):
        if failed and trial in self._trial_runs:
            from mlflow import MlflowClient

            message = str(getattr(trial, "error_message", None) or "trial failed")
            MlflowClient(tracking_uri=self.tracking_uri).set_tag(self._trial_runs[trial], "error",
                                                                 message[-4000:])
        super().log_trial_end(trial, failed=failed)
