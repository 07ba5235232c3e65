"""The Ray Train per-worker loop: DeepSpeed + DASH-InfoNCE with cross-worker negatives.

The loop reads only its :class:`LoopConfig` (built once on the driver by
:func:`pipelines.pretrain.loop_config`; the ``TorchTrainer`` hands it over as
``train_loop_config["loop"]``). Data comes from
``ray.train.get_dataset_shard("train")``; a checkpoint is written shard (every
rank's DeepSpeed state) → barrier → ``ray.train.report``; a restarted worker
group resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipelines.checkpoints import DataPosition, checkpoint_dir_name, data_position, read_state, write_state
from pipelines.deepspeed_engine import (
    full_parameters,
    initialize,
    load_engine,
    plain_state,
    promote_scalar_parameters,
    save_engine,
    zero_stage_of,
)
from pipelines.runtime import file_type, start_system_metrics, write_text
from pipelines.train_config import PretrainConfig, config_to_dict
from pipelines.validation import HeldOutValidator
from s2v_core.ema import EMA
from s2v_core.locations import join, resolve
from s2v_core.losses import dash_infonce
from s2v_core.model import ModelConfig, SleepEncoder, batch_to_tensors, save_encoder
from s2v_core.objective import Objective
from s2v_core.run_layout import EMA_FILE, ENCODER_DIR, ONLINE_ENCODER_DIR, TRAINING_RECORD_FILE
from s2v_core.store import table_to_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker's loop reads; built once on the driver, immutable in the workers."""

    pretrain: PretrainConfig  # resolved options (modalities filled in from the store)
    model: ModelConfig  # the encoder architecture (s2v_core.architecture.resolve_model_config)
    modalities: tuple[str, ...]  # what the encoder is built for and trained on
    epochs_per_window: int  # the store's window length
    ds_config: dict[str, Any]  # the DeepSpeed config, resolved for the device
    run_dir: str  # a path or a URI
    store_repeats: int  # copies of the store in one pass of the dataset shard (the loop's epoch)
    resume_from: str | None = None  # a checkpoint to start from when Ray has none (--resume)
    mlflow: dict[str, str] | None = None  # {"tracking_uri", "run_id"}: where rank 0 logs
    validation_files: tuple[str, ...] = ()  # the val subjects' store files (held-out figures)
    validation_filesystem: pafs.FileSystem | None = None
    training_record: dict[str, Any] | None = None  # which store and splits trained the encoder


#: Per-step metrics averaged over workers before logging (NaN-aware).
AVERAGED_STATS = (
    "loss",
    "negatives_per_anchor",
    "weight_same_site",
    "weight_other_site",
    "weight_same_sex",
    "weight_other_sex",
    "temperature",
    "pairs",
    "global_batch",
)
#: Metric rows rank 0 buffers before writing them to MLflow in one batch.
MLFLOW_FLUSH_ROWS = 50


