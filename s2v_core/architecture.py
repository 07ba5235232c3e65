"""Architecture of the encoder: :class:`ModelConfig` and the named sizes in ``configs/model/*.toml``.

A size (``tiny``, ``small``, ``base``, ``large``) is a TOML file headed by the
command that uses it; :func:`model_config` loads one and applies overrides.
The architectural choices (``tokenizer``, ``position``, ``head``,
``mask_tokens``) default to the project's original encoder; objective presets
(``s2v_core.objective``) switch them for the authors' recipe.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any

from s2v_core.config import from_mapping
from s2v_core.tokenizers import TOKENIZERS

POSITIONS = ("absolute", "rotary")
HEADS = ("linear", "simclr")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`SleepEncoder` (named sizes live in ``configs/model/*.toml``)."""

    name: str = "tiny"  # the named size this config came from (overrides keep the name)
    width: int = 32  # token and backbone width d; the scaling sweeps vary it
    depth: int = 2  # number of transformer blocks in the shared backbone
    heads: int = 2  # attention heads; width must be divisible by heads
    mlp_ratio: float = 2.0  # feed-forward hidden size = mlp_ratio * width (4.0 in ViT/BERT)
    dropout: float = 0.0  # dropout in attention/MLP/tokens; 0 keeps CPU tests deterministic
    projection_dim: int = 32  # dimension of the aligned space the loss and embeddings live in
    modality_dropout: float = 0.25  # P(drop a present modality of a window) in training, never all
    # Training window length; with absolute positions also the longest sequence the
    # model can encode (the table's size); rotary positions encode any length.
    epochs_per_window: int = 10
    init_temperature: float = 0.07  # InfoNCE temperature at init (CLIP's value), or the fixed one
    learn_temperature: bool = True  # learn log(1/temperature) as in CLIP, else keep it fixed
    stem_channels: int = 8  # channels of the conv stems; tokenizer cost grows with it
    tokenizer: str = "conv"  # conv (the project's strided stem, as GEMMs) | mlp (the authors')
    position: str = "absolute"  # absolute (learned table, capped at epochs_per_window) | rotary
    head: str = "linear"  # linear | simclr (Linear-BN-ReLU-Linear-BN, the authors')
    mask_tokens: bool = False  # build a learned mask token per modality for encode(mask_rate=…)

    def __post_init__(self) -> None:
        positive = ("width", "depth", "heads", "projection_dim", "epochs_per_window", "stem_channels")
        for field_name in positive:
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config {self.name!r}: {field_name} must be an integer >= 1, found {value!r}")
        if self.width % self.heads:
            raise ValueError(
                f"model config {self.name!r}: width {self.width} is not divisible by "
                f"heads {self.heads}; override heads too (e.g. heads=1)"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"model config {self.name!r}: mlp_ratio must be > 0, found {self.mlp_ratio}")
        for field_name in ("dropout", "modality_dropout"):
            value = getattr(self, field_name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model config {self.name!r}: {field_name} must be in [0, 1), found {value}")
        if not self.init_temperature > 0:
            raise ValueError(f"model config {self.name!r}: init_temperature must be > 0, found {self.init_temperature}")
        for field_name, allowed in (("tokenizer", tuple(TOKENIZERS)), ("position", POSITIONS), ("head", HEADS)):
            if getattr(self, field_name) not in allowed:
                raise ValueError(
                    f"model config {self.name!r}: {field_name} must be one of "
                    f"{', '.join(allowed)}, found {getattr(self, field_name)!r}"
                )
        if self.position == "rotary" and (self.width // self.heads) % 2:
            raise ValueError(
                f"model config {self.name!r}: rotary positions need an even head size, "
                f"found width {self.width} / heads {self.heads} = {self.width // self.heads}"
            )


def _config_dir():
    return resources.files("s2v_core").joinpath("configs", "model")


def available_model_configs() -> tuple[str, ...]:
    """Names of the shipped model sizes (``configs/model/<name>.toml``), sorted."""
    return tuple(sorted(p.name[:-5] for p in _config_dir().iterdir() if p.name.endswith(".toml")))


def model_config(name: str = "tiny", **overrides: Any) -> ModelConfig:
    """Load the named model size and apply ``overrides`` (e.g. ``width=128, depth=4``).

    Overrides whose value is ``None`` are ignored, so unset CLI options pass
    straight through. Raises ``ValueError`` for an unknown name (listing the
    available ones), an unknown override key (listing the fields) or an
    invalid value, ``TypeError`` for a value of the wrong type.
    """
    available = available_model_configs()
    if name not in available:
        raise ValueError(f"unknown model config {name!r}; expected one of {', '.join(available)}")
    source = f"s2v_core/configs/model/{name}.toml"
    data = tomllib.loads(_config_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8"))
    data.setdefault("name", name)
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"model config {name!r}: unknown override(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(sorted(known))}"
        )
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(ModelConfig, data, source=source)


def resolve_model_config(
    name: str,
    *,
    width: int | None = None,
    depth: int | None = None,
    epochs_per_window: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """The one place run options become an architecture (pretrain, sweep and finetune call it).

    The named size (``configs/model/<name>.toml``), then ``overrides`` (an
    objective preset's ``[model]`` table, temperature and mask tokens), then
    ``width``/``depth``. A width the size's head count does not divide gets
    the largest divisor of it not above that count; an absolute position
    table is widened to ``epochs_per_window`` (the store's window length)
    when the size's is shorter (rotary positions need no table).
    """
    chosen: dict[str, Any] = {**dict(overrides or {}), "width": width, "depth": depth}
    base = model_config(name, **{k: v for k, v in chosen.items() if k not in ("width", "depth")})
    if epochs_per_window is not None and epochs_per_window > base.epochs_per_window:
        chosen["epochs_per_window"] = epochs_per_window
    final_width = width or base.width
    if final_width % base.heads:
        chosen["heads"] = max(h for h in range(1, base.heads + 1) if final_width % h == 0)
    return model_config(name, **chosen)
