"""``s2v embed``: batch embedding extraction over a store (Ray Data actor pool).

Usage::

    s2v embed --checkpoint CKPT --data STORE --output EMB [--modalities hr,spo2,thorax]
              [--features hidden|projected] [--batch-size 64] [--actors N] [--per-modality]

``--features hidden`` (the default) writes the backbone's hidden states (width
``d``, after its final norm, before the projection head): what downstream
probes and fine-tuning use, as the authors do. ``projected`` writes the
aligned space the contrastive loss shapes (``projection_dim``, unit length).

``CKPT`` is a :func:`s2v_core.model.save_encoder` directory, a pretraining run
directory, or an MLflow model URI / run id (resolved by
``pipelines.model_io.load_trained_encoder``). The store is streamed through
``map_batches`` with an actor pool: each actor loads the encoder once (CPU, or
one GPU per actor when the cluster has GPUs) and embeds ``batch_size`` windows
at a time in eval mode, so memory does not grow with the store. ``CKPT``,
``STORE`` and ``EMB`` may each be a local path or a URI (``s3://…``, ``gs://…``):
everything is read and written through ``pyarrow.fs``.

The embeddings format (``EMB/``) is described and read in :mod:`s2v_core.embeddings`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.embed_config import EmbedConfig, config_from_args
from pipelines.model_io import load_encoder_spec
from pipelines.runtime import write_text
from s2v_core.embeddings import (
    CARRIED_COLUMNS,
    FEATURES,
    INFO_FILE,
    WINDOWS_DIR,
    embeddings_info,
    float_list_column,
    fresh_output,
    write_nights,
)
from s2v_core.locations import join
from s2v_core.modalities import MODALITY_KEYS, parse_modalities
from s2v_core.splits import SplitConfig, assign_splits, read_splits
from s2v_core.store import open_store, present_matrix, schema_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedSummary:
    """What :func:`embed` wrote."""

    output: str  # the EMB directory (a path or a URI, as given)
    windows: int  # rows of EMB/windows
    nights: int  # rows of EMB/nights.parquet
    embedding_dim: int  # P, the aligned-space dimension
    epochs_per_window: int  # E, from the store
    modalities: tuple[str, ...]  # the subset the encoder read
    seconds: float  # wall-clock time of the whole call
    windows_per_second: float  # windows / seconds


class _EmbedActor:
    """Ray Data actor: loads the encoder once, then reads and embeds whole store files.

    Each call gets a batch of file paths and returns only their embeddings:
    the raw signals (~0.3 MB a window with every modality) never travel
    through the object store, which on a small machine cost more than the
    forward pass (``benchmarks/bench_embed.py``).
    """

    def __init__(
        self,
        checkpoint: str,
        modalities: tuple[str, ...],
        epochs_per_window: int,
        per_modality: bool,
        threads: int,
        columns: list[str],
        filesystem: pafs.FileSystem,
        batch_size: int,
        splits: SplitConfig,
        features: str,
        allow_pickle: bool = False,
    ) -> None:
        import torch

        # One actor per core: more intra-op threads per actor would oversubscribe the node.
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder_spec(checkpoint, allow_pickle=allow_pickle)[0].to(self.device).eval()
        self.modalities = modalities
        self.epochs_per_window = epochs_per_window
        self.per_modality = per_modality
        self.columns, self.filesystem, self.batch_size = columns, filesystem, batch_size
        self.splits, self.features = splits, features

    def __call__(self, items: dict[str, np.ndarray]) -> pa.Table:
        parts = []
        for path in items["path"]:
            night = pq.read_table(str(path), columns=self.columns, filesystem=self.filesystem)
            parts += [
                embed_table(
                    self.encoder,
                    night.slice(start, self.batch_size),
                    modalities=self.modalities,
                    epochs_per_window=self.epochs_per_window,
                    splits=self.splits,
                    per_modality=self.per_modality,
                    device=self.device,
                    features=self.features,
                )
                for start in range(0, night.num_rows, self.batch_size)
            ]
        return pa.concat_tables(parts)


def embed_table(
    encoder,
    table: pa.Table,
    *,
    modalities: Sequence[str],
    epochs_per_window: int,
    splits: SplitConfig,
    per_modality: bool = False,
    device: str = "cpu",
    features: str = "hidden",
) -> pa.Table:
    """Embed store rows (a ``pyarrow.Table`` in the store schema) into embeddings rows.

    Rows with none of ``modalities`` present are dropped. The forward runs
    in eval mode under ``torch.inference_mode`` (deterministic, no modality
    dropout). ``splits`` is the store's assignment (each row's ``split``);
    ``features`` chooses hidden states or projections (see the module docstring).
    """
    import torch

    from s2v_core.model import batch_to_tensors
    from s2v_core.store import table_to_batch

    indices = [MODALITY_KEYS.index(k) for k in modalities]
    present = present_matrix(table.column("present"))
    keep = present[:, indices].any(axis=1)
    if not keep.all():
        table = table.filter(pa.array(keep))
    batch = table_to_batch(table, modalities=modalities, epochs_per_window=epochs_per_window)
    with torch.inference_mode():
        out = encoder.encode(batch_to_tensors(batch, device), modalities=list(modalities))
    if features == "hidden":
        fused, window, per_key = out.fused_hidden, out.window_hidden, out.hidden
    else:
        fused, window, per_key = out.fused, out.window, out.per_modality
    rows, epochs, dim = fused.shape
    columns = {name: table.column(name) for name in CARRIED_COLUMNS}
    columns["split"] = pa.array(
        assign_splits(table.column("site").to_pylist(), table.column("subject_id").to_pylist(), splits).tolist(),
        pa.string(),
    )
    columns["present"] = pa.array(out.present.cpu().numpy().tolist(), type=pa.list_(pa.bool_()))
    columns["epoch_embedding"] = float_list_column(fused.float().cpu().numpy().reshape(rows, epochs * dim))
    columns["window_embedding"] = float_list_column(window.float().cpu().numpy())
    if per_modality:
        used = out.present.cpu().numpy()
        for key in modalities:
            values = per_key[key].float().cpu().numpy().reshape(rows, epochs * dim)
            columns[f"emb_{key}"] = float_list_column(values, mask=~used[:, MODALITY_KEYS.index(key)])
    return pa.table(columns)


def _count_usable_windows(dataset: pads.Dataset, modalities: Sequence[str]) -> int:
    """Windows with at least one requested modality (reads only the ``present`` column)."""
    indices = [MODALITY_KEYS.index(k) for k in modalities]
    usable = 0
    for batch in dataset.to_batches(columns=["present"]):
        present = present_matrix(batch.column(0))
        usable += int(present[:, indices].any(axis=1).sum())
    return usable


def embed(config: EmbedConfig, *, address: str | None = None) -> EmbedSummary:
    """Embed every window of the store ``config.data`` with the encoder ``config.checkpoint`` into ``config.output``.

    Parameters
    ----------
    config : EmbedConfig
        The encoder, the store, the output directory (layout in
        :mod:`s2v_core.embeddings`) and every option
        (:class:`~pipelines.embed_config.EmbedConfig`), validated.
    address : str, optional
        Ray cluster address; default ``RAY_ADDRESS`` or a local instance.

    Returns
    -------
    EmbedSummary
        What was written, with the throughput.

    Raises
    ------
    ValueError
        A modality the encoder was not built for, or a store with no window
        holding any of the requested modalities.
    """
    import ray

    from pipelines.runtime import init_ray

    checkpoint, data, output, features = config.checkpoint, config.data, config.output, config.features
    started = time.perf_counter()
    encoder, pretrain_run = load_encoder_spec(checkpoint, allow_pickle=config.allow_pickle_model)
    dataset, epochs_per_window, selected, usable = _prepare(
        encoder, data, config.modalities, config.batch_size, checkpoint, features
    )
    embedding_dim = _embedding_dim(encoder, features)
    from pipelines.model_io import training_record

    record = training_record(checkpoint)
    del encoder  # the actors load their own copy

    out = fresh_output(output)
    if Path(checkpoint).exists():  # actors may run in another working directory
        checkpoint = str(Path(checkpoint).resolve())
    started_ray = not ray.is_initialized()
    init_ray(address)
    try:
        _run_actor_pool(
            checkpoint,
            dataset,
            out,
            modalities=selected,
            epochs_per_window=epochs_per_window,
            batch_size=config.batch_size,
            num_actors=config.num_actors,
            per_modality=config.per_modality,
            usable=usable,
            splits=read_splits(data),
            features=features,
            allow_pickle=config.allow_pickle_model,
        )
    finally:
        if started_ray:  # leave a caller's Ray (tests, evaluate's scenarios) running
            ray.shutdown()

    info = embeddings_info(
        embedding_dim=embedding_dim,
        epochs_per_window=epochs_per_window,
        modalities=selected,
        per_modality=config.per_modality,
        source=checkpoint,
        pretrain_run=pretrain_run,
        data=data,
        training=record,
        features=features,
    )
    return _finish(out, output, info, started)


def embed_local(
    encoder,
    data: str,
    output: str,
    *,
    modalities: str | Sequence[str] | None = None,
    batch_size: int = 64,
    per_modality: bool = False,
    source: str = "in-process encoder",
    training: dict | None = None,
    features: str = "hidden",
) -> EmbedSummary:
    """:func:`embed` in this process, without Ray, for notebooks, tests and small stores.

    Same output layout; ``encoder`` is a loaded :class:`~s2v_core.model.SleepEncoder`
    and ``source`` is recorded as its ``encoder_source``, ``training`` as its
    ``encoder_training`` (the record of what pretrained it; ``None`` = unknown).
    Streams the store one ``batch_size`` batch at a time.
    """
    started = time.perf_counter()
    dataset, epochs_per_window, selected, _ = _prepare(encoder, data, modalities, batch_size, source, features)
    encoder.eval()
    out = fresh_output(output)
    filesystem, root = out
    filesystem.create_dir(f"{root}/{WINDOWS_DIR}")
    splits = read_splits(data)
    writer = None
    try:
        for batch in dataset.to_batches(columns=[*CARRIED_COLUMNS, *selected, "present"], batch_size=batch_size):
            table = embed_table(
                encoder,
                pa.Table.from_batches([batch]),
                modalities=selected,
                epochs_per_window=epochs_per_window,
                splits=splits,
                per_modality=per_modality,
                features=features,
            )
            if table.num_rows == 0:
                continue
            writer = writer or pq.ParquetWriter(
                f"{root}/{WINDOWS_DIR}/part-0.parquet", table.schema, filesystem=filesystem
            )
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    info = embeddings_info(
        embedding_dim=_embedding_dim(encoder, features),
        epochs_per_window=epochs_per_window,
        modalities=selected,
        per_modality=per_modality,
        source=source,
        pretrain_run=None,
        data=data,
        training=training,
        features=features,
    )
    return _finish(out, output, info, started)


def _embedding_dim(encoder, features: str) -> int:
    return encoder.config.width if features == "hidden" else encoder.config.projection_dim


def _prepare(encoder, data: str, modalities, batch_size: int, source: str, features: str = "hidden"):
    """Validate the request; returns ``(dataset, epochs_per_window, modalities, usable windows)``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if features not in FEATURES:
        raise ValueError(f"--features: expected {' or '.join(FEATURES)}, found {features!r}")
    dataset = open_store(data)
    epochs_per_window = schema_info(dataset.schema)[1]
    selected = parse_modalities(modalities) if modalities else encoder.modalities
    missing = [k for k in selected if k not in encoder.modalities]
    if missing:
        raise ValueError(
            f"--modalities: the encoder at {source!r} has no tokenizer for "
            f"{', '.join(missing)}; it was built for {', '.join(encoder.modalities)}"
        )
    if encoder.config.position == "absolute" and epochs_per_window > encoder.config.epochs_per_window:
        raise ValueError(
            f"--data {data!r} has windows of {epochs_per_window} epochs; the encoder "
            f"(absolute positions) handles at most {encoder.config.epochs_per_window}"
        )
    usable = _count_usable_windows(dataset, selected)
    if usable == 0:
        raise ValueError(
            f"--data {data!r}: no window holds any of the requested modalities {','.join(selected)}; nothing to embed"
        )
    return dataset, epochs_per_window, tuple(selected), usable


