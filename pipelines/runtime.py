"""Shared runtime set-up for the pipelines: Ray connection, MLflow store, storage locations.

A *location* (a local path or a URI; :mod:`s2v_core.locations` says which
is which, joins and redacts them): the helpers here read and write small
files and directories at either through ``pyarrow.fs``; bulk data (Parquet,
checkpoints) goes through pyarrow and Ray with the filesystem that
:func:`s2v_core.locations.resolve` returns. :class:`RedactingFilter` removes
credentials (:func:`s2v_core.locations.redact`) from every log line of the CLI.

MLflow, one policy for every command (:func:`mlflow_tracking_uri`,
:func:`mlflow_experiment`): the tracking store is ``MLFLOW_TRACKING_URI`` or
a SQLite file in the command's output directory, and an experiment's
artifacts live next to its store (``DIR/mlartifacts/<experiment>`` beside
``DIR/mlflow.db``), never in the current directory's ``mlruns/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from s2v_core.locations import is_uri, join, redact, resolve

logger = logging.getLogger(__name__)


class RedactingFilter(logging.Filter):
    """A logging filter that removes credentials in URIs from every record (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False  # os.kill(0 or -1, ...) would address process groups, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray: an existing cluster (``address`` or ``RAY_ADDRESS``) or a local one.

    A local instance is started on demand with an explicit ``num_cpus``
    (default: all cores). Does nothing when Ray is already initialised in this
    process (tests share one instance per module).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        ray.init(address=address)
    else:
        num_cpus = num_cpus or os.cpu_count() or 1
        logger.info("starting a local Ray instance with %d CPUs", num_cpus)
        start_local_ray(num_cpus=num_cpus, include_dashboard=False)


def start_local_ray(*, num_cpus: int, attempts: int = 3, **init_kwargs) -> None:
    """Start a fresh local Ray instance, retrying a start-up that timed out.

    ``address="local"`` always starts a new instance instead of attaching to
    whatever ``ray start`` cluster happens to run on this machine. On an
    oversubscribed machine the raylet can miss Ray's fixed start-up deadline;
    that failure leaves nothing behind, so it is retried a few times.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logger.warning("Ray start-up timed out (attempt %d of %d); retrying", attempt, attempts)
            ray.shutdown()


def file_type(location: str | Path) -> pafs.FileType:
    """``pyarrow.fs.FileType`` of what is at ``location`` (``NotFound`` when nothing is)."""
    filesystem, path = resolve(str(location))
    return filesystem.get_file_info(path).type


def read_text(location: str | Path) -> str:
    """The UTF-8 text of the file at ``location``."""
    filesystem, path = resolve(str(location))
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to the file at ``location``, creating its directory."""
    filesystem, path = resolve(str(location))
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def replace_directory(source: str | Path, destination: str | Path) -> None:
    """Make ``destination`` a copy of the directory ``source`` (either a path or a URI)."""
    source_fs, source_path = resolve(str(source))
    destination_fs, destination_path = resolve(str(destination))
    if destination_fs.get_file_info(destination_path).type != pafs.FileType.NotFound:
        destination_fs.delete_dir(destination_path)
    destination_fs.create_dir(destination_path, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs, destination_filesystem=destination_fs)


@contextlib.contextmanager
def local_directory(location: str | Path) -> Iterator[str]:
    """A local path holding the directory at ``location``: itself, or a temporary download of it.

    For what only reads local files (``torch.load``, MLflow's ``log_artifacts``);
    meant for small directories such as a saved encoder.
    """
    if not is_uri(location):
        yield resolve(str(location))[1]
        return
    with tempfile.TemporaryDirectory(prefix="s2v-download-") as directory:
        replace_directory(location, directory)
        yield directory


def check_mlflow_store(workdir: str | Path, *, option: str) -> None:
    """``ValueError`` naming ``option`` when MLflow's default store would have to live at a URI.

    The default store is a SQLite file in the command's output directory,
    and SQLite needs a local file: with a URI output, ``MLFLOW_TRACKING_URI``
    must name a tracking server (or another store) instead.
    """
    if is_uri(workdir) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ValueError(
            f"{option} {workdir}: MLflow's default store is a SQLite file in the output directory, "
            "which cannot live at a URI; set MLFLOW_TRACKING_URI (e.g. http://mlflow-server:5000) "
            f"or give a local {option}"
        )


#: Seconds between MLflow system-metric samples (CPU, memory, disk, network; GPU with nvidia-ml-py).
SYSTEM_METRICS_SECONDS = 10.0


def start_system_metrics(mlflow: dict[str, str] | None, *, resumed: bool = False):
    """Start MLflow's system-metrics sampler for ``{"tracking_uri", "run_id"}``; ``None`` without a run.

    Training loops call this on rank 0 (cheap evidence of how busy the node's
    CPU/GPU were, logged as ``system/...`` into the run's own store) and call
    ``finish()`` on what it returns when they end.
    """
    if not mlflow:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        mlflow["run_id"],
        sampling_interval=SYSTEM_METRICS_SECONDS,
        resume_logging=resumed,
        tracking_uri=mlflow["tracking_uri"],
    )
    monitor.start()
    return monitor


