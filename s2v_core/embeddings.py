"""The embeddings format written by ``s2v embed`` and read by ``s2v evaluate``.

This module owns the layout of an embeddings directory: its file names, its
``embed.json`` record, the pooled per-night table and the reader. Writing the
window rows (running the encoder) is :mod:`pipelines.embed`'s job; what is
pure pyarrow/numpy lives here so that any reader (evaluate, a notebook, a
benchmark) needs no Ray.

Embeddings format (``EMB/``), read back with :func:`read_embeddings`
--------------------------------------------------------------------

``EMB/windows/*.parquet`` — one row per store window that has at least one
of the requested modalities (file order is arbitrary; sort by
``site, recording_id, window_index``):

=====================  ===============================================================
``recording_id``       str, night (unique with ``site``: sites may reuse ids); with
                       ``subject_id`` (str), ``site`` (str),
                       ``window_index`` (int32), ``start_epoch`` (int32) as in the store
``split``              str: the subject's split in the store (``train``/``val``/``test``,
                       ``STORE/splits.json``)
``stages``             list<int8> ``(E,)``: W=0 N1=1 N2=2 N3=3 REM=4, -1 unknown
``age``, ``sex``       float32 years / int8 0 female 1 male, null unknown
``outcomes``           map<str, float64>, the store's per-night outcome columns
``present``            list<bool> ``(9,)`` registry order: modalities the encoder read
``epoch_embedding``    list<float32> ``E*P``: fused per-epoch embedding, row-major ``(E, P)``
                       (``P`` = width for hidden features, projection_dim for projected)
``window_embedding``   list<float32> ``P``: mean of the epoch embeddings (L2-normalised when projected)
``emb_<modality>``     list<float32> ``E*P`` per requested modality (``--per-modality``
                       only); null where that modality is absent
=====================  ===============================================================

``EMB/nights.parquet`` — one row per night: ``recording_id``, ``subject_id``,
``site``, ``split``, ``age``, ``sex``, ``outcomes``, ``windows`` (int32), and
``night_embedding`` (list<float32> ``P``: mean of the night's window
embeddings, L2-normalised, :func:`s2v_core.model.pool_night`).

``EMB/embed.json`` (also in the schema metadata of ``nights.parquet`` under
``s2v.embeddings``) — ``format``, ``features`` (hidden | projected), ``embedding_dim`` (P), ``epochs_per_window``
(E), ``modalities`` (requested subset), ``per_modality``, ``encoder_source``,
``pretrain_run_id`` and ``pretrain_tracking_uri`` (the pretraining MLflow run,
null if unknown), ``store``, ``store_splits`` (the store's id and split
assignment, :func:`s2v_core.splits.split_record`), ``encoder_training`` (the
store and splits that pretrained the encoder, null if unrecorded: ``s2v
evaluate`` uses the two to refuse scoring subjects the encoder saw),
``windows``, ``nights``.
Embeddings are unit-length (cosine geometry); they carry no signal values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from s2v_core.locations import absolute, redact, resolve
from s2v_core.splits import SPLIT_NAMES, split_record
from s2v_core.store import IDENTITY_COLUMNS

#: Version of the embeddings layout described in this module's docstring.
EMBEDDINGS_FORMAT = 2
INFO_FILE = "embed.json"
WINDOWS_DIR = "windows"
NIGHTS_FILE = "nights.parquet"
METADATA_KEY = b"s2v.embeddings"
#: What an embedding is: the backbone's hidden state (downstream default) or the aligned projection.
FEATURES = ("hidden", "projected")
#: Store columns carried through unchanged to every embeddings row.
CARRIED_COLUMNS = (*IDENTITY_COLUMNS, "stages", "age", "sex", "outcomes")


@dataclass(frozen=True)
class Embeddings:
    """Embeddings read by :func:`read_embeddings`, windows sorted by night then window index."""

    info: dict  # contents of EMB/embed.json
    epoch: np.ndarray  # float32 (N, E, P) fused per-epoch embeddings
    window: np.ndarray  # float32 (N, P) window embeddings
    stages: np.ndarray  # int64 (N, E), -1 unknown
    recording_id: np.ndarray  # str (N,)
    night_id: np.ndarray  # str (N,) "site/recording_id": a night (sites may reuse recording ids)
    subject_id: np.ndarray  # str (N,)
    split: np.ndarray  # str (N,) the subject's split: train / val / test
    site: np.ndarray  # str (N,)
    start_epoch: np.ndarray  # int64 (N,)
    windows: pa.Table  # the window rows without the embedding columns (metadata, outcomes)
    nights: pa.Table  # EMB/nights.parquet
    night: np.ndarray  # float32 (K, P), rows of ``nights``
    per_modality: dict[str, np.ndarray]  # key -> float32 (N, E, P), NaN where absent


def float_list_column(values: np.ndarray, *, mask: np.ndarray | None = None) -> pa.Array:
    """``(rows, k)`` float32 array -> ``list<float32>`` column (null where ``mask``)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(values.ravel()), mask=None if mask is None else pa.array(mask)
    )


