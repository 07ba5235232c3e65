"""The Arrow schema of the Parquet store and its conversion to model batches.

One row is a window of ``epochs_per_window`` consecutive 30-s epochs of one
night. Layout (schema version :data:`SCHEMA_VERSION`):

identity
    ``recording_id`` (str), ``subject_id`` (str), ``site`` (str; also the hive
    partition ``site=<name>/``), ``window_index`` (int32, 0-based within the
    night), ``start_epoch`` (int32, index of the window's first epoch in the
    night).
signals
    one ``list<float16>`` column per modality in registry order, holding the
    window flattened row-major from shape ``(epochs_per_window,
    samples_per_epoch)``, robust-normalised per recording (dimensionless);
    null when the modality is absent from that window.
``present``
    ``list<bool>`` of length 9 in registry order; ``present[k]`` is true iff
    the column of modality ``k`` is non-null.
``stages``
    ``list<int8>`` of length ``epochs_per_window``: W=0 N1=1 N2=2 N3=3 REM=4,
    -1 unknown/movement/unscored.
metadata
    ``age`` (float32 years, null if unknown), ``sex`` (int8: 0 female,
    1 male, null if unknown), ``outcomes`` (``map<str, float64>``: per-night
    outcome columns of the site's table, e.g. ``ahi``, ``hypertension``; a map
    so that sites with different outcome columns share one schema).
``events``
    ``list<int8>`` of length ``epochs_per_window``, null when the night has no
    scored events (its hypnogram is not an NSRR XML file): per 30-s epoch the
    OR of the bits of the scored events overlapping it, apnoea = 1,
    hypopnoea = 2, SpO2 desaturation = 4, arousal = 8
    (:data:`s2v_core.io.events.EVENT_FLAGS`). Added after the first stores
    were written: a store without the column reads as it did, and tasks that
    need it say so.

The schema metadata carries ``s2v.schema_version`` and
``s2v.epochs_per_window``. Nothing from an EDF patient or recording header is
ever part of this schema.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from s2v_core.locations import resolve
from s2v_core.modalities import MODALITY_KEYS, get_modality
from s2v_core.splits import assign_splits, read_splits, select_splits
from s2v_core.store_subset import SUBSET_SUFFIX, read_store_subset

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"s2v.schema_version"
EPOCHS_PER_WINDOW_KEY = b"s2v.epochs_per_window"

#: Stage codes of the store.
STAGE_CODES = {"W": 0, "N1": 1, "N2": 2, "N3": 3, "REM": 4}
UNKNOWN_STAGE = -1
STAGE_NAMES = ("W", "N1", "N2", "N3", "REM")

#: The per-epoch event-label column (see the module docstring); older stores lack it.
EVENTS_COLUMN = "events"
#: ``batch["events"]`` value of an epoch whose night has no scored events.
UNKNOWN_EVENTS = -1

IDENTITY_COLUMNS = ("recording_id", "subject_id", "site", "window_index", "start_epoch")


def store_schema(epochs_per_window: int) -> pa.Schema:
    """Return the Arrow schema of a store written with ``epochs_per_window``."""
    if epochs_per_window < 1:
        raise ValueError(f"epochs_per_window must be >= 1, got {epochs_per_window}")
    fields = [
        pa.field("recording_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("start_epoch", pa.int32(), nullable=False),
    ]
    fields += [pa.field(key, pa.list_(pa.float16()), nullable=True) for key in MODALITY_KEYS]
    fields += [
        pa.field("present", pa.list_(pa.bool_()), nullable=False),
        pa.field("stages", pa.list_(pa.int8()), nullable=False),
        pa.field("age", pa.float32(), nullable=True),
        pa.field("sex", pa.int8(), nullable=True),
        pa.field("outcomes", pa.map_(pa.string(), pa.float64()), nullable=True),
        pa.field(EVENTS_COLUMN, pa.list_(pa.int8()), nullable=True),
    ]
    metadata = {
        SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(),
        EPOCHS_PER_WINDOW_KEY: str(epochs_per_window).encode(),
    }
    return pa.schema(fields, metadata=metadata)


def write_store_file(table: pa.Table, where, *, filesystem=None) -> None:
    """Write one night's store table as Parquet, encoded for fast reading.

    The signal columns are written without dictionary encoding: float16
    samples take tens of thousands of distinct values, so pyarrow's default
    dictionary pages decoded 4-5x slower than plain ones (96 windows of EEG,
    ECG, HR and SpO2: 178 ms vs 37 ms on one core), and pretraining reads the
    store once per pass. zstd keeps the files as small as the default's.
    """
    import pyarrow.parquet as pq

    signals = set(MODALITY_KEYS)
    pq.write_table(
        table,
        where,
        filesystem=filesystem,
        compression="zstd",
        use_dictionary=[name for name in table.column_names if name not in signals],
    )


def schema_info(schema: pa.Schema) -> tuple[int, int]:
    """Return ``(schema_version, epochs_per_window)`` from a store schema.

    Raises ``ValueError`` when the metadata is missing (not a sleep2vec store).
    """
    meta = schema.metadata or {}
    if SCHEMA_VERSION_KEY not in meta or EPOCHS_PER_WINDOW_KEY not in meta:
        raise ValueError(
            "not a sleep2vec store: schema metadata lacks "
            f"{SCHEMA_VERSION_KEY.decode()!r}/{EPOCHS_PER_WINDOW_KEY.decode()!r}"
        )
    return int(meta[SCHEMA_VERSION_KEY]), int(meta[EPOCHS_PER_WINDOW_KEY])


class EmptyStoreError(ValueError):
    """A store (or store subset) that exists but holds no Parquet file."""


def store_files(root: str) -> tuple[list[str], pafs.FileSystem]:
    """The Parquet files of the store at ``root`` (a path or a URI pyarrow understands).

    Only ``*.parquet`` files count: the root also holds ``manifest.jsonl``, and
    ingest's in-flight temporaries are hidden (dot-prefixed) files. ``root``
    may also be a store subset (a file ending in :data:`SUBSET_SUFFIX`, see
    :func:`s2v_core.store_subset.write_store_subset`). Returns the sorted file paths on the
    filesystem they live on (absolute paths for a local store, bucket-prefixed
    keys for ``s3://``/``gs://``) and that filesystem. Raises
    ``FileNotFoundError`` when ``root`` does not exist and
    :class:`EmptyStoreError` (a ``ValueError``) when it holds no Parquet file.
    """
    filesystem, path = resolve(str(root))
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"store {root} does not exist")
    if path.endswith(SUBSET_SUFFIX):
        return _subset_files(filesystem, path, root)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )
    if not files:
        raise EmptyStoreError(f"store {root}: no Parquet files (expected {root}/site=<name>/<recording>.parquet)")
    return files, filesystem


def _subset_files(filesystem: pafs.FileSystem, path: str, root: str) -> tuple[list[str], pafs.FileSystem]:
    subset = read_store_subset(filesystem, path)
    if not subset.get("files"):
        raise EmptyStoreError(f"store {root}: no Parquet files (the subset of {subset.get('store')} lists none)")
    store_filesystem, store = resolve(subset["store"])
    return sorted(f"{store}/{name}" for name in subset["files"]), store_filesystem


def open_store(root: str | os.PathLike, *, option: str = "--data"):
    """A ``pyarrow.dataset.Dataset`` over the store's Parquet files (see :func:`store_files`).

    Use this rather than ``pyarrow.dataset.dataset(root)``, which would also
    try to read ``manifest.jsonl`` as Parquet. The files carry their own
    ``site`` column, so no hive partitioning is applied on top. The dataset's
    ``files`` and ``filesystem`` say where the Parquet files are.

    Raises
    ------
    ValueError
        ``root`` does not exist or holds no Parquet file; the message names
        ``option`` (the command-line option or argument that gave ``root``).
    """
    import pyarrow.dataset as pads

    try:
        files, filesystem = store_files(str(root))
    except FileNotFoundError:
        raise ValueError(
            f"{option}: expected a store written by `s2v ingest` (a directory or a URI), found no directory at {root}"
        ) from None
    except EmptyStoreError:
        raise ValueError(
            f"{option}: expected Parquet files (site=<name>/<recording>.parquet) under {root}, found none"
        ) from None
    return pads.dataset(files, format="parquet", filesystem=filesystem)


def split_files(root: str, splits: Sequence[str]) -> tuple[list[str], pafs.FileSystem]:
    """The Parquet files (nights) of ``root`` whose subject is in one of ``splits``.

    The split of each subject comes from the store's ``splits.json``
    (:mod:`s2v_core.splits`); a store without one raises
    :class:`s2v_core.splits.MissingSplitsError` naming the command that adds
    it. Reads only the ``site`` and ``subject_id`` columns. Returns the sorted
    paths and their filesystem, like :func:`store_files` (the list may be empty).
    """
    wanted = set(select_splits(splits, option="splits"))
    config = read_splits(root)
    files, filesystem = store_files(root)
    import pyarrow.dataset as pads

    table = pads.dataset(files, format="parquet", filesystem=filesystem).to_table(
        columns=["site", "subject_id", "__filename"]
    )
    assigned = assign_splits(table.column("site").to_pylist(), table.column("subject_id").to_pylist(), config)
    keep = {str(f) for f, s in zip(table.column("__filename").to_pylist(), assigned) if s in wanted}
    return [f for f in files if f in keep], filesystem


def row_splits(table: pa.Table, root: str) -> np.ndarray:
    """The split (``train``/``val``/``test``) of each row of ``table`` (needs ``site`` and ``subject_id``)."""
    return assign_splits(table.column("site").to_pylist(), table.column("subject_id").to_pylist(), read_splits(root))


def stable_id(text: str) -> int:
    """A stable signed 63-bit integer id of ``text`` (same on every machine and run)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def present_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``present`` column (``list<bool>`` of 9, registry order) as ``bool (rows, 9)``.

    The one decoding of the flags: readers, embedding and the sweep's
    modality census all go through it.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=bool).reshape(len(column), len(MODALITY_KEYS))


