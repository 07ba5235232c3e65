"""Encoders written in format 1 (conv stems, nn.TransformerEncoder) load and encode as before."""

from __future__ import annotations

import json

import pytest
import torch

from s2v_core.legacy import convert_format1_state
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.model import ENCODER_FORMAT, load_encoder, model_config, save_encoder
from tests.format1_encoder import Format1Encoder, save_format1

MODALITIES = ("eeg", "ecg", "hr", "airflow")


def batch(rows=3, epochs=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(rows, epochs, get_modality(k).samples_per_epoch, generator=generator) for k in MODALITIES}
    out["present"] = torch.zeros(rows, len(MODALITY_KEYS), dtype=torch.bool)
    for k in MODALITIES:
        out["present"][:, MODALITY_KEYS.index(k)] = True
    return out


def test_a_format1_encoder_loads_and_encodes_exactly_as_before(tmp_path):
    torch.manual_seed(0)
    config = model_config("tiny", width=24, heads=4, depth=2, stem_channels=6, epochs_per_window=5)
    old = Format1Encoder(config, MODALITIES).eval()
    directory = save_format1(old, tmp_path / "v1")
    new = load_encoder(directory)
    assert (new.config.tokenizer, new.config.position, new.config.head) == ("conv", "absolute", "linear")
    with torch.no_grad():
        old_z, old_fused = old.encode(batch())
        out = new.encode(batch())
    for key in MODALITIES:
        assert torch.allclose(out.per_modality[key], old_z[key], atol=1e-5), key
    assert torch.allclose(out.fused, old_fused, atol=1e-5)
    # Saved again, it is a current-format encoder.
    resaved = save_encoder(new, tmp_path / "v2")
    assert json.loads((resaved / "model_config.json").read_text())["format"] == ENCODER_FORMAT


def test_unknown_formats_and_weights_are_named(tmp_path):
    torch.manual_seed(1)
    directory = save_format1(Format1Encoder(model_config("tiny"), ("eeg",)), tmp_path / "enc")
    description = json.loads((directory / "model_config.json").read_text())
    description["format"] = 7
    (directory / "model_config.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="format 7"):
        load_encoder(directory)
    with pytest.raises(ValueError, match="cannot convert weight 'backbone.layers.0.mystery'"):
        convert_format1_state({"backbone.layers.0.mystery": torch.zeros(1)})
