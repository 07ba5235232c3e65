"""EvaluateConfig: built once from the flags, frozen, and every bad option named before anything is read."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pipelines.evaluate import add_arguments
from pipelines.evaluate_config import EvaluateConfig, config_from_args


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--embeddings", "EMB", "--report", "R.json", *flags])


def test_flags_map_onto_one_frozen_config():
    config = config_from_args(
        _args("--task", "staging", "--heads", "linear", "--scenarios", "only:eeg, wearable", "--no-mlflow")
    )
    assert config == EvaluateConfig(
        embeddings="EMB",
        task="staging",
        report="R.json",
        heads=("linear",),
        scenarios=("only:eeg", "wearable"),
        log_to_mlflow=False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.task = "site"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "sleepiness"}, "--task: expected"),
        ({"task": "site", "robustness": True, "data": "S", "checkpoint": "C"}, "apply to --task staging only"),
        ({"task": "staging", "label_efficiency_curve": True}, "need --data STORE and --checkpoint CKPT"),
        ({"task": "staging", "compare": "EMB2"}, "--compare applies to --task site only"),
        ({"task": "staging", "peer": "yasa"}, "--peer: only 'yasa' is available and it needs --data"),
        ({"task": "staging", "heads": ("linear", "gru")}, "--heads: expected linear and/or temporal"),
        ({"task": "staging", "folds": 1, "transductive": True}, "--folds: expected >= 2 with --transductive"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EvaluateConfig(embeddings="EMB", report="R.json", **options)
