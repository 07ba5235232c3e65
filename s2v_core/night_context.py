"""Whole-night context for epoch-level tasks: a second-stage transformer over a night's epoch features.

The ``temporal`` head of :mod:`s2v_core.finetuning` reads one store window
(e.g. 10 epochs = 5 min). A scorer reads more: whether an ambiguous epoch is
REM or wake, N1 or N2, depends on what came minutes before and after. This
module adds a second stage on top of a fine-tuned model (any mode: frozen,
LoRA or full)::

    stage 1 (s2v finetune): windows ─► FineTunedModel.features ─► (E, width) per window
                                            │ grouped by night, ordered by window_index
                                            ▼
    stage 2 (this module):  one night's (epochs, width) ─► NightContextHead ─► (epochs, outputs)
                            + stage 1's own outputs (residual)

The head is **residual** by default (``fit_night_context``, ``s2v finetune
--night-context``): it adds a correction to stage 1's outputs for the same
epochs, its output layer starts at zero, and the val nights score the
untrained head too, so the head kept is never worse on val than stage 1
alone. A head that predicted from the features alone had to learn the
classes again from 36 nights and lost 0.02 κ to its stage 1 on the
benchmark's test nights (0.901 vs 0.924); residual, it kept them (0.925).

:func:`night_features` runs stage 1 once (eval mode, no gradient) and
returns one :class:`NightSequence` per night; :class:`NightContextHead` is
a bidirectional rotary transformer over the whole sequence (relative
positions, so nights of any length); :func:`train_night_head` fits it on the
train nights with early stopping on the val nights; :func:`predict_nights`
gives targets and outputs ready for :meth:`s2v_core.evaluation.tasks.Task.metrics`.

Nights are processed one at a time, never padded together, so attention
never crosses nights. Windows the store dropped (no usable modality) are
missing from a sequence: the epochs on either side of such a gap become
neighbours. Stage 1 stays fixed while stage 2 trains (its features are
computed once); staging with both stages means running the fine-tuned model
and then the head over each night.

``s2v finetune --night-context`` trains the head after stage 1 and keeps it in
the fine-tuned model directory (:func:`save_night_head`: ``night_head.pt``
and its hyper-parameters under ``"night_head"`` in ``finetuned.json``);
:func:`load_night_head` finds it there, and ``s2v stage`` applies it over
each whole recording.

Pure torch: no Ray, no MLflow.
"""

from __future__ import annotations

import copy
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
from s2v_core.evaluation.tasks import Task
from s2v_core.run_layout import DESCRIPTION_FILE, NIGHT_HEAD_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NightSequence:
    """One night's stage-1 epoch features and its epoch targets, in night order.

    Attributes
    ----------
    features : ndarray, float32 ``(epochs, width)``
    target : ndarray ``(epochs,)``
        The task's per-epoch targets (classes with −1 unknown, or 1/0 with NaN unknown).
    stage1 : ndarray, float32 ``(epochs, outputs)``, optional
        Stage 1's own outputs (its head's logits) for the epochs; a residual head adds to them.
    """

    features: np.ndarray
    target: np.ndarray
    stage1: np.ndarray | None = None


@torch.no_grad()
def night_features(model, batches: Iterable[Mapping[str, np.ndarray]], *, device="cpu") -> list[NightSequence]:
    """Stage 1: the fused epoch features of a fine-tuned model, grouped by night and ordered.

    Parameters
    ----------
    model : s2v_core.finetuning.FineTunedModel
        A model of an epoch-level task (its head is not used).
    batches : iterable of dict
        :func:`s2v_core.store.table_to_batch` batches with ``night_id`` and
        ``window_index`` (windows of a night may come in any order and batch).
    """
    from s2v_core.finetuning import batch_targets
    from s2v_core.model import batch_to_tensors

    if model.task.level != "epoch":
        raise ValueError(f"night_features: task {model.task.name!r} is not an epoch-level task")
    was_training = model.training
    model.eval()
    parts: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for batch in batches:
        if "window_index" not in batch:
            raise ValueError("night_features: the batches need window_index (read the store column)")
        features = model.features(batch_to_tensors(batch, device))
        stage1 = model.head(features).float().cpu().numpy()
        features = features.float().cpu().numpy()
        target = batch_targets(model.task, batch)
        for row, night in enumerate(batch["night_id"].tolist()):
            parts.setdefault(night, []).append(
                (int(batch["window_index"][row]), features[row], target[row], stage1[row])
            )
    model.train(was_training)
    nights = []
    for rows in parts.values():
        rows.sort(key=lambda r: r[0])
        nights.append(NightSequence(*(np.concatenate([r[i] for r in rows]) for i in (1, 2, 3))))
    return nights


