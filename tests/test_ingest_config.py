"""IngestConfig: built once from the flags, frozen, and bad options named before anything is created."""

from __future__ import annotations

import argparse

import pytest

from pipelines.ingest import add_arguments
from pipelines.ingest_config import IngestConfig, config_from_args
from pipelines.ingest_plan import IngestLimits


def test_flags_map_onto_one_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--input", "a", "--input", "b", "--output", "S", "--epochs-per-window", "5", "--task-retries", "0"]
    )
    config = config_from_args(args)
    assert config == IngestConfig(
        inputs=("a", "b"), output="S", epochs_per_window=5, limits=IngestLimits(task_retries=0)
    )
    assert IngestConfig(inputs=["a"], output="S").inputs == ("a",)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inputs": ()}, "--input: expected at least one input directory"),
        ({"inputs": ("a", "b"), "site_config": "site.toml"}, "--site-config applies to exactly one --input, found 2"),
        ({"epochs_per_window": 0}, "--epochs-per-window: expected >= 1, found 0"),
        ({"workers": 0}, "workers: expected >= 1, found 0"),
        ({"ids": "names"}, "--ids: expected one of pseudonymous, original, found 'names'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        IngestConfig(**{"inputs": ("a",), "output": "S", **options})
