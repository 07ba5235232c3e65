"""PretrainConfig validation, file/CLI mapping and the DeepSpeed config derived from it."""

from __future__ import annotations

import argparse
import json

import pytest

from pipelines import pretrain_cli
from pipelines.train_config import (
    PretrainConfig,
    config_differences,
    config_from_dict,
    config_to_dict,
    deepspeed_config,
    load_pretrain_config,
    use_bf16,
)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_carries_the_run_config(stage):
    config = PretrainConfig(
        workers=2,
        global_batch=16,
        grad_accum=3,
        zero_stage=stage,
        grad_clip=0.5,
        steps=40,
        warmup_steps=5,
        min_lr_ratio=0.2,
    )
    ds = deepspeed_config(config, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    # DeepSpeed checks train_batch_size == micro * accumulation * world size.
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    schedule = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert (schedule["total_num_steps"], schedule["warmup_num_steps"]) == (40, 5)
    assert schedule["cos_min_ratio"] == schedule["warmup_min_ratio"] == 0.2
    assert "optimizer" not in ds  # the torch AdamW is passed in: no op compilation on CPU
    json.dumps(ds)  # saved with the run and logged to MLflow


def test_precision_follows_the_device():
    assert deepspeed_config(PretrainConfig(), on_gpu=True)["bf16"]["enabled"] is True
    assert deepspeed_config(PretrainConfig(), on_gpu=False)["bf16"]["enabled"] is False
    assert use_bf16(PretrainConfig(precision="fp32"), on_gpu=True) is False
    assert use_bf16(PretrainConfig(precision="bf16"), on_gpu=False) is True


def test_zero_overlap_only_on_gpu():
    cpu = deepspeed_config(PretrainConfig(zero_stage=2), on_gpu=False)["zero_optimization"]
    gpu = deepspeed_config(PretrainConfig(zero_stage=2), on_gpu=True)["zero_optimization"]
    assert cpu["overlap_comm"] is False and cpu["reduce_scatter"] is False
    assert gpu["overlap_comm"] is True


def test_default_zero_stage_follows_the_device():
    # ZeRO-2's bucketing costs ~20 % of a CPU step for memory a CPU run does not need.
    assert deepspeed_config(PretrainConfig(), on_gpu=False)["zero_optimization"]["stage"] == 0
    assert deepspeed_config(PretrainConfig(), on_gpu=True)["zero_optimization"]["stage"] == 2
    assert deepspeed_config(PretrainConfig(zero_stage=3), on_gpu=False)["zero_optimization"]["stage"] == 3


def test_warmup_is_clamped_to_the_run_length():
    ds = deepspeed_config(PretrainConfig(steps=4, warmup_steps=10), on_gpu=False)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 4


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"global_batch": 9, "workers": 2}, "--global-batch"),
        ({"zero_stage": 4}, "--zero-stage"),
        ({"steps": 0}, "--steps"),
        ({"workers": 0}, "--workers"),
        ({"lr": 0.0}, "--lr"),
        ({"precision": "fp16"}, "--precision"),
        ({"device": "tpu"}, "--device"),
        ({"report_every": -1}, "report_every"),
        ({"log_every": 0}, "--log-every"),
        ({"nights_per_block": 0}, "--nights-per-block"),
        ({"shuffle_buffer": -5}, "shuffle_buffer"),
    ],
)
def test_invalid_values_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PretrainConfig(**kwargs)


def test_global_batch_divisibility_message_says_expected_and_found():
    with pytest.raises(ValueError, match=r"multiple of --workers \(4\).*found 10"):
        PretrainConfig(workers=4, global_batch=10)


def test_config_file_maps_strictly_and_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "S"\noutput = "R"\nsteps = 7\nmodalities = ["ecg", "eeg"]\nlr = 1e-3\n')
    config = load_pretrain_config(str(path), steps=9, lr=None)
    assert (config.steps, config.lr, config.modalities) == (9, 1e-3, ("ecg", "eeg"))
    path.write_text("stpes = 7\n")
    with pytest.raises(ValueError, match="stpes"):
        load_pretrain_config(str(path))
    path.write_text('steps = "many"\n')
    with pytest.raises(TypeError, match="steps"):
        load_pretrain_config(str(path))


def test_cli_flags_map_onto_the_config():
    parser = argparse.ArgumentParser()
    pretrain_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--data",
            "S",
            "--output",
            "R",
            "--workers",
            "2",
            "--global-batch",
            "8",
            "--modalities",
            "eeg,ecg",
            "--zero-stage",
            "1",
            "--no-dash",
            "--steps",
            "5",
        ]
    )
    config = pretrain_cli.config_from_args(args)
    assert config.modalities == ("eeg", "ecg") and config.dash is False
    assert (config.zero_stage, config.steps, config.per_worker_batch) == (1, 5, 4)
    assert pretrain_cli.config_from_args(parser.parse_args(["--data", "S"])).dash is True


def test_round_trip_and_differences_ignore_runtime_fields():
    config = PretrainConfig(data="a", output="b", modalities=("eeg",), fail_at_step=3)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config
    moved = PretrainConfig(
        data="elsewhere",
        output="b2",
        modalities=("eeg",),
        max_failures=3,
        log_every=10,
        report_every=5,
        progress_seconds=0,
    )
    assert config_differences(config, moved) == {}
    changed = PretrainConfig(data="a", output="b", modalities=("eeg",), lr=1e-2)
    assert set(config_differences(config, changed)) == {"lr"}


def test_model_config_applies_overrides_and_fits_the_window():
    config = PretrainConfig(model="tiny", width=48, depth=1)
    model = config.model_config(epochs_per_window=12)
    assert (model.width, model.depth, model.epochs_per_window) == (48, 1, 12)
    assert model.width % model.heads == 0
    odd = PretrainConfig(model="tiny", width=33).model_config()
    assert odd.width % odd.heads == 0