def _finish(out: tuple[pafs.FileSystem, str], output: str, info: dict, started: float) -> EmbedSummary:
    """Pool the nights, write embed.json and summarise."""
    written, nights = write_nights(out, info)
    info.update(windows=written, nights=nights)
    write_text(join(output, INFO_FILE), json.dumps(info, indent=2) + "\n")
    seconds = time.perf_counter() - started
    logger.info("wrote %d window and %d night embeddings to %s in %.1f s", written, nights, output, seconds)
    return EmbedSummary(
        output=str(output),
        windows=written,
        nights=nights,
        embedding_dim=info["embedding_dim"],
        epochs_per_window=info["epochs_per_window"],
        modalities=tuple(info["modalities"]),
        seconds=seconds,
        windows_per_second=written / seconds,
    )


def _run_actor_pool(
    checkpoint: str,
    dataset: pads.Dataset,
    out: tuple[pafs.FileSystem, str],
    *,
    modalities: tuple[str, ...],
    epochs_per_window: int,
    batch_size: int,
    num_actors: int | None,
    per_modality: bool,
    usable: int,
    splits: SplitConfig,
    features: str = "hidden",
    allow_pickle: bool = False,
) -> None:
    """Stream the store through the encoder actor pool into ``out/windows``."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = num_actors or max(1, gpus or cpus)
    logger.info(
        "embedding %d windows with %d actor(s) on %s, modalities %s",
        usable,
        actors,
        "GPU" if gpus else "CPU",
        ",".join(modalities),
    )
    # Only the requested modality columns are read from the store.
    columns = [*CARRIED_COLUMNS, *modalities, "present"]
    # Ray Data's write tasks each ask for one whole CPU; the actors share what
    # is left (their real thread count is set in the actor), so a full pool
    # can never starve the tasks that drain it.
    actor_cpus = 0 if gpus else max(cpus - 1, 1) / actors
    # One block per night: the actors read the files themselves (see _EmbedActor).
    files = sorted(dataset.files)
    embedded = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files)).map_batches(
        _EmbedActor,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "modalities": tuple(modalities),
            "epochs_per_window": epochs_per_window,
            "per_modality": per_modality,
            "threads": 1 if gpus else max(1, cpus // actors),
            "columns": columns,
            "filesystem": dataset.filesystem,
            "batch_size": batch_size,
            "splits": splits,
            "features": features,
            "allow_pickle": allow_pickle,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=1 if gpus else 0,
    )
    filesystem, root = out
    embedded.write_parquet(f"{root}/{WINDOWS_DIR}", filesystem=filesystem)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="saved encoder dir or pretraining run dir (a path or a URI), or MLflow model URI / run id",
    )
    parser.add_argument("--data", required=True, help="store (STORE/site=<name>/*.parquet; a path or a URI)")
    parser.add_argument("--output", required=True, help="embeddings directory to write, replaced (a path or a URI)")
    parser.add_argument(
        "--modalities",
        default=None,
        help="comma-separated subset the encoder reads, e.g. eeg or hr,spo2,thorax "
        "(default: all the encoder was built for)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="windows per forward pass (default 64)")
    parser.add_argument(
        "--actors", type=int, default=None, help="actor pool size (default: one per CPU, or per GPU when present)"
    )
    parser.add_argument(
        "--features",
        choices=FEATURES,
        default="hidden",
        help="hidden: the backbone's hidden states, what probes and fine-tuning use (default); "
        "projected: the aligned space of the contrastive loss",
    )
    parser.add_argument(
        "--per-modality", action="store_true", help="also write one emb_<modality> column per requested modality"
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default RAY_ADDRESS or local)")
    parser.add_argument(
        "--allow-pickle-model",
        action="store_true",
        help="accept an MLflow pytorch model (runs:/ID/model, models:/...): a pickle that runs code "
        "when loaded; only for models you trust (default: weights-only encoders)",
    )


def run(args: argparse.Namespace) -> int:
    summary = embed(config_from_args(args), address=args.address)
    print(json.dumps(asdict(summary)))
    return 0
