"""A pretrained encoder turned into a task model: gated fusion, a task head, frozen / LoRA / full tuning.

Data flow for one window of ``E`` 30-s epochs::

    batch (any subset of the encoder's modalities, ``present`` mask)
        │ [training, modality_dropout > 0: drop present modalities, never all of a window]
        │ SleepEncoder.encode → hidden[m] (B, E, width) per modality
        │ (a window longer than the encoder's epochs_per_window: encoded in chunks, concatenated)
        ▼
    GatedFusion: softmax over the learned scalars of the modalities present in each window
        ▼ (B, E, width)
    task head: linear | mlp | temporal (a rotary transformer over the sequence of epochs)
        ▼
    epoch-level task: (B, E, outputs)      night-level task: (B, outputs), mean over epochs

Modes (:data:`MODES`): ``frozen`` trains the fusion and the head on a fixed
encoder; ``lora`` adds ``peft`` LoRA adapters to the backbone's projections
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``) and keeps
every base weight fixed; ``full`` trains the backbone too. The tokenizers stay
frozen unless ``train_tokenizers``; the encoder's projection head, temperature
and mask tokens serve only the contrastive objective and always stay frozen.

A fine-tuned model is a directory (:func:`save_finetuned` / :func:`load_finetuned`)::

    finetuned.json       format, task, mode, modalities, head, LoRA settings, metrics; an event
                         detector also its counting (``event_threshold``, ``events_per_epoch``,
                         fitted on val nights)
    encoder/             the base encoder (s2v_core.model.save_encoder; full mode: the tuned one)
    adapter.pt           lora mode: the LoRA weights (peft's adapter state dict)
    task_model.pt        the fusion and head weights

Pure torch + peft: no Ray, no MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from s2v_core.backbone import Backbone
from s2v_core.config import from_mapping, to_mapping
from s2v_core.evaluation.tasks import Task, get_task, night_targets
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.model import SleepEncoder, load_encoder, save_encoder
from s2v_core.run_layout import ADAPTER_FILE, DESCRIPTION_FILE, ENCODER_DIR, TASK_MODEL_FILE

logger = logging.getLogger(__name__)

MODES = ("frozen", "lora", "full")
HEAD_KINDS = ("linear", "mlp", "temporal")
#: The backbone's linear layers (s2v_core.backbone names them for adapters).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
#: Format of ``finetuned.json``.
FINETUNED_FORMAT = 1


@dataclass(frozen=True)
class FinetuneSpec:
    """How a task model is built on an encoder (saved with the model, so it rebuilds the same)."""

    task: str = "staging"  # a name of s2v_core.evaluation.tasks (staging, staging4, ahi, outcome:COL …)
    mode: str = "frozen"  # frozen (fusion + head) | lora (peft adapters on the backbone) | full
    head: str = "linear"  # linear | mlp | temporal (transformer over the epochs of the sequence)
    head_hidden: int = 64  # hidden width of the mlp head; feed-forward width of the temporal head
    head_depth: int = 1  # transformer blocks of the temporal head
    head_dropout: float = 0.1  # dropout inside the mlp / temporal head
    lora_r: int = 8  # LoRA rank (peft's r)
    lora_alpha: int = 16  # LoRA scale numerator: updates are scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module names that get adapters
    train_tokenizers: bool = False  # tokenizers frozen by default: small labelled sets overfit them
    modality_dropout: float = 0.0  # P(drop a present modality of a window) in training, never all
    modalities: tuple[str, ...] = ()  # modalities the task model reads (empty: every encoder modality)
    # Epochs per window the model was trained on (the store's; may exceed the encoder's, see
    # FineTunedModel.features); staging encodes recordings in windows of this length. 0: the encoder's.
    epochs_per_window: int = 0

    def __post_init__(self) -> None:
        get_task(self.task)  # ValueError naming the valid tasks
        for name, value, allowed in (("mode", self.mode, MODES), ("head", self.head, HEAD_KINDS)):
            if value not in allowed:
                raise ValueError(f"--{name}: expected one of {', '.join(allowed)}, found {value!r}")
        for name in ("head_hidden", "head_depth", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"finetune spec: {name} must be an integer >= 1, found {value!r}")
        if not isinstance(self.epochs_per_window, int) or self.epochs_per_window < 0:
            raise ValueError(
                f"finetune spec: epochs_per_window must be an integer >= 0, found {self.epochs_per_window!r}"
            )
        for name in ("head_dropout", "lora_dropout", "modality_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"finetune spec: {name} must be in [0, 1), found {getattr(self, name)!r}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if not self.lora_targets or unknown:
            raise ValueError(
                f"--lora-targets: expected a non-empty subset of {', '.join(LORA_TARGETS)}, "
                f"found {', '.join(self.lora_targets) or 'nothing'}"
            )

    @property
    def task_definition(self) -> Task:
        return get_task(self.task)


def drop_modalities(present: Tensor, probability: float) -> Tensor:
    """Drop each present modality with ``probability``; a window never loses all of them.

    A window that would lose every modality keeps one uniformly chosen present one.
    """
    kept = present & (torch.rand(present.shape, device=present.device) >= probability)
    emptied = present.any(dim=1) & ~kept.any(dim=1)
    scores = torch.rand(present.shape, device=present.device).masked_fill(~present, -1.0)
    rescue = torch.arange(present.shape[1], device=present.device) == scores.argmax(dim=1, keepdim=True)
    return kept | (rescue & emptied[:, None])


class GatedFusion(nn.Module):
    """Fuse per-modality features with learned per-modality weights, softmax over the present ones.

    One scalar per modality (registry-indexed, so models built on different
    subsets agree on what each means); for each window the weights are the
    softmax of the scalars of the modalities present there, so an absent
    modality gets weight 0 and a window with a single modality uses it as
    it is. A window with none gives zeros.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(len(MODALITY_KEYS)))  # equal weights at the start

    def weights(self, present: Tensor, keys: Sequence[str]) -> Tensor:
        """``(B, M)`` fusion weights of ``keys`` per window (rows sum to 1, or 0 with no modality)."""
        index = torch.tensor([MODALITY_KEYS.index(k) for k in keys], device=present.device)
        mask = present.bool()[:, index]
        logits = self.gate[index].expand(mask.shape).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return torch.where(mask.any(dim=1, keepdim=True), weights, 0.0)  # all -inf rows would be NaN

    def forward(self, hidden: Mapping[str, Tensor], present: Tensor) -> Tensor:
        """``hidden``: ``(B, E, width)`` per modality; ``present``: ``(B, 9)`` bool. Returns ``(B, E, width)``."""
        keys = list(hidden)
        weights = self.weights(present, keys).to(hidden[keys[0]].dtype)
        stacked = torch.stack([hidden[k] for k in keys], dim=1)  # (B, M, E, width)
        # Absent rows of `hidden` are zero already; weight 0 keeps any value there out.
        return (torch.where(weights[:, :, None, None] > 0, stacked, 0.0) * weights[:, :, None, None]).sum(1)