def modality_array(
    table: pa.Table, key: str, epochs_per_window: int, *, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one modality column into ``(values, present)``.

    Returns
    -------
    values : ndarray, ``dtype`` (float32; float16 halves the memory of large
        in-memory sets), shape ``(rows, epochs_per_window, samples_per_epoch)``
        Zeros where the modality is absent (never read them without ``present``).
    present : ndarray, bool, shape ``(rows,)``
    """
    samples = get_modality(key).samples_per_epoch
    column = table.column(key).combine_chunks()
    rows = len(column)
    present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    out = np.zeros((rows, epochs_per_window, samples), dtype=dtype)
    if present.any():
        flat = column.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False)
        out[present] = flat.astype(dtype, copy=False).reshape(-1, epochs_per_window, samples)
    return out, present


def event_matrix(column: pa.Array | pa.ChunkedArray, epochs_per_window: int) -> np.ndarray:
    """The ``events`` column as ``int64 (rows, epochs_per_window)``; null rows are :data:`UNKNOWN_EVENTS`."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out = np.full((len(column), epochs_per_window), UNKNOWN_EVENTS, dtype=np.int64)
    known = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if known.any():
        flat = column.filter(pa.array(known)).flatten().to_numpy(zero_copy_only=False)
        out[known] = flat.astype(np.int64).reshape(-1, epochs_per_window)
    return out


def outcome_values(table: pa.Table, name: str) -> np.ndarray:
    """Per-row float64 values of outcome ``name`` from the ``outcomes`` map (NaN if missing)."""
    values = np.full(table.num_rows, np.nan)
    for i, entry in enumerate(table.column("outcomes").to_pylist()):
        if entry:
            for key, value in entry:
                if key == name and value is not None:
                    values[i] = value
    return values


def table_to_batch(
    table: pa.Table,
    *,
    modalities: Sequence[str] = MODALITY_KEYS,
    epochs_per_window: int,
    history_columns: Sequence[str] = (),
    signal_dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    """Convert store rows into the numpy batch the model and loss consume.

    Returns a dict with one ``signal_dtype (B, E, S)`` array per selected modality,
    ``present`` (``bool (B, 9)``, registry order, false for modalities not
    selected), ``stages`` (``int64 (B, E)``), ``age`` (``float32 (B,)``, NaN
    unknown), ``sex`` (``float32 (B,)``, NaN unknown), ``site_id`` and
    ``night_id`` (``int64 (B,)``, stable hashes of the site and of site + recording id) and
    ``history`` (``float32 (B, H)``, NaN unknown) for ``history_columns``;
    when ``table`` holds the ``events`` column also ``events`` (``int64 (B, E)``,
    the event bits per epoch, :data:`UNKNOWN_EVENTS` for a night without
    scored events) and, with ``window_index``, ``window_index`` (``int64 (B,)``).
    """
    batch: dict[str, np.ndarray] = {}
    present = np.zeros((table.num_rows, len(MODALITY_KEYS)), dtype=bool)
    for key in modalities:
        values, mask = modality_array(table, key, epochs_per_window, dtype=signal_dtype)
        batch[key] = values
        present[:, MODALITY_KEYS.index(key)] = mask
    batch["present"] = present
    stages = table.column("stages").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    batch["stages"] = stages.astype(np.int64).reshape(table.num_rows, epochs_per_window)
    batch["age"] = table.column("age").to_numpy(zero_copy_only=False).astype(np.float32)
    sex = table.column("sex").combine_chunks()
    batch["sex"] = np.where(
        sex.is_null().to_numpy(zero_copy_only=False), np.nan, sex.fill_null(0).to_numpy(zero_copy_only=False)
    ).astype(np.float32)
    batch["site_id"] = np.array([stable_id(s) for s in table.column("site").to_pylist()], dtype=np.int64)
    # Recording ids are site-given and may repeat across sites ("1001"), so a
    # night is identified by site and recording id together.
    batch["night_id"] = np.array(
        [
            stable_id(f"{s}/{r}")
            for s, r in zip(table.column("site").to_pylist(), table.column("recording_id").to_pylist())
        ],
        dtype=np.int64,
    )
    if EVENTS_COLUMN in table.column_names:
        batch["events"] = event_matrix(table.column(EVENTS_COLUMN), epochs_per_window)
    if "window_index" in table.column_names:
        batch["window_index"] = table.column("window_index").to_numpy(zero_copy_only=False).astype(np.int64)
    history = [outcome_values(table, name) for name in history_columns]
    batch["history"] = (np.stack(history, axis=1) if history else np.zeros((table.num_rows, 0))).astype(np.float32)
    return batch
