"""The sleep2vec encoder: per-modality tokenizers, one shared backbone, an aligned space.

Data flow for one window of ``E`` consecutive 30-s epochs::

    modality m, epoch e  (samples_per_epoch(m) samples at the store rate)
        │ tokenizer[m]: strided 1-D conv stem → one ``width``-dim token
        │ + modality embedding[m] + position embedding[e]
        ▼
    shared transformer backbone over the E tokens of (window, modality)
        │ final LayerNorm → projection head → L2 normalisation
        ▼
    per-modality epoch embedding (B, E, projection_dim)
        │ mean over the modalities present in the window, re-normalised
        ▼
    fused epoch embedding (B, E, P) → window embedding (B, P) → night (pool_night)

Each modality's sequence goes through the backbone on its own (no attention
across modalities): the contrastive objective aligns modalities of the same
window, and letting one modality attend to another would let the model copy
the answer instead of learning it. A missing modality is never encoded; it is
simply left out of the fused mean (no zeros pretending to be signal).
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2v_core.config import from_mapping, to_mapping
from s2v_core.modalities import MODALITY_KEYS, get_modality, parse_modalities

logger = logging.getLogger(__name__)

#: Format version of ``model_config.json`` written by :func:`save_encoder`.
ENCODER_FORMAT = 1
CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "encoder.pt"

#: First stem layer: non-overlapping patches of 8 samples (62.5 ms at 128 Hz,
#: 0.5 s at 16 Hz, 2 s at 4 Hz), a linear map that cuts the activation volume
#: of the following layers eightfold — the stems dominate the CPU cost.
_STEM_PATCH = 8
#: Then strided convolutions (kernel 8, stride 4) until an epoch is at most
#: 32 steps long: 3840 samples → 480 → 120 → 30, 480 → 60 → 15, 120 → 15.
_STEM_MAX_STEPS = 32
_STEM_STRIDE = 4


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`SleepEncoder` (named sizes live in ``configs/model/*.toml``)."""

    name: str = "tiny"  # the named size this config came from (overrides keep the name)
    width: int = 32  # token and backbone width d; the scaling sweeps vary it
    depth: int = 2  # number of transformer layers in the shared backbone
    heads: int = 2  # attention heads; width must be divisible by heads
    mlp_ratio: float = 2.0  # feed-forward hidden size = mlp_ratio * width (4.0 in ViT/BERT)
    dropout: float = 0.0  # dropout in attention/MLP/tokens; 0 keeps CPU tests deterministic
    projection_dim: int = 32  # dimension of the aligned space the loss and embeddings live in
    modality_dropout: float = 0.25  # P(drop a present modality of a window) in training, never all
    epochs_per_window: int = 10  # max sequence length (position embeddings); the store default
    init_temperature: float = 0.07  # InfoNCE temperature at init (CLIP's value)
    learn_temperature: bool = True  # learn log(1/temperature) as in CLIP, else keep it fixed
    stem_channels: int = 8  # channels of the conv stems; tokenizer cost grows with it

    def __post_init__(self) -> None:
        positive = ("width", "depth", "heads", "projection_dim", "epochs_per_window", "stem_channels")
        for field_name in positive:
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config {self.name!r}: {field_name} must be an integer >= 1, "
                                 f"found {value!r}")
        if self.width % self.heads:
            raise ValueError(f"model config {self.name!r}: width {self.width} is not divisible by "
                             f"heads {self.heads}; override heads too (e.g. heads=1)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"model config {self.name!r}: mlp_ratio must be > 0, found {self.mlp_ratio}")
        for field_name in ("dropout", "modality_dropout"):
            value = getattr(self, field_name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model config {self.name!r}: {field_name} must be in [0, 1), "
                                 f"found {value}")
        if not self.init_temperature > 0:
            raise ValueError(f"model config {self.name!r}: init_temperature must be > 0, "
                             f"found {self.init_temperature}")


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
        raise ValueError(f"model config {name!r}: unknown override(s) {', '.join(unknown)}; "
                         f"expected some of {', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(ModelConfig, data, source=source)


class EpochTokenizer(nn.Module):
    """One 30-s epoch of one modality → one ``width``-dim token.

    A patch layer (kernel = stride = 8 samples) followed by strided 1-D
    convolutions (kernel 8, stride 4) that downsample the epoch until it is at
    most 32 steps long (3 layers in all for 128 Hz signals, 2 for 16 Hz, 1 for
    4 Hz); the flattened feature map is linearly mapped to ``width``.
    Input ``(n, E, samples_per_epoch)``, output ``(n, E, width)``.
    """

    def __init__(self, samples_per_epoch: int, width: int, channels: int) -> None:
        super().__init__()
        if samples_per_epoch % _STEM_PATCH:
            raise ValueError(f"EpochTokenizer: samples_per_epoch {samples_per_epoch} is not a multiple "
                             f"of the patch length {_STEM_PATCH}")
        # No per-epoch normalisation in the stem: the store already scales each
        # recording to unit robust spread, and the amplitude of an epoch relative to
        # its night (slow waves in N3, a desaturation) is signal that a per-epoch
        # GroupNorm/LayerNorm on the feature map would erase.
        layers: list[nn.Module] = [nn.Conv1d(1, channels, _STEM_PATCH, stride=_STEM_PATCH), nn.GELU()]
        steps = samples_per_epoch // _STEM_PATCH
        while steps > _STEM_MAX_STEPS:
            # padding 2 with kernel 8 / stride 4 gives exactly steps / 4 outputs.
            layers += [nn.Conv1d(channels, channels, 8, stride=_STEM_STRIDE, padding=2), nn.GELU()]
            steps = math.ceil(steps / _STEM_STRIDE)
        self.samples_per_epoch = samples_per_epoch
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, 1, samples_per_epoch)).numel()
        self.out = nn.Sequential(nn.Linear(flat, width), nn.LayerNorm(width))

    def forward(self, x: Tensor) -> Tensor:
        n, epochs, samples = x.shape
        features = self.convs(x.reshape(n * epochs, 1, samples))
        tokens = self.out(features.flatten(1))
        return tokens.reshape(n, epochs, tokens.shape[-1])  # explicit width: n may be 0


