"""``s2v ingest``: stream EDF/BDF recordings into the Parquet store with Ray Data.

Launch::

    s2v ingest --input COHORT/ --output STORE/ [--site-config site.toml] [--epochs-per-window 10]
               [--ids pseudonymous|original] [--pseudonym-key-file FILE] [--link-table FILE] [--prune]

Reads top to bottom: ``setup`` (the pseudonym key, site discovery, the
store's lease, its settings, stale temporary files) -> ``plan`` (skip
finished recordings, decode changed ones again, refuse duplicates, oversized
files and orphan hypnograms, withdraw vanished inputs; see
:mod:`pipelines.ingest_plan`) -> ``run`` (Ray Data maps
:func:`pipelines.ingest_task.ingest_one` over the recordings, one recording
per task, each reserving the memory its header says it needs and retried
at most ``--task-retries`` times when its worker dies) -> ``cleanup``
(erase what was withdrawn, release the lease, shut down a Ray instance
this call started).

Store layout: ``STORE/site=<site>/<recording_id>.parquet`` rows following
``s2v_core.store.store_schema(epochs_per_window)``; ``STORE/manifest.jsonl``
one line per input file (see :mod:`pipelines.manifest`); ``STORE/ingest.json``
the id mode, the pseudonym key's check value and the window length, which
every later ingest into the store must match.

Privacy: ``recording_id`` and ``subject_id`` are keyed hashes of the site's
own keys (:mod:`s2v_core.io.identity`); nothing this command writes, logs or
sends to MLflow holds a path, a site key or a byte of an EDF header besides
channel labels. ``--link-table FILE`` (outside the store, mode 0600) is the
one place that maps pseudonyms back to files and keys.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import time
import warnings
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipelines.ingest_config import IngestConfig, config_from_args
from pipelines.ingest_plan import IngestLimits, Plan, Task, plan
from pipelines.ingest_store import (
    check_settings,
    delete_file,
    erase_unlisted,
    remove_stale_temporaries,
    write_link_table,
)
from pipelines.ingest_task import TESTING_SIGKILL_ENV, ingest_one, remove_orphaned_copies
from pipelines.manifest import (
    MANIFEST_NAME,
    ManifestEntry,
    ManifestWriter,
    read_manifest,
    recording_file,
    rewrite_manifest,
)
from pipelines.runtime import file_type, init_ray, mlflow_experiment, read_text
from pipelines.store_lease import store_lease
from s2v_core.io.discovery import SiteListing, discover_site, find_sites
from s2v_core.io.identity import ID_MODES, Identities, load_pseudonym_key
from s2v_core.locations import join, redact, resolve
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.splits import ensure_splits

logger = logging.getLogger(__name__)
MLFLOW_EXPERIMENT = "s2v-ingest"
_MIB = 1 << 20


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one ingest run.

    Parameters
    ----------
    store, manifest : str
        Where the store and its manifest are (credentials in URIs redacted).
    ok, quarantined, skipped : int
        Recordings written this run, quarantined this run, and skipped
        because a previous run finished them with the same inputs.
    windows : int
        Windows (store rows) written this run.
    peak_worker_rss_mb : float
        Largest peak resident memory of a worker process that decoded a
        recording (MiB; 0 when nothing was decoded). Bounded by one recording.
    withdrawn : int
        Recordings erased this run because their input is gone (``--prune``).
    stale : int
        Recordings still in the store whose input is gone (no ``--prune``).
    """

    store: str
    manifest: str
    ok: int
    quarantined: int
    skipped: int
    windows: int
    peak_worker_rss_mb: float = 0.0
    withdrawn: int = 0
    stale: int = 0


# -- setup ------------------------------------------------------------------------------------------
def discover(inputs: list[str], *, site_config: str | None, identities: Identities) -> list[SiteListing]:
    """What every site under ``inputs`` holds (see :func:`s2v_core.io.discovery.discover_site`)."""
    listings = []
    for input_uri in inputs:
        for config, site_uri in find_sites(input_uri, site_config=site_config):
            listing = discover_site(config, site_uri, input_uri=input_uri, identities=identities)
            logger.info("site %s: %d signal files", config.name, len(listing.sources))
            listings.append(listing)
    return listings


# -- run --------------------------------------------------------------------------------------------
def _memory_class(bytes_needed: int, ceiling: float) -> int:
    """``bytes_needed`` rounded up to 256 MiB times a power of two (few classes: few Ray Data operators)."""
    step = 256 * _MIB
    return int(min(step * 2 ** math.ceil(math.log2(max(bytes_needed / step, 1))), ceiling))