def embeddings_info(
    *,
    embedding_dim: int,
    epochs_per_window: int,
    modalities: Sequence[str],
    per_modality: bool,
    source: str,
    pretrain_run: dict | None,
    data: str,
    training: dict | None,
    features: str,
) -> dict:
    """The ``embed.json`` record of an embeddings directory (before ``windows``/``nights`` are counted).

    Parameters
    ----------
    embedding_dim : int
        ``P``: the width (hidden features) or the projection dimension (projected).
    epochs_per_window : int
        ``E``: 30-s epochs per window, from the store.
    modalities : sequence of str
        The subset the encoder read.
    per_modality : bool
        Whether ``emb_<modality>`` columns were written.
    source : str
        Where the encoder came from (recorded redacted).
    pretrain_run : dict or None
        ``{"tracking_uri", "run_id"}`` of the pretraining MLflow run, if known.
    data : str
        The store that was embedded (its split assignment is recorded).
    training : dict or None
        The record of what pretrained the encoder (``None``: unknown).
    features : {"hidden", "projected"}
        What an embedding is.

    Returns
    -------
    dict
        The record, JSON-serialisable, credentials in locations redacted.
    """
    return {
        "format": EMBEDDINGS_FORMAT,
        "features": features,
        "embedding_dim": embedding_dim,
        "epochs_per_window": epochs_per_window,
        "modalities": list(modalities),
        "per_modality": per_modality,
        "encoder_source": redact(str(source)),
        "pretrain_run_id": (pretrain_run or {}).get("run_id"),
        "pretrain_tracking_uri": redact((pretrain_run or {}).get("tracking_uri") or "") or None,
        "store": redact(absolute(data)),
        "store_splits": split_record(data, SPLIT_NAMES),
        "encoder_training": training,
    }


def fresh_output(output: str) -> tuple[pafs.FileSystem, str]:
    """Create ``output`` (a path or a URI), replacing a previous embeddings directory but nothing else.

    Returns its filesystem and its path there.
    """
    filesystem, root = resolve(str(output))
    if filesystem.get_file_info(root).type != pafs.FileType.NotFound:
        kinds = {info.base_name: info.type for info in filesystem.get_file_info(pafs.FileSelector(root))}
        is_embeddings = kinds.get(INFO_FILE) == pafs.FileType.File or kinds.get(WINDOWS_DIR) == pafs.FileType.Directory
        if kinds and not is_embeddings:
            raise ValueError(
                f"--output {str(output)!r} exists and is not an embeddings directory; refusing to replace it"
            )
        filesystem.delete_dir(root)
    filesystem.create_dir(root, recursive=True)
    return filesystem, root


def write_nights(out: tuple[pafs.FileSystem, str], info: dict) -> tuple[int, int]:
    """Pool window embeddings per night, streaming over EMB/windows; returns (windows, nights)."""
    from s2v_core.model import pool_night

    filesystem, root = out
    dataset = pads.dataset(f"{root}/{WINDOWS_DIR}", format="parquet", filesystem=filesystem)
    meta_columns = ["recording_id", "subject_id", "site", "split", "age", "sex", "outcomes"]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    first_rows: dict[str, dict] = {}
    windows = 0
    for batch in dataset.to_batches(columns=[*meta_columns, "window_embedding"]):
        table = pa.Table.from_batches([batch])
        ids = np.asarray(
            [f"{s}/{r}" for s, r in zip(table.column("site").to_pylist(), table.column("recording_id").to_pylist())]
        )
        values = table.column("window_embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
        # Pool per batch (sums, not means) so that memory stays one vector per night.
        nights, inverse = np.unique(ids, return_inverse=True)
        for k, night in enumerate(nights):
            chosen = inverse == k
            sums[night] = sums.get(night, 0) + values[chosen].astype(np.float64).sum(axis=0)
            counts[night] = counts.get(night, 0) + int(chosen.sum())
            if night not in first_rows:
                first_rows[night] = table.select(meta_columns).slice(int(np.argmax(chosen)), 1).to_pylist()[0]
        windows += len(ids)
    order = sorted(sums)
    means = np.stack([sums[n] / counts[n] for n in order]).astype(np.float32)
    _, pooled = pool_night(means, np.arange(len(order)))  # L2-normalise, as the model pools
    rows = [first_rows[n] for n in order]
    table = pa.Table.from_pylist(rows, schema=pa.schema([dataset.schema.field(c) for c in meta_columns]))
    table = table.append_column("windows", pa.array([counts[n] for n in order], type=pa.int32()))
    table = table.append_column("night_embedding", float_list_column(pooled))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})
    pq.write_table(table, f"{root}/{NIGHTS_FILE}", filesystem=filesystem)
    return windows, len(order)


