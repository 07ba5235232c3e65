"""Validation contrastive loss (the sweep's score) on held-out store windows."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.validation import evaluate_contrastive_loss
from s2v_core.model import SleepEncoder, model_config
from s2v_core.store import open_store
from s2v_core.toystore import write_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "hr"),
    )


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
    store = write_toy_store(
        tmp_path / "long",
        sites=2,
        recordings_per_site=2,
        windows_per_recording=16,
        epochs_per_window=2,
        modalities=("eeg", "ecg"),
        seed=3,
    )
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg"))
    result = evaluate_contrastive_loss(encoder, store, batch_size=8)
    # 4 nights mixed at random: about 3/4 of the other 7 windows of a batch are other nights'.
    assert result["negatives_per_anchor"] > 3.5
    assert evaluate_contrastive_loss(encoder, store, batch_size=8) == result
    assert evaluate_contrastive_loss(encoder, store, batch_size=8, shuffle_seed=1) != result


class _CopyingEncoder(torch.nn.Module):
    """Embeds each modality of a window as its per-epoch RMS profile: the toy store's shared envelope."""

    modalities = ("eeg", "ecg", "hr")

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.1)))

    def encode(self, batch, modalities=None):
        from s2v_core.model import EncoderOutput

        per_modality = {}
        for key in modalities:
            profile = batch[key].pow(2).mean(-1).sqrt()  # (B, E)
            profile = profile - profile.mean(-1, keepdim=True)
            per_modality[key] = torch.nn.functional.normalize(profile, dim=-1)[:, None, :].expand(
                -1, profile.shape[1], -1
            )
        fused = torch.stack(list(per_modality.values())).mean(0)
        return EncoderOutput(
            per_modality=per_modality, present=batch["present"].bool(), fused=fused, window=fused.mean(1)
        )


def test_held_out_validator_scores_val_subjects_against_chance(tmp_path):
    from pipelines.validation import HeldOutValidator
    from s2v_core.store import split_files

    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=6,
        windows_per_recording=6,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "hr"),
        val_per_site=3,
    )
    files, filesystem = split_files(str(store), ["val"])
    validator = HeldOutValidator(
        files,
        filesystem,
        modalities=("eeg", "ecg", "hr"),
        epochs_per_window=4,
        max_epochs=4 * 30,
        batch_size=12,
        seed=0,
    )
    assert validator.windows == 30 and validator.pairs == [("eeg", "ecg"), ("eeg", "hr"), ("ecg", "hr")]
    copying = validator(_CopyingEncoder())
    torch.manual_seed(0)
    random = validator(SleepEncoder(model_config("tiny", modality_dropout=0.0), ("eeg", "ecg", "hr")))
    for pair in ("eeg-ecg", "eeg-hr", "ecg-hr"):
        # Chance: the mean log number of candidates, and k / N for retrieval.
        assert copying[f"val/{pair}/chance_top1"] == pytest.approx(1 / copying[f"val/{pair}/n"])
        assert copying[f"val/{pair}/chance_loss"] == pytest.approx(random[f"val/{pair}/chance_loss"])
        assert copying[f"val/{pair}/loss_ratio"] < 0.6 < random[f"val/{pair}/loss_ratio"]
        assert copying[f"val/{pair}/top1_over_chance"] > 5
    assert copying["val/loss_ratio_mean"] < 0.6 and copying["val/windows"] == 30
    # A val split with no subject gives a validator that scores nothing (the run logs a warning).
    assert not HeldOutValidator([], None, modalities=("eeg",), epochs_per_window=4, max_epochs=40, batch_size=4)
