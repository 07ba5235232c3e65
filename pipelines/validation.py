"""Validation contrastive loss of a trained encoder on held-out windows (single process).

The sweep scores each trial by this number on a held-out, subject-disjoint
store: the pretraining objective (DASH-InfoNCE) in eval mode (no modality
dropout), over fixed batches cut from one seeded order of the windows that
mixes nights, so every encoder is scored on the same problem with the same
negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipelines.train_data import keep_windows_with, open_store
from s2v_core.losses import DashConfig, dash_infonce
from s2v_core.model import SleepEncoder, batch_to_tensors
from s2v_core.store import schema_info, table_to_batch


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
        raise ValueError(f"evaluate_contrastive_loss: expected at least 2 windows with "
                         f"{', '.join(selected)}, found {table.num_rows}")
    starts = list(range(0, max(table.num_rows - batch_size, 0) + 1, batch_size))
    total, anchors, negatives = 0.0, 0.0, 0.0
    encoder.eval()
    with torch.no_grad():
        for start in starts:
            rows = table.slice(start, batch_size)
            batch = batch_to_tensors(table_to_batch(rows, modalities=selected, epochs_per_window=epochs_per_window,
                                                    history_columns=history_columns))
            out = encoder.encode(batch, modalities=selected)
            meta = {k: batch[k] for k in ("age", "sex", "site_id", "night_id", "history")}
            result = dash_infonce(out.per_modality, out.present, meta, logit_scale=encoder.logit_scale,
                                  config=dash)
            stats = result.to_floats()
            count = stats.get("anchors", 0.0)
            total += stats["loss"] * count
            negatives += stats.get("negatives_per_anchor", 0.0) * count
            anchors += count
    if anchors == 0:
        raise ValueError(f"evaluate_contrastive_loss: no window holds two of {', '.join(selected)}; "
                         "nothing to align")
    return {"loss": total / anchors, "negatives_per_anchor": negatives / anchors,
            "batches": float(len(starts)), "windows": float(min(table.num_rows, len(starts) * batch_size))}
