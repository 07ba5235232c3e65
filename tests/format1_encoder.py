"""A format-1 encoder, as the code before encoder format 2 built, ran and saved it (test fixture).

Trimmed from ``s2v_core/model.py`` at the commit before format 2 (4aa7c47): the
``nn.Conv1d`` stem, the ``nn.TransformerEncoder`` backbone, the eval-mode
``encode`` path (every modality present) and ``save_encoder``. Frozen on
purpose: tests/test_legacy.py checks that what it wrote still loads and
encodes the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2v_core.modalities import MODALITY_KEYS, get_modality

#: The config fields format 1 knew (and wrote to model_config.json).
FORMAT1_FIELDS = (
    "name",
    "width",
    "depth",
    "heads",
    "mlp_ratio",
    "dropout",
    "projection_dim",
    "modality_dropout",
    "epochs_per_window",
    "init_temperature",
    "learn_temperature",
    "stem_channels",
)


class EpochTokenizer(nn.Module):
    def __init__(self, samples_per_epoch: int, width: int, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(1, channels, 8, stride=8), nn.GELU()]
        steps = samples_per_epoch // 8
        while steps > 32:
            layers += [nn.Conv1d(channels, channels, 8, stride=4, padding=2), nn.GELU()]
            steps = math.ceil(steps / 4)
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, 1, samples_per_epoch)).numel()
        self.out = nn.Sequential(nn.Linear(flat, width), nn.LayerNorm(width))

    def forward(self, x: Tensor) -> Tensor:
        n, epochs, samples = x.shape
        tokens = self.out(self.convs(x.reshape(n * epochs, 1, samples)).flatten(1))
        return tokens.reshape(n, epochs, tokens.shape[-1])


class Format1Encoder(nn.Module):
    def __init__(self, config, modalities) -> None:
        super().__init__()
        self.config = config
        self.modalities = tuple(k for k in MODALITY_KEYS if k in set(modalities))
        width = config.width
        self.tokenizers = nn.ModuleDict(
            {k: EpochTokenizer(get_modality(k).samples_per_epoch, width, config.stem_channels) for k in self.modalities}
        )
        self.modality_embedding = nn.Embedding(len(MODALITY_KEYS), width)
        self.position_embedding = nn.Parameter(torch.zeros(config.epochs_per_window, width))
        nn.init.normal_(self.modality_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            config.heads,
            dim_feedforward=int(round(config.mlp_ratio * width)),
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.backbone = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def encode(self, batch) -> tuple[dict[str, Tensor], Tensor]:
        """Eval-mode encode of windows holding every built modality: (per_modality, fused)."""
        tokens = [
            self.tokenizers[k](batch[k]) + self.modality_embedding(torch.tensor(MODALITY_KEYS.index(k)))
            for k in self.modalities
        ]
        epochs = tokens[0].shape[1]
        hidden = self.final_norm(self.backbone(torch.cat(tokens) + self.position_embedding[:epochs]))
        projected = F.normalize(self.head(hidden), dim=-1).chunk(len(self.modalities))
        per_modality = dict(zip(self.modalities, projected))
        fused = F.normalize(torch.stack(projected).sum(0) / len(projected), dim=-1)
        return per_modality, fused


def save_format1(model: Format1Encoder, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(model.config, k) for k in FORMAT1_FIELDS}
    description = {"format": 1, "config": config, "modalities": list(model.modalities)}
    (directory / "model_config.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / "encoder.pt")
    return directory
