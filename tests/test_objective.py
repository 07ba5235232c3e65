"""Objective presets: shipped files, strict parsing, what each preset fixes, and the random pair."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from importlib import resources

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.train_config import PretrainConfig
from s2v_core.dash import DashConfig, PaperDashConfig
from s2v_core.losses import dash_infonce
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.model import ModelConfig, SleepEncoder, model_config
from s2v_core.objective import Objective, available_objectives, draw_pair, load_objective
from tests.gloo_workers import run_in_group
from tests.test_model import random_batch


def test_presets_are_shipped_and_headed_by_their_command():
    assert {"project", "paper"} <= set(available_objectives())
    for name in available_objectives():
        text = resources.files("s2v_core").joinpath("configs", "objective", f"{name}.toml").read_text()
        assert text.startswith(f"# s2v pretrain --data STORE --output RUN --objective {name}\n"), name
        preset = load_objective(name)
        assert preset.name == name and preset.command.startswith("s2v pretrain")
        model_config("tiny", **preset.model_overrides())  # every override is a valid model config


def test_project_preset_is_exactly_the_behaviour_before_presets():
    preset = load_objective("project")
    assert preset.objective.loss_options() == {"config": DashConfig(), "negatives": "global", "epoch_chunk": None}
    assert preset.objective.pairing == "all_pairs" and preset.objective.mask_rate == 0.0
    defaults = ModelConfig()
    built = model_config("tiny", **preset.model_overrides())
    assert built == model_config("tiny")
    assert (defaults.init_temperature, defaults.learn_temperature) == (built.init_temperature, True)
    before = PretrainConfig()
    training = preset.training
    assert (training.lr, training.weight_decay, training.warmup_steps, training.min_lr_ratio, training.grad_clip) == (
        before.lr,
        before.weight_decay,
        before.warmup_steps,
        before.min_lr_ratio,
        before.grad_clip,
    )
    assert training.betas == (0.9, 0.98) and not training.ema


def test_paper_preset_is_the_authors_recipe():
    preset = load_objective("paper")
    objective = preset.objective
    assert objective.dash_config == PaperDashConfig()
    assert (
        objective.temperature,
        objective.learn_temperature,
        objective.pairing,
        objective.mask_rate,
        objective.negatives,
    ) == (0.2, False, "random_pair", 0.15, "local")
    config = model_config("base", **preset.model_overrides())
    assert (config.tokenizer, config.position, config.head, config.projection_dim, config.mask_tokens) == (
        "mlp",
        "rotary",
        "simclr",
        128,
        True,
    )
    assert (config.width, config.depth, config.heads, int(config.mlp_ratio * config.width)) == (768, 12, 16, 3072)
    large = model_config("large")
    assert (large.width, large.depth, large.heads) == (1024, 16, 16)
    training = preset.training
    assert (
        training.lr,
        training.weight_decay,
        training.betas,
        training.warmup_fraction,
        training.min_lr_ratio,
        training.grad_clip,
        training.ema,
        training.ema_momentum_start,
        training.ema_momentum_end,
    ) == (5e-5, 0.01, (0.9, 0.95), 0.03, 0.1, 1.0, True, 0.996, 1.0)


def test_dash_off_disables_the_weights_and_step_modalities_follow_the_pairing():
    assert Objective(dash="off").dash_config == DashConfig(enabled=False)
    modalities = ("ecg", "eeg", "hr")
    assert Objective().step_modalities(modalities, seed=0, step=5) == ("eeg", "ecg", "hr")
    pair = Objective(pairing="random_pair").step_modalities(modalities, seed=0, step=5)
    assert pair == draw_pair(modalities, seed=0, step=5) and len(pair) == 2


@pytest.mark.parametrize(
    "text, words",
    [
        ("[objective]\ndash = 'paper'\n[extras]\nx = 1\n", ["bad.toml", "unknown table", "extras"]),
        ("[objective]\ndahs = 'paper'\n", ["bad.toml [objective]", "dahs"]),
        ("[objective]\n[objective.paper]\nepsilon = 'tiny'\n", ["bad.toml [objective].paper.epsilon", "number"]),
        ("[objective]\npairing = 'two'\n", ["pairing", "random_pair"]),
        ("[objective]\n[model]\nwidth = 64\n", ["bad.toml", "may not set width"]),
        ("[objective]\n[model]\ninit_temperature = 0.1\n", ["may not set init_temperature", "[objective]"]),
        ("[objective]\n[model]\ntokenizer = 'cnn'\n", ["tokenizer", "conv, mlp"]),
        ("[objective]\n[training]\nbetas = [0.9]\n", ["bad.toml [training].betas", "2 items"]),
        ("[objective]\n[training]\nwarmup_fraction = 0.05\n", ["warmup_steps"]),
        ("[model]\nhead = 'simclr'\n", ["bad.toml", "[objective]"]),
        ("[objective]\n[objective.project]\nenabled = false\n", ['dash = "off"']),
    ],
)
def test_preset_files_are_parsed_strictly_with_errors_naming_the_file(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text("# s2v pretrain --objective bad.toml\n" + text)
    with pytest.raises((ValueError, TypeError)) as error:
        load_objective(path)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_a_preset_file_by_path_and_unknown_names():
    with pytest.raises(ValueError, match="project"):
        load_objective("papers")
    source = resources.files("s2v_core").joinpath("configs", "objective", "paper.toml")
    with resources.as_file(source) as path:
        assert load_objective(path).objective == load_objective("paper").objective


def test_draw_pair_is_a_deterministic_uniform_pair_in_registry_order():
    modalities = ("spo2", "eeg", "ecg", "hr")
    draws = [draw_pair(modalities, seed=3, step=s) for s in range(600)]
    assert draws == [draw_pair(list(reversed(modalities)), seed=3, step=s) for s in range(600)]
    counts = Counter(draws)
    assert set(counts) == set(itertools.combinations(("eeg", "ecg", "hr", "spo2"), 2))
    assert min(counts.values()) > 60  # 100 expected each
    assert draws != [draw_pair(modalities, seed=4, step=s) for s in range(600)]
    with pytest.raises(ValueError, match="at least two"):
        draw_pair(["eeg"], seed=0, step=0)
    with pytest.raises(ValueError, match="at least two"):
        draw_pair(["eeg", "ppg"], seed=0, step=0)


def pair_worker(rank: int, init_file: str, out_dir: str) -> None:
    def body():
        pairs = [draw_pair(MODALITY_KEYS, seed=7, step=step) for step in range(50)]
        everyone = [None, None]
        dist.all_gather_object(everyone, pairs)
        torch.save(everyone, f"{out_dir}/rank{rank}.pt")

    run_in_group(rank, 2, init_file, body)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_random_pair_is_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(pair_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        first, second = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert first == second and len(set(first)) > 10


def test_a_paper_encoder_trains_one_random_pair_step_with_every_parameter_in_the_graph():
    preset = load_objective("paper")
    model = SleepEncoder(model_config("tiny", **preset.model_overrides()), ("eeg", "ecg", "hr")).train()
    batch = random_batch(4, ("eeg", "ecg", "hr"), seed=1)
    batch.update(
        age=torch.tensor([30.0, 40.0, 50.0, 60.0]),
        sex=torch.tensor([0.0, 1.0, 0.0, 1.0]),
        site_id=torch.zeros(4, dtype=torch.int64),
        night_id=torch.arange(4),
    )
    pair = preset.objective.step_modalities(model.modalities, seed=0, step=0)
    out = model.encode(batch, modalities=pair, mask_rate=preset.objective.mask_rate)
    result = dash_infonce(
        out.per_modality, out.present, batch, logit_scale=out.logit_scale, **preset.objective.loss_options()
    )
    result.loss.backward()
    assert sorted(out.per_modality) == sorted(pair)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert result.to_floats()["temperature"] == pytest.approx(0.2)


def test_a_120_epoch_pretraining_step_with_the_paper_objective_runs_on_cpu():
    objective = load_objective("paper").objective
    torch.manual_seed(6)
    keys = ("eeg", "ecg", "spo2")
    model = SleepEncoder(model_config("tiny", **load_objective("paper").model_overrides()), keys).train()
    batch = random_batch(4, keys, epochs=120)
    meta = {
        "age": torch.tensor([30.0, 50.0, float("nan"), 70.0]),
        "sex": torch.tensor([0.0, 1.0, 1.0, 0.0]),
        "site_id": torch.tensor([1, 1, 2, 2]),
        "night_id": torch.tensor([1, 1, 2, 3]),
    }
    out = model.encode(batch, modalities=objective.step_modalities(keys, seed=0, step=0), mask_rate=objective.mask_rate)
    result = dash_infonce(out.per_modality, out.present, meta, logit_scale=out.logit_scale, **objective.loss_options())
    result.loss.backward()
    assert math.isfinite(result.loss.item()) and result.to_floats()["anchors"] == 2 * 4 * 120
