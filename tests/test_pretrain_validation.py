"""Validation contrastive loss (the sweep's score) on held-out store windows."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.validation import evaluate_contrastive_loss
from pipelines.train_data import store_files
from s2v_core.model import SleepEncoder, model_config
from s2v_core.store import open_store
from s2v_core.toystore import write_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy_store(tmp_path_factory.mktemp("store"), sites=2, recordings_per_site=3,
                           windows_per_recording=4, epochs_per_window=4, modalities=("eeg", "ecg", "hr"))


def test_loss_is_deterministic_and_near_chance_for_a_random_encoder(store):
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg", "hr"))
    first = evaluate_contrastive_loss(encoder, store, batch_size=8)
    again = evaluate_contrastive_loss(encoder, str(store), batch_size=8)
    assert first == again
    assert first["batches"] == 3 and first["windows"] == 24
    # Untrained: close to log(1 + negatives), the loss of uniform logits.
    assert abs(first["loss"] - math.log(1 + first["negatives_per_anchor"])) < 1.5


def test_accepts_a_table_and_a_modality_subset(store):
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg", "hr"))
    table = open_store(str(store)).to_table()
    result = evaluate_contrastive_loss(encoder, table, modalities=("eeg", "ecg"), batch_size=6)
    assert result["batches"] == 4 and math.isfinite(result["loss"])


def test_rejects_unusable_input(store):
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg", "hr"))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_contrastive_loss(encoder, store, batch_size=1)
    with pytest.raises(ValueError, match="nothing to align"):
        evaluate_contrastive_loss(encoder, store, modalities=("eeg",), batch_size=4)


def test_batches_mix_nights_longer_than_a_batch(tmp_path):
    """Nights of 16 windows, batches of 8: in store order every batch would be one night, no negatives."""
    store = write_toy_store(tmp_path / "long", sites=2, recordings_per_site=2, windows_per_recording=16,
                            epochs_per_window=2, modalities=("eeg", "ecg"), seed=3)
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg"))
    result = evaluate_contrastive_loss(encoder, store, batch_size=8)
    # 4 nights mixed at random: about 3/4 of the other 7 windows of a batch are other nights'.
    assert result["negatives_per_anchor"] > 3.5
    assert evaluate_contrastive_loss(encoder, store, batch_size=8) == result
    assert evaluate_contrastive_loss(encoder, store, batch_size=8, shuffle_seed=1) != result
