"""Objectives as data: every constant of the contrastive loss and pairing, kept in preset files.

A preset (``configs/objective/<name>.toml``, or any TOML file of the same
shape) is headed by the command that uses it and holds up to three tables::

    # s2v pretrain --data STORE --output RUN --objective paper
    [objective]          # → Objective: DASH formula and constants, temperature,
                         #   pairing, token masking, negatives, loss chunking
    [objective.paper]    # → PaperDashConfig (or [objective.project] → DashConfig)
    [model]              # ModelConfig overrides the recipe needs (tokenizer, position, head, …)
    [training]           # → TrainingDefaults: optimiser, schedule, clipping, EMA

Shipped presets: ``project`` (the project's objective, unchanged: the
default) and ``paper`` (the authors' public recipe). Files are mapped
strictly: an unknown table or key, or a value of the wrong type, is an error
naming the file. The temperature and whether tokens are masked are decided
in ``[objective]`` only; :meth:`ObjectivePreset.model_overrides` passes them
to the model config.

:func:`draw_pair` is the random-pair objective's draw: a pure function of
``(modalities, seed, step)``, so every rank of a data-parallel run encodes
the same two modalities without a collective.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from s2v_core.architecture import ModelConfig
from s2v_core.config import from_mapping
from s2v_core.dash import DashConfig, PaperDashConfig
from s2v_core.modalities import MODALITY_KEYS

DASH_FORMULAS = ("project", "paper", "off")
PAIRINGS = ("all_pairs", "random_pair")
NEGATIVES = ("global", "local")
#: ModelConfig fields a preset may not set: the size is ``--model``'s choice, and the
#: temperature and mask tokens follow from ``[objective]``.
_NOT_IN_MODEL_TABLE = frozenset(
    {"name", "width", "depth", "heads", "init_temperature", "learn_temperature", "mask_tokens"}
)


@dataclass(frozen=True)
class Objective:
    """Every constant of the contrastive objective (the loss and which modalities it pairs)."""

    dash: str = "project"  # DASH formula: project (DashConfig) | paper (the authors') | off (plain InfoNCE)
    project: DashConfig = DashConfig()  # constants of the project formula (`enabled` follows `dash`)
    paper: PaperDashConfig = PaperDashConfig()  # constants of the authors' formula
    temperature: float = 0.07  # τ: the initial value when learned (CLIP's 0.07), else the fixed one
    learn_temperature: bool = True  # learn log(1/τ) (CLIP) or keep τ fixed (the authors: 0.2)
    pairing: str = "all_pairs"  # all_pairs: every pair of the step's modalities | random_pair: one per step
    mask_rate: float = 0.0  # fraction of tokens replaced by a learned mask token in training (authors: 0.15)
    negatives: str = "global"  # global: every worker's windows | local: the worker's own (the authors')
    epoch_chunk: int = 0  # epoch positions per checkpointed chunk of loss logits; 0 = all at once
    history_columns: tuple[str, ...] = ()  # outcome columns used as DASH history flags (project formula)

    def __post_init__(self) -> None:
        for name, allowed in (("dash", DASH_FORMULAS), ("pairing", PAIRINGS), ("negatives", NEGATIVES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"objective.{name}: expected one of {', '.join(allowed)}, found {getattr(self, name)!r}"
                )
        if not self.project.enabled:
            raise ValueError('objective.project.enabled: turn DASH off with dash = "off", not here')
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"objective.temperature: expected a number > 0, found {self.temperature!r}")
        if not 0.0 <= self.mask_rate < 1.0:
            raise ValueError(f"objective.mask_rate: expected a value in [0, 1), found {self.mask_rate!r}")
        if self.epoch_chunk < 0:
            raise ValueError(
                f"objective.epoch_chunk: expected an integer >= 0 (0 = unchunked), found {self.epoch_chunk!r}"
            )

    @property
    def dash_config(self) -> DashConfig | PaperDashConfig:
        """The weights' config for :func:`s2v_core.losses.dash_infonce` (``off`` = project, disabled)."""
        if self.dash == "paper":
            return self.paper
        return DashConfig(
            **{**{f.name: getattr(self.project, f.name) for f in fields(DashConfig)}, "enabled": self.dash == "project"}
        )

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`s2v_core.losses.dash_infonce` this objective fixes."""
        return {"config": self.dash_config, "negatives": self.negatives, "epoch_chunk": self.epoch_chunk or None}

    def step_modalities(self, modalities: Sequence[str], *, seed: int, step: int) -> tuple[str, ...]:
        """The modalities one training step encodes: all of them, or :func:`draw_pair`'s pair."""
        if self.pairing == "random_pair":
            return draw_pair(modalities, seed=seed, step=step)
        return tuple(k for k in MODALITY_KEYS if k in set(modalities))