class TaskHead(nn.Module):
    """Epoch features ``(B, E, width)`` → ``(B, E, outputs)`` (epoch level) or ``(B, outputs)`` (night level)."""

    def __init__(
        self,
        kind: str,
        width: int,
        outputs: int,
        *,
        level: str,
        hidden: int,
        depth: int,
        dropout: float,
        heads: int = 1,
    ) -> None:
        super().__init__()
        self.kind, self.level = kind, level
        if kind == "linear":
            self.body = nn.Identity()
            self.out = nn.Linear(width, outputs)
        elif kind == "mlp":
            self.body = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout))
            self.out = nn.Linear(hidden, outputs)
        elif kind == "temporal":
            # Rotary positions: trained on store windows, it reads a whole night's sequence unchanged.
            self.body = Backbone(width, depth, heads, hidden, dropout, rotary=True)
            self.out = nn.Linear(width, outputs)
        else:
            raise ValueError(f"--head: expected one of {', '.join(HEAD_KINDS)}, found {kind!r}")

    def forward(self, features: Tensor) -> Tensor:
        x = self.body(features)
        return self.out(x) if self.level == "epoch" else self.out(x.mean(dim=1))


class FineTunedModel(nn.Module):
    """A :class:`SleepEncoder` with gated fusion and a task head, tuned as ``spec.mode`` says.

    Parameters
    ----------
    encoder : SleepEncoder
        The pretrained encoder (modified in place: LoRA adapters, frozen parameters).
    spec : FinetuneSpec
    """

    def __init__(self, encoder: SleepEncoder, spec: FinetuneSpec) -> None:
        super().__init__()
        if not isinstance(encoder, SleepEncoder):
            raise TypeError(f"FineTunedModel: expected a SleepEncoder, found {type(encoder).__name__}")
        modalities = spec.modalities or encoder.modalities
        missing = [m for m in modalities if m not in encoder.modalities]
        if missing:
            raise ValueError(
                f"--modalities: {', '.join(missing)} not built into the encoder "
                f"(it has {', '.join(encoder.modalities)})"
            )
        self.spec = dataclasses.replace(spec, modalities=tuple(k for k in MODALITY_KEYS if k in modalities))
        self.task = spec.task_definition
        self.base_config = encoder.config
        # The task model drops modalities itself (also in frozen mode, where the encoder runs in eval mode).
        encoder.config = dataclasses.replace(encoder.config, modality_dropout=0.0)
        self.encoder = encoder
        width = encoder.config.width
        self.fusion = GatedFusion()
        self.head = TaskHead(
            spec.head,
            width,
            self.task.outputs,
            level=self.task.level,
            hidden=spec.head_hidden,
            depth=spec.head_depth,
            dropout=spec.head_dropout,
            heads=encoder.config.heads,
        )
        self._configure_encoder()

    def _configure_encoder(self) -> None:
        spec, encoder = self.spec, self.encoder
        encoder.requires_grad_(spec.mode == "full")
        if spec.mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            config = LoraConfig(
                r=spec.lora_r,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=list(spec.lora_targets),
                bias="none",
            )
            inject_adapter_in_model(config, encoder)  # marks only the adapters trainable
        # What only the contrastive objective reads never trains here.
        for module in (encoder.head, getattr(encoder, "mask_embedding", None)):
            if module is not None:
                module.requires_grad_(False)
        encoder.logit_scale.requires_grad_(False)
        encoder.tokenizers.requires_grad_(spec.train_tokenizers)

    def train(self, mode: bool = True) -> FineTunedModel:
        super().train(mode)
        if self.spec.mode == "frozen":
            self.encoder.eval()  # no dropout, and BatchNorm statistics stay the pretrained ones
        self.encoder.head.eval()  # the projection head's output is unused: keep its statistics
        return self

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Fused epoch features ``(B, L, width)`` of a batch of ``L``-epoch windows (what the head reads).

        Windows longer than the encoder reads at once (its ``epochs_per_window``
        with absolute positions) are encoded in consecutive chunks of that length
        (the last may be shorter) whose features are concatenated: the temporal
        head then sees the whole long window. In training, modality dropout is
        drawn once per window, shared by its chunks.
        """
        modalities = [m for m in self.spec.modalities if m in batch]
        if not modalities:
            raise ValueError(f"the batch holds none of the model's modalities {', '.join(self.spec.modalities)}")
        present = batch["present"].bool()
        if self.training and self.spec.modality_dropout > 0:
            present = drop_modalities(present, self.spec.modality_dropout)
        length = batch[modalities[0]].shape[1]
        chunk = self.encoder.config.epochs_per_window if self.encoder.config.position == "absolute" else length
        parts = []
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.spec.mode != "frozen"):
            for start in range(0, length, chunk):
                piece = {k: batch[k][:, start : start + chunk] for k in modalities}
                # Through the encoder's __call__, not .encode: ZeRO-3 then gathers its own parameters.
                out = self.encoder({**piece, "present": present}, modalities)
                parts.append(self.fusion(out.hidden, out.present))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Head outputs of a :func:`s2v_core.model.batch_to_tensors` batch (see the module docstring)."""
        return self.head(self.features(batch))

    @property
    def window_epochs(self) -> int:
        """Epochs per window the model was trained on (what staging encodes together)."""
        return self.spec.epochs_per_window or self.base_config.epochs_per_window

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, *, lr: float, head_lr: float | None = None) -> list[dict]:
        """Optimiser groups: the encoder's trained weights at ``lr``, the fusion and head at ``head_lr``.

        A head starts from random weights while a pretrained encoder should move
        little, so full fine-tuning usually gives the head the larger rate.
        ``head_lr=None`` uses ``lr`` for both. Empty groups (a frozen encoder) are left out.
        """
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        task = [p for module in (self.fusion, self.head) for p in module.parameters() if p.requires_grad]
        groups = [{"params": encoder, "lr": lr}, {"params": task, "lr": lr if head_lr is None else head_lr}]
        return [g for g in groups if g["params"]]