class NightContextHead(nn.Module):
    """A bidirectional rotary transformer over a whole night: ``(epochs, width)`` → ``(epochs, outputs)``.

    Parameters
    ----------
    width : int
        Width of the stage-1 features.
    outputs : int
        The task's output width (classes, or 1).
    depth, heads, hidden, dropout
        Transformer blocks, attention heads (must divide ``width``),
        feed-forward width and dropout.
    residual : bool
        Add the output to stage 1's outputs (``forward(features, stage1)``);
        the output layer starts at zero, so the untrained head is stage 1.
    """

    def __init__(
        self,
        width: int,
        outputs: int,
        *,
        depth: int = 2,
        heads: int = 2,
        hidden: int = 128,
        dropout: float = 0.1,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"NightContextHead: heads ({heads}) must divide width ({width})")
        #: What rebuilds this head (:func:`save_night_head` writes it, :func:`load_night_head` reads it).
        self.hyperparameters = {
            "width": width,
            "outputs": outputs,
            "depth": depth,
            "heads": heads,
            "hidden": hidden,
            "dropout": dropout,
            "residual": residual,
        }
        self.residual = residual
        self.norm = nn.LayerNorm(width)
        self.body = Backbone(width, depth, heads, hidden, dropout, rotary=True)
        self.out = nn.Linear(width, outputs)
        if residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, stage1: Tensor | None = None) -> Tensor:
        """``(epochs, width)`` (one night) or ``(1, epochs, width)`` → the same leading shape with ``outputs``.

        A residual head needs ``stage1``, stage 1's outputs for the same epochs
        (``(epochs, outputs)`` or ``(1, epochs, outputs)``); others ignore it.
        """
        single = features.dim() == 2
        x = features[None] if single else features
        if x.shape[0] != 1:
            raise ValueError(f"NightContextHead: expected one night at a time, found a batch of {x.shape[0]}")
        y = self.out(self.body(self.norm(x)))
        if self.residual:
            if stage1 is None:
                raise ValueError("NightContextHead: a residual head needs stage 1's outputs for the night")
            y = y + (stage1[None] if stage1.dim() == 2 else stage1).to(y.dtype)
        return y[0] if single else y


def _tensors(night: NightSequence) -> tuple[Tensor, Tensor, Tensor | None]:
    stage1 = None if night.stage1 is None else torch.from_numpy(np.asarray(night.stage1, np.float32))
    return (
        torch.from_numpy(np.asarray(night.features, np.float32)),
        torch.from_numpy(np.asarray(night.target)),
        stage1,
    )


@torch.no_grad()
def predict_nights(
    head: NightContextHead, nights: Sequence[NightSequence], task: Task
) -> tuple[np.ndarray, np.ndarray]:
    """Targets and head outputs of every known epoch of ``nights`` (eval mode), for ``task.metrics``."""
    was_training = head.training
    head.eval()
    targets, outputs = [], []
    for night in nights:
        features, target, stage1 = _tensors(night)
        output = head(features, stage1).numpy()
        target = target.numpy()
        keep = target >= 0  # −1 classes and NaN labels are unknown
        targets.append(target[keep])
        outputs.append(output[keep])
    head.train(was_training)
    if not targets:
        raise ValueError("predict_nights: no night to score")
    return np.concatenate(targets), np.concatenate(outputs)


