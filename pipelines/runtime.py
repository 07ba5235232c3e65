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
        # address="local" always starts a fresh instance instead of attaching to
        # whatever `ray start` cluster happens to run on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)


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