def _died(task: Task, limits: IngestLimits) -> ManifestEntry:
    entry = task.entry
    hours = "an unread header" if entry.declared_hours is None else f"a header declaring {entry.declared_hours:g} h"
    entry.reason = (
        f"file {entry.file_id}: the worker decoding it died {limits.task_retries + 1} times (killed by "
        "the system, e.g. out of memory, or a crash inside a reader); "
        f"{(entry.size_bytes or 0) / _MIB:.1f} MiB, {hours}; not retried again"
    )
    return entry


def run_tasks(tasks: list[Task], *, output: str, epochs_per_window: int, limits: IngestLimits, workers: int | None):
    """Decode ``tasks`` with Ray Data; yield ``(task, manifest line, peak worker RSS MiB)`` as they finish.

    Each task reserves its estimated memory (rounded to a class; one Ray Data
    map per class) and is retried at most ``limits.task_retries`` times when
    its worker dies; a recording whose worker keeps dying is yielded as a
    ``quarantined`` line after the others, and the run goes on. A task
    needing more memory than any node has is quarantined without starting.
    """
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    ceiling = max((node["Resources"].get("memory", 0.0) for node in alive), default=0.0)
    runnable = []
    for task in tasks:
        if ceiling and task.memory_bytes > ceiling:
            task.entry.reason = (
                f"file {task.entry.file_id}: decoding needs about {task.memory_bytes / (1 << 30):.1f} "
                f"GiB, more than the largest Ray node offers ({ceiling / (1 << 30):.1f} GiB)"
            )
            yield task, task.entry, 0.0
        else:
            runnable.append(task)
    if not runnable:
        return
    by_key = {(t.entry.site, t.entry.file_id): t for t in runnable}
    classes: dict[int, list[Task]] = {}
    for task in runnable:
        classes.setdefault(_memory_class(task.memory_bytes, ceiling or math.inf), []).append(task)
    context = ray.data.DataContext.get_current()
    allowed_errors = context.max_errored_blocks
    # One recording per block: a block that fails after its retries (its worker kept
    # dying) is dropped instead of failing the dataset, and reported below.
    context.max_errored_blocks = len(runnable)
    try:
        datasets = []
        for memory, members in sorted(classes.items()):
            items = [{"task": pickle.dumps(t.source), "entry": t.entry.to_json()} for t in members]
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for a task's retries; the ray_remote_args
                # form is deprecated for 2.64 (tests/test_ingest_lifecycle.py notices when
                # the limit stops holding).
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                datasets.append(
                    ray.data.from_items(items, override_num_blocks=len(items)).map(
                        ingest_one,
                        fn_kwargs={
                            "output": output,
                            "epochs_per_window": epochs_per_window,
                            "testing_sigkill_source": os.environ.get(TESTING_SIGKILL_ENV),
                        },
                        num_cpus=1,
                        memory=memory,
                        compute=ray.data.TaskPoolStrategy(size=workers),
                        max_retries=limits.task_retries,
                    )
                )
        dataset = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        for row in dataset.iter_rows():
            entry = ManifestEntry.from_json(row["entry"])
            yield by_key.pop((entry.site, entry.file_id)), entry, float(row["peak_rss_mb"])
    finally:
        context.max_errored_blocks = allowed_errors
    for task in by_key.values():
        yield task, _died(task, limits), 0.0
    remove_orphaned_copies()  # copies of remote inputs left by the dead workers of this node


