"""The Ray Train per-worker loop of ``s2v finetune``: train on ``train``, early-stop on ``val``.

The loop reads only its ``config`` (built by :func:`pipelines.finetune.loop_config`):

``config["finetune"]``     the :class:`~pipelines.finetune.FinetuneConfig` as a dict
``config["spec"]``         the :class:`~s2v_core.finetuning.FinetuneSpec` as a dict
``config["encoder_dir"]``  a local encoder directory (the pretrained weights, EMA ones when kept)
``config["epochs_per_window"]``, ``config["run_dir"]``, ``config["resume_from"]``
``config["validation"]``   ``{"files", "filesystem"}``: store files of the ``val`` subjects
``config["mlflow"]``       ``{"tracking_uri", "run_id"}`` or ``None``: where rank 0 logs metrics
``config["ds_config"]``    ``--deepspeed``: the DeepSpeed config (:func:`pipelines.finetune_deepspeed.deepspeed_config`), else ``None``

Data comes from ``ray.train.get_dataset_shard("train")``. Every
``eval_every`` steps rank 0 scores the model on the ``val`` subjects with the
task's primary figure (κ, MAE, AUROC, C-index) and keeps the best weights;
after ``patience`` evaluations without a gain every rank stops.

Two ways to train, the same AdamW (:meth:`FineTunedModel.parameter_groups`) in both:

- data parallel (the default): DDP workers; a checkpoint is ``state.json``,
  ``training.pt`` (model and optimiser) and ``best/`` (the best model so far as
  a fine-tuned model directory), written by rank 0 and reported;
- ``--deepspeed``: a DeepSpeed engine at the config's ZeRO stage; every rank
  writes its engine state into ``engine/`` (``pipelines.deepspeed_engine``),
  rank 0 ``state.json`` and ``best/``, and every rank reports (Ray assembles one
  directory). Rank 0 scores and saves a plain copy of the weights; under ZeRO-3
  all ranks first gather them.

A restarted worker group resumes from ``ray.train.get_checkpoint()``.
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
    trainer: DataParallelTrainer | DeepSpeedTrainer,
    best_state: dict | None,
    state: dict,
    config: dict,
    *,
    rank: int,
    world_size: int,
) -> None:
    """Shard → barrier → report: the trainer's state, and rank 0's ``best/`` and ``state.json``."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="s2v-finetune-") as directory:
        trainer.save(Path(directory), rank=rank, best_state=best_state)
        current = trainer.scoring_model()  # every rank: ZeRO-3 gathers collectively
        if rank == 0:
            best = _model_from(config, best_state) if best_state is not None else current
            save_finetuned(best, Path(directory) / BEST_DIR, extra={"step": state["best_step"] or state["step"]})
            (Path(directory) / FINETUNE_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if world_size > 1:
            dist.barrier()
        ray.train.report(
            state["metrics"],
            checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 or trainer.sharded else None,
            checkpoint_dir_name=checkpoint_dir_name(state["step"]),
        )


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """What keeps a fine-tuning checkpoint directory from being complete (empty list: complete).

    Data parallel: ``state.json`` and ``training.pt``. ``--deepspeed``: ``state.json``
    (whose ``engine`` says the ZeRO stage and the ranks), ``best/`` and every
    rank's engine state (:func:`pipelines.checkpoints.engine_problems`): Ray
    assembles the directory from what each worker uploads, and a worker that
    died mid-upload leaves part of it.
    """
    from pipelines.checkpoints import engine_problems
    from s2v_core.run_layout import DESCRIPTION_FILE

    if not (checkpoint / FINETUNE_STATE_FILE).is_file():
        return [f"no {FINETUNE_STATE_FILE}"]
    if (checkpoint / TRAINING_FILE).is_file():
        return []
    try:
        engine = json.loads((checkpoint / FINETUNE_STATE_FILE).read_text(encoding="utf-8")).get("engine")
    except (ValueError, AttributeError):
        return [f"{FINETUNE_STATE_FILE} unreadable"]
    if not engine:
        return [f"no {TRAINING_FILE} (a data-parallel run's) and no DeepSpeed engine in {FINETUNE_STATE_FILE}"]
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    problems = [] if files.get(f"{BEST_DIR}/{DESCRIPTION_FILE}") else [f"no {BEST_DIR}/{DESCRIPTION_FILE}"]
    return problems + engine_problems(files, world_size=engine.get("world_size"), zero_stage=engine.get("zero_stage"))


def _model_from(config: dict, weights: dict | None = None) -> FineTunedModel:
    spec = from_mapping(FinetuneSpec, config["spec"], source="finetune loop config.spec")
    model = FineTunedModel(load_encoder(config["encoder_dir"]), spec)
    if weights is not None:
        model.load_state_dict(weights)
    return model


class DataParallelTrainer:
    """The default: the model in DDP, a torch AdamW; rank 0 checkpoints model and optimiser in ``training.pt``."""

    sharded = False  # only rank 0 writes and reports a checkpoint

    def __init__(self, model: FineTunedModel, cfg: Any) -> None:
        import ray.train.torch

        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.parameter_groups(lr=cfg.lr, head_lr=cfg.head_lr), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.wrapped = ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
        self.record = None  # nothing for state.json

    def train(self) -> None:
        self.wrapped.train()

    def train_step(self, task: Any, batch: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        loss = task.loss(self.wrapped(batch), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def scoring_model(self) -> FineTunedModel:
        """The model itself: every rank holds the whole weights."""
        return self.model

    def save(self, directory: Path, *, rank: int, best_state: dict | None) -> None:
        if rank == 0:
            torch.save(
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best": best_state},
                directory / TRAINING_FILE,
            )

    def load(self, directory: Path, *, device: torch.device, rank: int) -> dict | None:
        """Restore model and optimiser; the best weights so far (rank 0's), or None."""
        saved = torch.load(directory / TRAINING_FILE, map_location=device, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        return saved["best"]


class DeepSpeedTrainer:
    """``--deepspeed``: the same AdamW inside a DeepSpeed engine; every rank checkpoints its engine state.

    Frozen parameters (the frozen encoder, LoRA's base weights, the
    tokenizers) stay out of the optimiser, as in the data-parallel path; ZeRO
    partitions only what the optimiser holds, except ZeRO-3, which partitions
    every parameter. Rank 0 keeps a plain copy of the model (fine-tuned models
    are small) to score on the val subjects and to save.
    """

    sharded = True  # every rank writes and reports its part

    def __init__(
        self, model: FineTunedModel, cfg: Any, ds_config: dict, config: dict, *, device, rank: int, world_size: int
    ) -> None:
        from pipelines.deepspeed_engine import initialize, promote_scalar_parameters, zero_stage_of

        # A plain model on rank 0, built before the engine changes any shape: it receives the weights to score.
        self.scorer = _model_from(config).to(device) if rank == 0 else None
        promote_scalar_parameters(model)
        optimizer = torch.optim.AdamW(
            model.parameter_groups(lr=cfg.lr, head_lr=cfg.head_lr), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.engine, _ = initialize(model, optimizer, ds_config, on_cpu=device.type == "cpu")
        self.zero_stage = zero_stage_of(ds_config)
        # In state.json: what a resume needs to load the engine state (and to check it is complete).
        self.record = {"zero_stage": self.zero_stage, "world_size": world_size}

    def train(self) -> None:
        self.engine.train()

    def train_step(self, task: Any, batch: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        loss = task.loss(self.engine(batch), target)
        self.engine.backward(loss)
        self.engine.step()
        return loss

    def scoring_model(self) -> FineTunedModel | None:
        """Rank 0: the plain model holding the engine's current weights; None elsewhere.

        Every rank must call it at the same step: under ZeRO-3 it gathers the
        partitioned parameters collectively.
        """
        from pipelines.deepspeed_engine import full_parameters, plain_state

        with full_parameters(self.engine.module, zero_stage=self.zero_stage):
            if self.scorer is not None:
                self.scorer.load_state_dict(plain_state(self.engine.module.state_dict(), self.scorer.state_dict()))
        return self.scorer

    def save(self, directory: Path, *, rank: int, best_state: dict | None) -> None:
        from pipelines.deepspeed_engine import save_engine

        save_engine(self.engine, directory)  # best_state goes into best/ (rank 0), read back on resume

    def load(self, directory: Path, *, device: torch.device, rank: int) -> dict | None:
        """Restore the engine (weights, optimiser); rank 0: the best weights so far from ``best/``, or None."""
        from pipelines.deepspeed_engine import load_engine
        from s2v_core.finetuning import load_finetuned

        load_engine(self.engine, directory)
        state = json.loads((directory / FINETUNE_STATE_FILE).read_text(encoding="utf-8"))
        if rank != 0 or state["best_step"] is None:
            return None
        return {k: v.clone() for k, v in load_finetuned(directory / BEST_DIR).state_dict().items()}


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
    if config.get("ds_config"):
        trainer = DeepSpeedTrainer(
            model, cfg, config["ds_config"], config, device=device, rank=rank, world_size=world_size
        )
    else:
        trainer = DataParallelTrainer(model, cfg)
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
        **({"engine": trainer.record} if trainer.record else {}),
    }
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            best_state = trainer.load(Path(directory), device=device, rank=rank)
            state = json.loads((Path(directory) / FINETUNE_STATE_FILE).read_text(encoding="utf-8"))
        logger.info("rank %d resumed at step %d", rank, state["step"])
    torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + state["step"])
    validation = config.get("validation") or {}
    val_files = list(validation.get("files") or [])  # every rank knows whether rank 0 validates
    metric_name, sign = task.primary
    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.batch_size // world_size
    trainer.train()
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
            loss = trainer.train_step(task, batch_to_tensors(np_batch, device), target)
            state["step"] += 1
            state["batches_in_epoch"] = consumed
            step = state["step"]
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluate_now:
                metrics = {"loss": float(loss.detach())}
                current = trainer.scoring_model() if val_files else None  # every rank: ZeRO-3 gathers
                if rank == 0 and val_files:
                    figures = score(
                        current,
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
                        best_state = {k: v.detach().cpu().clone() for k, v in current.state_dict().items()}
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
                _save_checkpoint(trainer, best_state, state, config, rank=rank, world_size=world_size)
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
