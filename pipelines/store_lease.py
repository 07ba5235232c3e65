"""One ingest at a time per store: a lease file the running ingest holds and renews.

Two ingests into one store would delete each other's temporary files (each
sweeps those an interrupted run left) and interleave manifest rewrites. The
first one writes ``STORE/.ingest-lease.json`` (``run_id``, host, pid, expiry)
and renews it every :data:`RENEW_SECONDS` while it runs; a second one is
refused with the holder's details. A lease whose expiry has passed, or whose
holder process is gone (same host), is stale and is taken over. On local
stores the lease is created atomically; on object stores, which have no
create-if-absent here, it is written and read back, which closes all but a
sub-second race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from pipelines.runtime import process_alive

logger = logging.getLogger(__name__)

LEASE_NAME = ".ingest-lease.json"
#: How long a lease holds without renewal (s): a crashed run blocks the store at most this long.
LEASE_SECONDS = 300.0
#: How often the holder renews it (s).
RENEW_SECONDS = 60.0


class StoreBusy(ValueError):
    """Another ingest holds the store's lease."""


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


def is_stale(lease: dict, *, now: float | None = None) -> bool:
    """Whether ``lease`` no longer protects the store: expired, or its process is gone from this host."""
    now = time.time() if now is None else now
    if float(lease.get("expires", 0)) < now:
        return True
    return lease.get("host") == socket.gethostname() and not process_alive(int(lease.get("pid", -1)))


def _write(fs: pafs.FileSystem, path: str, lease: dict, *, exclusive: bool) -> None:
    data = json.dumps(lease).encode("utf-8")
    if exclusive and isinstance(fs, pafs.LocalFileSystem):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return
    temporary = f"{path}.{uuid.uuid4().hex}"
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)


def _busy(store: str, lease: dict) -> StoreBusy:
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("expires", 0))))
    return StoreBusy(
        f"--output {store}: another ingest is writing this store (run {lease.get('run_id')} on host "
        f"{lease.get('host')}, pid {lease.get('pid')}, lease valid until {expires}); wait for it to finish, "
        f"or, if that run is gone, delete {LEASE_NAME} in the store"
    )


@contextlib.contextmanager
def store_lease(fs: pafs.FileSystem, store_root: str, *, store: str) -> Iterator[str]:
    """Hold the store's lease for a block; yields this run's id.

    Raises
    ------
    StoreBusy
        Another live ingest holds it (the message names its run, host and pid).
    """
    path = f"{store_root}/{LEASE_NAME}"
    run_id = uuid.uuid4().hex
    lease = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() + LEASE_SECONDS}
    current = _read(fs, path)
    if current is not None and not is_stale(current):
        raise _busy(store, current)
    if current is not None:
        logger.warning(
            "taking over the stale ingest lease of run %s (host %s, pid %s)",
            current.get("run_id"),
            current.get("host"),
            current.get("pid"),
        )
    try:
        _write(fs, path, lease, exclusive=current is None)
    except FileExistsError:
        raise _busy(store, _read(fs, path) or {}) from None
    if (_read(fs, path) or {}).get("run_id") != run_id:  # lost a race on an object store
        raise _busy(store, _read(fs, path) or {})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_SECONDS):
            try:
                _write(fs, path, {**lease, "expires": time.time() + LEASE_SECONDS}, exclusive=False)
            except OSError as exc:  # the next renewal tries again; the lease lasts LEASE_SECONDS
                logger.warning("could not renew the ingest lease: %s", exc)

    renewer = threading.Thread(target=renew, name="s2v-ingest-lease", daemon=True)
    renewer.start()
    try:
        yield run_id
    finally:
        stop.set()
        renewer.join()
        if (_read(fs, path) or {}).get("run_id") == run_id:
            with contextlib.suppress(OSError):
                fs.delete_file(path)