class EncoderOutput(NamedTuple):
    """What :meth:`SleepEncoder.encode` returns (all embeddings L2-normalised).

    A named tuple rather than a dataclass so that wrappers which hook module
    outputs can reach its tensors: DeepSpeed ZeRO-3 re-gathers a module's
    parameters for backward through hooks on the tensors of its output, and
    it walks tuples, lists and dicts only.

    Attributes
    ----------
    per_modality : dict of str to Tensor ``(B, E, P)``
        Projection of each encoded modality; rows where the modality is absent
        (see ``present``) are zero and must be ignored.
    present : Tensor ``(B, 9)`` bool
        Registry-order mask of the modalities actually used, after selection
        and (in training) modality dropout.
    fused : Tensor ``(B, E, P)``
        Mean of the present modalities' projections per epoch, re-normalised;
        zero for a window with no modality.
    window : Tensor ``(B, P)``
        Mean of ``fused`` over the epochs of the window, re-normalised.
    logit_scale : Tensor, scalar, optional
        The encoder's ``log(1/temperature)`` as computed in this forward pass
        (gradient flows to ``SleepEncoder.logit_scale``); prefer it to the
        parameter when a wrapper partitions parameters (DeepSpeed ZeRO-3).
    """

    per_modality: dict[str, Tensor]
    present: Tensor
    fused: Tensor
    window: Tensor
    logit_scale: Tensor | None = None


