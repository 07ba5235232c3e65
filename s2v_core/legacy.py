"""Encoders written before format 2: their stem, and the conversion of their weights.

Format 1 (``model_config.json`` ``"format": 1``) encoders used ``nn.Conv1d``
stems (``tokenizers.<m>.convs.<j>``, ``tokenizers.<m>.out.<0|1>``) and an
``nn.TransformerEncoder`` backbone (``backbone.layers.<i>.self_attn.in_proj_weight``,
``linear1``/``linear2``) followed by a top-level ``final_norm``. Format 2
computes the same functions with differently laid out weights; :func:`convert_format1_state`
maps a format-1 state dict onto the format-2 keys so that such an encoder
loads and encodes exactly as before (tokenizer ``conv``, position
``absolute``, head ``linear`` — the defaults).

:class:`LegacyConvTokenizer` is the format-1 stem itself, kept so that the
conversion is tested against it and ``benchmarks/bench_model.py`` can time
the convolution formulation against the GEMM one with the same weights.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from s2v_core.tokenizers import STEM_KERNEL, STEM_PATCH, STEM_STRIDE, stem_steps

FORMAT1 = 1


class LegacyConvTokenizer(nn.Module):
    """The format-1 stem: ``nn.Conv1d`` layers, flattened channel-first, ``Linear`` + ``LayerNorm``.

    Input ``(n, E, samples_per_epoch)``, output ``(n, E, width)``.
    """

    def __init__(self, samples_per_epoch: int, width: int, channels: int) -> None:
        super().__init__()
        steps = stem_steps(samples_per_epoch)
        layers: list[nn.Module] = [nn.Conv1d(1, channels, STEM_PATCH, stride=STEM_PATCH), nn.GELU()]
        for _ in steps[1:]:
            layers += [nn.Conv1d(channels, channels, STEM_KERNEL, stride=STEM_STRIDE, padding=2), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.Linear(steps[-1] * channels, width), nn.LayerNorm(width))

    def forward(self, x: Tensor) -> Tensor:
        n, epochs, samples = x.shape
        features = self.convs(x.reshape(n * epochs, 1, samples))
        tokens = self.out(features.flatten(1))
        return tokens.reshape(n, epochs, tokens.shape[-1])


def strided_weight_from_conv(weight: Tensor) -> Tensor:
    """``Conv1d`` weight ``(C, C, 8)`` → :class:`~s2v_core.tokenizers.StridedConv` weight ``(2C, 4C)``."""
    channels = weight.shape[0]
    halves = weight.reshape(channels, channels, 2, STEM_KERNEL // 2)  # (o, i, h, k)
    return halves.permute(2, 0, 3, 1).reshape(2 * channels, (STEM_KERNEL // 2) * channels)


def convert_tokenizer_state(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Format-1 stem weights (``convs.*``, ``out.*`` under ``prefix``) → :class:`ConvTokenizer` weights."""
    patch = state[f"{prefix}convs.0.weight"]
    channels = patch.shape[0]
    out = {
        f"{prefix}patch.weight": patch.reshape(channels, STEM_PATCH),
        f"{prefix}patch.bias": state[f"{prefix}convs.0.bias"],
    }
    layer = 0
    while f"{prefix}convs.{2 * (layer + 1)}.weight" in state:
        index = 2 * (layer + 1)
        out[f"{prefix}strided.{layer}.blocks.weight"] = strided_weight_from_conv(state[f"{prefix}convs.{index}.weight"])
        out[f"{prefix}strided.{layer}.bias"] = state[f"{prefix}convs.{index}.bias"]
        layer += 1
    linear = state[f"{prefix}out.0.weight"]  # (width, C * L), channel-first flattening
    width, flat = linear.shape
    steps = flat // channels
    out[f"{prefix}out.weight"] = linear.reshape(width, channels, steps).transpose(1, 2).reshape(width, flat)
    out[f"{prefix}out.bias"] = state[f"{prefix}out.0.bias"]
    out[f"{prefix}norm.weight"] = state[f"{prefix}out.1.weight"]
    out[f"{prefix}norm.bias"] = state[f"{prefix}out.1.bias"]
    return out


_LAYER_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "linear1.": "mlp.fc1.",
    "linear2.": "mlp.fc2.",
    "norm1.": "norm1.",
    "norm2.": "norm2.",
}


def convert_format1_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a format-1 encoder state dict onto the format-2 keys (tokenizer ``conv``, absolute, linear head).

    Raises ``ValueError`` naming the first key it does not know how to map.
    """
    converted: dict[str, Tensor] = {}
    tokenizer_prefixes = sorted({m.group(0) for key in state if (m := re.match(r"tokenizers\.[a-z0-9_]+\.", key))})
    for prefix in tokenizer_prefixes:
        converted.update(convert_tokenizer_state(state, prefix))
    for key, value in state.items():
        if key.startswith("tokenizers."):
            continue
        if key.startswith("final_norm."):
            converted["backbone." + key] = value
            continue
        match = re.match(r"(backbone\.layers\.\d+\.)(.*)", key)
        if match is None:
            if key in ("modality_embedding.weight", "position_embedding", "logit_scale") or key.startswith("head."):
                converted[key] = value
                continue
            raise ValueError(f"format-1 encoder: cannot convert weight {key!r}")
        layer, rest = match.groups()
        if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{layer}attn.{name}.{kind}"] = part
            continue
        for old, new in _LAYER_RENAMES.items():
            if rest.startswith(old):
                converted[layer + new + rest[len(old) :]] = value
                break
        else:
            raise ValueError(f"format-1 encoder: cannot convert weight {key!r}")
    return converted
