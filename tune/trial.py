"""One trial of ``s2v sweep``: pretrain on ``train`` subjects, choose on ``val``, report on ``test``.

:func:`run_trial` is the Tune trainable. Following Ray Train V2's Tune
integration it is a *function* that builds a ``TorchTrainer`` with ``s2v
pretrain``'s own :func:`pipelines.pretrain.build_trainer` (the store's
``splits.json`` keeps it on ``train`` subjects), once per learning rate of
the trial's grid (see :mod:`tune.plan`), then scores each encoder with

``val_loss`` / ``test_loss``
    :class:`pipelines.validation.HeldOutValidator` on a fixed seeded sample
    of ``score_windows`` windows of the ``val`` / ``test`` subjects: the
    held-out contrastive loss, averaged over the sweep's fixed *scoring
    pairs* (every trial's subset holds them), with the same windows and
    batch size for every trial. The learning rate with the lowest
    ``val_loss`` is kept; ``test_loss`` is the figure the law is fitted to.
``staging_macro_f1`` / ``downstream_error``
    A linear staging probe (:func:`s2v_core.evaluation.probes.fit_linear_stager`)
    on fused epoch embeddings of the scoring modalities, fitted on a seeded
    sample of ``probe_windows`` ``train`` windows and scored on the ``test``
    sample; ``downstream_error = 1 - macro-F1``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from ray.air.integrations.mlflow import MLflowLoggerCallback

from s2v_core.locations import redact_values

logger = logging.getLogger(__name__)


def run_trial(config: dict) -> None:
    """Tune trainable: train one point and seed at each learning rate, score, report the metrics."""
    from ray import tune

    trial, settings = config["trial"], config["settings"]
    log_event(settings["output"], trial["key"], "start", phase=trial["phase"])
    started = time.monotonic()
    scorer = HeldOutScorer(
        settings["data"],
        pairs=[tuple(p) for p in trial["scoring_pairs"]],
        windows=settings["score_windows"],
        probe_windows=settings["probe_windows"],
        batch_size=settings["validation_batch"],
        seed=settings["score_seed"],
    )
    candidates = []
    for index, multiplier in enumerate(settings["lr_multipliers"]):
        lr = trial["lr"] * multiplier
        encoder_dir, train_metrics = pretrain_trial(trial, settings, lr=lr, attempt=index)
        candidates.append((scorer.loss(encoder_dir, "val"), lr, encoder_dir, train_metrics))
    val_loss, lr, encoder_dir, train_metrics = min(candidates, key=lambda c: c[0])
    test_loss = scorer.loss(encoder_dir, "test")
    f1 = scorer.staging_f1(encoder_dir)
    metrics = {
        "val_loss": val_loss,
        "test_loss": test_loss,
        "staging_macro_f1": f1,
        "downstream_error": 1.0 - f1,
        "lr_chosen": lr,
        "train_loss": train_metrics.get("loss", float("nan")),
        "steps": train_metrics.get("step", 0),
        "train_seconds": time.monotonic() - started,
        "n_params": trial["n_params"],
        "val_windows": scorer.windows("val"),
        "test_windows": scorer.windows("test"),
    }
    log_event(
        settings["output"],
        trial["key"],
        "finish",
        test_loss=test_loss,
        val_loss_by_lr={f"{c[1]:.6g}": c[0] for c in candidates},
    )
    tune.report(metrics)


def log_event(output: str, key: str, event: str, **extra) -> None:
    """Append ``{"key", "event", "time", ...}`` to ``SWEEP_DIR/trial_log.jsonl``.

    One short line per write with ``O_APPEND``, so concurrent trials on one
    filesystem do not interleave; tests read the start times of trials here.
    """
    line = json.dumps({"key": key, "event": event, "time": time.time(), "pid": os.getpid(), **extra}) + "\n"
    fd = os.open(Path(output) / "trial_log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# -- training --------------------------------------------------------------------------------------


def pretrain_trial(trial: dict, settings: dict, *, lr: float, attempt: int = 0) -> tuple[str, dict]:
    """Pretrain one point at ``lr`` with ``s2v pretrain``'s trainer; return ``(encoder_dir, last_metrics)``.

    The run is :func:`pipelines.pretrain.setup` → :func:`~pipelines.pretrain.build_trainer`
    → :func:`~pipelines.pretrain.cleanup` in ``SWEEP_DIR/train/<key>/lr<attempt>``,
    with the sweep's objective preset (its ``[training]`` defaults, then the
    sweep's steps, batch, learning rate, seed and EMA switch). MLflow logging is the
    sweep's: rank 0 writes per-step metrics into the trial's nested run.
    A retried trial starts its run dir afresh.
    """
    import dataclasses
    import shutil

    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import build_trainer, cleanup, detect_gpu, setup

    run_dir = Path(settings["output"]) / "train" / trial["key"] / f"lr{attempt}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = trial_pretrain_config(trial, settings, lr=lr, run_dir=run_dir)
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


def trial_pretrain_config(trial: dict, settings: dict, *, lr: float, run_dir: str | Path):
    """The :class:`~pipelines.train_config.PretrainConfig` of one trial at one learning rate.

    The objective preset's ``[training]`` table gives the defaults; the
    sweep fixes steps, batch, learning rate, seed and EMA. ``train_splits``
    stays ``("train",)``: val and test subjects are never trained on.
    """
    from pipelines.train_config import load_pretrain_config

    return load_pretrain_config(
        None,
        data=settings["data"],
        output=str(run_dir),
        workers=settings["workers"],
        model=settings["model"],
        objective=settings["objective"],
        width=trial["width"],
        depth=trial["depth"],
        modalities=tuple(trial["modalities"]),
        steps=settings["steps"],
        global_batch=settings["global_batch"],
        lr=lr,
        seed=trial["seed"],
        checkpoint_every=settings["steps"],
        keep_checkpoints=1,
        max_failures=0,
        validate_every=0,
        validation_epochs=settings["score_windows"],
        device=settings["device"],
        ema=settings.get("ema", False),
    )


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
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    logger.warning("no MLflow run found for trial %s; its per-step metrics are not logged", name)
    return None


# -- scoring ---------------------------------------------------------------------------------------


class HeldOutScorer:
    """The fixed held-out problem every trial of a sweep is scored on (see the module docstring).

    Parameters
    ----------
    store : str
        The store (with ``splits.json``).
    pairs : sequence of (str, str)
        The scoring pairs.
    windows : int
        Windows sampled (seeded) from each of ``val`` and ``test``.
    probe_windows : int
        ``train`` windows the staging probe is fitted on.
    batch_size : int
        Windows per contrastive batch.
    seed : int
        Seed of the samples (the sweep's, not the trial's: every trial sees the same windows).
    """

    def __init__(self, store: str, *, pairs, windows: int, probe_windows: int, batch_size: int, seed: int) -> None:
        from s2v_core.modalities import MODALITY_KEYS
        from s2v_core.store import open_store, schema_info

        self.store, self.pairs, self.seed = store, [tuple(p) for p in pairs], seed
        self.modalities = tuple(k for k in MODALITY_KEYS if any(k in p for p in self.pairs))
        self.windows_per_split = {"val": windows, "test": windows, "train": probe_windows}
        self.batch_size = batch_size
        self.epochs_per_window = schema_info(open_store(store).schema)[1]
        self._validators: dict[str, object] = {}

    def validator(self, split: str):
        from pipelines.validation import HeldOutValidator
        from s2v_core.store import split_files

        if split not in self._validators:
            files, filesystem = split_files(self.store, [split])
            if not files:
                raise ValueError(
                    f"--data: the store {self.store} has no {split!r} subject; a sweep scores on "
                    "val and test subjects (s2v split --data STORE)"
                )
            self._validators[split] = HeldOutValidator(
                files,
                filesystem,
                modalities=self.modalities,
                epochs_per_window=self.epochs_per_window,
                max_epochs=self.windows_per_split[split] * self.epochs_per_window,
                batch_size=self.batch_size,
                seed=self.seed,
                pairs=self.pairs,
            )
        return self._validators[split]

    def windows(self, split: str) -> int:
        return int(self.validator(split).windows)

    def loss(self, encoder_dir: str, split: str) -> float:
        """Mean held-out contrastive loss (nats per anchor) over the scoring pairs on ``split``'s sample."""
        from s2v_core.evaluation.alignment import pair_name
        from s2v_core.model import load_encoder

        validator = self.validator(split)
        figures = validator.figures(load_encoder(encoder_dir).eval())
        missing = [pair_name(*p) for p in self.pairs if pair_name(*p) not in figures]
        if missing:
            raise ValueError(
                f"no {split} window holds both modalities of the scoring pair(s) "
                f"{', '.join(missing)}; choose other --scoring-pairs"
            )
        return float(np.mean([figures[pair_name(*p)]["loss"] for p in self.pairs]))

    def staging_f1(self, encoder_dir: str) -> float:
        """Macro-F1 on ``test`` of a linear stager fitted on ``train`` fused embeddings of the scoring modalities."""
        import torch

        from s2v_core.evaluation.metrics import staging_metrics
        from s2v_core.evaluation.probes import fit_linear_stager, predict_stages
        from s2v_core.model import load_encoder

        model = load_encoder(encoder_dir).eval()
        with torch.no_grad():
            train_x, train_y = self._embed(model, "train")
            test_x, test_y = self._embed(model, "test")
        stager = fit_linear_stager(train_x, train_y, np.arange(len(train_x)), seed=self.seed)
        predicted = predict_stages(stager, test_x)
        return float(staging_metrics(test_y, predicted)["macro_f1"])

    def _embed(self, model, split: str) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipelines.train_data import keep_windows_with
        from s2v_core.model import batch_to_tensors
        from s2v_core.store import split_files, table_to_batch

        files, filesystem = split_files(self.store, [split])
        columns = [
            "recording_id",
            "site",
            "subject_id",
            "window_index",
            "present",
            "stages",
            "age",
            "sex",
            *self.modalities,
        ]
        table = keep_windows_with(
            pa.concat_tables([pq.read_table(str(f), columns=columns, filesystem=filesystem) for f in files]),
            self.modalities,
        )
        order = np.random.default_rng([self.seed, 3]).permutation(table.num_rows)[: self.windows_per_split[split]]
        table = table.take(pa.array(np.sort(order)))
        fused, stages = [], []
        for start in range(0, table.num_rows, self.batch_size):
            batch = batch_to_tensors(
                table_to_batch(
                    table.slice(start, self.batch_size),
                    modalities=self.modalities,
                    epochs_per_window=self.epochs_per_window,
                )
            )
            fused.append(model.encode(batch, modalities=self.modalities).fused.numpy())
            stages.append(batch["stages"].numpy())
        return np.concatenate(fused), np.concatenate(stages)


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
            # Named by point and seed (w64-d4-m5-k1-s2), tagged with Tune's trial name for the lookup.
            run = self.mlflow_util.start_run(
                tags={**self.tags, "trial_name": str(trial)}, run_name=trial.config["trial"]["key"]
            )
            self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=redact_values(trial.config))

    def log_trial_end(self, trial, failed: bool = False):
        if failed and trial in self._trial_runs:
            from mlflow import MlflowClient

            message = str(getattr(trial, "error_message", None) or "trial failed")
            MlflowClient(tracking_uri=self.tracking_uri).set_tag(self._trial_runs[trial], "error", message[-4000:])
        super().log_trial_end(trial, failed=failed)
