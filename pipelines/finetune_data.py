"""Which store windows ``s2v finetune`` learns from and scores on (driver side, pyarrow only).

- Event tasks (``--task events``, ``arousal``, ``events:…``) learn from the
  nights whose hypnogram scored events (the store's ``events`` column is not
  null there); the others hold no label for them.
- ``--labelled-windows N`` (the few-shot protocol): training sees only N
  windows drawn at random (seeded) from the usable windows of the train
  subjects; validation and test stay whole.
- Event tasks whose positives are respiratory events are also scored as an
  AHI from detected events per test night, next to the night's scored
  ``ahi_scored`` (:mod:`s2v_core.evaluation.events`), with the detection
  threshold chosen on the val nights.
- The report's baseline (:func:`baseline_predictions`) is what a model
  without inputs predicts, fitted on the train subjects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from s2v_core.evaluation.tasks import Task
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.store import EVENTS_COLUMN, present_matrix

if TYPE_CHECKING:
    from pipelines.finetune import PreparedFinetune

#: Outcome an AHI from detected events is compared with (written by ingest from NSRR XML).
AHI_REFERENCE = "ahi_scored"


def labelled_nights(files: Sequence[str], filesystem: Any, task: Task) -> list[str]:
    """The ``files`` (nights) holding the labels ``task`` needs: all of them unless it is an event task.

    Raises ``ValueError`` naming ``--task`` when a file predates the ``events``
    column (the store must be re-ingested).
    """
    if not task.event_bits:
        return list(files)
    kept = []
    for path in files:
        if EVENTS_COLUMN not in pq.read_schema(path, filesystem=filesystem).names:
            raise ValueError(
                f"--task {task.name}: {path} has no per-epoch event labels (column {EVENTS_COLUMN!r}); "
                "re-ingest the store with this version of s2v"
            )
        column = pq.read_table(path, columns=[EVENTS_COLUMN], filesystem=filesystem).column(EVENTS_COLUMN)
        if column.null_count < len(column):
            kept.append(path)
    return kept


def usable_windows(files: Sequence[str], filesystem: Any, modalities: Sequence[str]) -> list[str]:
    """Names (:func:`pipelines.train_data.window_key`) of the windows of ``files`` holding one of ``modalities``.

    Reads the identity columns and ``present`` only, never the signals.
    """
    from pipelines.train_data import window_key

    columns = [MODALITY_KEYS.index(k) for k in modalities]
    keys = []
    for path in files:
        table = pq.read_table(path, columns=["site", "recording_id", "window_index", "present"], filesystem=filesystem)
        usable = present_matrix(table.column("present"))[:, columns].any(axis=1)
        keys += [
            window_key(s, r, w)
            for s, r, w, keep in zip(
                table.column("site").to_pylist(),
                table.column("recording_id").to_pylist(),
                table.column("window_index").to_pylist(),
                usable,
            )
            if keep
        ]
    return keys


def choose_windows(keys: Sequence[str], count: int, *, seed: int) -> list[str]:
    """``count`` of ``keys`` drawn without replacement by ``seed`` (sorted); ``ValueError`` if too few."""
    if count > len(keys):
        raise ValueError(
            f"--labelled-windows: expected at most {len(keys)} (the usable windows of the train subjects), "
            f"found {count}"
        )
    chosen = np.random.default_rng([seed, 15]).choice(len(keys), size=count, replace=False)
    return sorted(keys[i] for i in chosen)


def event_ahi_report(
    model, files: Sequence[str], filesystem: Any, *, spec, epochs_per_window: int, val_files: Sequence[str] = ()
) -> dict | None:
    """AHI from detected events vs the scored ``ahi_scored`` on ``files`` (test nights); None if not applicable.

    Applies to event tasks that count respiratory events (apnoea and/or
    hypopnoea bits, nothing else). The detection threshold and the events
    per positive epoch are fitted on the ``val_files`` nights
    (:func:`s2v_core.evaluation.events.choose_counting`; the scored labels'
    own rate too); without them each run of epochs above 0.5 counts one
    event. See :func:`s2v_core.evaluation.events.ahi_agreement`.
    """
    from s2v_core.evaluation.events import EventCounting, ahi_agreement, choose_counting, counts_ahi

    if not counts_ahi(spec.task_definition):
        return None
    val_nights = _nights(model, val_files, filesystem, spec, epochs_per_window) if val_files else []
    counting = choose_counting(val_nights)
    report = ahi_agreement(
        _nights(model, files, filesystem, spec, epochs_per_window),
        counting=counting or EventCounting(),
        label_counting=choose_counting(val_nights, labels=True),
    )
    chosen = "val nights (closest AHI, MAE)" if counting is not None else "default (no val night with ahi_scored)"
    return {"reference": AHI_REFERENCE, "sleep": "scored stages of the store", "threshold_from": chosen, **report}


def _nights(model, files: Sequence[str], filesystem: Any, spec, epochs_per_window: int):
    from pipelines.finetune_loop import read_store_batches
    from s2v_core.evaluation.events import night_event_predictions

    batches = read_store_batches(
        list(files),
        filesystem,
        spec=spec,
        epochs_per_window=epochs_per_window,
        batch_size=64,
        history_columns=(AHI_REFERENCE,),
        extra_columns=("window_index",),
    )
    return night_event_predictions(model, batches, reference=AHI_REFERENCE)


def read_night_features(model, files: Sequence[str], filesystem: Any, *, batch_size: int = 64) -> list:
    """Stage-1 features of every night of ``files`` under ``model`` (``--night-context``; ``bench_finetune``).

    Parameters
    ----------
    model : s2v_core.finetuning.FineTunedModel
        A fine-tuned model of an epoch-level task.
    files, filesystem
        Store nights (e.g. :func:`s2v_core.store.split_files` of one split).
    batch_size : int
        Windows encoded together.

    Returns
    -------
    list of s2v_core.night_context.NightSequence
        One per night, its windows in ``window_index`` order.
    """
    from pipelines.finetune_loop import read_store_batches
    from s2v_core.night_context import night_features

    batches = read_store_batches(
        list(files),
        filesystem,
        spec=model.spec,
        epochs_per_window=model.window_epochs,
        batch_size=batch_size,
        extra_columns=("window_index",),
    )
    return night_features(model, batches, device=next(model.parameters()).device)


def baseline_predictions(prepared: PreparedFinetune, target: np.ndarray) -> np.ndarray:
    """What a model without inputs predicts for ``target``'s rows, fitted on the train subjects.

    Classification: the train subjects' most frequent class; regression: their
    mean; binary and survival: a constant score (AUROC and C-index 0.5).
    """
    from pipelines.finetune_loop import read_store_batches
    from s2v_core.finetuning import batch_targets

    task = prepared.spec.task_definition
    if task.kind in ("binary", "survival"):
        return np.zeros((len(target), 1))
    values = np.concatenate(
        [
            batch_targets(task, b).reshape(-1)
            for b in read_store_batches(
                list(prepared.train_files),
                prepared.filesystem,
                spec=prepared.spec,
                epochs_per_window=prepared.epochs_per_window,
                batch_size=256,
            )
        ]
    )
    if task.kind == "classification":
        known = values[values >= 0].astype(np.int64)
        majority = int(np.bincount(known, minlength=len(task.classes)).argmax()) if known.size else 0
        return np.eye(len(task.classes))[np.full(len(target), majority)]
    return np.full((len(target), 1), float(np.nanmean(values)))