class SleepEncoder(nn.Module):
    """The sleep2vec encoder (see the module docstring for the data flow).

    Parameters
    ----------
    config : ModelConfig
        Architecture; see :func:`model_config` for the named sizes.
    modalities : sequence of str
        Modalities to build tokenizers for (registry keys, any order); the
        encoder can then encode any subset of them.
    """

    def __init__(self, config: ModelConfig, modalities: Sequence[str] = MODALITY_KEYS) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"SleepEncoder: expected a ModelConfig, found {type(config).__name__}")
        if isinstance(modalities, str):  # "eeg,ecg" must not become a set of letters
            modalities = parse_modalities(modalities, option="SleepEncoder(modalities=…)")
        wanted = set(modalities)
        for key in wanted:
            get_modality(key)  # KeyError naming the valid keys
        if not wanted:
            raise ValueError("SleepEncoder: modalities must name at least one modality")
        self.config = config
        self.modalities: tuple[str, ...] = tuple(k for k in MODALITY_KEYS if k in wanted)
        width = config.width
        self.tokenizers = nn.ModuleDict({
            key: EpochTokenizer(get_modality(key).samples_per_epoch, width, config.stem_channels)
            for key in self.modalities
        })
        # Indexed by registry position so that checkpoints of encoders built on
        # different subsets share the meaning of each row.
        self.modality_embedding = nn.Embedding(len(MODALITY_KEYS), width)
        self.position_embedding = nn.Parameter(torch.zeros(config.epochs_per_window, width))
        nn.init.normal_(self.modality_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.token_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            width, config.heads, dim_feedforward=int(round(config.mlp_ratio * width)),
            dropout=config.dropout, activation="gelu", batch_first=True, norm_first=True,
        )
        self.backbone = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.projection_dim)
        # log(1/temperature), CLIP's parametrisation: positive and well scaled.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)),
                                        requires_grad=config.learn_temperature)

    # -- selection and dropout ------------------------------------------------------------------
    def _select(self, batch: Mapping[str, Tensor], modalities: Sequence[str] | None) -> tuple[str, ...]:
        if modalities is None:
            selected = tuple(k for k in self.modalities if k in batch)
            if not selected:
                raise ValueError(f"encode: the batch holds none of the encoder's modalities "
                                 f"{', '.join(self.modalities)}; found keys {', '.join(sorted(batch))}")
            return selected
        if isinstance(modalities, str):
            modalities = [m.strip() for m in modalities.split(",") if m.strip()]
        if not modalities:
            raise ValueError("encode: modalities is empty; pass None to encode every modality in the batch")
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise ValueError(f"encode: modality {', '.join(map(repr, unknown))} was not built into this "
                             f"encoder; it has {', '.join(self.modalities)}")
        missing = [m for m in modalities if m not in batch]
        if missing:
            raise ValueError(f"encode: modality {', '.join(map(repr, missing))} requested but the batch "
                             f"has no such key")
        return tuple(k for k in self.modalities if k in set(modalities))

    def _drop_modalities(self, keep: Tensor) -> Tensor:
        """Drop each used modality with probability ``modality_dropout``, never all of a window."""
        p = self.config.modality_dropout
        draw = torch.rand(keep.shape, device=keep.device)
        kept = keep & (draw >= p)
        emptied = keep.any(dim=1) & ~kept.any(dim=1)
        if emptied.any():
            # Keep one uniformly chosen present modality of each emptied window.
            scores = torch.rand(keep.shape, device=keep.device).masked_fill(~keep, -1.0)
            rescue = F.one_hot(scores.argmax(dim=1), keep.shape[1]).bool()
            kept = kept | (rescue & emptied[:, None])
        return kept

    # -- forward ----------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Tensor], modalities: Sequence[str] | None = None) -> EncoderOutput:
        """Encode whatever modalities of ``batch`` are present.

        Parameters
        ----------
        batch : mapping
            :func:`batch_to_tensors` output: one float ``(B, E, samples_per_epoch)``
            tensor per modality (robust-normalised, dimensionless; 3840 samples
            per 30-s epoch at 128 Hz, 480 at 16 Hz, 120 at 4 Hz) and ``present``
            (bool ``(B, 9)``, registry order). Other keys are ignored.
        modalities : sequence of str, optional
            Subset to encode; default every built modality found in ``batch``.

        Returns
        -------
        EncoderOutput
            Per-modality, fused per-epoch and window embeddings. In training
            mode modality dropout is applied to the ``present`` mask first.
        """
        selected = self._select(batch, modalities)
        present_in = batch["present"]
        if present_in.ndim != 2 or present_in.shape[1] != len(MODALITY_KEYS):
            raise ValueError(f"encode: present must have shape (B, {len(MODALITY_KEYS)}), "
                             f"found {tuple(present_in.shape)}")
        present_in = present_in.bool()
        rows, epochs = self._check_shapes(batch, selected, present_in.shape[0])
        keep = torch.zeros_like(present_in)
        for key in selected:
            index = MODALITY_KEYS.index(key)
            keep[:, index] = present_in[:, index]
        if self.training and self.config.modality_dropout > 0:
            keep = self._drop_modalities(keep)

        dtype = self.position_embedding.dtype
        tokens, owners = [], []
        for key in selected:
            index = MODALITY_KEYS.index(key)
            where = keep[:, index].nonzero().squeeze(1)
            # A modality absent from every window still runs its tokenizer, on zero
            # rows: ZeRO-3 gathers each module's parameters collectively as it runs,
            # so every rank must run the same modules in the same order.
            signal = batch[key] if where.numel() == rows else batch[key][where]
            token = self.tokenizers[key](signal.to(dtype))
            # Through the embedding's forward, not .weight[…], so that ZeRO-3 gathers it.
            tokens.append(token + self.modality_embedding(torch.tensor(index, device=token.device)))
            owners.append((key, where))
        p_dim = self.config.projection_dim
        device = present_in.device
        per_modality = {key: torch.zeros(rows, epochs, p_dim, device=device, dtype=dtype)
                        for key in selected}
        hidden = torch.cat(tokens) + self.position_embedding[:epochs]
        hidden = self.final_norm(self.backbone(self.token_dropout(hidden)))
        projected = F.normalize(self.head(hidden), dim=-1)
        start = 0
        for key, where in owners:
            part = projected[start:start + where.numel()]
            start += where.numel()
            per_modality[key] = (part if where.numel() == rows
                                 else per_modality[key].index_copy(0, where, part))

        if self.training and torch.is_grad_enabled():
            # Tokenizers of built modalities this call does not encode would get no
            # gradient, and data-parallel wrappers (DDP, DeepSpeed) expect every worker to
            # produce the same set of gradients: an exact zero keeps every parameter in the graph.
            idle = [p for key in self.modalities if key not in selected for p in self.tokenizers[key].parameters()]
            if idle:
                first = selected[0]
                per_modality[first] = per_modality[first] + 0.0 * sum(p.sum() for p in idle)
        stacked = torch.stack([per_modality[k] for k in selected])  # (M, B, E, P), zeros where absent
        counts = torch.stack([keep[:, MODALITY_KEYS.index(k)] for k in selected]).sum(0)  # (B,)
        fused = stacked.sum(0) / counts.clamp(min=1).to(dtype)[:, None, None]
        fused = F.normalize(fused, dim=-1)  # zero rows stay zero
        window = F.normalize(fused.mean(dim=1), dim=-1)
        # A fresh tensor made inside forward, so the temperature can be read safely
        # even when a wrapper (DeepSpeed ZeRO-3) partitions parameters outside it.
        return EncoderOutput(per_modality=per_modality, present=keep, fused=fused, window=window,
                             logit_scale=self.logit_scale * 1.0)

    forward = encode

    def _check_shapes(self, batch: Mapping[str, Tensor], selected: tuple[str, ...], rows: int) -> tuple[int, int]:
        epochs = None
        for key in selected:
            x = batch[key]
            samples = get_modality(key).samples_per_epoch
            if x.ndim != 3 or x.shape[0] != rows or x.shape[2] != samples:
                raise ValueError(f"encode: {key} must have shape ({rows}, epochs, {samples}) "
                                 f"({samples} samples per 30-s epoch), found {tuple(x.shape)}")
            if epochs is None:
                epochs = x.shape[1]
            elif x.shape[1] != epochs:
                raise ValueError(f"encode: {key} has {x.shape[1]} epochs per window, other modalities "
                                 f"have {epochs}")
        if epochs > self.config.epochs_per_window:
            raise ValueError(f"encode: windows of {epochs} epochs exceed the model's epochs_per_window "
                             f"{self.config.epochs_per_window}; build the model with a larger value")
        return rows, epochs