@dataclass(frozen=True)
class TrainingDefaults:
    """Optimiser, schedule, clipping and EMA a preset recommends (the pipeline maps them onto its config)."""

    lr: float = 3e-4  # peak AdamW learning rate after warm-up
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (β1, β2)
    warmup_steps: int = 10  # linear warm-up in optimiser steps (0 when warmup_fraction is set)
    warmup_fraction: float = 0.0  # > 0: warm-up as a fraction of the run's steps instead (the authors: 0.03)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    per_worker_batch: int | None = None  # windows per worker per step the recipe used; None = the CLI's
    ema: bool = False  # keep an exponential moving average of the weights (s2v_core.ema)
    ema_momentum_start: float = 0.996  # EMA momentum at step 0, cosine-scheduled …
    ema_momentum_end: float = 1.0  # … to this at the last step

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or (self.warmup_fraction > 0 and self.warmup_steps):
            raise ValueError(
                "training: expected warmup_steps >= 0, and 0 when warmup_fraction is set, found "
                f"warmup_steps={self.warmup_steps!r}, warmup_fraction={self.warmup_fraction!r}"
            )
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"training: expected lr > 0, weight_decay >= 0, grad_clip >= 0, found "
                f"{self.lr!r}, {self.weight_decay!r}, {self.grad_clip!r}"
            )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"training.betas: expected two values in [0, 1), found {self.betas!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"training.warmup_fraction: expected a value in [0, 1), found {self.warmup_fraction!r}")
        if not 0.0 <= self.ema_momentum_start <= self.ema_momentum_end <= 1.0:
            raise ValueError(
                f"training: expected 0 <= ema_momentum_start <= ema_momentum_end <= 1, found "
                f"{self.ema_momentum_start!r}, {self.ema_momentum_end!r}"
            )


@dataclass(frozen=True)
class ObjectivePreset:
    """A parsed preset file (see the module docstring)."""

    name: str  # file stem: project, paper, or a user's file name
    source: str  # the file it was read from
    command: str  # its first line, the command that uses it
    objective: Objective
    model: tuple[tuple[str, Any], ...] = ()  # [model] overrides, in file order
    training: TrainingDefaults = field(default_factory=TrainingDefaults)

    def model_overrides(self) -> dict[str, Any]:
        """``model_config(size, **overrides)`` arguments: ``[model]`` plus temperature and mask tokens."""
        return {
            **dict(self.model),
            "init_temperature": self.objective.temperature,
            "learn_temperature": self.objective.learn_temperature,
            "mask_tokens": self.objective.mask_rate > 0,
        }


def _preset_dir():
    return resources.files("s2v_core").joinpath("configs", "objective")


def available_objectives() -> tuple[str, ...]:
    """Names of the shipped presets (``configs/objective/<name>.toml``), sorted."""
    return tuple(sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".toml")))


def load_objective(name_or_path: str | Path) -> ObjectivePreset:
    """Load a shipped preset by name (``"project"``, ``"paper"``) or a preset file by path.

    Raises ``ValueError`` for an unknown name or file, an unknown table or
    key, a forbidden ``[model]`` key, or an invalid value, and ``TypeError``
    for a value of the wrong type; every message names the file.
    """
    text_name = str(name_or_path)
    if text_name in available_objectives():
        source = f"s2v_core/configs/objective/{text_name}.toml"
        text, name = _preset_dir().joinpath(f"{text_name}.toml").read_text(encoding="utf-8"), text_name
    else:
        path = Path(name_or_path)
        if path.suffix != ".toml" or not path.is_file():
            raise ValueError(
                f"objective {text_name!r}: expected one of {', '.join(available_objectives())} "
                f"or an existing .toml preset file"
            )
        source, text, name = str(path), path.read_text(encoding="utf-8"), path.stem
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML ({error})") from error
    unknown = sorted(set(data) - {"objective", "model", "training"})
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {', '.join(unknown)}; expected objective, model, training")
    if "objective" not in data:
        raise ValueError(f"{source}: expected an [objective] table")
    model = dict(data.get("model", {}))
    forbidden = sorted(set(model) & _NOT_IN_MODEL_TABLE)
    if forbidden:
        raise ValueError(
            f"{source}: [model] may not set {', '.join(forbidden)} (the size comes from --model; "
            f"temperature and mask tokens from [objective])"
        )
    from_mapping(ModelConfig, model, source=f"{source} [model]")  # unknown keys, types, values
    first = text.splitlines()[0] if text else ""
    return ObjectivePreset(
        name=name,
        source=source,
        command=first.lstrip("# ").strip(),
        objective=from_mapping(Objective, data["objective"], source=f"{source} [objective]"),
        model=tuple(model.items()),
        training=from_mapping(TrainingDefaults, data.get("training", {}), source=f"{source} [training]"),
    )


def draw_pair(modalities: Sequence[str], *, seed: int, step: int) -> tuple[str, str]:
    """The two modalities step ``step`` of a run seeded ``seed`` aligns (random-pair objective).

    Uniform over unordered pairs of ``modalities``, returned in registry
    order; a pure function of its arguments, so every rank draws the same
    pair without communicating.
    """
    keys = [k for k in MODALITY_KEYS if k in set(modalities)]
    unknown = sorted(set(modalities) - set(MODALITY_KEYS))
    if unknown or len(keys) < 2:
        raise ValueError(f"draw_pair: expected at least two registry modalities, found {list(modalities)!r}")
    if seed < 0 or step < 0:
        raise ValueError(f"draw_pair: expected seed >= 0 and step >= 0, found seed={seed}, step={step}")
    first, second = np.random.default_rng([seed, step]).choice(len(keys), size=2, replace=False)
    return tuple(keys[i] for i in sorted((int(first), int(second))))
