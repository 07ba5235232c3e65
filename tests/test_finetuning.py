"""Gated fusion, task heads, frozen/LoRA/full tuning and the fine-tuned model directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2v_core.finetuning import (
    ADAPTER_FILE,
    FineTunedModel,
    FinetuneSpec,
    GatedFusion,
    drop_modalities,
    load_finetuned,
    save_finetuned,
)
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.model import SleepEncoder, batch_to_tensors, model_config

MODALITIES = ("eeg", "ecg", "spo2")
EEG, ECG, SPO2 = (MODALITY_KEYS.index(k) for k in MODALITIES)


def _encoder(seed: int = 0) -> SleepEncoder:
    torch.manual_seed(seed)
    return SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=4), MODALITIES)


def _batch(rows: int = 6, epochs: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch = {k: torch.randn(rows, epochs, get_modality(k).samples_per_epoch, generator=generator) for k in MODALITIES}
    present = torch.zeros(rows, len(MODALITY_KEYS), dtype=torch.bool)
    present[:, [EEG, ECG, SPO2]] = True
    present[0, [ECG, SPO2]] = False  # a window with EEG only
    batch["present"] = present
    batch["stages"] = torch.randint(0, 5, (rows, epochs), generator=generator)
    return batch


def test_gated_fusion_softmax_over_present_modalities():
    fusion = GatedFusion()
    with torch.no_grad():
        fusion.gate[EEG], fusion.gate[ECG], fusion.gate[SPO2] = 1.0, 0.0, 5.0
    hidden = {
        "eeg": torch.full((3, 2, 4), 1.0),
        "ecg": torch.full((3, 2, 4), 10.0),
        "spo2": torch.full((3, 2, 4), 100.0),
    }
    present = torch.zeros(3, len(MODALITY_KEYS), dtype=torch.bool)
    present[0, EEG] = True  # one modality: used as it is
    present[1, [EEG, ECG]] = True  # spo2 absent: its large gate must not matter
    present[2, [EEG, ECG, SPO2]] = True
    hidden["spo2"][1] = float("nan")  # whatever an absent row holds stays out
    fused = fusion(hidden, present)
    weights = fusion.weights(present, list(hidden)).detach()
    assert torch.allclose(fused[0], torch.ones(2, 4))
    expected = (np.e * 1.0 + 1.0 * 10.0) / (np.e + 1.0)
    assert torch.allclose(fused[1], torch.full((2, 4), expected, dtype=torch.float32))
    assert weights[1, 2] == 0 and weights[1].sum() == pytest.approx(1.0)
    full = torch.softmax(torch.tensor([1.0, 0.0, 5.0]), 0)
    assert torch.allclose(weights[2], full)


def test_gated_fusion_window_without_modality_is_zero_and_gates_learn():
    fusion = GatedFusion()
    hidden = {"eeg": torch.randn(2, 3, 4, requires_grad=True), "ecg": torch.randn(2, 3, 4)}
    present = torch.zeros(2, len(MODALITY_KEYS), dtype=torch.bool)
    present[1, [EEG, ECG]] = True
    fused = fusion(hidden, present)
    assert torch.equal(fused[0], torch.zeros(3, 4))
    fused.sum().backward()
    assert fusion.gate.grad[EEG] != 0 and fusion.gate.grad[SPO2] == 0


def test_drop_modalities_never_empties_a_window():
    torch.manual_seed(0)
    present = torch.zeros(200, len(MODALITY_KEYS), dtype=torch.bool)
    present[:, [EEG, ECG]] = True
    dropped = drop_modalities(present, 0.9)
    assert dropped.any(dim=1).all()
    assert not (dropped & ~present).any()
    assert dropped.sum() < present.sum()


@pytest.mark.parametrize("head", ["linear", "mlp", "temporal"])
def test_heads_shapes_for_epoch_and_night_tasks(head):
    batch = _batch()
    staging = FineTunedModel(_encoder(), FinetuneSpec(task="staging4", head=head)).eval()
    assert staging(batch).shape == (6, 4, 4)
    age = FineTunedModel(_encoder(), FinetuneSpec(task="age", head=head)).eval()
    assert age(batch).shape == (6, 1)


def test_temporal_head_reads_longer_sequences_than_training_windows():
    model = FineTunedModel(_encoder(), FinetuneSpec(task="staging", head="temporal")).eval()
    features = torch.randn(1, 40, 16)
    assert model.head(features).shape == (1, 40, 5)


def _train(model: FineTunedModel, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = _batch(seed=step)
        target = torch.from_numpy(model.task.stage_targets(batch["stages"].numpy()))
        loss = model.task.loss(model(batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_lora_adapters_train_and_base_weights_stay_bit_identical():
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = FineTunedModel(encoder, FinetuneSpec(task="staging", mode="lora", lora_r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert all(n.startswith(("fusion.", "head.")) or ".lora_" in n for n in trainable)
    assert any("fc1" in n for n in trainable) and any("q_proj" in n for n in trainable)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    _train(model)
    after = {k.replace(".base_layer.", "."): v for k, v in model.encoder.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    changed = [n for n, p in model.named_parameters() if ".lora_B." in n and not torch.equal(p, lora_before[n])]
    assert changed  # lora_B starts at zero: a step moved it


def test_frozen_mode_trains_only_fusion_and_head():
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = FineTunedModel(encoder, FinetuneSpec(task="staging", mode="frozen", head="mlp"))
    head_before = model.head.out.weight.detach().clone()
    _train(model)
    assert all(torch.equal(v, before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.head.out.weight, head_before)
    assert model.encoder.training is False


def test_full_mode_trains_the_backbone_but_not_frozen_tokenizers():
    encoder = _encoder()
    q_before = encoder.backbone.layers[0].attn.q_proj.weight.detach().clone()
    tokenizer_before = {k: v.clone() for k, v in encoder.tokenizers.state_dict().items()}
    model = FineTunedModel(encoder, FinetuneSpec(task="staging", mode="full"))
    _train(model)
    assert not torch.equal(encoder.backbone.layers[0].attn.q_proj.weight, q_before)
    assert all(torch.equal(v, tokenizer_before[k]) for k, v in encoder.tokenizers.state_dict().items())


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_parameter_groups_cover_every_trained_weight_once_with_the_head_at_its_own_rate(mode):
    model = FineTunedModel(_encoder(), FinetuneSpec(task="staging", mode=mode, head="mlp"))
    groups = model.parameter_groups(lr=1e-4, head_lr=1e-3)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.trainable_parameters())
    head = {id(p) for m in (model.fusion, model.head) for p in m.parameters()}
    assert all(g["lr"] == (1e-3 if id(g["params"][0]) in head else 1e-4) for g in groups)
    assert len(groups) == (1 if mode == "frozen" else 2)
    assert {g["lr"] for g in model.parameter_groups(lr=1e-4)} == {1e-4}


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_save_and_load_round_trip(tmp_path, mode):
    model = FineTunedModel(
        _encoder(), FinetuneSpec(task="staging3", mode=mode, head="temporal", modalities=("eeg", "ecg"))
    )
    _train(model, steps=2)
    model.eval()
    batch = _batch(seed=9)
    with torch.no_grad():
        expected = model(batch)
    directory = save_finetuned(model, tmp_path / "model", extra={"metrics": {"kappa": 0.5}})
    assert (directory / ADAPTER_FILE).is_file() == (mode == "lora")
    loaded = load_finetuned(directory)
    assert loaded.spec.modalities == ("eeg", "ecg") and loaded.task.name == "staging3"
    with torch.no_grad():
        assert torch.allclose(loaded(batch), expected, atol=1e-6)


def test_spec_rejects_bad_options():
    with pytest.raises(ValueError, match="--mode: expected one of frozen, lora, full, found 'adapter'"):
        FinetuneSpec(mode="adapter")
    with pytest.raises(ValueError, match="--lora-targets"):
        FinetuneSpec(lora_targets=("qkv",))
    with pytest.raises(ValueError, match="--modalities: hr not built into the encoder"):
        FineTunedModel(_encoder(), FinetuneSpec(modalities=("hr",)))


def test_night_task_targets_and_per_night_pooling(tmp_path):
    import pyarrow.parquet as pq

    from s2v_core.finetuning import batch_targets, predict
    from s2v_core.store import table_to_batch
    from s2v_core.toystore import write_toy_store

    store = write_toy_store(
        tmp_path / "store",
        sites=1,
        recordings_per_site=3,
        windows_per_recording=3,
        epochs_per_window=4,
        modalities=("hr", "spo2"),
        seed=1,
    )
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=4), ("hr", "spo2"))
    model = FineTunedModel(encoder, FinetuneSpec(task="ahi", head="mlp"))
    tables = [pq.read_table(path) for path in sorted(store.glob("site=*/*.parquet"))]
    batches = [
        table_to_batch(t, modalities=("hr", "spo2"), epochs_per_window=4, history_columns=("ahi",)) for t in tables
    ]
    first = batch_targets(model.task, batches[0])
    assert first.shape == (3,) and np.all(first == first[0]) and first[0] > 0  # one AHI per night
    target, output = predict(model, batches)
    assert target.shape == (3,) and output.shape == (3, 1)  # three nights, window outputs averaged
    with torch.no_grad():
        expected = model.eval()(batch_to_tensors(batches[1])).mean(0)
    night = np.flatnonzero(target == batch_targets(model.task, batches[1])[0])[0]
    assert output[night, 0] == pytest.approx(float(expected[0]), rel=1e-5)
    figures = model.task.metrics(target, output)
    assert {"mae", "pearson_r", "icc", "severity_kappa"} <= set(figures)


def test_windows_longer_than_the_encoder_are_encoded_in_chunks():
    model = FineTunedModel(_encoder(), FinetuneSpec(task="staging", head="temporal")).eval()  # encoder: 4 epochs
    batch = _batch(rows=2, epochs=10)
    with torch.no_grad():
        features = model.features(batch)
        pieces = [
            model.features({**{k: batch[k][:, a:b] for k in MODALITIES}, "present": batch["present"]})
            for a, b in ((0, 4), (4, 8), (8, 10))
        ]
        assert model(batch).shape == (2, 10, 5)  # the temporal head reads all 10 epochs at once
    assert features.shape == (2, 10, 16)
    assert torch.allclose(features, torch.cat(pieces, dim=1))
    with pytest.raises(ValueError, match="exceed the model's epochs_per_window"):
        model.encoder.encode(batch)  # what the chunks avoid
