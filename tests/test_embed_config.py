"""EmbedConfig: built once from the flags, frozen, modalities parsed and bad options named up front."""

from __future__ import annotations

import argparse

import pytest

from pipelines.embed import add_arguments
from pipelines.embed_config import EmbedConfig, config_from_args


def test_flags_map_onto_one_config_with_modalities_in_registry_order():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", "C", "--data", "S", "--output", "E", "--modalities", "spo2,hr", "--actors", "3"]
    )
    config = config_from_args(args)
    assert config == EmbedConfig(checkpoint="C", data="S", output="E", modalities=("hr", "spo2"), num_actors=3)
    assert EmbedConfig(checkpoint="C", data="S", output="E", modalities="").modalities is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modalities": "ekg"}, "--modalities: unknown modality 'ekg'"),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"num_actors": 0}, "--actors: expected >= 1, found 0"),
        ({"features": "raw"}, "--features: expected hidden or projected, found 'raw'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EmbedConfig(checkpoint="C", data="S", output="E", **options)
