"""The whole-night second stage: it sees context across the night, never across nights, and learns from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s2v_core.evaluation.tasks import get_task
from s2v_core.night_context import (
    NightContextHead,
    NightSequence,
    night_features,
    predict_nights,
    train_night_head,
)


def test_an_epoch_reads_a_distant_epoch_of_its_own_night_only():
    torch.manual_seed(0)
    head = NightContextHead(16, 5, depth=1, heads=2, hidden=32, dropout=0.0).eval()
    night = torch.randn(400, 16)
    other = torch.randn(300, 16)
    with torch.no_grad():
        before = head(night)
        changed = night.clone()
        changed[350] = 3.0 * torch.randn(16)  # 175 min after epoch 0
        after = head(changed)
        assert (before[0] - after[0]).abs().max() > 1e-4  # epoch 0 saw epoch 350
        # Nights go through one at a time: another night's output is the same whatever this one holds.
        assert torch.equal(head(other), head(other.clone()))
    nights = [
        NightSequence(night.numpy(), np.zeros(400, np.int64)),
        NightSequence(other.numpy(), np.ones(300, np.int64)),
    ]
    _, outputs = predict_nights(head, nights, get_task("staging"))
    nights[0] = NightSequence(changed.numpy(), np.zeros(400, np.int64))
    _, outputs_changed = predict_nights(head, nights, get_task("staging"))
    np.testing.assert_allclose(outputs[400:], outputs_changed[400:])  # night 2 untouched by night 1's change
    assert not np.allclose(outputs[:400], outputs_changed[:400])
    with pytest.raises(ValueError, match="one night at a time"):
        head(torch.randn(2, 10, 16))


def _context_nights(count: int, rng: np.random.Generator) -> list[NightSequence]:
    """Every epoch of a night has the night's class; one epoch alone shows it only faintly.

    Feature 0 is +0.5 or -0.5 (the class) plus unit noise: the best guess from one epoch is right
    69 % of the time (Phi(0.5)), the mean over a night's 60 epochs about 100 %.
    """
    nights = []
    for _ in range(count):
        label = int(rng.integers(0, 2))
        features = rng.normal(size=(60, 8)).astype(np.float32)
        features[:, 0] += 0.5 if label else -0.5
        nights.append(NightSequence(features, np.full(60, label, dtype=np.int64)))
    return nights


def test_training_learns_what_only_the_rest_of_the_night_says():
    """Above 90 % accuracy is out of reach of any per-epoch classifier here (69 % at best)."""
    task = get_task("staging3")  # 3 classes, the nights use two
    rng = np.random.default_rng(0)
    train, val, test = _context_nights(40, rng), _context_nights(10, rng), _context_nights(20, rng)
    head, history = train_night_head(
        train, val, task, steps=120, eval_every=20, patience=3, depth=1, heads=2, hidden=32, dropout=0.0, lr=3e-3
    )
    figures = task.metrics(*predict_nights(head, test, task))
    assert figures["accuracy"] > 0.9, figures
    assert history["best_step"] is not None and history["best_score"] > 0.8
    with pytest.raises(ValueError, match="not an epoch-level task"):
        train_night_head(train, val, get_task("age"))


def _with_stage1(
    nights: list[NightSequence], rng: np.random.Generator, *, strength: float, classes: int = 3
) -> list[NightSequence]:
    """Give each night stage-1 logits that favour its class by ``strength`` with unit noise per epoch."""
    out = []
    for night in nights:
        logits = rng.normal(size=(night.target.size, classes)).astype(np.float32)
        logits[np.arange(night.target.size), night.target] += strength
        out.append(NightSequence(night.features, night.target, logits))
    return out


def test_a_residual_head_starts_as_stage_1_and_is_kept_only_where_it_beats_it_on_val():
    task = get_task("staging3")
    rng = np.random.default_rng(1)
    train, val, test = (_with_stage1(_context_nights(n, rng), rng, strength=1.0) for n in (40, 10, 20))
    head = NightContextHead(8, 3, depth=1, heads=2, hidden=16, residual=True)
    stage1 = torch.from_numpy(train[0].stage1)
    with torch.no_grad():
        torch.testing.assert_close(head(torch.from_numpy(train[0].features), stage1), stage1)
    with pytest.raises(ValueError, match="a residual head needs stage 1's outputs"):
        head(torch.from_numpy(train[0].features))
    alone = task.metrics(*predict_nights(head, val, task))["kappa"]  # the untrained head is stage 1
    trained, history = train_night_head(
        train,
        val,
        task,
        steps=120,
        eval_every=20,
        patience=3,
        depth=1,
        heads=2,
        hidden=32,
        dropout=0.0,
        lr=3e-3,
        residual=True,
    )
    assert history["best_score"] >= alone  # step 0 counts: never worse than stage 1 on val
    stage1_test = task.metrics(*predict_nights(head, test, task))["accuracy"]
    assert task.metrics(*predict_nights(trained, test, task))["accuracy"] > max(0.9, stage1_test)
    # Nothing to learn from (the features carry no class): the head kept is stage 1 itself.
    blind = [NightSequence(np.zeros_like(n.features), n.target, n.stage1) for n in train]
    _, nothing = train_night_head(blind, val, task, steps=40, eval_every=20, patience=1, residual=True, lr=1e-6)
    assert nothing["best_step"] == 0 and nothing["best_score"] == pytest.approx(alone)
    with pytest.raises(ValueError, match="needs every night's stage-1 outputs"):
        train_night_head(_context_nights(3, rng), val, task, residual=True)


def test_night_features_group_and_order_windows_by_night():
    from s2v_core.finetuning import FineTunedModel, FinetuneSpec
    from s2v_core.model import SleepEncoder, batch_to_tensors, model_config

    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=2), ("hr",))
    model = FineTunedModel(encoder, FinetuneSpec(task="staging"))
    rng = np.random.default_rng(0)
    batch = {
        "hr": rng.normal(size=(5, 2, 120)).astype(np.float32),
        "present": np.zeros((5, 9), bool),
        "stages": rng.integers(0, 5, size=(5, 2)),
        "night_id": np.array([7, 7, 7, 9, 9]),
        "window_index": np.array([0, 1, 2, 0, 1]),
    }
    batch["present"][:, 3] = True
    with torch.no_grad():
        expected = model.eval().features(batch_to_tensors(batch)).numpy()
        logits = model(batch_to_tensors(batch)).numpy()
    order = np.array([4, 2, 0, 3, 1])
    shuffled = {k: v[order] for k, v in batch.items()}
    nights = night_features(model, [{k: v[:3] for k, v in shuffled.items()}, {k: v[3:] for k, v in shuffled.items()}])
    by_length = {len(n.target): n for n in nights}
    np.testing.assert_allclose(by_length[6].features, expected[:3].reshape(6, 16), rtol=1e-5)
    np.testing.assert_allclose(by_length[4].features, expected[3:].reshape(4, 16), rtol=1e-5)
    assert by_length[6].target.tolist() == batch["stages"][:3].reshape(-1).tolist()
    np.testing.assert_allclose(by_length[4].stage1, logits[3:].reshape(4, 5), rtol=1e-5, atol=1e-6)  # its own head


def test_a_saved_head_is_found_in_the_model_directory_and_gives_the_same_outputs(tmp_path):
    from s2v_core.finetuning import FineTunedModel, FinetuneSpec, read_description, save_finetuned
    from s2v_core.model import SleepEncoder, model_config
    from s2v_core.night_context import load_night_head, remove_night_head, save_night_head
    from s2v_core.run_layout import NIGHT_HEAD_FILE

    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=2), ("hr",))
    directory = save_finetuned(FineTunedModel(encoder, FinetuneSpec(task="staging3")), tmp_path / "model")
    assert load_night_head(directory) is None
    head = NightContextHead(16, 3, depth=1, heads=2, hidden=24, dropout=0.3)
    with torch.no_grad():  # not the initial weights: loading must bring these back
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_night_head(head, directory, extra={"best_step": 7})
    loaded = load_night_head(directory)
    night = torch.randn(50, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(night), head.eval()(night))
    assert loaded.hyperparameters == {
        "width": 16,
        "outputs": 3,
        "depth": 1,
        "heads": 2,
        "hidden": 24,
        "dropout": 0.3,
        "residual": False,
    }
    assert not loaded.training and read_description(directory)["night_head"]["best_step"] == 7
    (directory / NIGHT_HEAD_FILE).rename(tmp_path / "elsewhere.pt")
    with pytest.raises(FileNotFoundError, match=f"{NIGHT_HEAD_FILE} is missing"):
        load_night_head(directory)
    remove_night_head(directory)
    assert load_night_head(directory) is None and "night_head" not in read_description(directory)


def test_fit_night_context_scores_the_test_nights():
    from s2v_core.night_context import fit_night_context

    rng = np.random.default_rng(1)
    nights = {
        split: _with_stage1(_context_nights(count, rng), rng, strength=1.0, classes=5)
        for split, count in (("train", 6), ("val", 2), ("test", 2))
    }
    head, record = fit_night_context(nights, get_task("staging"), heads=2, steps=20, patience=2, seed=0)
    assert record["nights"] == {"train": 6, "val": 2, "test": 2}
    assert record["test"]["n_epochs"] == 120 and 1 <= record["steps"] <= 20
    assert isinstance(head, NightContextHead) and not head.training and head.residual  # residual by default


def test_a_saved_residual_head_comes_back_residual(tmp_path):
    from s2v_core.finetuning import FineTunedModel, FinetuneSpec, read_description, save_finetuned
    from s2v_core.model import SleepEncoder, model_config
    from s2v_core.night_context import load_night_head, save_night_head
    from s2v_core.run_layout import DESCRIPTION_FILE

    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=2), ("hr",))
    directory = save_finetuned(FineTunedModel(encoder, FinetuneSpec(task="staging3")), tmp_path / "model")
    head = NightContextHead(16, 3, depth=1, heads=2, hidden=24, residual=True)
    with torch.no_grad():
        head.out.weight.add_(0.1 * torch.randn_like(head.out.weight))
    save_night_head(head, directory)
    loaded = load_night_head(directory)
    night, stage1 = torch.randn(50, 16), torch.randn(50, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(night, stage1), head.eval()(night, stage1))
    assert loaded.residual
    # A head saved before residual heads existed has no such key: it predicts from the features alone.
    description = read_description(directory)
    del description["night_head"]["hyperparameters"]["residual"]
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description))
    assert load_night_head(directory).residual is False
