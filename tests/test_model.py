"""The sleep2vec encoder: named sizes, any-subset encoding, masking, checkpoints, overfitting."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2v_core.losses import dash_infonce
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.model import (
    ModelConfig,
    SleepEncoder,
    available_model_configs,
    batch_to_tensors,
    count_parameters,
    load_encoder,
    model_config,
    pool_night,
    save_encoder,
)
from s2v_core.store import open_store, table_to_batch
from s2v_core.toystore import write_toy_store

EPOCHS = 3


def random_batch(rows: int, modalities, *, epochs: int = EPOCHS, present=None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch = {
        key: torch.randn(rows, epochs, get_modality(key).samples_per_epoch, generator=generator) for key in modalities
    }
    if present is None:
        present = torch.zeros(rows, len(MODALITY_KEYS), dtype=torch.bool)
        for key in modalities:
            present[:, MODALITY_KEYS.index(key)] = True
    batch["present"] = present
    return batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waiting on busy 2-core runners."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SleepEncoder(model_config("tiny")).eval()


# -- named sizes ----------------------------------------------------------------------------------


def test_named_sizes_are_shipped_and_headed_by_their_command():
    names = available_model_configs()
    assert {"tiny", "small", "base", "large"} <= set(names)
    from importlib import resources

    for name in names:
        text = resources.files("s2v_core").joinpath("configs", "model", f"{name}.toml").read_text()
        assert text.startswith("# s2v pretrain"), name
        config = model_config(name)
        assert config.name == name and config.width % config.heads == 0


def test_base_is_the_papers_backbone_and_sizes_grow():
    base = model_config("base")
    assert (base.width, base.depth) == (768, 12)
    widths = [model_config(n).width for n in ("tiny", "small", "base", "large")]
    assert widths == sorted(widths)


def test_width_and_depth_overrides_keep_the_name():
    config = model_config("tiny", width=64, depth=3, heads=None)
    assert (config.name, config.width, config.depth, config.heads) == ("tiny", 64, 3, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 8


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: model_config("huge"), ["huge", "tiny", "small", "base", "large"]),
        (lambda: model_config("tiny", widht=64), ["widht", "width"]),
        (lambda: model_config("tiny", width=30, heads=4), ["divisible", "heads"]),
        (lambda: model_config("tiny", modality_dropout=1.0), ["modality_dropout"]),
        (lambda: ModelConfig(depth=0), ["depth"]),
    ],
)
def test_bad_configs_are_value_errors_that_say_why(call, words):
    with pytest.raises(ValueError) as error:
        call()
    assert all(word in str(error.value) for word in words)


def test_parameter_count_is_counted_and_excludes_embeddings():
    small, wide = SleepEncoder(model_config("tiny")), SleepEncoder(model_config("tiny", width=64))
    everything = sum(p.numel() for p in small.parameters())
    assert count_parameters(small, non_embedding=False) == everything
    backbone = sum(p.numel() for m in (small.backbone, small.head) for p in m.parameters())
    assert count_parameters(small) == backbone
    assert count_parameters(wide) > count_parameters(small)
    # N of the scaling laws does not depend on how many tokenizers were built.
    assert count_parameters(SleepEncoder(model_config("tiny"), ["eeg"])) == backbone


# -- encoding any subset --------------------------------------------------------------------------

SUBSETS = [("spo2",), ("eeg",), MODALITY_KEYS, ("eeg", "ecg", "airflow"), ("hr", "thorax", "emg", "eog")]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s))
def test_shapes_and_masking_for_random_subsets(encoder, subset):
    rows = 6
    generator = torch.Generator().manual_seed(len(subset))
    present = torch.zeros(rows, len(MODALITY_KEYS), dtype=torch.bool)
    for key in subset:
        present[:, MODALITY_KEYS.index(key)] = torch.rand(rows, generator=generator) < 0.7
    present[0] = False  # a window with none of the modalities
    for key in subset:
        present[1, MODALITY_KEYS.index(key)] = True
    batch = random_batch(rows, subset, present=present)
    with torch.no_grad():
        out = encoder.encode(batch)
    p_dim = encoder.config.projection_dim
    assert sorted(out.per_modality) == sorted(subset)
    assert torch.equal(out.present, present)
    assert out.fused.shape == (rows, EPOCHS, p_dim) and out.window.shape == (rows, p_dim)
    stack, mask = [], []
    for key in subset:
        z, here = out.per_modality[key], present[:, MODALITY_KEYS.index(key)]
        assert z.shape == (rows, EPOCHS, p_dim)
        assert torch.allclose(z[here].norm(dim=-1), torch.ones(1), atol=1e-5)
        assert torch.all(z[~here] == 0)
        stack.append(z)
        mask.append(here)
    expected = F.normalize(torch.stack(stack).sum(0), dim=-1)
    assert torch.allclose(out.fused, expected, atol=1e-6)
    assert torch.all(out.fused[0] == 0) and torch.all(out.window[0] == 0)
    assert torch.allclose(out.window[1:].norm(dim=-1)[present[1:].any(1)], torch.ones(1), atol=1e-5)


def test_an_absent_modality_contributes_nothing(encoder):
    batch = random_batch(4, ("eeg", "ecg", "spo2"))
    batch["present"][:, MODALITY_KEYS.index("ecg")] = torch.tensor([True, False, True, False])
    with torch.no_grad():
        before = encoder.encode(batch)
        batch["ecg"][[1, 3]] = 1e3 * torch.randn(2, EPOCHS, get_modality("ecg").samples_per_epoch)
        after = encoder.encode(batch)
        without = encoder.encode({k: v for k, v in batch.items() if k != "ecg"})
    assert torch.allclose(before.fused[[1, 3]], after.fused[[1, 3]])
    # Windows 1 and 3 lack ECG, so leaving the ECG column out entirely changes nothing for them.
    assert torch.allclose(after.fused[[1, 3]], without.fused[[1, 3]], atol=1e-6)


def test_modalities_argument_selects_a_subset_and_windows_are_independent(encoder):
    batch = random_batch(5, MODALITY_KEYS)
    with torch.no_grad():
        chosen = encoder.encode(batch, modalities=["ecg", "eeg"])
        alone = encoder.encode({k: v[2:3] for k, v in batch.items()}, modalities=["eeg", "ecg"])
    assert sorted(chosen.per_modality) == ["ecg", "eeg"]
    assert chosen.present.sum().item() == 10
    assert torch.allclose(chosen.window[2:3], alone.window, atol=1e-5)


def test_encode_rejects_what_it_cannot_encode():
    eeg_only = SleepEncoder(model_config("tiny"), ["eeg"]).eval()
    batch = random_batch(2, ("eeg", "ecg"))
    with pytest.raises(ValueError, match="not built"):
        eeg_only.encode(batch, modalities=["ecg"])
    with pytest.raises(ValueError, match="3840"):
        eeg_only.encode({"eeg": torch.zeros(2, EPOCHS, 100), "present": batch["present"]})
    with pytest.raises(ValueError, match="epochs_per_window"):
        eeg_only.encode(random_batch(2, ("eeg",), epochs=11))
    with pytest.raises(ValueError, match="empty"):
        eeg_only.encode(batch, modalities=[])
    with pytest.raises(KeyError, match="unknown modality"):
        SleepEncoder(model_config("tiny"), ["eeg", "ppg"])
    assert SleepEncoder(model_config("tiny"), "ecg,eeg").modalities == ("eeg", "ecg")


def test_modality_dropout_only_in_training_and_never_empties_a_window():
    torch.manual_seed(1)
    model = SleepEncoder(model_config("tiny", modality_dropout=0.9), ["eeg", "hr", "spo2"])
    batch = random_batch(64, ("eeg", "hr", "spo2"))
    batch["present"][:8] = False  # windows with nothing stay empty
    model.train()
    out = model.encode(batch)
    assert not torch.any(out.present & ~batch["present"])
    assert torch.all(out.present[8:].sum(1) >= 1) and not out.present[:8].any()
    assert out.present.sum() < batch["present"].sum()  # something was dropped
    model.eval()
    assert torch.equal(model.encode(batch).present, batch["present"])


def test_temperature_parameter_follows_the_config():
    learnt = SleepEncoder(model_config("tiny", init_temperature=0.1))
    fixed = SleepEncoder(model_config("tiny", learn_temperature=False))
    assert math.isclose(learnt.logit_scale.item(), math.log(10.0), rel_tol=1e-6)
    assert learnt.logit_scale.requires_grad and not fixed.logit_scale.requires_grad
    out = learnt.encode(random_batch(2, MODALITY_KEYS))
    out.logit_scale.backward()  # the forward's copy feeds the parameter's gradient
    assert out.logit_scale.item() == learnt.logit_scale.item() and learnt.logit_scale.grad.item() == 1.0


# -- store batches, pooling, checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def toy_batch(tmp_path_factory):
    root = write_toy_store(
        tmp_path_factory.mktemp("toy"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=2,
        epochs_per_window=EPOCHS,
        seed=3,
    )
    table = open_store(str(root)).to_table()
    return table_to_batch(table, epochs_per_window=EPOCHS, history_columns=["hypertension"])


def test_batch_to_tensors_keeps_dtypes_the_model_and_loss_need(toy_batch):
    batch = batch_to_tensors(toy_batch)
    assert batch["eeg"].dtype == torch.float32 and batch["present"].dtype == torch.bool
    assert batch["night_id"].dtype == torch.int64 and batch["age"].dtype == torch.float32
    assert batch["history"].shape == (12, 1)
    with torch.no_grad():
        out = SleepEncoder(model_config("tiny")).eval().encode(batch)
    assert torch.equal(out.present, batch["present"])
    assert not out.present.all()  # the toy store drops a modality in every third night


def test_pool_night_means_the_windows_of_each_night():
    windows = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [1.0, 1.0]], dtype=np.float32)
    nights, pooled = pool_night(windows, ["b", "a", "b", "a"])
    assert list(nights) == ["a", "b"]
    np.testing.assert_allclose(pooled[0], np.array([0.5, 1.0]) / np.linalg.norm([0.5, 1.0]), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], np.array([2.0, 2.0]) / np.linalg.norm([2.0, 2.0]), rtol=1e-6)
    ids, as_tensor = pool_night(torch.from_numpy(windows), torch.tensor([7, 7, 7, 9]))
    assert isinstance(as_tensor, torch.Tensor) and list(ids) == [7, 9]
    with pytest.raises(ValueError, match="one night id per window"):
        pool_night(windows, [1, 2])


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(2)
    model = SleepEncoder(model_config("tiny", width=16, heads=2), ["eeg", "spo2"]).eval()
    directory = save_encoder(model, tmp_path / "ckpt")
    described = json.loads((directory / "model_config.json").read_text())
    assert described["modalities"] == ["eeg", "spo2"] and described["config"]["width"] == 16
    loaded = load_encoder(directory)
    batch = random_batch(3, ("eeg", "spo2"))
    with torch.no_grad():
        assert torch.equal(model.encode(batch).fused, loaded.encode(batch).fused)
    assert loaded.config == model.config and not loaded.training
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_encoder(tmp_path / "nowhere")


# -- learning -------------------------------------------------------------------------------------


def test_tiny_model_overfits_a_handful_of_windows(toy_batch):
    torch.manual_seed(0)
    keys = ("eeg", "ecg", "spo2", "airflow")
    batch = batch_to_tensors({k: v[:8] for k, v in toy_batch.items() if k not in set(MODALITY_KEYS) - set(keys)})
    model = SleepEncoder(model_config("tiny", modality_dropout=0.0), keys).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model.encode(batch)
        result = dash_infonce(out.per_modality, out.present, batch, logit_scale=model.logit_scale)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
        losses.append(result.loss.item())
    # Chance is about log(number of candidates); the model must get far below it.
    assert losses[0] > 0.5 * math.log(8)
    assert losses[-1] < 0.2 * math.log(8)


def test_every_parameter_gets_a_gradient_even_when_a_modality_is_absent():
    """Data-parallel wrappers need the same set of gradients on every worker, whatever it saw."""
    model = SleepEncoder(model_config("tiny", modality_dropout=0.0), ["eeg", "ecg", "spo2"]).train()
    batch = random_batch(4, ("eeg", "ecg"))  # no SpO2 in this step
    batch.update(
        age=torch.full((4,), 40.0),
        sex=torch.zeros(4),
        site_id=torch.zeros(4, dtype=torch.int64),
        night_id=torch.arange(4),
    )
    out = model.encode(batch)
    dash_infonce(out.per_modality, out.present, batch, logit_scale=model.logit_scale).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.all(p.grad == 0) for p in model.tokenizers["spo2"].parameters())


def test_an_epochs_amplitude_reaches_its_token():
    """Amplitude relative to the night (N3 slow waves, desaturations) is signal, not nuisance."""
    torch.manual_seed(3)
    tokenizer = SleepEncoder(model_config("tiny"), ["eeg"]).tokenizers["eeg"]
    epoch = torch.randn(1, 1, get_modality("eeg").samples_per_epoch)
    with torch.no_grad():
        quiet, loud = tokenizer(epoch), tokenizer(4.0 * epoch)
    assert F.cosine_similarity(quiet, loud, dim=-1).item() < 0.99


# -- features, masking, long context ------------------------------------------------------------------


def paper_model(modalities=("eeg", "ecg", "hr"), **overrides):
    options = dict(tokenizer="mlp", position="rotary", head="simclr", mask_tokens=True, modality_dropout=0.0)
    options.update(overrides)
    return SleepEncoder(model_config("tiny", **options), modalities)


def test_hidden_states_are_returned_per_modality_and_fused_over_present_ones(encoder):
    batch = random_batch(4, ("eeg", "ecg", "spo2"))
    batch["present"][1, MODALITY_KEYS.index("ecg")] = False
    batch["present"][3] = False
    with torch.no_grad():
        out = encoder.encode(batch)
    width = encoder.config.width
    assert out.hidden["eeg"].shape == (4, EPOCHS, width) and out.window_hidden.shape == (4, width)
    assert torch.all(out.hidden["ecg"][1] == 0) and torch.all(out.fused_hidden[3] == 0)
    expected = (out.hidden["eeg"][1] + out.hidden["spo2"][1]) / 2
    assert torch.allclose(out.fused_hidden[1], expected, atol=1e-6)
    assert torch.allclose(out.window_hidden, out.fused_hidden.mean(1))
    # The projection is the head's, on those hidden states.
    assert torch.allclose(
        out.per_modality["eeg"][0], F.normalize(encoder.head(out.hidden["eeg"][0]), dim=-1), atol=1e-6
    )


def test_token_masking_replaces_the_requested_fraction_and_trains_the_mask_token():
    torch.manual_seed(4)
    model = paper_model(("eeg", "hr")).train()
    batch = random_batch(40, ("eeg", "hr"), epochs=10)
    tokens = {}
    for key in ("eeg", "hr"):
        model.tokenizers[key].register_forward_hook(lambda m, i, o, key=key: tokens.__setitem__(key, o))
    # Capture what the backbone receives: tokens plus modality embedding.
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = model.encode(batch, mask_rate=0.15)
    received = seen[0].view(2, 40, 10, -1)
    masked = []
    for m, key in enumerate(("eeg", "hr")):
        index = MODALITY_KEYS.index(key)
        expected_mask = model.mask_embedding.weight[index] + model.modality_embedding.weight[index]
        is_mask = torch.isclose(received[m], expected_mask, atol=1e-6).all(-1)
        unmasked = torch.isclose(received[m], tokens[key] + model.modality_embedding.weight[index], atol=1e-6).all(-1)
        assert torch.all(is_mask ^ unmasked)
        masked.append(is_mask.float().mean().item())
    # 400 tokens per modality: a binomial(400, 0.15) fraction lies in [0.09, 0.21] with p > 0.999.
    assert all(0.09 < rate < 0.21 for rate in masked), masked
    meta = {"night_id": torch.arange(40), "site_id": torch.zeros(40, dtype=torch.int64)}
    dash_infonce(out.per_modality, out.present, meta, logit_scale=out.logit_scale).loss.backward()
    grad = model.mask_embedding.weight.grad
    assert grad[MODALITY_KEYS.index("eeg")].abs().sum() > 0 and grad[MODALITY_KEYS.index("spo2")].abs().sum() == 0
    model.eval()
    with torch.no_grad():  # eval mode: nothing is masked
        assert torch.equal(model.encode(batch, mask_rate=0.15).fused, model.encode(batch).fused)
    with pytest.raises(ValueError, match="mask_tokens"):
        SleepEncoder(model_config("tiny"), ("eeg",)).encode(random_batch(2, ("eeg",)), mask_rate=0.15)


def test_a_rotary_encoder_trained_on_10_epoch_windows_encodes_a_120_epoch_sequence():
    torch.manual_seed(5)
    keys = ("eeg", "hr")
    model = paper_model(keys, mask_tokens=False).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = random_batch(6, keys, epochs=10)
    meta = {"night_id": torch.arange(6), "site_id": torch.zeros(6, dtype=torch.int64)}
    for _ in range(3):
        out = model.encode(batch)
        loss = dash_infonce(out.per_modality, out.present, meta, logit_scale=out.logit_scale).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    night = random_batch(2, keys, epochs=120, seed=9)
    with torch.no_grad():
        out = model.encode(night)
        alone = model.encode({k: (v[:, 40:50] if k in keys else v) for k, v in night.items()})
    assert out.fused.shape == (2, 120, model.config.projection_dim) and torch.isfinite(out.fused).all()
    assert out.window_hidden.shape == (2, model.config.width)
    # Context matters: an epoch seen inside the night is not encoded as in a 10-epoch window alone.
    assert not torch.allclose(out.fused[:, 40:50], alone.fused, atol=1e-3)
    absolute = SleepEncoder(model_config("tiny"), keys).eval()
    with pytest.raises(ValueError, match="epochs_per_window"):
        absolute.encode(night)


def test_simclr_encoder_round_trips_with_its_batchnorm_statistics(tmp_path):
    torch.manual_seed(7)
    model = paper_model().train()
    model.encode(random_batch(5, ("eeg", "ecg", "hr")))  # moves the running statistics
    model.eval()
    loaded = load_encoder(save_encoder(model, tmp_path / "enc"))
    batch = random_batch(3, ("eeg", "ecg", "hr"), seed=2)
    with torch.no_grad():
        assert torch.equal(model.encode(batch).fused, loaded.encode(batch).fused)
    assert torch.equal(loaded.head.bn1.running_mean, model.head.bn1.running_mean)
    assert model.set_batchnorm_reducer(None) == 2 and encoder_reducer_count() == 0


def encoder_reducer_count():
    return SleepEncoder(model_config("tiny"), ("eeg",)).set_batchnorm_reducer(lambda t: t)


def test_compiled_blocks_keep_weights_and_outputs():
    model = paper_model(("eeg", "hr")).eval()
    batch = random_batch(2, ("eeg", "hr"))
    with torch.no_grad():
        before = model.encode(batch).fused
        keys = set(model.state_dict())
        model.compile_blocks(backend="eager")
        after = model.encode(batch).fused
    assert set(model.state_dict()) == keys and torch.allclose(before, after, atol=1e-6)


@pytest.mark.parametrize("preset", ["project", "paper"])
def test_a_batch_of_zero_rows_encodes_to_zero_rows(preset):
    # An embedding block can hold no window with the requested sensors (EEG-only scenario, a
    # home-sleep-test night): the encoder must return empty outputs, not fail a reshape.
    from s2v_core.architecture import resolve_model_config
    from s2v_core.objective import load_objective

    config = resolve_model_config("tiny", overrides=load_objective(preset).model_overrides())
    encoder = SleepEncoder(config, ("eeg", "ecg")).eval()
    with torch.inference_mode():
        out = encoder.encode(random_batch(0, ("eeg", "ecg")), modalities=["eeg", "ecg"])
    width = encoder.config.width
    assert out.fused_hidden.shape == (0, EPOCHS, width) and out.window_hidden.shape == (0, width)
    assert out.fused.shape[:2] == (0, EPOCHS) and out.window.shape[0] == 0