def batch_to_tensors(np_batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """Convert a :func:`s2v_core.store.table_to_batch` dict to torch tensors on ``device``.

    Float arrays become float32, bool stays bool, integers become int64;
    values that are not numpy arrays (or already tensors) are passed through.
    """
    out: dict[str, Any] = {}
    for key, value in np_batch.items():
        if isinstance(value, np.ndarray):
            if value.dtype == np.bool_:
                tensor = torch.from_numpy(value)
            elif np.issubdtype(value.dtype, np.floating):
                tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            elif np.issubdtype(value.dtype, np.integer):
                tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
            else:
                out[key] = value
                continue
            out[key] = tensor.to(device) if device is not None else tensor
        elif isinstance(value, Tensor) and device is not None:
            out[key] = value.to(device)
        else:
            out[key] = value
    return out


def pool_night(window_embeddings: Tensor | np.ndarray, night_ids: Any) -> tuple[np.ndarray, Tensor | np.ndarray]:
    """Night-level embeddings: the mean of each night's window embeddings, L2-normalised.

    Parameters
    ----------
    window_embeddings : Tensor or ndarray, ``(N, P)``
        Window embeddings (e.g. ``EncoderOutput.window``), any order.
    night_ids : array-like, ``(N,)``
        The night (``night_id`` or ``recording_id``) of each row.

    Returns
    -------
    nights : ndarray ``(K,)``
        The distinct night ids, sorted (``np.unique`` order).
    embeddings : same type as ``window_embeddings``, ``(K, P)``
        Row k is the mean of the windows of ``nights[k]``, re-normalised to unit
        length (a zero mean stays zero).
    """
    ids = np.asarray(night_ids.cpu() if isinstance(night_ids, Tensor) else night_ids)
    if ids.ndim != 1 or len(ids) != len(window_embeddings):
        raise ValueError(f"pool_night: expected one night id per window ({len(window_embeddings)}), "
                         f"found shape {ids.shape}")
    nights, inverse = np.unique(ids, return_inverse=True)
    as_tensor = isinstance(window_embeddings, Tensor)
    values = window_embeddings if as_tensor else torch.from_numpy(np.asarray(window_embeddings))
    index = torch.from_numpy(inverse.astype(np.int64)).to(values.device)
    sums = torch.zeros(len(nights), values.shape[1], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, values)
    counts = torch.bincount(index, minlength=len(nights)).to(values.dtype)
    pooled = F.normalize(sums / counts[:, None], dim=-1)
    return nights, (pooled if as_tensor else pooled.numpy())


def count_parameters(model: nn.Module, *, non_embedding: bool = True) -> int:
    """Number of parameters (frozen ones included), the ``N`` of the scaling laws.

    With ``non_embedding=True`` (Kaplan et al. 2020's convention) the count
    excludes what maps inputs to tokens: the per-modality tokenizer stems,
    the modality and position embeddings, and the temperature. What remains
    is the shared backbone, its final norm and the projection head, so ``N``
    does not change with the number of modalities a model was built for.
    """
    excluded = ("tokenizers.", "modality_embedding.", "position_embedding", "logit_scale")
    return sum(param.numel() for name, param in model.named_parameters()
               if not (non_embedding and name.startswith(excluded)))


def save_encoder(model: SleepEncoder, directory: str | Path) -> Path:
    """Write ``model_config.json`` (config + modalities) and ``encoder.pt`` (state dict) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = {"format": ENCODER_FORMAT, "config": to_mapping(model.config),
                   "modalities": list(model.modalities)}
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    return directory


def load_encoder(directory: str | Path, *, map_location: Any = "cpu") -> SleepEncoder:
    """Rebuild a :class:`SleepEncoder` written by :func:`save_encoder` (weights loaded, eval mode)."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"load_encoder: {config_path} does not exist (not a saved encoder)")
    description = json.loads(config_path.read_text(encoding="utf-8"))
    if description.get("format") != ENCODER_FORMAT:
        raise ValueError(f"load_encoder: {config_path}: expected format {ENCODER_FORMAT}, "
                         f"found {description.get('format')!r}")
    config = from_mapping(ModelConfig, description["config"], source=str(config_path))
    model = SleepEncoder(config, description["modalities"])
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