def make_gather(world_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Concatenate a tensor over all ranks along dim 0, in rank order.

    Tensors that require grad go through torch's functional autograd gather
    (``all_gather_single_autograd``), whose backward reduce-scatters: each rank
    gets the sum of the gradients every rank computed for its slice (so each
    embedding gets the gradient of every worker's loss terms that used it as a
    negative; checked by tests/test_pretrain_gather.py and
    test_losses_distributed.py); metadata goes through a plain ``all_gather``.
    """
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single_autograd

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.requires_grad:
            return all_gather_single_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    return gather


class _TimedGather:
    """Wraps a gather function and accumulates the seconds spent in it (forward only)."""

    def __init__(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.gather = gather
        self.seconds = 0.0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.gather(tensor)
        self.seconds += time.perf_counter() - start
        return out


def forward_backward(
    engine: Any,
    tensors: dict[str, Any],
    *,
    objective: Objective,
    rank: int,
    world_size: int,
    gather: Callable[[torch.Tensor], torch.Tensor] | None,
    modalities: Sequence[str] | None = None,
) -> Any:
    """A micro-step's gradient: encode the local batch, DASH-InfoNCE against the global batch, backward.

    ``modalities`` are the ones this step encodes (the objective's random pair,
    or all); the objective fixes the masking rate, the DASH formula and
    whether negatives are global or the worker's own. The caller then runs
    ``engine.step()`` (every micro-step: DeepSpeed applies the optimiser at the
    end of each ``gradient_accumulation_steps`` window). Returns the loss
    result (``loss``, ``stats``).
    """
    out, logit_scale = engine(tensors, modalities=modalities, mask_rate=objective.mask_rate)
    meta = {k: tensors[k] for k in ("age", "sex", "site_id", "night_id", "history")}
    result = dash_infonce(
        {k: v.float() for k, v in out.per_modality.items()},
        out.present,
        meta,
        logit_scale=logit_scale,
        rank=rank,
        world_size=world_size,
        gather=gather,
        **objective.loss_options(),
    )
    engine.backward(result.loss)
    return result


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: biases, norms, embeddings' scales and the temperature
    # are not regularised (the usual AdamW convention of GPT-2/CLIP).
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "embedding" not in name else plain).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class ContrastiveStep(torch.nn.Module):
    """The module DeepSpeed wraps: the encoder's forward plus its logit scale, in one call.

    ZeRO-3 materialises a parameter only while a module that uses it runs;
    the loss needs ``logit_scale`` outside ``SleepEncoder.forward``, so this
    wrapper reads it in its own forward and declares it there as an external
    parameter. For other stages it is a plain pass-through.
    """

    def __init__(self, encoder: SleepEncoder, *, zero_stage: int) -> None:
        super().__init__()
        self.encoder = encoder
        if zero_stage == 3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, encoder.logit_scale)
            # The encoder indexes its embedding tables' weights instead of calling
            # them, so ZeRO-3 would never gather them for the encoder's forward.
            for child in encoder.children():
                if isinstance(child, torch.nn.Embedding):
                    deepspeed.zero.register_external_parameter(encoder, child.weight)

    def forward(
        self, batch: dict[str, Any], modalities: Sequence[str] | None = None, mask_rate: float = 0.0
    ) -> tuple[Any, torch.Tensor]:
        # A computed 0-dim copy: it stays valid after ZeRO-3 re-partitions the parameter.
        scale = self.encoder.logit_scale.float().reshape(()) * 1.0
        return self.encoder.encode(batch, modalities, mask_rate=mask_rate), scale


def _average_stats(stats: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Mean of each stat over workers, ignoring workers where it is NaN."""
    values = torch.tensor([stats.get(k, math.nan) for k in AVERAGED_STATS], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        valid = ~torch.isnan(values)
        packed = torch.stack([torch.where(valid, values, torch.zeros_like(values)), valid.double()]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        values = packed[0] / packed[1]  # 0/0 stays NaN: no worker had that category
    return {k: float(v) for k, v in zip(AVERAGED_STATS, values)}


class _MetricLog:
    """Rank 0's buffered MLflow metric writer (no-op elsewhere or without MLflow).

    It also samples MLflow's system metrics (``system/...``) on rank 0's node
    while the loop runs: cheap evidence of how busy the CPU/GPU were.
    """

    def __init__(self, mlflow: dict[str, str] | None, enabled: bool, *, resumed: bool = False) -> None:
        self.client = self.monitor = None
        self.rows: list[Any] = []
        if mlflow and enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
            self.run_id = mlflow["run_id"]
            self.monitor = start_system_metrics(mlflow, resumed=resumed)

    def add(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.rows += [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        if len(self.rows) >= MLFLOW_FLUSH_ROWS * 8:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.rows:
            for start in range(0, len(self.rows), 1000):  # MLflow's log_batch limit
                self.client.log_batch(self.run_id, metrics=self.rows[start : start + 1000])
            self.rows = []

    def close(self) -> None:
        """Write what is buffered and stop the system-metrics sampler."""
        self.flush()
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


class _Progress:
    """Rank 0's progress line every ``every_seconds`` (the driver shows worker output)."""

    def __init__(self, steps: int, *, every_seconds: float) -> None:
        self.steps, self.every_seconds = steps, every_seconds
        self.last = time.monotonic()
        if every_seconds > 0 and not logger.handlers and logger.getEffectiveLevel() > logging.INFO:
            # A Ray worker process configures no logging for our loggers; the
            # loop owns this process, so it gives its progress logger a handler.
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)

    def maybe_log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        # The first step too: the user sees that training started (and at what rate).
        due = step in (1, self.steps) or now - self.last >= self.every_seconds or "val/loss_ratio_mean" in metrics
        if self.every_seconds <= 0 or not due:
            return
        self.last = now
        held_out = ""
        if "val/loss_ratio_mean" in metrics:
            held_out = (
                f"  held-out loss/chance {metrics['val/loss_ratio_mean']:.3f}"
                f"  top-1 {metrics['val/top1_over_chance_mean']:.1f}x chance"
            )
        logger.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f windows/s%s",
            step,
            self.steps,
            metrics.get("loss", math.nan),
            metrics.get("lr", math.nan),
            metrics.get("windows_per_s", 0.0),
            held_out,
        )


def _validation_due(cfg: Any, step: int) -> bool:
    return step == cfg.steps or (cfg.validate_every > 0 and step % cfg.validate_every == 0)


def _validator(loop: LoopConfig, *, rank: int, zero_stage: int) -> HeldOutValidator | None:
    """The held-out validator of the workers that validate (rank 0; every rank under ZeRO-3).

    ZeRO-3 gathers parameters collectively in every forward, so there all
    ranks run the same validation forwards; otherwise rank 0 validates alone
    while the others wait at the next collective.
    """
    if not loop.validation_files or (rank != 0 and zero_stage != 3):
        return None
    cfg = loop.pretrain
    return HeldOutValidator(
        list(loop.validation_files),
        loop.validation_filesystem,
        modalities=loop.modalities,
        epochs_per_window=loop.epochs_per_window,
        max_epochs=cfg.validation_epochs,
        batch_size=cfg.global_batch,
        seed=cfg.seed,
    )


def _validate(
    validator: HeldOutValidator | None, encoder: SleepEncoder, ema: EMA | None, device: torch.device, *, rank: int
) -> dict[str, float]:
    """Held-out figures of the encoder (its EMA weights when the run keeps them); rank 0's are logged."""
    if validator is None:
        return {}
    with ema.applied(encoder) if ema is not None else contextlib.nullcontext():
        figures = validator(encoder, device=device)
    return figures if rank == 0 else {}


def all_reduce_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradient: the BatchNorm reducer of global-negative runs.

    A gather-then-sum through the autograd gather (the statistics are a few
    hundred floats), so its backward is the sum of every rank's gradient, as
    for an all-reduce, without torch's deprecated ``torch.distributed.nn``.
    """
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(tensor.unsqueeze(0).contiguous(), gather_dim=0, group=dist.group.WORLD).sum(0)


def _maybe_fail(cfg: Any, step: int, rank: int, world_size: int, run_dir: str) -> None:
    """Testing aid: the last rank raises once, when about to run optimiser step ``fail_at_step``."""
    if cfg.fail_at_step is None or step + 1 != cfg.fail_at_step or rank != world_size - 1:
        return
    marker = join(run_dir, f".failed_at_step_{cfg.fail_at_step}")  # run_dir may be a URI
    if file_type(marker) != pafs.FileType.NotFound:
        return
    write_text(marker, "injected failure already happened; the run resumes past it\n")
    raise RuntimeError(f"injected failure before optimiser step {cfg.fail_at_step} (fail_at_step)")


def build_engine(
    model_cfg: ModelConfig, modalities: tuple[str, ...], *, cfg: Any, ds_config: dict[str, Any], on_cpu: bool
) -> tuple[Any, Any]:
    """The DeepSpeed engine (and LR scheduler) around a freshly initialised encoder.

    Needs an initialised ``torch.distributed`` process group (Ray Train's).
    Every rank starts from the same weights (seeded; DeepSpeed also
    broadcasts rank 0's); the ZeRO stage is ``ds_config``'s.
    """
    torch.manual_seed(cfg.seed)
    encoder = SleepEncoder(model_cfg, modalities)
    promote_scalar_parameters(encoder)
    model = ContrastiveStep(encoder, zero_stage=zero_stage_of(ds_config))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    return initialize(model, optimizer, ds_config, on_cpu=on_cpu)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the encoder on this worker's shard until ``steps`` optimiser steps are done."""
    import ray.train
    import ray.train.torch

    loop: LoopConfig = config["loop"]
    cfg, modalities, epochs_per_window = loop.pretrain, loop.modalities, loop.epochs_per_window
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    engine, scheduler = build_engine(
        loop.model, modalities, cfg=cfg, ds_config=loop.ds_config, on_cpu=device.type == "cpu"
    )
    zero_stage = zero_stage_of(loop.ds_config)  # resolved for the device
    objective = cfg.loss_objective
    encoder = engine.module.encoder
    if world_size > 1 and objective.negatives == "global":
        # Global negatives: the head's BatchNorm sees the global batch too (equal to one process).
        encoder.set_batchnorm_reducer(all_reduce_with_grad)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        encoder.compile_blocks()
    ema = (
        EMA(encoder, total_steps=cfg.steps, momentum_start=cfg.ema_momentum_start, momentum_end=cfg.ema_momentum_end)
        if cfg.ema
        else None
    )

    step, position = 0, DataPosition()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop.resume_from:
        # `--resume` on a fresh trainer: start from the run's latest checkpoint.
        filesystem, path = resolve(loop.resume_from)  # a local path or a URI
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_state(directory)
            load_engine(engine, directory)
            step, position = int(state["step"]), data_position(state)
            if ema is not None:
                ema.load_state_dict(torch.load(Path(directory) / EMA_FILE, map_location=device, weights_only=True))
        logger.info(
            "rank %d resumed at step %d (epoch %d, batch %d)", rank, step, position.epoch, position.batches_in_epoch
        )

    gather = _TimedGather(make_gather(world_size)) if world_size > 1 else None
    shard = ray.train.get_dataset_shard("train")
    log = _MetricLog(loop.mlflow, enabled=rank == 0, resumed=step > 0)
    progress = _Progress(cfg.steps, every_seconds=cfg.progress_seconds if rank == 0 else 0.0)
    last_checkpoint_step = step
    store_repeats = loop.store_repeats  # copies of the store in one pass (`epoch`) of the shard
    epoch, skip = position.epoch, position.batches_in_epoch
    window_count, interval_start, gather_seconds = 0, time.perf_counter(), 0.0
    micro, metrics = 0, {}
    validator = _validator(loop, rank=rank, zero_stage=zero_stage)
    engine.train()

    while step < cfg.steps:
        consumed = 0
        batches = shard.iter_batches(
            batch_size=cfg.per_worker_batch,
            batch_format="pyarrow",
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + 7919 * epoch + rank if cfg.shuffle_buffer else None,
        )
        for table in batches:
            consumed += 1
            if consumed <= skip:
                continue  # already trained on before the checkpoint we resumed from
            if micro == 0:
                _maybe_fail(cfg, step, rank, world_size, loop.run_dir)
                # Dropout, modality-dropout and mask draws differ per rank and depend only on
                # (seed, rank, step): a resumed run draws what the uninterrupted one drew.
                torch.manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
            # Every rank draws the same modalities for an optimiser step (seed and step).
            step_modalities = objective.step_modalities(modalities, seed=cfg.seed, step=step)
            np_batch = table_to_batch(
                table,
                modalities=step_modalities,
                epochs_per_window=epochs_per_window,
                history_columns=cfg.history_columns,
            )
            result = forward_backward(
                engine,
                batch_to_tensors(np_batch, device),
                objective=objective,
                rank=rank,
                world_size=world_size,
                gather=gather,
                modalities=step_modalities,
            )
            engine.step()
            micro += 1
            window_count += cfg.global_batch
            if micro < cfg.grad_accum:
                continue
            micro, step = 0, step + 1
            if ema is not None:
                ema.update(encoder, step)
            if gather is not None:
                gather_seconds += gather.seconds
                gather.seconds = 0.0
            position = DataPosition(epoch=epoch, batches_in_epoch=consumed, store_repeats=store_repeats)
            checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
            report_now = cfg.report_every > 0 and step % cfg.report_every == 0
            validate_now = _validation_due(cfg, step)
            if step % cfg.log_every == 0 or checkpoint_now or report_now or validate_now:
                # Every rank takes part in the stats all-reduce, on the same steps.
                stats = _average_stats(result.to_floats(), world_size, device)  # one device read per log
                elapsed = time.perf_counter() - interval_start
                metrics = {
                    **stats,
                    "step": float(step),
                    "epoch": float(epoch * store_repeats),
                    "optimizer_steps": float(engine.global_steps),
                    "lr": float(scheduler.get_last_lr()[0]) if scheduler is not None else cfg.lr,
                    "windows_per_s": window_count / max(elapsed, 1e-9),
                    "gather_share": gather_seconds / max(elapsed, 1e-9),
                }
                window_count, gather_seconds = 0, 0.0
                if validate_now:
                    metrics.update(_validate(validator, encoder, ema, device, rank=rank))
                log.add(
                    {k: v for k, v in metrics.items() if k not in ("step", "global_batch", "optimizer_steps")}, step
                )
                progress.maybe_log(step, metrics)
                if checkpoint_now:
                    log.flush()
                    _save_and_report(engine, metrics, loop, rank, world_size, step, position, zero_stage, ema=ema)
                    last_checkpoint_step = step
                elif report_now:
                    ray.train.report(metrics)
                # Checkpoint and report time is charged to no interval: windows_per_s is the training rate.
                interval_start = time.perf_counter()
            if step >= cfg.steps:
                break
        if consumed == 0:
            # The driver checks that every worker's shard fills a batch; if the
            # store shrank since, stop instead of spinning on empty epochs.
            raise RuntimeError(
                f"worker {rank}: pass {epoch} yielded no batch of {cfg.per_worker_batch} "
                "windows; the store has fewer windows than --global-batch needs"
            )
        skip = 0
        if step < cfg.steps:
            epoch += 1
    if last_checkpoint_step != step:  # unreachable by construction; kept as a guard for future edits
        _save_and_report(engine, metrics, loop, rank, world_size, step, position, zero_stage, ema=ema)
    log.close()


def _save_and_report(
    engine: Any,
    metrics: dict[str, float],
    loop: LoopConfig,
    rank: int,
    world_size: int,
    step: int,
    position: DataPosition,
    zero_stage: int,
    *,
    ema: EMA | None = None,
) -> None:
    """Shard → barrier → report: every rank saves its DeepSpeed state, rank 0 the encoder and state.

    With EMA, ``encoder/`` holds the averaged weights (what embed and evaluate
    use by default), ``online_encoder/`` the optimiser's, and ``ema.pt`` the
    average's state for resuming.
    """
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="s2v-ckpt-") as directory:
        save_engine(engine, directory)
        if ema is not None:
            _save_encoder(engine, Path(directory) / ONLINE_ENCODER_DIR, rank=rank, zero_stage=zero_stage)
            if rank == 0:
                torch.save(ema.state_dict(), Path(directory) / EMA_FILE)
            with ema.applied(engine.module.encoder):
                _save_encoder(engine, Path(directory) / ENCODER_DIR, rank=rank, zero_stage=zero_stage)
        else:
            _save_encoder(engine, Path(directory) / ENCODER_DIR, rank=rank, zero_stage=zero_stage)
        if rank == 0 and loop.training_record:
            # Which store and subjects trained this encoder: `s2v evaluate` refuses to call them unseen.
            (Path(directory) / ENCODER_DIR / TRAINING_RECORD_FILE).write_text(
                json.dumps(loop.training_record, indent=1) + "\n", encoding="utf-8"
            )
        if rank == 0:
            write_state(
                directory,
                config=config_to_dict(loop.pretrain),
                step=step,
                seed=loop.pretrain.seed,
                position=position,
                metrics=metrics,
                world_size=world_size,
            )
        if world_size > 1:
            dist.barrier()
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=checkpoint_dir_name(step),
        )


def _save_encoder(engine: Any, directory: Path, *, rank: int, zero_stage: int) -> None:
    """Rank 0 writes the plain encoder (fp32 weights); ZeRO-3 first gathers the partitions (all ranks)."""
    with full_parameters(engine.module, zero_stage=zero_stage):
        if rank == 0:
            save_encoder(_fp32_copy(engine.module.encoder), directory)


def _fp32_copy(module: SleepEncoder) -> SleepEncoder:
    """A float32 CPU copy of the encoder (bf16 training keeps bf16 weights in the module)."""
    copy = SleepEncoder(module.config, module.modalities)
    copy.load_state_dict(plain_state(module.state_dict(), copy.state_dict()))
    return copy
