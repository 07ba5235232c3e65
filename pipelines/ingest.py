"""``s2v ingest``: stream EDF/BDF recordings into the Parquet store with Ray Data.

Launch::

    s2v ingest --input COHORT/ --output STORE/ [--site-config site.toml] [--epochs-per-window 10]

Reads top to bottom: ``setup`` (store directory, stale temporary files,
site discovery, manifest compaction) -> ``plan`` (skip finished recordings,
quarantine duplicates and orphan hypnograms in the driver) -> ``run`` (Ray Data maps :func:`ingest_one` over the recordings, one
recording per task, each writing its own Parquet file atomically) ->
``cleanup`` (shut down a Ray instance this call started).

Store layout: ``STORE/site=<site>/<recording_id>.parquet`` rows following
``s2v_core.store.store_schema(epochs_per_window)``; ``STORE/manifest.jsonl``
one line per input recording (see :mod:`pipelines.manifest`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import resource
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.manifest import (MANIFEST_NAME, ManifestEntry, ManifestWriter, compact_manifest,
                                recording_file)
from pipelines.runtime import file_type, init_ray, join, read_text
from s2v_core.io.base import UnreadableRecording
from s2v_core.io.discovery import RecordingSource, discover_site, find_sites, fingerprint, resolve
from s2v_core.io.metadata import RecordingMetadata
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.recording import decode_recording
from s2v_core.splits import ensure_splits
from s2v_core.store import schema_info, write_store_file

logger = logging.getLogger(__name__)
_MIN_FINGERPRINT_BYTES = 256  # smaller files cannot be EDF; the reader reports why
_TEMPORARY_PREFIX = ".tmp-"  # pyarrow and Ray skip files starting with "." when reading a store


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one ingest run.

    Parameters
    ----------
    store, manifest : str
        Where the store and its manifest are.
    ok, quarantined, skipped : int
        Recordings written this run, quarantined this run, and skipped
        because a previous run finished them.
    windows : int
        Windows (store rows) written this run.
    peak_worker_rss_mb : float
        Largest peak resident memory of a worker process that decoded a
        recording (MiB; 0 when nothing was decoded). Bounded by one recording.
    """

    store: str
    manifest: str
    ok: int
    quarantined: int
    skipped: int
    windows: int
    peak_worker_rss_mb: float = 0.0


@contextlib.contextmanager
def _local_copy(uri: str | None) -> Iterator[str | None]:
    """A local path for ``uri``: the file itself when local, else a temporary download."""
    if uri is None or "://" not in uri or uri.startswith("file://"):
        yield None if uri is None else uri.removeprefix("file://")
        return
    fs, path = resolve(uri)
    suffix = os.path.splitext(path)[1]
    with tempfile.TemporaryDirectory(prefix="s2v-ingest-") as tmp:
        local = os.path.join(tmp, "recording" + suffix)
        with fs.open_input_stream(path) as source, open(local, "wb") as target:
            while chunk := source.read(1 << 24):
                target.write(chunk)
        yield local


