"""Shared runtime set-up for the pipelines: Ray connection and MLflow store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


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


def mlflow_tracking_uri(workdir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store ``WORKDIR/mlflow.db``.

    MLflow 3 would otherwise default to ``sqlite:///mlflow.db`` in whatever the
    current directory is; every run names its store explicitly instead.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"