# -- the entry point: setup -> plan -> run -> cleanup ---------------------------------------------------
def ingest(
    config: IngestConfig,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    mlflow_tracking_uri: str | None = None,
) -> IngestSummary:
    """Ingest the recordings under ``config.inputs`` into the store at ``config.output``.

    Parameters
    ----------
    config : IngestConfig
        The inputs, the store and every option that shapes it
        (:class:`~pipelines.ingest_config.IngestConfig`), validated.
    address : str, optional
        Ray cluster address (else ``RAY_ADDRESS``, else a local Ray started here).
    num_cpus : int, optional
        CPUs of a local Ray started here (default: all cores).
    mlflow_tracking_uri : str, optional
        Log the run (counts, hours per second, the manifest) to this MLflow
        store; default ``MLFLOW_TRACKING_URI`` if set, else no MLflow run.

    Returns
    -------
    IngestSummary

    Raises
    ------
    FileNotFoundError
        An input is not a directory (nothing is created at the output).
    """
    inputs, output, epochs_per_window = list(config.inputs), config.output, config.epochs_per_window
    ids, limits, prune = config.ids, config.limits, config.prune
    for input_uri in inputs:  # before creating anything at the output
        fs, path = resolve(input_uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"--input {redact(input_uri)}: not a directory")

    # setup
    started = time.perf_counter()
    identities = Identities(load_pseudonym_key(config.pseudonym_key_file), mode=ids)
    if ids == "original":
        logger.warning(
            "--ids original: the store keeps the sites' own recording and subject keys; use this only "
            "when those keys are already pseudonymous (they must not be names, dates or hospital numbers)"
        )
    sites = discover(inputs, site_config=config.site_config, identities=identities)  # config errors before the store
    fs, root = resolve(output)
    fs.create_dir(root, recursive=True)
    summary_store, manifest = redact(output), redact(join(output, MANIFEST_NAME))
    with store_lease(fs, root, store=summary_store) as run_id:
        previous = read_manifest(fs, root)
        check_settings(
            fs, root, output=output, identities=identities, epochs_per_window=epochs_per_window, previous=previous
        )
        remove_stale_temporaries(fs, root)

        # plan
        decided: Plan = plan(
            sites,
            previous=previous,
            identities=identities,
            limits=limits,
            epochs_per_window=epochs_per_window,
            prune=prune,
            store=(fs, root),
        )
        if config.link_table:
            written = write_link_table(
                config.link_table, [row for listing in sites for row in listing.links], store=output
            )
            logger.info("link table (restricted, mode 0600): %s", written)
        rewrite_manifest(fs, root, decided.kept)
        writer = ManifestWriter(fs, root, run_id=run_id)
        try:
            for entry in decided.withdrawn:
                delete_file(fs, recording_file(root, entry.site, entry.recording_id))
                writer.append(entry)
            for entry in decided.rejected:
                logger.warning("quarantined: %s", entry.reason)
                writer.append(entry)
            logger.info(
                "%d recordings to decode, %d skipped (unchanged, already in the store), %d quarantined "
                "before decoding, %d withdrawn",
                len(decided.tasks),
                decided.skipped,
                len(decided.rejected),
                len(decided.withdrawn),
            )
            if decided.stale:
                logger.warning(
                    "%d recordings in the store have no input any more; `s2v ingest --prune` erases them",
                    len(decided.stale),
                )
            counts = _run(
                decided.tasks,
                writer,
                fs=fs,
                root=root,
                output=output,
                epochs_per_window=epochs_per_window,
                limits=limits,
                workers=config.workers,
                address=address,
                num_cpus=num_cpus,
            )
        finally:
            writer.close()
        # cleanup
        if prune:
            erased = erase_unlisted(fs, root, {listing.site for listing in sites})
            if erased:
                logger.info("--prune: erased %d windows files that no manifest line points at", erased)
    ok, windows, quarantined, peak_rss_mb = counts
    summary = IngestSummary(
        store=summary_store,
        manifest=manifest,
        ok=ok,
        quarantined=quarantined + len(decided.rejected),
        skipped=decided.skipped,
        windows=windows,
        peak_worker_rss_mb=peak_rss_mb,
        withdrawn=len(decided.withdrawn),
        stale=len(decided.stale),
    )
    if ok + decided.skipped:
        # Every subject gets a split the moment the store has nights (s2v_core.splits):
        # later nights and sites never move the subjects already assigned.
        ensure_splits(output)
    tracking_uri = mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri:
        run_mlflow = _log_mlflow(
            tracking_uri,
            summary,
            inputs=inputs,
            epochs_per_window=epochs_per_window,
            workers=config.workers,
            seconds=time.perf_counter() - started,
            identities=identities,
            manifest_location=join(output, MANIFEST_NAME),
        )
        logger.info("MLflow run %s at %s", run_mlflow, redact(tracking_uri))
    return summary


def _run(
    tasks: list[Task],
    writer: ManifestWriter,
    *,
    fs: pafs.FileSystem,
    root: str,
    output: str,
    epochs_per_window: int,
    limits: IngestLimits,
    workers: int | None,
    address: str | None,
    num_cpus: int | None,
) -> tuple[int, int, int, float]:
    """Decode ``tasks`` on Ray, append their manifest lines; return ``(ok, windows, quarantined, peak RSS MiB)``."""
    ok = windows = quarantined = 0
    peak_rss_mb = 0.0
    if not tasks:
        return ok, windows, quarantined, peak_rss_mb
    import ray

    started_here = not ray.is_initialized()
    init_ray(address, num_cpus=num_cpus)
    try:
        results = run_tasks(tasks, output=output, epochs_per_window=epochs_per_window, limits=limits, workers=workers)
        for done, (task, entry, rss_mb) in enumerate(results, start=1):
            peak_rss_mb = max(peak_rss_mb, rss_mb)
            if entry.status != "ok" and task.replaces:
                # The input changed and no longer decodes: its old windows no longer describe it.
                delete_file(fs, recording_file(root, entry.site, entry.recording_id))
            writer.append(entry)  # after the file is in place (ingest_one renamed it)
            if entry.status == "ok":
                ok, windows = ok + 1, windows + entry.windows
                logger.info(
                    "[%d/%d] %s/%s: %d windows, %s",
                    done,
                    len(tasks),
                    entry.site,
                    entry.recording_id,
                    entry.windows,
                    ",".join(entry.modalities),
                )
                if entry.reason:
                    logger.warning("%s/%s: %s", entry.site, entry.recording_id, entry.reason)
            else:
                quarantined += 1
                logger.warning("[%d/%d] quarantined: %s", done, len(tasks), entry.reason)
    finally:
        if started_here:
            ray.shutdown()
    return ok, windows, quarantined, peak_rss_mb