def batch_targets(task: Task, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The targets of a :func:`s2v_core.store.table_to_batch` batch read with ``history_columns=task.outcome_columns``.

    Epoch-level: ``int64 (B, E)`` classes (−1 unknown), or for event tasks
    ``float64 (B, E)`` 1/0 (NaN unknown; the batch needs ``events``); night-level:
    ``float64 (B,)`` (``(B, 2)`` event, time for survival), NaN unknown.
    """
    if task.event_bits:
        if "events" not in batch:
            raise ValueError(
                f"--task {task.name}: the store has no per-epoch event labels (column 'events'); "
                "re-ingest it with this version of s2v (NSRR XML hypnograms carry the events)"
            )
        return task.event_targets(batch["events"])
    if task.level == "epoch":
        return task.stage_targets(batch["stages"])
    history = batch["history"]
    outcomes = {name: history[:, i] for i, name in enumerate(task.outcome_columns)}
    return night_targets(task, age=batch["age"], sex=batch["sex"], outcomes=outcomes)


@torch.no_grad()
def predict(
    model: FineTunedModel, batches: Iterable[Mapping[str, np.ndarray]], *, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and head outputs of every row of ``batches`` (eval mode), ready for :func:`score`.

    Epoch-level tasks give one row per scored epoch (unknown stages dropped);
    night-level tasks one row per night: window outputs are averaged over the
    windows of a night (``night_id``), whose target they share.
    """
    from s2v_core.model import batch_to_tensors

    was_training = model.training
    model.eval()
    targets, outputs, nights = [], [], []
    for batch in batches:
        output = model(batch_to_tensors(batch, device)).float().cpu().numpy()
        target = batch_targets(model.task, batch)
        if model.task.level == "epoch":
            keep = target.reshape(-1) >= 0
            targets.append(target.reshape(-1)[keep])
            outputs.append(output.reshape(-1, output.shape[-1])[keep])
        else:
            targets.append(target)
            outputs.append(output)
            nights.append(batch["night_id"])
    model.train(was_training)
    if not targets:
        raise ValueError("predict: no batch to score")
    target, output = np.concatenate(targets), np.concatenate(outputs)
    if model.task.level == "night":
        ids, inverse = np.unique(np.concatenate(nights), return_inverse=True)
        pooled = np.zeros((len(ids), output.shape[1]))
        np.add.at(pooled, inverse, output)
        pooled /= np.bincount(inverse, minlength=len(ids))[:, None]
        first = np.unique(inverse, return_index=True)[1]
        return target[first], pooled
    return target, output


def _base_state(encoder: SleepEncoder) -> dict[str, Tensor]:
    """The encoder's own weights, without LoRA parameters and with peft's ``base_layer`` names undone."""
    return {
        k.replace(".base_layer.", "."): v.detach().cpu() for k, v in encoder.state_dict().items() if "lora_" not in k
    }


#: Keys of ``finetuned.json`` an event detector's directory adds: the probability above which an
#: epoch holds an event, where it was chosen (``s2v finetune``: on the val nights), and the events a
#: run of positive epochs counts per epoch (s2v_core.evaluation.events.EventCounting).
EVENT_THRESHOLD_KEY = "event_threshold"
EVENT_THRESHOLD_FROM_KEY = "event_threshold_from"
EVENTS_PER_EPOCH_KEY = "events_per_epoch"


def save_finetuned(model: FineTunedModel, directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a fine-tuned model directory (layout in the module docstring); ``extra`` goes into the JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = SleepEncoder(model.base_config, model.encoder.modalities)
    base.load_state_dict(_base_state(model.encoder))
    save_encoder(base, directory / ENCODER_DIR)
    if model.spec.mode == "lora":
        from peft import get_peft_model_state_dict

        torch.save(
            {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model.encoder).items()}, directory / ADAPTER_FILE
        )
    torch.save({"fusion": model.fusion.state_dict(), "head": model.head.state_dict()}, directory / TASK_MODEL_FILE)
    task = model.task
    description = {
        "format": FINETUNED_FORMAT,
        "spec": to_mapping(model.spec),
        "task": task.name,
        "level": task.level,
        "kind": task.kind,
        "classes": list(task.classes),
        "modalities": list(model.spec.modalities),
        "epochs_per_window": model.window_epochs,
        **(extra or {}),
    }
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return directory


def read_description(directory: str | Path) -> dict:
    """The ``finetuned.json`` of a fine-tuned model directory (``FileNotFoundError`` naming it if absent)."""
    path = Path(directory) / DESCRIPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--model {directory}: not a fine-tuned model (no {DESCRIPTION_FILE}; `s2v finetune` writes RUN_DIR/model)"
        )
    description = json.loads(path.read_text(encoding="utf-8"))
    if description.get("format") != FINETUNED_FORMAT:
        raise ValueError(
            f"{path}: fine-tuned model format {description.get('format')!r} is not readable by "
            f"this version; expected {FINETUNED_FORMAT}"
        )
    return description


def load_finetuned(directory: str | Path, *, map_location: Any = "cpu") -> FineTunedModel:
    """Rebuild a model written by :func:`save_finetuned` (weights loaded, eval mode)."""
    directory = Path(directory)
    description = read_description(directory)
    spec = from_mapping(FinetuneSpec, description["spec"], source=str(directory / DESCRIPTION_FILE))
    model = FineTunedModel(load_encoder(directory / ENCODER_DIR, map_location=map_location), spec)
    if spec.mode == "lora":
        from peft import set_peft_model_state_dict

        adapter = torch.load(directory / ADAPTER_FILE, map_location=map_location, weights_only=True)
        result = set_peft_model_state_dict(model.encoder, adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(
                f"{directory / ADAPTER_FILE}: adapter weights that match no LoRA layer: "
                f"{', '.join(result.unexpected_keys[:5])}"
            )
    parts = torch.load(directory / TASK_MODEL_FILE, map_location=map_location, weights_only=True)
    model.fusion.load_state_dict(parts["fusion"])
    model.head.load_state_dict(parts["head"])
    return model.eval()
