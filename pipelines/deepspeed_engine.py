"""DeepSpeed under Ray Train: what ``s2v pretrain`` and ``s2v finetune --deepspeed`` share.

Both hand ``deepspeed.initialize`` a ``torch.optim.AdamW`` of their own (so no
DeepSpeed optimiser op is ever compiled) inside the process group Ray Train
started (gloo on CPU workers, NCCL on GPUs). This module holds the parts
that do not depend on what is trained:

- :func:`add_zero_stage_argument`, :func:`resolve_zero_stage` and
  :func:`engine_config`: the ``--zero-stage`` option, the ZeRO stage a run
  uses and the common part of its DeepSpeed config;
- :func:`initialize`: the engine, with 0-dim parameters made 1-element and
  the CPU-only op kept from being built;
- :func:`full_parameters` and :func:`plain_state`: the whole weights on every
  rank (ZeRO-3 partitions them) in the shapes of the unwrapped module;
- :func:`save_engine` and :func:`load_engine`: every rank's engine state in a
  checkpoint directory (``engine/state/``, :mod:`s2v_core.run_layout`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from s2v_core.run_layout import ENGINE_DIR, ENGINE_TAG


def add_zero_stage_argument(parser: argparse.ArgumentParser, *, condition: str = "") -> None:
    """``--zero-stage {0,1,2,3}``, default None (:func:`resolve_zero_stage` picks); ``condition`` prefixes the help."""
    parser.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        help=f"{condition}DeepSpeed ZeRO stage (default: 2 on GPU workers, 0 on CPU workers)",
    )


def resolve_zero_stage(requested: int | None, *, on_gpu: bool) -> int:
    """The ZeRO stage a run uses: ``requested``, or 2 on GPU workers and 0 on CPU ones.

    On CPU, ZeRO-2's gradient bucketing cost ~20 % of a pretraining step
    (bench_pretrain) and the memory it saves is not what limits a CPU run.
    """
    if requested is not None:
        return requested
    return 2 if on_gpu else 0


def engine_config(
    *,
    micro_batch: int,
    grad_accum: int,
    zero_stage: int,
    on_gpu: bool,
    bf16: bool,
    grad_clip: float,
    workers: int,
) -> dict[str, Any]:
    """The DeepSpeed config a run's options give, without a scheduler (a caller adds its own).

    ``micro_batch`` windows per worker per micro-step, ``grad_accum``
    micro-steps per optimiser step, ``grad_clip`` the global gradient-norm clip
    (0: none).
    """
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage in (1, 2):
        # Overlapping reduction with backward needs CUDA streams; keep it on GPUs only.
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_scatter=on_gpu)
    if zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * workers * grad_accum,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # A client torch optimizer under ZeRO is supported but flagged "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress goes to MLflow, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }


def promote_scalar_parameters(model: torch.nn.Module) -> None:
    """Turn 0-dim parameters (``SleepEncoder.logit_scale``) into 1-element ones, in place.

    DeepSpeed 0.19 assumes every parameter has a dimension: it broadcasts
    parameters as ``uint8`` views at start-up and in ZeRO-3 partitioning, and
    ZeRO-0 copies reduced gradients back through 1-d buffers; all of them
    raise for a 0-dim tensor. :func:`plain_state` restores the original
    shapes when weights are written, so saved models are unchanged.
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.ndim == 0:
                module._parameters[name] = torch.nn.Parameter(
                    param.detach().reshape(1), requires_grad=param.requires_grad
                )


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling ``deepspeed_shm_comm`` on CPU workers.

    That op only speeds up ``inference_all_reduce`` on one host; training
    all-reduces through gloo. Building it costs minutes on a fresh machine, and
    a build killed mid-way leaves a lock file in the torch extensions cache on
    which every later run waits forever (seen here). DeepSpeed skips ops marked
    incompatible, so mark it so.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], *, on_cpu: bool
) -> tuple[Any, Any]:
    """The DeepSpeed engine (and its LR scheduler, or None) around ``model`` and its ``optimizer``.

    Needs Ray Train's initialised ``torch.distributed`` process group.
    ``model``'s 0-dim parameters must already be promoted
    (:func:`promote_scalar_parameters`, before the optimiser is built on them).
    Every rank should start from the same weights (DeepSpeed also broadcasts rank 0's).
    """
    import deepspeed

    if on_cpu:
        skip_shm_comm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine, scheduler


def zero_stage_of(ds_config: Mapping[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config."""
    return int(ds_config["zero_optimization"]["stage"])


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, *, zero_stage: int) -> Iterator[None]:
    """Inside: every rank holds ``module``'s whole parameters, read-only.

    Under ZeRO-3 this is a collective (``deepspeed.zero.GatheredParameters``):
    every rank must enter it, at the same point. Other stages keep whole
    parameters on every rank, so it does nothing.
    """
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def plain_state(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of ``state`` in the shapes and dtypes of ``like`` (an unwrapped module's state dict).

    Undoes :func:`promote_scalar_parameters` (1-element → 0-dim) and bf16
    training (bf16 → the module's float32).
    """
    return {k: v.detach().cpu().to(like[k].dtype).reshape(like[k].shape).clone() for k, v in state.items()}


def save_engine(engine: Any, checkpoint_dir: str | Path) -> None:
    """Every rank writes its part of the engine's state into ``checkpoint_dir/engine/state/`` (a collective)."""
    engine_dir = Path(checkpoint_dir) / ENGINE_DIR
    (engine_dir / ENGINE_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(engine_dir), tag=ENGINE_TAG)


def load_engine(engine: Any, checkpoint_dir: str | Path) -> None:
    """Restore weights, optimiser (and scheduler) from what :func:`save_engine` wrote."""
    engine_dir = Path(checkpoint_dir) / ENGINE_DIR
    loaded, _ = engine.load_checkpoint(str(engine_dir), tag=ENGINE_TAG)
    if loaded is None:  # DeepSpeed only warns, and training would restart from the initial weights
        raise FileNotFoundError(f"{engine_dir}: no DeepSpeed state with tag {ENGINE_TAG!r} to resume from")
