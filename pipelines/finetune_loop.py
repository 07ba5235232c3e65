"""The Ray Train per-worker loop of ``s2v finetune``: train on ``train``, early-stop on ``val``.

The loop reads only its ``config`` (built by :func:`pipelines.finetune.loop_config`):

``config["finetune"]``     the :class:`~pipelines.finetune.FinetuneConfig` as a dict
``config["spec"]``         the :class:`~s2v_core.finetuning.FinetuneSpec` as a dict
``config["encoder_dir"]``  a local encoder directory (the pretrained weights, EMA ones when kept)
``config["epochs_per_window"]``, ``config["run_dir"]``, ``config["resume_from"]``
``config["validation"]``   ``{"files", "filesystem"}``: store files of the ``val`` subjects
``config["mlflow"]``       ``{"tracking_uri", "run_id"}`` or ``None``: where rank 0 logs metrics

Data comes from ``ray.train.get_dataset_shard("train")``. Every
``eval_every`` steps rank 0 scores the model on the ``val`` subjects with the
task's primary figure (κ, MAE, AUROC, C-index) and keeps the best weights;
after ``patience`` evaluations without a gain every rank stops. A checkpoint
(``state.json``, ``training.pt`` with model and optimiser, ``best/`` the best
model so far as a fine-tuned model directory) is written by rank 0 and
reported; a restarted worker group resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.runtime import start_system_metrics
from pipelines.train_data import keep_windows_with, training_columns
from s2v_core.config import from_mapping
from s2v_core.finetuning import FineTunedModel, FinetuneSpec, batch_targets, predict, save_finetuned
from s2v_core.model import batch_to_tensors, load_encoder
from s2v_core.run_layout import BEST_DIR, FINETUNE_STATE_FILE
from s2v_core.run_layout import FINETUNE_TRAINING_FILE as TRAINING_FILE
from s2v_core.store import table_to_batch

logger = logging.getLogger(__name__)

#: Version of a fine-tuning checkpoint's ``state.json``.
CHECKPOINT_FORMAT = 1


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def read_store_batches(
    files: list[str],
    filesystem: Any,
    *,
    spec: FinetuneSpec,
    epochs_per_window: int,
    batch_size: int,
    history_columns: tuple[str, ...] | None = None,
    extra_columns: tuple[str, ...] = (),
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches (:func:`s2v_core.store.table_to_batch`) of every usable window of ``files``, in order.

    The batches carry the task's outcomes and label columns; ``history_columns``
    (default: the task's outcome columns) and ``extra_columns`` ask for others.
    """
    task = spec.task_definition
    history = task.outcome_columns if history_columns is None else history_columns
    columns = training_columns(spec.modalities, history, (*task.store_columns, *extra_columns))
    for path in files:
        table = keep_windows_with(pq.read_table(str(path), columns=columns, filesystem=filesystem), spec.modalities)
        for start in range(0, table.num_rows, batch_size):
            yield table_to_batch(
                table.slice(start, batch_size),
                modalities=spec.modalities,
                epochs_per_window=epochs_per_window,
                history_columns=history,
            )


def score(model: FineTunedModel, batches) -> dict:
    """The task's figures of ``model`` over ``batches`` (see :func:`s2v_core.finetuning.predict`)."""
    target, output = predict(model, batches, device=next(model.parameters()).device)
    return model.task.metrics(target, output)