def read_embeddings(path: str | os.PathLike, *, per_modality: bool = False) -> Embeddings:
    """Read an embeddings directory (a path or a URI) written by ``s2v embed`` into numpy arrays.

    Parameters
    ----------
    path : str or os.PathLike
        The embeddings directory ``EMB`` (layout in this module's docstring).
    per_modality : bool
        Also read the ``emb_<modality>`` columns (written with ``--per-modality``).

    Returns
    -------
    Embeddings
        Windows sorted by site, night and window index; nights by site and night.

    Raises
    ------
    FileNotFoundError
        ``path`` is not an embeddings directory (no ``embed.json``).
    ValueError
        ``embed.json`` has another format version.
    """
    filesystem, root = resolve(str(path))
    if filesystem.get_file_info(f"{root}/{INFO_FILE}").type != pafs.FileType.File:
        raise FileNotFoundError(
            f"--embeddings {str(path)!r}: not an embeddings directory (no {INFO_FILE}; write one with `s2v embed`)"
        )
    with filesystem.open_input_stream(f"{root}/{INFO_FILE}") as stream:
        info = json.loads(stream.read().decode("utf-8"))
    if info.get("format") != EMBEDDINGS_FORMAT:
        raise ValueError(
            f"{path}/{INFO_FILE}: expected embeddings format {EMBEDDINGS_FORMAT}, found {info.get('format')!r}"
        )
    table = pads.dataset(f"{root}/{WINDOWS_DIR}", format="parquet", filesystem=filesystem).to_table()
    table = table.sort_by([("site", "ascending"), ("recording_id", "ascending"), ("window_index", "ascending")])
    rows, epochs, dim = table.num_rows, info["epochs_per_window"], info["embedding_dim"]

    def matrix(name: str, shape: tuple[int, ...]) -> np.ndarray:
        column = table.column(name).combine_chunks()
        values = np.full((rows, int(np.prod(shape))), np.nan, dtype=np.float32)
        valid = ~column.is_null().to_numpy(zero_copy_only=False)
        if valid.any():
            flat = column.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            values[valid] = flat.reshape(int(valid.sum()), -1)
        return values.reshape(rows, *shape)

    nights = pq.read_table(f"{root}/{NIGHTS_FILE}", filesystem=filesystem)
    nights = nights.sort_by([("site", "ascending"), ("recording_id", "ascending")])
    embedding_columns = [c for c in table.column_names if c.endswith("_embedding") or c.startswith("emb_")]
    stages = table.column("stages").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return Embeddings(
        info=info,
        epoch=matrix("epoch_embedding", (epochs, dim)),
        window=matrix("window_embedding", (dim,)),
        stages=stages.astype(np.int64).reshape(rows, epochs),
        recording_id=np.asarray(table.column("recording_id").to_pylist()),
        night_id=np.asarray(
            [f"{s}/{r}" for s, r in zip(table.column("site").to_pylist(), table.column("recording_id").to_pylist())]
        ),
        subject_id=np.asarray(table.column("subject_id").to_pylist()),
        split=np.asarray(table.column("split").to_pylist()),
        site=np.asarray(table.column("site").to_pylist()),
        start_epoch=table.column("start_epoch").to_numpy().astype(np.int64),
        windows=table.drop_columns(embedding_columns),
        nights=nights.drop_columns(["night_embedding"]),
        night=(
            nights.column("night_embedding")
            .combine_chunks()
            .flatten()
            .to_numpy()
            .reshape(nights.num_rows, dim)
            .astype(np.float32)
        ),
        per_modality={
            c[4:]: matrix(c, (epochs, dim)) for c in embedding_columns if per_modality and c.startswith("emb_")
        },
    )
