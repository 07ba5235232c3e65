"""The run-directory layout: one module names every file, and the modules that write them use those names."""

from __future__ import annotations

import importlib

import pytest

from s2v_core import run_layout

#: (module, its name for the file) -> the layout's name; finetune keeps its short local names.
USERS = {
    ("s2v_core.model", "MODEL_CONFIG_FILE"): "MODEL_CONFIG_FILE",
    ("s2v_core.model", "WEIGHTS_FILE"): "WEIGHTS_FILE",
    ("s2v_core.splits", "TRAINING_RECORD_FILE"): "TRAINING_RECORD_FILE",
    ("s2v_core.finetuning", "DESCRIPTION_FILE"): "DESCRIPTION_FILE",
    ("s2v_core.finetuning", "ADAPTER_FILE"): "ADAPTER_FILE",
    ("s2v_core.finetuning", "TASK_MODEL_FILE"): "TASK_MODEL_FILE",
    ("pipelines.checkpoints", "CHECKPOINT_STATE_FILE"): "CHECKPOINT_STATE_FILE",
    ("pipelines.checkpoints", "EMA_FILE"): "EMA_FILE",
    ("pipelines.pretrain", "PRETRAIN_CONFIG_FILE"): "PRETRAIN_CONFIG_FILE",
    ("pipelines.pretrain", "DS_CONFIG_FILE"): "DS_CONFIG_FILE",
    ("pipelines.finetune", "CONFIG_FILE"): "FINETUNE_CONFIG_FILE",
    ("pipelines.finetune", "REPORT_FILE"): "FINETUNE_REPORT_FILE",
    ("pipelines.finetune", "MODEL_DIR"): "FINETUNED_MODEL_DIR",
    ("pipelines.finetune_loop", "FINETUNE_STATE_FILE"): "FINETUNE_STATE_FILE",
    ("pipelines.finetune_loop", "TRAINING_FILE"): "FINETUNE_TRAINING_FILE",
    ("tune.sweep", "SWEEP_STATE_FILE"): "SWEEP_STATE_FILE",
    ("tune.sweep", "PREDICTIONS_FILE"): "PREDICTIONS_FILE",
}


@pytest.mark.parametrize(
    ("user", "layout_name"), USERS.items(), ids=lambda v: ".".join(v) if isinstance(v, tuple) else v
)
def test_writers_use_the_layouts_names(user, layout_name):
    module, name = user
    assert getattr(importlib.import_module(module), name) == getattr(run_layout, layout_name)


def test_files_of_one_directory_have_distinct_names():
    pretrain_run = [
        run_layout.PRETRAIN_CONFIG_FILE,
        run_layout.DS_CONFIG_FILE,
        run_layout.MLFLOW_RUN_FILE,
        run_layout.ENCODER_DIR,
        run_layout.CHECKPOINTS_NAME,
    ]
    checkpoint = [
        run_layout.CHECKPOINT_STATE_FILE,
        run_layout.ENCODER_DIR,
        run_layout.ONLINE_ENCODER_DIR,
        run_layout.EMA_FILE,
        run_layout.ENGINE_DIR,
    ]
    saved_encoder = [run_layout.MODEL_CONFIG_FILE, run_layout.WEIGHTS_FILE, run_layout.TRAINING_RECORD_FILE]
    finetune_run = [
        run_layout.FINETUNE_CONFIG_FILE,
        run_layout.FINETUNE_REPORT_FILE,
        run_layout.MLFLOW_RUN_FILE,
        run_layout.PRETRAINED_ENCODER_DIR,
        run_layout.FINETUNED_MODEL_DIR,
        run_layout.CHECKPOINTS_NAME,
    ]
    for names in (pretrain_run, checkpoint, saved_encoder, finetune_run):
        assert len(set(names)) == len(names), names


def test_locations_of_a_run_keep_uri_options():
    run = "s3://b/runs/x?endpoint_override=h:1"
    assert run_layout.final_encoder_location(run) == "s3://b/runs/x/encoder?endpoint_override=h:1"
    assert run_layout.checkpoints_location("/tmp/run") == "/tmp/run/checkpoints"