def _log_metrics(mlflow: dict | None, metrics: dict[str, float], step: int) -> None:
    if not mlflow:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    rows = [
        Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    if rows:
        MlflowClient(tracking_uri=mlflow["tracking_uri"]).log_batch(mlflow["run_id"], metrics=rows)


def _save_checkpoint(
    model: FineTunedModel,
    optimizer: torch.optim.Optimizer,
    best_state: dict | None,
    state: dict,
    config: dict,
    *,
    rank: int,
    world_size: int,
) -> None:
    """Rank 0 writes the checkpoint → barrier → every rank reports it (Ray keeps rank 0's directory)."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="s2v-finetune-") as directory:
        if rank == 0:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best": best_state},
                Path(directory) / TRAINING_FILE,
            )
            best = _model_from(config, best_state) if best_state is not None else model
            save_finetuned(best, Path(directory) / BEST_DIR, extra={"step": state["best_step"] or state["step"]})
            (Path(directory) / FINETUNE_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if world_size > 1:
            dist.barrier()
        ray.train.report(
            state["metrics"],
            checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None,
            checkpoint_dir_name=checkpoint_dir_name(state["step"]),
        )


def _model_from(config: dict, weights: dict | None = None) -> FineTunedModel:
    spec = from_mapping(FinetuneSpec, config["spec"], source="finetune loop config.spec")
    model = FineTunedModel(load_encoder(config["encoder_dir"]), spec)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune on this worker's shard until ``steps`` or early stopping (rank 0 samples system metrics)."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    monitor = start_system_metrics(
        config.get("mlflow") if rank == 0 else None, resumed=ray.train.get_checkpoint() is not None
    )
    try:
        _finetune(config)
    finally:
        if monitor is not None:
            monitor.finish()


def _finetune(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pipelines.finetune import FinetuneConfig

    cfg = from_mapping(FinetuneConfig, config["finetune"], source="finetune loop config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    epochs_per_window = int(config["epochs_per_window"])
    torch.manual_seed(cfg.seed)
    model = _model_from(config).to(device)
    task, spec = model.task, model.spec
    optimizer = torch.optim.AdamW(
        model.parameter_groups(lr=cfg.lr, head_lr=cfg.head_lr), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "best_score": None,
        "best_step": None,
        "evals_without_gain": 0,
        "stopped_early": False,
        "metrics": {},
    }
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / TRAINING_FILE, map_location=device, weights_only=True)
            state = json.loads((Path(directory) / FINETUNE_STATE_FILE).read_text(encoding="utf-8"))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state = saved["best"]
        logger.info("rank %d resumed at step %d", rank, state["step"])
    torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + state["step"])
    ddp = ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    validation = config.get("validation") or {}
    val_files = list(validation.get("files") or []) if rank == 0 else []
    metric_name, sign = task.primary
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.batch_size // world_size
    ddp.train()
    stop = state["step"] >= cfg.steps or state["stopped_early"]
    while not stop:
        consumed, skip = 0, state["batches_in_epoch"]
        for table in shard.iter_batches(
            batch_size=per_worker,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=4 * per_worker,
            local_shuffle_seed=cfg.seed + 7919 * state["epoch"] + rank,
        ):
            consumed += 1
            if consumed <= skip:
                continue  # trained on before the checkpoint this run resumed from
            np_batch = table_to_batch(
                table,
                modalities=spec.modalities,
                epochs_per_window=epochs_per_window,
                history_columns=task.outcome_columns,
            )
            target = torch.from_numpy(batch_targets(task, np_batch)).to(device)
            loss = task.loss(ddp(batch_to_tensors(np_batch, device)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            state["batches_in_epoch"] = consumed
            step = state["step"]
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluate_now:
                metrics = {"loss": float(loss.detach())}
                if rank == 0 and val_files:
                    figures = score(
                        model,
                        read_store_batches(
                            val_files,
                            validation.get("filesystem"),
                            spec=spec,
                            epochs_per_window=epochs_per_window,
                            batch_size=cfg.batch_size,
                        ),
                    )
                    value = figures.get(metric_name)
                    metrics.update({f"val/{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
                    gained = value is not None and (
                        state["best_score"] is None or sign * value > sign * state["best_score"]
                    )
                    if gained:
                        state.update(best_score=float(value), best_step=step, evals_without_gain=0)
                        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                    else:
                        state["evals_without_gain"] += 1
                    logger.info(
                        "step %d/%d loss %.4f val %s %s (best %s at step %s)",
                        step,
                        cfg.steps,
                        metrics["loss"],
                        metric_name,
                        value,
                        state["best_score"],
                        state["best_step"],
                    )
                state["stopped_early"] = bool(val_files) and state["evals_without_gain"] >= cfg.patience
                state["metrics"] = metrics
                if rank == 0:
                    _log_metrics(config.get("mlflow"), metrics, step)
            stop = _agree(state["stopped_early"], world_size, device) or step >= cfg.steps
            if step % cfg.checkpoint_every == 0 or stop:
                _save_checkpoint(model, optimizer, best_state, state, config, rank=rank, world_size=world_size)
            if stop:
                break
        if consumed == 0:
            raise RuntimeError(
                f"worker {rank}: the train shard yielded no batch of {per_worker} windows; "
                "the store has fewer training windows than --batch-size needs"
            )
        if not stop:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0


def _agree(flag: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (only rank 0 validates)."""
    if world_size == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