def train_night_head(
    train: Sequence[NightSequence],
    val: Sequence[NightSequence],
    task: Task,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    eval_every: int = 25,
    patience: int = 4,
    seed: int = 0,
    depth: int = 2,
    heads: int = 2,
    hidden: int = 128,
    dropout: float = 0.1,
    residual: bool = False,
) -> tuple[NightContextHead, dict]:
    """Stage 2: fit a :class:`NightContextHead` on whole train nights, early-stopped on the val nights.

    Each step is one train night drawn at random (seeded), the whole night
    at once. Every ``eval_every`` steps the task's primary figure (κ for
    staging) is measured on ``val``; the best weights are kept, and training
    stops after ``patience`` evaluations without a gain (without ``val``,
    the last weights are kept). A ``residual`` head (every night must carry
    its ``stage1`` outputs) is scored on ``val`` before training too (step
    0: stage 1 alone), so it is kept only where training beats stage 1.

    Returns
    -------
    head : NightContextHead
        The best head, in eval mode.
    history : dict
        ``steps``, ``best_step``, ``best_score`` (the primary figure on val), ``stopped_early``.
    """
    if task.level != "epoch":
        raise ValueError(f"train_night_head: task {task.name!r} is not an epoch-level task")
    if not train:
        raise ValueError("train_night_head: no train night")
    if steps < 1 or eval_every < 1 or patience < 1:
        raise ValueError(
            f"train_night_head: steps, eval_every and patience must be >= 1, found {steps}, {eval_every}, {patience}"
        )
    if residual and any(night.stage1 is None for night in [*train, *val]):
        raise ValueError("train_night_head: a residual head needs every night's stage-1 outputs (NightSequence.stage1)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = train[0].features.shape[1]
    head = NightContextHead(
        width, task.outputs, depth=depth, heads=heads, hidden=hidden, dropout=dropout, residual=residual
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    metric, sign = task.primary
    best_state, best_score, best_step, without_gain, step = None, None, None, 0, 0
    if residual and val:  # step 0: the untrained residual head is stage 1 alone
        best_state, best_step = copy.deepcopy(head.state_dict()), 0
        best_score = task.metrics(*predict_nights(head, val, task)).get(metric)
    head.train()
    for step in range(1, steps + 1):
        features, target, stage1 = _tensors(train[int(rng.integers(len(train)))])
        loss = task.loss(head(features, stage1), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if val and (step % eval_every == 0 or step == steps):
            score = task.metrics(*predict_nights(head, val, task)).get(metric)
            if score is not None and (best_score is None or sign * score > sign * best_score):
                best_state, best_score, best_step, without_gain = copy.deepcopy(head.state_dict()), score, step, 0
            else:
                without_gain += 1
            logger.info(
                "night head step %d loss %.4f val %s %s (best %s)", step, loss.item(), metric, score, best_score
            )
            if without_gain >= patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    history = {
        "steps": step,
        "best_step": best_step,
        "best_score": best_score,
        "stopped_early": step < steps,
    }
    return head.eval(), history


def fit_night_context(
    nights: Mapping[str, Sequence[NightSequence]],
    task: Task,
    *,
    heads: int,
    steps: int = 300,
    patience: int = 4,
    seed: int = 0,
    residual: bool = True,
) -> tuple[NightContextHead, dict]:
    """Stage 2 as ``s2v finetune --night-context`` and ``bench_finetune`` run it: train, stop on val, score test.

    Parameters
    ----------
    nights : mapping of str to sequence of NightSequence
        ``train`` and ``val`` nights (``val`` may be empty), and optionally ``test``.
    task : Task
        The epoch-level task of stage 1.
    heads : int
        Attention heads (the stage-1 encoder's, so they divide the feature width).
    steps, patience, seed, residual
        As for :func:`train_night_head`; validation every ``max(1, steps // 10)`` steps.

    Returns
    -------
    head : NightContextHead
        The best head on val, in eval mode.
    record : dict
        The training history of :func:`train_night_head`, ``nights`` per split,
        and ``test`` (the task's figures on the test nights) when ``nights`` has them.
    """
    head, history = train_night_head(
        nights["train"],
        nights.get("val") or [],
        task,
        steps=steps,
        eval_every=max(1, steps // 10),
        patience=patience,
        seed=seed,
        heads=heads,
        residual=residual,
    )
    record = {**history, "nights": {split: len(n) for split, n in nights.items()}}
    if nights.get("test"):
        record["test"] = task.metrics(*predict_nights(head, nights["test"], task))
    return head, record


def save_night_head(head: NightContextHead, directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Keep ``head`` in a fine-tuned model directory: weights in ``night_head.pt``, the rest in ``finetuned.json``.

    Parameters
    ----------
    head : NightContextHead
    directory : str or Path
        A directory written by :func:`s2v_core.finetuning.save_finetuned`.
    extra : mapping, optional
        Also recorded under ``"night_head"`` in the description (training history, test figures …).

    Returns
    -------
    Path
        The weights file.
    """
    from s2v_core.finetuning import read_description

    directory = Path(directory)
    description = read_description(directory)
    path = directory / NIGHT_HEAD_FILE
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, path)
    description["night_head"] = {"hyperparameters": dict(head.hyperparameters), **(extra or {})}
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return path


def load_night_head(directory: str | Path, *, map_location: Any = "cpu") -> NightContextHead | None:
    """The night head kept in a fine-tuned model directory (eval mode), or ``None`` when it has none.

    Raises
    ------
    FileNotFoundError
        The description names a night head but its weights file is missing.
    """
    from s2v_core.finetuning import read_description

    directory = Path(directory)
    record = read_description(directory).get("night_head")
    if record is None:
        return None
    path = directory / NIGHT_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: {DESCRIPTION_FILE} names a night head but {NIGHT_HEAD_FILE} is missing")
    hyper = record["hyperparameters"]
    head = NightContextHead(
        hyper["width"],
        hyper["outputs"],
        depth=hyper["depth"],
        heads=hyper["heads"],
        hidden=hyper["hidden"],
        dropout=hyper["dropout"],
        residual=hyper.get("residual", False),  # heads saved before it added nothing to stage 1
    )
    head.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    return head.eval()


def remove_night_head(directory: str | Path) -> None:
    """Take the night head out of a fine-tuned model directory (nothing to do when it has none)."""
    from s2v_core.finetuning import read_description

    directory = Path(directory)
    description = read_description(directory)
    (directory / NIGHT_HEAD_FILE).unlink(missing_ok=True)
    if description.pop("night_head", None) is not None:
        (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
