"""The store as pretraining data: checks in the driver, a Ray Data dataset for the workers.

Everything here that inspects the store runs in the driver with pyarrow
alone (no Ray), so that a bad ``--data``/``--modalities``/``--global-batch``
stops the run before any worker starts, with one message naming the option.
A store is a local path or a URI (``s3://…``; see :func:`s2v_core.store.store_files`),
or a store subset; the read tasks get its filesystem along with the file paths.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from s2v_core.modalities import MODALITY_KEYS
from s2v_core.store import SCHEMA_VERSION, open_store, present_matrix, schema_info, split_files

logger = logging.getLogger(__name__)

#: Columns table_to_batch reads besides the modality columns.
BATCH_COLUMNS = ("recording_id", "site", "present", "stages", "age", "sex")


@dataclass(frozen=True)
class StoreSummary:
    """What the driver learned about a store before training.

    Attributes
    ----------
    files : tuple of str
        The Parquet files of the store (``site=<name>/<recording>.parquet``), sorted,
        as paths on ``filesystem``.
    epochs_per_window : int
        Window length in 30-s epochs, from the schema metadata.
    modalities : tuple of str
        Modalities present in at least one window, registry order.
    windows : int
        Windows in the store.
    usable_windows : int
        Windows holding at least one of the selected modalities (the training rows).
    filesystem : pyarrow.fs.FileSystem
        Where ``files`` are (local, S3, GCS…).
    """

    files: tuple[str, ...]
    epochs_per_window: int
    modalities: tuple[str, ...]
    windows: int
    usable_windows: int
    filesystem: pafs.FileSystem


def inspect_store(
    store: str | Path, modalities: Sequence[str] = (), *, option: str = "--data", splits: Sequence[str] | None = None
) -> StoreSummary:
    """Check a store against the run's needs and summarise it.

    Reads only the Parquet footers and the ``present`` column (and, with
    ``splits``, the ``site`` and ``subject_id`` columns).

    Parameters
    ----------
    store : path
        Store root.
    modalities : sequence of str
        The selected modalities (``()`` = every modality present in the store).
    splits : sequence of str, optional
        Keep only the nights of subjects in these splits (``STORE/splits.json``);
        a store without splits raises a ``ValueError`` naming ``s2v split``.

    Raises
    ------
    ValueError
        No Parquet files; a schema version other than
        :data:`s2v_core.store.SCHEMA_VERSION`; files disagreeing on the window
        length; a selected modality absent from every window (naming
        ``--modalities``).
    """
    dataset = open_store(store, option=option)
    if splits is not None:
        chosen, _ = split_files(str(store), splits)
        if not chosen:
            raise ValueError(
                f"{option}: the store {store} has no night of a subject in the "
                f"{'/'.join(splits)} split(s); see `s2v split --data {store}`"
            )
        dataset = pads.dataset(chosen, format="parquet", filesystem=dataset.filesystem)
    files, filesystem = dataset.files, dataset.filesystem
    epochs = None
    for path in files:
        try:
            version, file_epochs = schema_info(pq.read_schema(path, filesystem=filesystem))
        except ValueError as exc:
            raise ValueError(f"{option}: {path}: {exc}") from None
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{option}: {path}: expected store schema version {SCHEMA_VERSION}, "
                f"found {version}; re-ingest the store with this version of s2v"
            )
        if epochs is not None and file_epochs != epochs:
            raise ValueError(
                f"{option}: {path}: expected {epochs} epochs per window like the other files, found {file_epochs}"
            )
        epochs = file_epochs
    present = present_matrix(dataset.to_table(columns=["present"]).column("present"))
    in_store = tuple(k for i, k in enumerate(MODALITY_KEYS) if present[:, i].any())
    selected = tuple(modalities) or in_store
    absent = [k for k in selected if k not in in_store]
    if absent:
        raise ValueError(
            f"--modalities: expected modalities present in the store {store}, "
            f"found {', '.join(absent)} absent (the store holds {', '.join(in_store) or 'none'})"
        )
    columns = [MODALITY_KEYS.index(k) for k in selected]
    usable = int(present[:, columns].any(axis=1).sum())
    return StoreSummary(
        files=tuple(files),
        epochs_per_window=int(epochs),
        modalities=tuple(k for k in MODALITY_KEYS if k in selected),
        windows=int(present.shape[0]),
        usable_windows=usable,
        filesystem=filesystem,
    )


def check_batch_fits(summary: StoreSummary, *, global_batch: int, workers: int) -> None:
    """``ValueError`` naming ``--global-batch`` when a worker's shard cannot fill one batch.

    Ray Train splits the rows equally over workers (dropping the remainder),
    and every worker drops its last incomplete batch, so a worker needs at
    least ``global_batch / workers`` windows.
    """
    per_worker = global_batch // workers
    if summary.usable_windows // workers < per_worker:
        raise ValueError(
            f"--global-batch: expected at most {summary.usable_windows // workers * workers} windows "
            f"(the store has {summary.usable_windows} windows with the selected modalities, split over "
            f"{workers} workers), found {global_batch}"
        )


def keep_windows_with(table: pa.Table, modalities: Sequence[str]) -> pa.Table:
    """Rows of ``table`` in which at least one of ``modalities`` is present."""
    keep = np.zeros(table.num_rows, dtype=bool)
    for key in modalities:
        keep |= ~np.asarray(table.column(key).is_null().to_numpy(zero_copy_only=False), dtype=bool)
    return table.filter(pa.array(keep))


def training_columns(
    modalities: Sequence[str], history_columns: Sequence[str], extra_columns: Sequence[str] = ()
) -> list[str]:
    """The store columns a training batch needs (``extra_columns``: e.g. a task's ``events`` labels)."""
    columns = list(BATCH_COLUMNS) + list(modalities)
    if history_columns:
        columns.append("outcomes")
    return columns + [c for c in extra_columns if c not in columns]


def window_key(site: str, recording_id: str, window_index: int) -> str:
    """The name of one store window, unique in a store (recording ids repeat across sites)."""
    return f"{site}/{recording_id}/{int(window_index)}"


def read_store_files(
    items: dict[str, np.ndarray],
    *,
    columns: Sequence[str],
    modalities: Sequence[str],
    seed: int | None = None,
    filesystem: pafs.FileSystem | None = None,
    windows: Sequence[str] | None = None,
) -> pa.Table:
    """Ray Data UDF: read the store files named in ``items["path"]`` (needed columns, usable rows).

    With ``windows`` (:func:`window_key` names; ``columns`` must hold
    ``window_index``), only those windows are kept: a labelled subset.

    The paths are on ``filesystem`` (default: local paths or full URIs). It is
    passed as an object rather than re-derived from a URI per file: that keeps
    the store URI's options (``endpoint_override`` …) and skips a bucket-region
    lookup per file.

    With ``seed`` (training), the rows of the group are returned in a random
    order drawn from ``seed`` and the group's first ``items["slot"]``: a night's
    windows are consecutive in its file, and a contrastive batch needs windows
    of many nights (windows of one night are masked as each other's
    negatives), so the reader mixes the nights of its group here, off the
    training workers.
    """
    tables = [
        keep_windows_with(pq.read_table(str(path), columns=list(columns), filesystem=filesystem), modalities)
        for path in items["path"]
    ]
    table = pa.concat_tables(tables)
    if windows is not None:
        wanted = set(windows)
        keys = zip(
            table.column("site").to_pylist(),
            table.column("recording_id").to_pylist(),
            table.column("window_index").to_pylist(),
        )
        table = table.filter(pa.array([window_key(*key) in wanted for key in keys], type=pa.bool_()))
    if seed is not None and table.num_rows > 1:
        rng = np.random.default_rng([seed, int(items["slot"][0])])
        # Zero-copy one-row slices, then one contiguous copy: 3-8x cheaper than
        # Table.take on the nested list columns of a block of ~100 MB.
        order = rng.permutation(table.num_rows)
        table = pa.concat_tables([table.slice(int(i), 1) for i in order]).combine_chunks()
    return table


#: A pass of the training stream holds at least this many optimiser steps of windows
#: (see :func:`store_repeats`).
MIN_STEPS_PER_PASS = 500


def store_repeats(usable_windows: int, *, windows_per_step: int, steps: int) -> int:
    """How many copies of the store one pass of the training stream holds.

    Each pass is one Ray Data execution: starting one costs about a second
    (executor start-up, then the first blocks are read before the first
    batch; measured 1.4-1.7 s on a 2-core machine), which a real store
    amortises over thousands of steps but a small one paid every few dozen.
    A pass therefore repeats the store until it holds
    :data:`MIN_STEPS_PER_PASS` steps of windows, and never more copies than
    the whole run needs (plus one, for the windows every worker drops at the
    end of a pass). Large stores get 1.
    """
    if usable_windows < 1:
        raise ValueError(f"store_repeats: expected at least one usable window, found {usable_windows}")
    wanted = math.ceil(MIN_STEPS_PER_PASS * windows_per_step / usable_windows)
    needed = math.ceil(steps * windows_per_step / usable_windows) + 1
    return max(1, min(wanted, needed))


def pass_order(files: Sequence[str], *, repeats: int, seed: int) -> list[str]:
    """The files of one pass: ``repeats`` copies of ``files``, each in its own seeded order."""
    order: list[str] = []
    for copy in range(repeats):
        permutation = np.random.default_rng([seed, copy]).permutation(len(files))
        order += [str(files[i]) for i in permutation]
    return order


def build_dataset(
    files: Sequence[str],
    *,
    modalities: Sequence[str],
    history_columns: Sequence[str],
    seed: int,
    repeats: int = 1,
    nights_per_block: int = 16,
    readers: int = 2,
    filesystem: pafs.FileSystem | None = None,
    extra_columns: Sequence[str] = (),
    windows: Sequence[str] | None = None,
):
    """A streaming Ray Data dataset of the training windows: one pass of the loop.

    One block per ``nights_per_block`` store files (nights), read lazily by a
    task that keeps only the needed columns and the windows holding at least
    one selected modality, and mixes the windows of its nights in a seeded
    order (:func:`read_store_files`); a pass visits the store ``repeats``
    times (see :func:`store_repeats`), each time in its own seeded file
    order. Workers may add a local shuffle buffer (``shuffle_buffer``). The
    ``files`` are paths on ``filesystem`` (:attr:`StoreSummary.filesystem`).

    The read tasks request no CPU: the cluster's CPUs are reserved for the
    training workers, and 2 workers on a 2-core machine would otherwise leave
    Ray Data a budget of zero and deadlock (``read_parquet``'s file-listing
    step always asks for one CPU). Reading a few Parquet files is light next
    to training. Zero-CPU tasks are not limited by the scheduler, so at most
    ``readers`` of them run at once (without a cap Ray starts a worker
    process per file).

    ``extra_columns`` are read too (a task's labels); ``windows`` keeps only
    the named windows (:func:`window_key`; fine-tuning on a labelled subset).
    """
    import ray.data

    order = pass_order(files, repeats=repeats, seed=seed)
    groups = math.ceil(len(order) / nights_per_block)
    dataset = ray.data.from_items([{"path": f, "slot": i} for i, f in enumerate(order)], override_num_blocks=groups)
    dataset = dataset.map_batches(
        read_store_files,
        batch_size=nights_per_block,
        batch_format="numpy",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=max(1, readers)),
        fn_kwargs={
            "columns": training_columns(
                modalities, history_columns, [*extra_columns, *(["window_index"] if windows is not None else [])]
            ),
            "modalities": list(modalities),
            "seed": seed,
            "filesystem": filesystem,
            "windows": None if windows is None else list(windows),
        },
    )
    return dataset
