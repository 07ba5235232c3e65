"""Held-out validation of an encoder: is it learning what transfers to unseen subjects?

:class:`HeldOutValidator` is what ``s2v pretrain`` runs every
``--validate-every`` steps and at the end, on windows of the ``val``
subjects (never trained on): per modality pair, the contrastive loss next to
its chance level and cross-modal retrieval top-1/top-5 next to chance
(:mod:`s2v_core.evaluation.alignment`). The windows are read once, a seeded
sample that mixes nights, so every validation of a run scores the same problem.

:func:`evaluate_contrastive_loss` is the sweep's score: the pretraining
objective (DASH-InfoNCE) in eval mode over fixed batches cut from one seeded
order of the windows that mixes nights, so every trial is scored on the same
problem with the same negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipelines.train_data import keep_windows_with, training_columns
from s2v_core.evaluation.alignment import AlignmentMeter, all_pairs, summarise_pairs
from s2v_core.losses import DashConfig, dash_infonce
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.model import SleepEncoder, batch_to_tensors
from s2v_core.store import open_store, schema_info, table_to_batch

#: Prefix of the held-out figures in a run's metrics (MLflow keys ``val/...``).
PREFIX = "val"


class HeldOutValidator:
    """Alignment of an encoder on a fixed sample of held-out windows (see the module docstring).

    Parameters
    ----------
    files : sequence of str
        Store files of the held-out subjects (paths on ``filesystem``).
    filesystem : pyarrow.fs.FileSystem, optional
    modalities : sequence of str
        The modalities trained on; every pair of them present in the sample is scored.
    epochs_per_window : int
    max_epochs : int or None
        Cap on the sample, in epochs (``max_epochs // epochs_per_window`` windows),
        so long windows do not multiply the memory held between validations;
        ``None`` keeps every window.
    batch_size : int
        Windows per contrastive batch (the training global batch: the same chance level).
    seed : int
        Seed of the sample and of its order.
    pairs : sequence of (str, str), optional
        The pairs to score (default: every pair of ``modalities`` the sample holds).
    """

    def __init__(
        self,
        files: Sequence[str],
        filesystem: pafs.FileSystem | None,
        *,
        modalities: Sequence[str],
        epochs_per_window: int,
        max_epochs: int | None,
        batch_size: int,
        seed: int = 0,
        pairs: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.modalities = tuple(k for k in MODALITY_KEYS if k in set(modalities))
        self.batch_size = max(2, int(batch_size))
        self.epochs_per_window = epochs_per_window
        tables = [
            keep_windows_with(
                pq.read_table(str(f), columns=training_columns(self.modalities, ()), filesystem=filesystem),
                self.modalities,
            )
            for f in files
        ]
        table = pa.concat_tables(tables) if tables else None
        self.windows = 0
        self.batches: list[dict[str, Any]] = []
        if table is None or table.num_rows < 2:
            return
        order = np.random.default_rng(seed).permutation(table.num_rows)
        if max_epochs is not None:
            order = order[: max(2, max_epochs // epochs_per_window)]
        table = table.take(pa.array(order))
        batch = table_to_batch(table, modalities=self.modalities, epochs_per_window=epochs_per_window)
        for key in self.modalities:  # half the memory held between validations
            batch[key] = batch[key].astype(np.float16)
        self.windows = table.num_rows
        for start in range(0, self.windows, self.batch_size):
            rows = slice(start, min(start + self.batch_size, self.windows))
            if rows.stop - rows.start >= 2:
                self.batches.append({k: v[rows] for k, v in batch.items()})
        present = batch["present"]
        candidates = all_pairs(self.modalities) if pairs is None else [tuple(p) for p in pairs]
        self.pairs = [
            (a, b)
            for a, b in candidates
            if a in self.modalities
            and b in self.modalities
            and (present[:, MODALITY_KEYS.index(a)] & present[:, MODALITY_KEYS.index(b)]).any()
        ]

    def __bool__(self) -> bool:
        return bool(self.batches) and bool(self.pairs)

    def __call__(self, encoder: SleepEncoder, *, device: torch.device | str = "cpu") -> dict[str, float]:
        """Flat metrics ``val/<pair>/<figure>`` plus ``val/loss_ratio_mean``, ``val/top1_over_chance_mean``."""
        figures = self.figures(encoder, device=device)
        flat = {
            f"{PREFIX}/{pair}/{name}": value
            for pair, values in figures.items()
            for name, value in values.items()
            if name in ("loss", "chance_loss", "loss_ratio", "top1", "top5", "chance_top1", "top1_over_chance", "n")
        }
        if flat:
            flat.update({f"{PREFIX}/{k}": v for k, v in summarise_pairs(figures).items()})
            flat[f"{PREFIX}/windows"] = float(self.windows)
        return flat

    def figures(self, encoder: SleepEncoder, *, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
        """Per pair ``"a-b"``: the figures of :meth:`s2v_core.evaluation.alignment.AlignmentMeter.result`."""
        if not self:
            return {}
        was_training = encoder.training
        encoder.eval()
        meter = AlignmentMeter(self.pairs, scale=float(encoder.logit_scale.detach().float().exp().reshape(())))
        try:
            with torch.no_grad():
                for batch in self.batches:
                    tensors = batch_to_tensors(batch, device)
                    out = encoder.encode(tensors, modalities=self.modalities)
                    meter.add(out.per_modality, out.present, tensors["night_id"])
        finally:
            encoder.train(was_training)
        return meter.result()


def evaluate_contrastive_loss(
    encoder: SleepEncoder,
    data: pa.Table | str | Path,
    *,
    modalities: Sequence[str] | None = None,
    batch_size: int = 16,
    history_columns: Sequence[str] = (),
    dash: DashConfig = DashConfig(),
    shuffle_seed: int = 0,
) -> dict[str, float]:
    """Mean DASH-InfoNCE per anchor of ``encoder`` over ``data``.

    Parameters
    ----------
    encoder : SleepEncoder
        Put in eval mode; its weights are not changed.
    data : pyarrow.Table or path
        Store rows (``s2v_core.store`` schema), or a store (a path, a URI or a store subset).
    modalities : sequence of str, optional
        Modalities to align (default: the encoder's). Windows holding none of
        them are skipped.
    batch_size : int
        Windows per contrastive batch (fixes the negatives per anchor); the
        last incomplete batch is dropped unless it is the only one.
    history_columns, dash
        As in pretraining.
    shuffle_seed : int
        Seed of the fixed order in which windows are cut into batches.

    Returns
    -------
    dict
        ``loss`` (mean over all anchors of all batches), ``negatives_per_anchor``,
        ``batches``, ``windows``.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size: expected at least 2 windows (one positive, one negative), found {batch_size}")
    selected = tuple(modalities or encoder.modalities)
    table = open_store(data, option="data").to_table() if not isinstance(data, pa.Table) else data
    epochs_per_window = schema_info(table.schema)[1]
    table = keep_windows_with(table, selected)
    # A night's windows are consecutive in the store: batches in store order would
    # hold one or two nights, whose windows are masked as each other's negatives,
    # so the loss would depend on night length. Batches mix nights in one fixed,
    # seeded order instead (the same for every encoder scored on this data).
    order = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
    table = table.take(pa.array(order))
    if table.num_rows < 2:
        raise ValueError(
            f"evaluate_contrastive_loss: expected at least 2 windows with {', '.join(selected)}, found {table.num_rows}"
        )
    starts = list(range(0, max(table.num_rows - batch_size, 0) + 1, batch_size))
    total, anchors, negatives = 0.0, 0.0, 0.0
    encoder.eval()
    with torch.no_grad():
        for start in starts:
            rows = table.slice(start, batch_size)
            batch = batch_to_tensors(
                table_to_batch(
                    rows, modalities=selected, epochs_per_window=epochs_per_window, history_columns=history_columns
                )
            )
            out = encoder.encode(batch, modalities=selected)
            meta = {k: batch[k] for k in ("age", "sex", "site_id", "night_id", "history")}
            result = dash_infonce(out.per_modality, out.present, meta, logit_scale=encoder.logit_scale, config=dash)
            stats = result.to_floats()
            count = stats.get("anchors", 0.0)
            total += stats["loss"] * count
            negatives += stats.get("negatives_per_anchor", 0.0) * count
            anchors += count
    if anchors == 0:
        raise ValueError(f"evaluate_contrastive_loss: no window holds two of {', '.join(selected)}; nothing to align")
    return {
        "loss": total / anchors,
        "negatives_per_anchor": negatives / anchors,
        "batches": float(len(starts)),
        "windows": float(min(table.num_rows, len(starts) * batch_size)),
    }