@contextlib.contextmanager
def tracking_uri_scope(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for a block, then restore it.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; left
    set, the next run in this process (a sweep, a test, a benchmark) would
    log into this run's store instead of its own.
    """
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri keeps the two in step
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets both the global and the variable


def mlflow_tracking_uri(workdir: str | Path, *, option: str = "--output") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``WORKDIR/mlflow.db``.

    MLflow 3 would otherwise default to ``sqlite:///mlflow.db`` in whatever the
    current directory is; every run names its store explicitly instead. A
    ``workdir`` at a URI needs ``MLFLOW_TRACKING_URI`` (see :func:`check_mlflow_store`).
    """
    check_mlflow_store(workdir, option=option)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


#: Artifacts of the experiments of a SQLite store ``DIR/mlflow.db`` live in ``DIR/mlartifacts/<experiment>``.
MLFLOW_ARTIFACTS_DIR = "mlartifacts"
#: Overrides where new experiments keep their artifacts (any store; e.g. s3://bucket/mlflow-artifacts).
MLFLOW_ARTIFACT_ROOT_ENV = "S2V_MLFLOW_ARTIFACT_ROOT"
#: Tracking stores that choose the artifact location themselves (the server's --artifacts-destination).
_SERVER_SCHEMES = ("http://", "https://", "databricks")


def mlflow_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment of ``tracking_uri`` keeps its artifacts; ``None``: MLflow's own choice.

    ========================================  ==============================================
    store                                      artifacts of experiment ``E``
    ========================================  ==============================================
    ``S2V_MLFLOW_ARTIFACT_ROOT`` set            ``$S2V_MLFLOW_ARTIFACT_ROOT/E``
    ``sqlite:///DIR/mlflow.db``                 ``file:///DIR/mlartifacts/E`` (next to the store)
    a tracking server (``http(s)://``)          ``None``: the server's ``--artifacts-destination``
    a file store (a path, ``file://``)          ``None``: MLflow keeps them inside the store
    another database (``postgresql://`` …)      ``ValueError``: set ``S2V_MLFLOW_ARTIFACT_ROOT``
    ========================================  ==============================================

    MLflow's client default for database stores is ``./mlruns`` in whatever the
    current directory is, which a ``ray job submit`` job loses and a user
    never finds; no command of this project uses it.
    """
    folder = re.sub(r"[^A-Za-z0-9_.\-]", "_", experiment)
    root = os.environ.get(MLFLOW_ARTIFACT_ROOT_ENV)
    if root:
        return join(root, folder)
    if tracking_uri.startswith("sqlite:///"):
        # sqlite:////abs/mlflow.db is absolute, sqlite:///rel/mlflow.db relative to the current directory.
        database = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).resolve()
        return (database.parent / MLFLOW_ARTIFACTS_DIR / folder).as_uri()
    if tracking_uri.startswith(_SERVER_SCHEMES) or not is_uri(tracking_uri) or tracking_uri.startswith("file:"):
        return None
    raise ValueError(
        f"MLFLOW_TRACKING_URI {redact(tracking_uri)}: a database store has no place for artifacts "
        f"of its own; set {MLFLOW_ARTIFACT_ROOT_ENV} (e.g. s3://bucket/mlflow-artifacts) or use a "
        "tracking server"
    )


def mlflow_experiment(client, tracking_uri: str, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created with artifacts next to the store.

    Every command creates its experiments through this function (see
    :func:`mlflow_artifact_location`).
    """
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=mlflow_artifact_location(tracking_uri, name))
    except Exception:  # MlflowException: another process created it between the two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
