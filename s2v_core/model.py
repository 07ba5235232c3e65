"""The sleep2vec encoder: per-modality tokenizers, one shared backbone, an aligned space.

Data flow for one window of ``E`` consecutive 30-s epochs::

    modality m, epoch e  (samples_per_epoch(m) samples at the store rate)
        │ tokenizer[m] (``conv`` stem or the authors' ``mlp``) → one ``width``-dim token
        │ [training, mask_rate > 0: a fraction of tokens replaced by mask embedding[m]]
        │ + modality embedding[m] (+ position embedding[e] when ``position = "absolute"``)
        ▼
    shared transformer backbone over the E tokens of (window, modality)
        │ (rotary positions inside attention when ``position = "rotary"``), final LayerNorm
        ▼
    hidden states (B, E, width)  ── the features for downstream models
        │ projection head (``linear`` or ``simclr``) → L2 normalisation
        ▼
    per-modality epoch embedding (B, E, projection_dim)
        │ mean over the modalities present in the window (re-normalised)
        ▼
    fused epoch embedding (B, E, P) → window embedding (B, P) → night (pool_night)

Each modality's sequence goes through the backbone on its own (no attention
across modalities): the contrastive objective aligns modalities of the same
window, and letting one modality attend to another would let the model copy
the answer instead of learning it. A missing modality contributes nothing:
its rows are encoded from zeros (every row of a selected modality is encoded,
so that no shape depends on the data and the step needs no host-device
synchronisation) and then masked out of every output and statistic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ModelConfig and the named sizes live in s2v_core.architecture; re-exported here, where callers import them.
from s2v_core.architecture import ModelConfig, available_model_configs, model_config  # noqa: F401
from s2v_core.backbone import Backbone
from s2v_core.config import from_mapping, to_mapping
from s2v_core.heads import MaskedBatchNorm, Reducer, build_head
from s2v_core.legacy import FORMAT1, convert_format1_state
from s2v_core.modalities import MODALITY_KEYS, get_modality, parse_modalities
from s2v_core.run_layout import MODEL_CONFIG_FILE, WEIGHTS_FILE
from s2v_core.tokenizers import build_tokenizer

logger = logging.getLogger(__name__)

#: Format version of ``model_config.json`` written by :func:`save_encoder`.
#: 2: tokenizers as GEMMs, a written-out backbone, tokenizer/position/head choices.
#: 1 (read only, converted on load): ``nn.Conv1d`` stems, ``nn.TransformerEncoder``.
ENCODER_FORMAT = 2


class EncoderOutput(NamedTuple):
    """What :meth:`SleepEncoder.encode` returns.

    A named tuple rather than a dataclass so that wrappers which hook module
    outputs can reach its tensors: DeepSpeed ZeRO-3 re-gathers a module's
    parameters for backward through hooks on the tensors of its output, and
    it walks tuples, lists and dicts only.

    Attributes
    ----------
    per_modality : dict of str to Tensor ``(B, E, P)``
        L2-normalised projection of each encoded modality; rows where the
        modality is absent (see ``present``) are zero and must be ignored.
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
    hidden : dict of str to Tensor ``(B, E, width)``, optional
        Backbone output (after the final LayerNorm, before the head) of each
        encoded modality; zero rows where the modality is absent. The
        features downstream models should start from (``--features hidden``).
    fused_hidden : Tensor ``(B, E, width)``, optional
        Mean of ``hidden`` over the present modalities (not normalised); zero
        for a window with no modality.
    window_hidden : Tensor ``(B, width)``, optional
        Mean of ``fused_hidden`` over the epochs of the window.
    """

    per_modality: dict[str, Tensor]
    present: Tensor
    fused: Tensor
    window: Tensor
    logit_scale: Tensor | None = None
    hidden: dict[str, Tensor] | None = None
    fused_hidden: Tensor | None = None
    window_hidden: Tensor | None = None


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
        self.tokenizers = nn.ModuleDict(
            {
                key: build_tokenizer(config.tokenizer, get_modality(key).samples_per_epoch, config)
                for key in self.modalities
            }
        )
        # Indexed by registry position so that checkpoints of encoders built on
        # different subsets share the meaning of each row.
        self.modality_embedding = nn.Embedding(len(MODALITY_KEYS), width)
        nn.init.normal_(self.modality_embedding.weight, std=0.02)
        if config.position == "absolute":
            self.position_embedding = nn.Parameter(torch.zeros(config.epochs_per_window, width))
            nn.init.normal_(self.position_embedding, std=0.02)
        if config.mask_tokens:
            # One learned token per modality (registry-indexed), initialised to ones as
            # the authors do: the scale of a LayerNorm-ed token.
            self.mask_embedding = nn.Embedding(len(MODALITY_KEYS), width)
            nn.init.ones_(self.mask_embedding.weight)
        self.token_dropout = nn.Dropout(config.dropout)
        self.backbone = Backbone(
            width,
            config.depth,
            config.heads,
            int(round(config.mlp_ratio * width)),
            config.dropout,
            rotary=config.position == "rotary",
        )
        self.head = build_head(config.head, width, config.projection_dim)
        # log(1/temperature), CLIP's parametrisation: positive and well scaled.
        self.logit_scale = nn.Parameter(
            torch.log(torch.tensor(1.0 / config.init_temperature)), requires_grad=config.learn_temperature
        )
        # Registry positions on the module's device: embedding rows are looked up
        # without a host-to-device copy per call.
        self.register_buffer("registry_index", torch.arange(len(MODALITY_KEYS)), persistent=False)

    # -- options the training pipeline sets ----------------------------------------------------------
    def set_batchnorm_reducer(self, reducer: Reducer | None) -> int:
        """Synchronise the head's BatchNorm statistics over ranks (see :mod:`s2v_core.heads`).

        ``reducer`` sums a tensor over all ranks with gradient (e.g.
        ``torch.distributed.nn.functional.all_reduce``); ``None`` keeps per-rank
        statistics. Returns the number of BatchNorm layers it was set on (0 for
        the linear head).
        """
        layers = [m for m in self.modules() if isinstance(m, MaskedBatchNorm)]
        for layer in layers:
            layer.set_reducer(reducer)
        return len(layers)

    def compile_blocks(self, **options: Any) -> SleepEncoder:
        """``torch.compile`` each tokenizer, the backbone and the head in place (keys unchanged).

        Unlike compiling :meth:`encode` as a whole, whose graph depends on which
        modalities a step encodes (a recompile per random pair), each block's
        graph depends only on shapes. ``options`` go to ``nn.Module.compile``.
        """
        for tokenizer in self.tokenizers.values():
            tokenizer.compile(**options)
        self.backbone.compile(**options)
        self.head.compile(**options)
        return self

    # -- selection and dropout ------------------------------------------------------------------
    def _select(self, batch: Mapping[str, Tensor], modalities: Sequence[str] | None) -> tuple[str, ...]:
        if modalities is None:
            selected = tuple(k for k in self.modalities if k in batch)
            if not selected:
                raise ValueError(
                    f"encode: the batch holds none of the encoder's modalities "
                    f"{', '.join(self.modalities)}; found keys {', '.join(sorted(batch))}"
                )
            return selected
        if isinstance(modalities, str):
            modalities = [m.strip() for m in modalities.split(",") if m.strip()]
        if not modalities:
            raise ValueError("encode: modalities is empty; pass None to encode every modality in the batch")
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise ValueError(
                f"encode: modality {', '.join(map(repr, unknown))} was not built into this "
                f"encoder; it has {', '.join(self.modalities)}"
            )
        missing = [m for m in modalities if m not in batch]
        if missing:
            raise ValueError(
                f"encode: modality {', '.join(map(repr, missing))} requested but the batch has no such key"
            )
        return tuple(k for k in self.modalities if k in set(modalities))

    def _drop_modalities(self, keep: Tensor) -> Tensor:
        """Drop each used modality with probability ``modality_dropout``, never all of a window.

        A window that would lose every modality keeps one uniformly chosen
        present modality. The rescue is computed for every window and applied
        where needed, so nothing depends on the draw on the host.
        """
        p = self.config.modality_dropout
        kept = keep & (torch.rand(keep.shape, device=keep.device) >= p)
        emptied = keep.any(dim=1) & ~kept.any(dim=1)
        scores = torch.rand(keep.shape, device=keep.device).masked_fill(~keep, -1.0)
        rescue = torch.arange(keep.shape[1], device=keep.device) == scores.argmax(dim=1, keepdim=True)
        return kept | (rescue & emptied[:, None])

    def _masking(self, mask_rate: float) -> bool:
        if not 0.0 <= mask_rate < 1.0:
            raise ValueError(f"encode: mask_rate must be in [0, 1), found {mask_rate!r}")
        if mask_rate > 0 and not self.config.mask_tokens:
            raise ValueError(
                f"encode: mask_rate {mask_rate} needs an encoder built with mask_tokens=True "
                f"(model config {self.config.name!r} has mask_tokens=False)"
            )
        return mask_rate > 0 and self.training

    # -- forward ----------------------------------------------------------------------------------
    def encode(
        self, batch: Mapping[str, Tensor], modalities: Sequence[str] | None = None, *, mask_rate: float = 0.0
    ) -> EncoderOutput:
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
        mask_rate : float
            In training, the probability that a token (one epoch of one
            modality) is replaced by its modality's learned mask embedding
            after the tokenizer (the authors use 0.15). Needs ``mask_tokens``;
            ignored in eval mode.

        Returns
        -------
        EncoderOutput
            Hidden states, per-modality, fused per-epoch and window embeddings.
            In training mode modality dropout is applied to ``present`` first.
        """
        selected = self._select(batch, modalities)
        present_in = batch["present"]
        if present_in.ndim != 2 or present_in.shape[1] != len(MODALITY_KEYS):
            raise ValueError(
                f"encode: present must have shape (B, {len(MODALITY_KEYS)}), found {tuple(present_in.shape)}"
            )
        present_in = present_in.bool()
        rows, epochs = self._check_shapes(batch, selected, present_in.shape[0])
        masking = self._masking(mask_rate)
        keep = torch.zeros_like(present_in)
        for key in selected:
            index = MODALITY_KEYS.index(key)
            keep[:, index] = present_in[:, index]
        if self.training and self.config.modality_dropout > 0:
            keep = self._drop_modalities(keep)
        valid = torch.stack([keep[:, MODALITY_KEYS.index(k)] for k in selected])  # (M, B)

        dtype = self.modality_embedding.weight.dtype
        # Through the embeddings' forward, not .weight[…], so that ZeRO-3 gathers them.
        modality_rows = self.modality_embedding(self.registry_index)  # (9, width)
        mask_rows = self.mask_embedding(self.registry_index) if self.config.mask_tokens else None
        tokens = []
        for m, key in enumerate(selected):
            index = MODALITY_KEYS.index(key)
            # Every row is encoded; absent rows from zeros (whatever the batch holds
            # there, e.g. NaN, must not reach a weight gradient).
            signal = torch.where(valid[m][:, None, None], batch[key], 0.0).to(dtype)
            token = self.tokenizers[key](signal)
            if masking:
                drawn = torch.rand(rows, epochs, device=token.device) < mask_rate
                token = torch.where(drawn[..., None], mask_rows[index].to(token.dtype), token)
            tokens.append(token + modality_rows[index])
        x = torch.cat(tokens)  # (M * B, E, width): every modality's sequences in one backbone call
        if self.config.position == "absolute":
            x = x + self.position_embedding[:epochs]
        count = len(selected)
        width = x.shape[-1]  # explicit sizes, not -1: a batch of zero rows must still reshape
        hidden = self.backbone(self.token_dropout(x)).view(count, rows, epochs, width)
        row_valid = valid[:, :, None].expand(count, rows, epochs).reshape(count, rows * epochs)
        projected = self.head(hidden.reshape(count, rows * epochs, width), row_valid)
        projected = F.normalize(projected, dim=-1).view(count, rows, epochs, projected.shape[-1])
        here = valid[:, :, None, None]
        projected = torch.where(here, projected, 0.0)
        hidden = torch.where(here, hidden, 0.0)
        if self.training and torch.is_grad_enabled():
            projected = projected + self._zero_for_unused(selected, x, mask_rows if not masking else None)

        counts = valid.sum(0).clamp(min=1)  # (B,)
        fused = F.normalize(projected.sum(0) / counts.to(projected.dtype)[:, None, None], dim=-1)
        window = F.normalize(fused.mean(dim=1), dim=-1)  # zero rows stay zero
        fused_hidden = hidden.sum(0) / counts.to(hidden.dtype)[:, None, None]
        # A fresh tensor made inside forward, so the temperature can be read safely
        # even when a wrapper (DeepSpeed ZeRO-3) partitions parameters outside it.
        return EncoderOutput(
            per_modality={k: projected[m] for m, k in enumerate(selected)},
            present=keep,
            fused=fused,
            window=window,
            logit_scale=self.logit_scale * 1.0,
            hidden={k: hidden[m] for m, k in enumerate(selected)},
            fused_hidden=fused_hidden,
            window_hidden=fused_hidden.mean(dim=1),
        )

    forward = encode

    def _zero_for_unused(self, selected: tuple[str, ...], x: Tensor, mask_rows: Tensor | None) -> Tensor:
        """An exact zero that puts every parameter this step did not use into the graph.

        Data-parallel wrappers (DDP, DeepSpeed) expect every worker to produce
        the same set of gradients, and ZeRO-3 gathers each module's parameters
        collectively as it runs, so every rank must run the same modules in the
        same order: tokenizers of modalities this step does not encode run on
        one zero epoch, an unused mask embedding is summed.
        """
        zero = x.new_zeros(())
        for key in self.modalities:
            if key not in selected:
                samples = get_modality(key).samples_per_epoch
                zero = zero + self.tokenizers[key](x.new_zeros(1, 1, samples)).sum()
        if mask_rows is not None:
            zero = zero + mask_rows.sum()
        return zero * 0.0

    def _check_shapes(self, batch: Mapping[str, Tensor], selected: tuple[str, ...], rows: int) -> tuple[int, int]:
        epochs = None
        for key in selected:
            x = batch[key]
            samples = get_modality(key).samples_per_epoch
            if x.ndim != 3 or x.shape[0] != rows or x.shape[2] != samples:
                raise ValueError(
                    f"encode: {key} must have shape ({rows}, epochs, {samples}) "
                    f"({samples} samples per 30-s epoch), found {tuple(x.shape)}"
                )
            if epochs is None:
                epochs = x.shape[1]
            elif x.shape[1] != epochs:
                raise ValueError(f"encode: {key} has {x.shape[1]} epochs per window, other modalities have {epochs}")
        if self.config.position == "absolute" and epochs > self.config.epochs_per_window:
            raise ValueError(
                f"encode: windows of {epochs} epochs exceed the model's epochs_per_window "
                f"{self.config.epochs_per_window} (absolute positions); build the model with "
                f"a larger value or with position='rotary'"
            )
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
        raise ValueError(
            f"pool_night: expected one night id per window ({len(window_embeddings)}), found shape {ids.shape}"
        )
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
    excludes what maps inputs to tokens: the per-modality tokenizers, the
    modality, mask and position embeddings, and the temperature. What remains
    is the shared backbone (with its final norm) and the projection head, so
    ``N`` does not change with the number of modalities a model was built for.
    """
    excluded = ("tokenizers.", "modality_embedding.", "mask_embedding.", "position_embedding", "logit_scale")
    return sum(
        param.numel() for name, param in model.named_parameters() if not (non_embedding and name.startswith(excluded))
    )


def save_encoder(model: SleepEncoder, directory: str | Path) -> Path:
    """Write ``model_config.json`` (format, config, modalities) and ``encoder.pt`` (state dict) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    description = {"format": ENCODER_FORMAT, "config": to_mapping(model.config), "modalities": list(model.modalities)}
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    torch.save(model.state_dict(), directory / WEIGHTS_FILE)
    return directory


def load_encoder(directory: str | Path, *, map_location: Any = "cpu") -> SleepEncoder:
    """Rebuild a :class:`SleepEncoder` written by :func:`save_encoder` (weights loaded, eval mode).

    Encoders of format 1 (written before tokenizer/position/head choices
    existed) are converted on load by :func:`s2v_core.legacy.convert_format1_state`
    and encode exactly as before; any other format is a ``ValueError`` naming it.
    """
    directory = Path(directory)
    config_path = directory / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"load_encoder: {config_path} does not exist (not a saved encoder)")
    description = json.loads(config_path.read_text(encoding="utf-8"))
    version = description.get("format")
    if version not in (FORMAT1, ENCODER_FORMAT):
        raise ValueError(
            f"load_encoder: {config_path}: encoder format {version!r} is not readable by this "
            f"version; expected format {ENCODER_FORMAT} (or {FORMAT1}, converted on load)"
        )
    config = from_mapping(ModelConfig, description["config"], source=str(config_path))
    model = SleepEncoder(config, description["modalities"])
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    if version == FORMAT1:
        logger.info("load_encoder: converting format-1 encoder %s to format %d", directory, ENCODER_FORMAT)
        state = convert_format1_state(state)
    model.load_state_dict(state)
    return model.eval()
