"""What s2v pretrain and s2v finetune --deepspeed share: the ZeRO stage, the config, the weights' shapes."""

from __future__ import annotations

import sys

import pytest
import torch

from pipelines.deepspeed_engine import (
    engine_config,
    full_parameters,
    plain_state,
    promote_scalar_parameters,
    resolve_zero_stage,
    zero_stage_of,
)
from s2v_core.model import SleepEncoder, model_config


def test_the_default_zero_stage_follows_the_device():
    # ZeRO-2's bucketing costs ~20 % of a CPU step for memory a CPU run does not need.
    assert resolve_zero_stage(None, on_gpu=False) == 0
    assert resolve_zero_stage(None, on_gpu=True) == 2
    assert [resolve_zero_stage(stage, on_gpu=gpu) for stage in (0, 3) for gpu in (False, True)] == [0, 0, 3, 3]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_config_batch_sizes_and_stage(stage):
    ds = engine_config(
        micro_batch=4, grad_accum=3, zero_stage=stage, on_gpu=False, bf16=False, grad_clip=0.5, workers=2
    )
    assert zero_stage_of(ds) == stage
    # DeepSpeed checks train_batch_size == micro batch * accumulation * workers.
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4,
        3,
        24,
    )
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert "optimizer" not in ds and "scheduler" not in ds  # the caller's AdamW; a scheduler is the caller's own
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    if stage in (1, 2):
        assert ds["zero_optimization"]["overlap_comm"] is False  # CUDA streams only
        gpu = engine_config(
            micro_batch=4, grad_accum=1, zero_stage=stage, on_gpu=True, bf16=True, grad_clip=0, workers=2
        )
        assert gpu["zero_optimization"]["overlap_comm"] is True


def test_promoted_scalars_are_written_back_in_their_own_shapes():
    torch.manual_seed(0)
    config = model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=4)
    encoder = SleepEncoder(config, ("hr", "spo2"))
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert encoder.logit_scale.ndim == 0
    promote_scalar_parameters(encoder)
    assert encoder.logit_scale.shape == (1,)  # what DeepSpeed can broadcast and partition
    assert encoder.logit_scale.requires_grad == config.learn_temperature
    copy = SleepEncoder(config, ("hr", "spo2"))
    copy.load_state_dict(plain_state(encoder.state_dict(), copy.state_dict()))
    assert copy.logit_scale.ndim == 0
    assert all(torch.equal(copy.state_dict()[k], original[k]) for k in original)


def test_plain_state_casts_bf16_weights_back_to_the_modules_dtype():
    module = torch.nn.Linear(3, 2)
    trained = {k: v.to(torch.bfloat16) for k, v in module.state_dict().items()}
    plain = plain_state(trained, module.state_dict())
    assert all(v.dtype == torch.float32 for v in plain.values())


def test_full_parameters_is_no_collective_below_zero_3():
    module = torch.nn.Linear(3, 2)
    imported = "deepspeed" in sys.modules
    with full_parameters(module, zero_stage=2):
        assert module.weight.shape == (2, 3)
    assert ("deepspeed" in sys.modules) == imported  # nothing was gathered, DeepSpeed not even imported
