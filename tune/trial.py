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
    windows cut from one seeded order that mixes nights, averaged over
    anchors, over the pairs of the sweep's *reference modalities* (the
    smallest subset, which every trial's nested subset contains). Batch size, windows and pairs are the
    same for every trial, so every trial is scored on the same problem and a
    larger M can only help by what the extra modalities taught the encoder.
``val_loss_own``
    The same over the trial's own modalities' pairs (a larger M averages
    over more, and harder, pairs: not comparable across M).
``staging_macro_f1`` / ``staging_macro_f1_own``
    The evaluation package's linear staging probe
    (:func:`s2v_core.evaluation.probes.linear_staging_probe`) on fused
    epoch embeddings of the reference / the trial's own modalities, trained
    on the training side and tested on the validation side: one
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

from pipelines.runtime import redact_values

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
                               # Absent from trials planned before sweeps scored reference pairs.
                               reference_modalities=trial.get("reference_modalities"),
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

def pretrain_trial(trial: dict, settings: dict) -> tuple[str, dict]:
    """Pretrain one grid point with ``s2v pretrain``'s trainer; return ``(encoder_dir, last_metrics)``.

    The run is :func:`pipelines.pretrain.setup` → :func:`~pipelines.pretrain.build_trainer`
    (DeepSpeed, DASH-InfoNCE, cross-worker negatives) with Tune's
    ``TuneReportCallback`` → :func:`~pipelines.pretrain.cleanup`, in
    ``SWEEP_DIR/train/<trial key>``. MLflow logging is the sweep's (one
    nested run per trial), so the pretraining run opens none of its own:
    rank 0 writes the per-step metrics into the trial's run (see
    :func:`trial_mlflow_run`), and Tune's callback adds the trial's results.
    A retried trial starts its run dir afresh.
    """
    import dataclasses
    import shutil

    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import build_trainer, cleanup, detect_gpu, setup
    from pipelines.train_config import PretrainConfig

    run_dir = Path(settings["output"]) / "train" / trial["key"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = PretrainConfig(
        data=trial["train_store"], output=str(run_dir), workers=settings["workers"], model=settings["model"],
        width=trial["width"], depth=trial["depth"], modalities=tuple(trial["modalities"]),
        steps=settings["steps"], global_batch=settings["global_batch"], seed=settings["seed"],
        checkpoint_every=settings["steps"], keep_checkpoints=1, max_failures=0,
        device=settings.get("device", "auto"),  # sweeps started before --device existed: auto
    )
    prepared = setup(config, on_gpu=detect_gpu(config))
    mlflow = settings.get("mlflow")
    run_id = trial_mlflow_run(mlflow) if mlflow else None
    if run_id is not None:
        prepared = dataclasses.replace(prepared, mlflow_tracking_uri=mlflow["tracking_uri"], mlflow_run_id=run_id)
    result = build_trainer(prepared, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error
    final = cleanup(prepared, Path(result.checkpoint.path), log_model=False)
    return final.encoder_dir, {"loss": final.final_loss, "step": final.steps, **final.metrics}


def trial_mlflow_run(mlflow: dict, *, wait_seconds: float = 30.0) -> str | None:
    """The id of this trial's MLflow run, created by the sweep's callback when Tune started the trial.

    The callback tags the run with the trial's name under the sweep's parent
    run; the trial looks it up (waiting briefly: the callback runs in the
    driver). ``None`` if it never appears; the trial then trains without
    per-step metrics rather than failing.
    """
    from mlflow import MlflowClient
    from ray import tune

    client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
    experiment = client.get_experiment_by_name(mlflow["experiment"])
    name = tune.get_context().get_trial_name()
    query = f"tags.trial_name = '{name}' and tags.mlflow.parentRunId = '{mlflow['parent_run_id']}'"
    deadline = time.monotonic() + wait_seconds
    while experiment is not None:
        runs = client.search_runs([experiment.experiment_id], filter_string=query,
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    logger.warning("no MLflow run found for trial %s; its per-step metrics are not logged", name)
    return None


# -- validation ------------------------------------------------------------------------------------

def validate_encoder(encoder_dir, *, train_store: str, validation_store: str, modalities,
                     reference_modalities=None, validation_batch: int = 32, seed: int = 0) -> dict:
    """Held-out DASH-InfoNCE losses and staging macro-F1 of a saved encoder (see the module docstring).

    ``reference_modalities`` (default: ``modalities``) are those every trial
    of the sweep holds; the headline ``val_loss`` and ``staging_macro_f1``
    use only them, the ``*_own`` figures the trial's own ``modalities``.
    """
    import torch

    from pipelines.validation import evaluate_contrastive_loss
    from s2v_core.model import load_encoder

    reference = tuple(reference_modalities or modalities)
    model = load_encoder(encoder_dir).eval()
    tables = {side: _read_sorted(store) for side, store in (("train", train_store),
                                                              ("validation", validation_store))}
    shared = evaluate_contrastive_loss(model, tables["validation"], modalities=reference,
                                       batch_size=validation_batch)
    with torch.no_grad():
        f1_shared = _staging_f1(model, tables, reference, batch_size=validation_batch, seed=seed)
    if set(modalities) == set(reference):  # the smallest subset's trials: the own figures are these
        own, f1_own = shared, f1_shared
    else:
        own = evaluate_contrastive_loss(model, tables["validation"], modalities=modalities,
                                        batch_size=validation_batch)
        with torch.no_grad():
            f1_own = _staging_f1(model, tables, modalities, batch_size=validation_batch, seed=seed)
    return {"val_loss": shared["loss"], "val_loss_own": own["loss"],
            "val_negatives_per_anchor": shared["negatives_per_anchor"], "staging_macro_f1": f1_shared,
            "staging_macro_f1_own": f1_own, "validation_windows": tables["validation"].num_rows}


def _read_sorted(store: str):
    """A (split) store's rows in night, window order."""
    from s2v_core.store import open_store

    table = open_store(store).to_table()
    return table.sort_by([("site", "ascending"), ("recording_id", "ascending"), ("window_index", "ascending")])


def _staging_f1(model, tables: dict, modalities, *, batch_size: int, seed: int) -> float:
    """Macro-F1 of the linear staging probe on fused epoch embeddings of ``modalities``: train → validation."""
    from s2v_core.evaluation.metrics import staging_metrics
    from s2v_core.evaluation.probes import linear_staging_probe
    from s2v_core.model import batch_to_tensors
    from s2v_core.store import schema_info, table_to_batch

    embeddings, stages = {}, {}
    for side, table in tables.items():
        epochs_per_window = schema_info(table.schema)[1]
        fused, labels = [], []
        for start in range(0, table.num_rows, batch_size):
            batch = batch_to_tensors(table_to_batch(table.slice(start, batch_size), modalities=modalities,
                                                    epochs_per_window=epochs_per_window))
            fused.append(model.encode(batch, modalities=modalities).fused.numpy())
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
    return float(staging_metrics(all_stages[test_rows], predicted)["macro_f1"])


# -- MLflow -----------------------------------------------------------------------------------------

class SweepMLflowCallback(MLflowLoggerCallback):
    """Tune's MLflow logger, plus the error of a failed trial as a tag of its run.

    Each trial is a run tagged ``mlflow.parentRunId`` (given in ``tags`` by
    :func:`tune.sweep.sweep`), which MLflow shows nested under the sweep's
    parent run; params are the trial's config, metrics its reports.
    """

    def log_trial_start(self, trial):
        # Tune's callback logs the whole trial config as params, locations included:
        # the same, with credentials in URIs redacted.
        if trial not in self._trial_runs:
            run = self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)}, run_name=str(trial))
            self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=redact_values(trial.config))

    def log_trial_end(self, trial, failed: bool = False):
        if failed and trial in self._trial_runs:
            from mlflow import MlflowClient

            message = str(getattr(trial, "error_message", None) or "trial failed")
            MlflowClient(tracking_uri=self.tracking_uri).set_tag(self._trial_runs[trial], "error",
                                                                 message[-4000:])
        super().log_trial_end(trial, failed=failed)
