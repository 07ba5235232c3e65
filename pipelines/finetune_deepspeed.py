"""``s2v finetune --deepspeed``: the DeepSpeed config of the workers and the checks of a resumed engine.

The engine helpers shared with ``s2v pretrain`` are in :mod:`pipelines.deepspeed_engine`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.deepspeed_engine import engine_config, resolve_zero_stage, zero_stage_of
from s2v_core.run_layout import DS_CONFIG_FILE, FINETUNE_STATE_FILE

if TYPE_CHECKING:
    from pipelines.finetune import FinetuneConfig, PreparedFinetune


def check_deepspeed(config: FinetuneConfig) -> None:
    """``--zero-stage`` is one of 0-3 and only comes with ``--deepspeed``."""
    if config.zero_stage is None:
        return
    if config.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage: expected 0, 1, 2 or 3, found {config.zero_stage!r}")
    if not config.deepspeed:
        raise ValueError(
            f"--zero-stage: a DeepSpeed option; expected --deepspeed with it, found --zero-stage "
            f"{config.zero_stage} without --deepspeed"
        )


def deepspeed_config(config: FinetuneConfig, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a ``--deepspeed`` run on CPU or GPU workers (``RUN_DIR/ds_config.json``).

    Each worker holds ``batch_size // workers`` windows a step. It trains as the
    data-parallel path does, so that their figures compare: float32 weights,
    no gradient clipping and no scheduler (the constant learning rates of
    :meth:`~s2v_core.finetuning.FineTunedModel.parameter_groups`). bf16 is
    left out on GPUs too: DeepSpeed would cast the frozen pretrained weights
    (frozen mode, LoRA's base weights) to bf16, and the saved model would no
    longer hold the encoder it started from.
    """
    return engine_config(
        micro_batch=config.batch_size // config.workers,
        grad_accum=1,
        zero_stage=resolve_zero_stage(config.zero_stage, on_gpu=on_gpu),
        on_gpu=on_gpu,
        bf16=False,
        grad_clip=0.0,
        workers=config.workers,
    )


def with_deepspeed(prepared: PreparedFinetune) -> PreparedFinetune:
    """A ``--deepspeed`` run with its DeepSpeed config for its workers' device, written to the run dir.

    A resumed run must be able to load its checkpoint's engine state: the
    same ZeRO stage, and for stages 1-3 (an optimiser shard per worker) the
    same ``--workers``; ``ValueError`` naming the option otherwise.
    """
    config = prepared.config
    if not config.deepspeed:
        return prepared
    ds_config = deepspeed_config(config, on_gpu=prepared.on_gpu)
    stage = zero_stage_of(ds_config)
    if prepared.resume_from is not None:
        checkpoint = Path(prepared.resume_from)
        engine = json.loads((checkpoint / FINETUNE_STATE_FILE).read_text(encoding="utf-8")).get("engine") or {}
        if engine.get("zero_stage") != stage:
            raise ValueError(
                f"--resume: expected the ZeRO stage of checkpoint {checkpoint.name} ({engine.get('zero_stage')}), "
                f"found {stage} (--zero-stage {config.zero_stage if config.zero_stage is not None else 'default'} "
                f"on {'GPU' if prepared.on_gpu else 'CPU'} workers); resume on the device it trained on (--device)"
            )
        if stage >= 1 and engine.get("world_size") != config.workers:
            raise ValueError(
                f"--workers: expected {engine.get('world_size')}, the workers that wrote checkpoint "
                f"{checkpoint.name} (ZeRO-{stage} keeps an optimiser shard per worker), found {config.workers}"
            )
    (prepared.run_dir / DS_CONFIG_FILE).write_text(json.dumps(ds_config, indent=2) + "\n", encoding="utf-8")
    return dataclasses.replace(prepared, ds_config=ds_config)