def _log_mlflow(
    uri: str,
    summary: IngestSummary,
    *,
    inputs: list[str],
    epochs_per_window: int,
    workers: int | None,
    seconds: float,
    identities: Identities,
    manifest_location: str,
) -> str:
    """Log one ingest run (counts, throughput, the manifest) to MLflow; return the run id.

    Only counts, redacted locations and the manifest are logged: the manifest
    holds no path, site key or header field, so neither does the run.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(mlflow_experiment(client, uri, MLFLOW_EXPERIMENT), run_name="ingest").info.run_id
    params = {
        "inputs": ",".join(redact(i) for i in inputs),
        "output": summary.store,
        "epochs_per_window": epochs_per_window,
        "workers": workers or "auto",
        "ids": identities.mode,
        "pseudonym_key_check": identities.key.check_value(),
    }
    for name, value in params.items():
        client.log_param(run_id, name, value)
    hours = summary.windows * epochs_per_window * EPOCH_SECONDS / 3600
    metrics = {
        "ok": summary.ok,
        "quarantined": summary.quarantined,
        "skipped": summary.skipped,
        "windows": summary.windows,
        "recording_hours": hours,
        "seconds": seconds,
        "hours_per_s": hours / seconds if seconds > 0 else 0.0,
        "peak_worker_rss_mb": summary.peak_worker_rss_mb,
        "withdrawn": summary.withdrawn,
        "stale": summary.stale,
    }
    for name, value in metrics.items():
        client.log_metric(run_id, name, float(value))
    if file_type(manifest_location) == pafs.FileType.File:
        client.log_text(run_id, read_text(manifest_location), MANIFEST_NAME)
    client.set_terminated(run_id, "FINISHED")
    return run_id


# -- CLI --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = IngestLimits()
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="DIR",
        help="site directory or parent of site directories (repeatable; path or URI)",
    )
    parser.add_argument("--output", required=True, metavar="STORE", help="store root (path or URI)")
    parser.add_argument("--site-config", metavar="FILE", help="site config overriding the input's site.toml")
    parser.add_argument("--epochs-per-window", type=int, default=10, help="30-s epochs per store row (default 10)")
    parser.add_argument(
        "--ids",
        choices=ID_MODES,
        default="pseudonymous",
        help="store ids: keyed hashes of the sites' keys (default), or the keys themselves when "
        "they are already pseudonymous (e.g. NSRR ids)",
    )
    parser.add_argument(
        "--pseudonym-key-file",
        metavar="FILE",
        help="file holding the pseudonym key (default: S2V_PSEUDONYM_KEY, else a key generated once "
        "in ~/.config/sleep2vec/pseudonym.key)",
    )
    parser.add_argument(
        "--link-table",
        metavar="FILE",
        help="write the table from files and site keys to store ids here (outside the store, "
        "mode 0600); it re-identifies the store, keep it private",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="erase recordings whose input is gone (windows deleted, manifest line 'withdrawn')",
    )
    parser.add_argument(
        "--task-retries",
        type=int,
        default=defaults.task_retries,
        help=f"retries of a recording whose worker died (default {defaults.task_retries})",
    )
    parser.add_argument(
        "--max-hours",
        type=float,
        default=defaults.max_hours,
        help=f"quarantine recordings declaring more hours than this (default {defaults.max_hours:g})",
    )
    parser.add_argument(
        "--max-file-gib",
        type=float,
        default=defaults.max_file_gib,
        help=f"quarantine signal files larger than this (default {defaults.max_file_gib:g} GiB)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all cores)")
    parser.add_argument("--workers", type=int, help="recordings decoded at the same time (default: Ray CPUs)")
    parser.add_argument("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else no MLflow run)")


def run(args: argparse.Namespace) -> int:
    summary = ingest(
        config_from_args(args), address=args.address, num_cpus=args.num_cpus, mlflow_tracking_uri=args.mlflow_uri
    )
    print(
        f"ingested {summary.ok} recordings ({summary.windows} windows), "
        f"quarantined {summary.quarantined}, skipped {summary.skipped} already in the store"
        + (f", withdrew {summary.withdrawn}" if summary.withdrawn else "")
        + (f"; {summary.stale} in the store have no input any more (--prune erases them)" if summary.stale else "")
    )
    print(f"store:    {summary.store}")
    print(f"manifest: {summary.manifest}")
    if summary.quarantined and not args.link_table:
        print("quarantined files are named by file_id; --link-table FILE maps them to paths")
    return 0