def _write_atomically(table, output: str, site: str, recording_id: str) -> None:
    """Write a temporary hidden file, then rename it: readers never see a partial file."""
    fs, root = resolve(output)
    final = recording_file(root, site, recording_id)
    fs.create_dir(os.path.dirname(final), recursive=True)
    # Hidden (pyarrow and Ray skip leading dots) and not ending in .parquet (globbing readers skip it).
    temporary = f"{os.path.dirname(final)}/{_TEMPORARY_PREFIX}{recording_id}.parquet.{uuid.uuid4().hex}"
    try:
        write_store_file(table, temporary, filesystem=fs)
        fs.move(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(temporary)
        raise


def ingest_one(row: dict, *, output: str, epochs_per_window: int) -> dict:
    """Decode one recording and write its Parquet file; return its manifest line.

    Runs inside a Ray task. Never raises for bad input: every failure becomes
    a ``quarantined`` entry whose reason names the source file.
    """
    source: RecordingSource = pickle.loads(row["task"])
    entry = ManifestEntry(recording_id=source.recording_id, site=source.site.name, source=source.source,
                          status="quarantined", content_hash=row["content_hash"])
    replacements: list[tuple[str, str]] = []
    try:
        with _local_copy(source.signal_uri) as signal, _local_copy(source.hypnogram_uri) as hypnogram:
            replacements = [(signal, source.source)] + ([(hypnogram, source.hypnogram)] if hypnogram else [])
            decoded = decode_recording(
                signal, recording_id=source.recording_id, site=source.site, metadata=source.metadata,
                hypnogram_path=hypnogram, hypnogram_problem=source.hypnogram_problem,
                epochs_per_window=epochs_per_window)
        _write_atomically(decoded.table, output, source.site.name, source.recording_id)
        entry.status, entry.windows = "ok", decoded.windows
        entry.modalities, entry.channels = list(decoded.modalities), decoded.channels
        entry.unknown_channels = list(decoded.unknown_channels)
        notes = list(decoded.notes)
        if not source.key_matched:
            notes.insert(0, f"{source.source}: file name does not match key_regex {source.site.key_regex!r}; "
                            f"recording_id is a stable hash of the path")
        entry.reason = "; ".join(notes) or None
    except UnreadableRecording as exc:
        entry.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad recording must never stop the run
        entry.reason = f"{source.source}: {type(exc).__name__}: {exc}"
    if entry.reason:
        # Reasons name the file as the user knows it, not the worker's local copy.
        for local, relative in replacements:
            entry.reason = entry.reason.replace(local, relative)
    # ru_maxrss is the peak of this worker process so far, in KiB on Linux.
    return {"entry": entry.to_json(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _remove_stale_temporaries(fs: pafs.FileSystem, root: str) -> None:
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.startswith((_TEMPORARY_PREFIX, f".{MANIFEST_NAME}")):
            logger.info("removing %s left by an interrupted run", info.path)
            fs.delete_file(info.path)


def _check_store_layout(fs: pafs.FileSystem, root: str, finished: list[ManifestEntry],
                        epochs_per_window: int) -> None:
    if not finished:
        return
    first = finished[0]
    path = recording_file(root, first.site, first.recording_id)
    with fs.open_input_file(path) as handle:
        _, existing = schema_info(pq.read_schema(handle))
    if existing != epochs_per_window:
        raise ValueError(f"--epochs-per-window {epochs_per_window}: the store at {root} was written with "
                         f"{existing}; use {existing} or a new --output")


def discover(inputs: list[str], *, site_config: str | None) -> list[tuple[str, list[RecordingSource], list]]:
    """``(site name, signal sources, orphan hypnograms)`` of every site under ``inputs``."""
    sites = []
    for input_uri in inputs:
        for config, site_uri in find_sites(input_uri, site_config=site_config):
            sources, orphans = discover_site(config, site_uri, input_uri=input_uri)
            logger.info("site %s: %d signal files in %s", config.name, len(sources), site_uri)
            sites.append((config.name, sources, orphans))
    return sites


def plan(sites: list[tuple[str, list[RecordingSource], list]], *, finished: list[ManifestEntry]
         ) -> tuple[list[tuple[RecordingSource, str]], list[ManifestEntry], int]:
    """Choose what to decode; return ``(tasks, quarantined entries, skipped count)``.

    Recordings with an ``ok`` line in ``finished`` are skipped. Duplicates (a
    recording id seen before, or the same content fingerprint) and hypnograms
    that no signal claims are quarantined here, before any decoding.
    """
    done = {(e.site, e.recording_id, e.source) for e in finished}
    seen_ids = {e.recording_id: e.source for e in finished}
    seen_hashes = {e.content_hash: e.source for e in finished if e.content_hash}
    candidates, rejected, skipped = [], [], 0
    for site, sources, orphans in sites:
        for source in sources:
            if (site, source.recording_id, source.source) in done:
                skipped += 1
                continue
            entry = ManifestEntry(recording_id=source.recording_id, site=site, source=source.source,
                                  status="quarantined")
            if source.size_bytes >= _MIN_FINGERPRINT_BYTES:
                # Files too small to be EDF are left to the reader, which says what is wrong with them.
                fs, path = resolve(source.signal_uri)
                try:
                    entry.content_hash = fingerprint(fs, path, source.size_bytes)
                except OSError as exc:
                    entry.reason = f"{source.source}: cannot read ({exc})"
            candidates.append((source, entry))
        rejected += [ManifestEntry(recording_id=None, site=o.site, source=o.source, status="quarantined",
                                   reason=f"{o.source}: hypnogram with no matching signal file")
                     for o in orphans]
    # Among duplicates keep the copy that has a hypnogram and a metadata row, then the first by path.
    candidates.sort(key=lambda c: (c[0].hypnogram is None, c[0].metadata == RecordingMetadata(), c[0].source))
    tasks = []
    for source, entry in candidates:
        if entry.reason is None and source.recording_id in seen_ids:
            entry.reason = (f"{source.source}: duplicate recording_id {source.recording_id!r} "
                            f"(already from {seen_ids[source.recording_id]})")
        elif entry.reason is None and entry.content_hash in seen_hashes:
            entry.reason = (f"{source.source}: duplicate recording, same content as "
                            f"{seen_hashes[entry.content_hash]}")
        if entry.reason:
            rejected.append(entry)
            continue
        seen_ids[source.recording_id] = source.source
        if entry.content_hash:
            seen_hashes[entry.content_hash] = source.source
        tasks.append((source, entry.content_hash))
    return tasks, rejected, skipped


MLFLOW_EXPERIMENT = "s2v-ingest"


def _log_mlflow(uri: str, summary: IngestSummary, *, inputs: list[str], epochs_per_window: int,
                workers: int | None, seconds: float) -> str:
    """Log one ingest run (counts, throughput, the manifest) to MLflow; return the run id.

    Only counts, paths and the manifest are logged: the manifest holds no
    header PHI, so neither does the run.
    """
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # Next to a local SQLite store, not in whatever the current directory is.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri() \
            if uri.startswith("sqlite:///") else None
        experiment_id = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)
    run_id = client.create_run(experiment_id, run_name="ingest").info.run_id
    for name, value in {"inputs": ",".join(inputs), "output": summary.store,
                        "epochs_per_window": epochs_per_window, "workers": workers or "auto"}.items():
        client.log_param(run_id, name, value)
    hours = summary.windows * epochs_per_window * EPOCH_SECONDS / 3600
    metrics = {"ok": summary.ok, "quarantined": summary.quarantined, "skipped": summary.skipped,
               "windows": summary.windows, "recording_hours": hours, "seconds": seconds,
               "hours_per_s": hours / seconds if seconds > 0 else 0.0,
               "peak_worker_rss_mb": summary.peak_worker_rss_mb}
    for name, value in metrics.items():
        client.log_metric(run_id, name, float(value))
    if file_type(summary.manifest) == pafs.FileType.File:
        client.log_text(run_id, read_text(summary.manifest), MANIFEST_NAME)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def ingest(
    inputs: list[str],
    output: str,
    *,
    site_config: str | None = None,
    epochs_per_window: int = 10,
    address: str | None = None,
    num_cpus: int | None = None,
    workers: int | None = None,
    mlflow_tracking_uri: str | None = None,
) -> IngestSummary:
    """Ingest the recordings under ``inputs`` into the store at ``output``.

    Parameters
    ----------
    inputs : list of str
        Site directories or parents of site directories (paths or pyarrow URIs).
    output : str
        Store root (path or URI); created if missing.
    site_config : str, optional
        Site config file overriding the input's own ``site.toml`` (one input only).
    epochs_per_window : int
        30-s epochs per store row (10 = 5 min). Must match an existing store.
    address : str, optional
        Ray cluster address (else ``RAY_ADDRESS``, else a local Ray started here).
    num_cpus : int, optional
        CPUs of a local Ray started here (default: all cores).
    workers : int, optional
        Most recordings decoded at the same time (default: as many as Ray has CPUs).
        Memory per worker is bounded by one recording.
    mlflow_tracking_uri : str, optional
        Log the run (counts, hours per second, the manifest) to this MLflow
        store; default ``MLFLOW_TRACKING_URI`` if set, else no MLflow run.

    Returns
    -------
    IngestSummary
    """
    if not inputs:
        raise ValueError("--input: expected at least one input directory")
    if site_config is not None and len(inputs) != 1:
        raise ValueError(f"--site-config applies to exactly one --input, found {len(inputs)}")
    if epochs_per_window < 1:
        raise ValueError(f"--epochs-per-window: expected >= 1, found {epochs_per_window}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers: expected >= 1, found {workers}")

    for input_uri in inputs:  # before creating anything at the output
        fs, path = resolve(input_uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"--input {input_uri}: not a directory")

    # setup
    started = time.perf_counter()
    sites = discover(inputs, site_config=site_config)  # config errors surface before the store is touched
    fs, root = resolve(output)
    fs.create_dir(root, recursive=True)
    _remove_stale_temporaries(fs, root)
    kept = compact_manifest(fs, root, redo_sites={name for name, _, _ in sites})
    finished = [e for e in kept if e.status == "ok" and e.recording_id]
    _check_store_layout(fs, root, finished, epochs_per_window)
    writer = ManifestWriter(fs, root)
    manifest = join(output, MANIFEST_NAME)

    # plan
    tasks, rejected, skipped = plan(sites, finished=finished)
    for entry in rejected:
        logger.warning("quarantined: %s", entry.reason)
        writer.append(entry)
    logger.info("%d recordings to ingest, %d skipped (already in the store), %d quarantined before decoding",
                len(tasks), skipped, len(rejected))

    # run
    ok = windows = 0
    peak_rss_mb = 0.0
    quarantined = len(rejected)
    if tasks:
        import ray

        started_here = not ray.is_initialized()
        init_ray(address, num_cpus=num_cpus)
        try:
            items = [{"task": pickle.dumps(source), "content_hash": content_hash} for source, content_hash in tasks]
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
                ingest_one, fn_kwargs={"output": output, "epochs_per_window": epochs_per_window},
                num_cpus=1, concurrency=workers)
            for done, row in enumerate(dataset.iter_rows(), start=1):
                entry = ManifestEntry.from_json(row["entry"])
                peak_rss_mb = max(peak_rss_mb, float(row["peak_rss_mb"]))
                writer.append(entry)  # after the file is in place (ingest_one renamed it)
                if entry.status == "ok":
                    ok, windows = ok + 1, windows + entry.windows
                    logger.info("[%d/%d] %s/%s: %d windows, %s", done, len(tasks), entry.site,
                                entry.recording_id, entry.windows, ",".join(entry.modalities))
                    if entry.reason:
                        logger.warning("%s/%s: %s", entry.site, entry.recording_id, entry.reason)
                else:
                    quarantined += 1
                    logger.warning("[%d/%d] quarantined: %s", done, len(tasks), entry.reason)
        finally:
            # cleanup
            if started_here:
                ray.shutdown()
    summary = IngestSummary(store=output, manifest=manifest, ok=ok, quarantined=quarantined,
                            skipped=skipped, windows=windows, peak_worker_rss_mb=peak_rss_mb)
    if ok + skipped:
        # Every subject gets a split the moment the store has nights (s2v_core.splits):
        # later nights and sites never move the subjects already assigned.
        ensure_splits(output)
    tracking_uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        run_id = _log_mlflow(tracking_uri, summary, inputs=inputs, epochs_per_window=epochs_per_window,
                             workers=workers, seconds=time.perf_counter() - started)
        logger.info("MLflow run %s at %s", run_id, tracking_uri)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="DIR",
                        help="site directory or parent of site directories (repeatable; path or URI)")
    parser.add_argument("--output", required=True, metavar="STORE", help="store root (path or URI)")
    parser.add_argument("--site-config", metavar="FILE", help="site config overriding the input's site.toml")
    parser.add_argument("--epochs-per-window", type=int, default=10, help="30-s epochs per store row (default 10)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all cores)")
    parser.add_argument("--workers", type=int, help="recordings decoded at the same time (default: Ray CPUs)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else no MLflow run)")


def run(args: argparse.Namespace) -> int:
    summary = ingest(args.input, args.output, site_config=args.site_config,
                     epochs_per_window=args.epochs_per_window, address=args.address,
                     num_cpus=args.num_cpus, workers=args.workers, mlflow_tracking_uri=args.mlflow_uri)
    print(f"ingested {summary.ok} recordings ({summary.windows} windows), "
          f"quarantined {summary.quarantined}, skipped {summary.skipped} already in the store")
    print(f"store:    {summary.store}")
    print(f"manifest: {summary.manifest}")
    return 0
