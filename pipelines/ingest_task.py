"""What one Ray task of ``s2v ingest`` does: decode one recording, write its file, return its manifest line.

:func:`ingest_one` never raises for bad input: every failure becomes a
``quarantined`` line. Its messages name files by their pseudonymous
``file_id`` (``file 3fa2…``, ``hypnogram file 9c0d…``), never by path: the
reader's messages are rewritten here before they leave the worker.

A worker can still die (killed for memory, a crash inside a C reader); the
driver then sees no line for that recording and writes one itself (see
:mod:`pipelines.ingest`). Local copies of remote inputs live in
``TMPDIR/s2v-ingest-<pid>-*`` so that the next task on the node, or the
driver at the end of the run, can remove those of a worker that died.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import posixpath
import re
import resource
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator

from pipelines.manifest import ManifestEntry, recording_file
from pipelines.runtime import process_alive
from s2v_core.io.base import UnreadableRecording
from s2v_core.io.discovery import RecordingSource
from s2v_core.locations import is_uri, resolve
from s2v_core.recording import decode_recording
from s2v_core.store import write_store_file

TEMPORARY_PREFIX = ".tmp-"  # pyarrow and Ray skip files starting with "." when reading a store
_COPY_PREFIX = "s2v-ingest-"
_COPY_DIR = re.compile(r"s2v-ingest-(?P<pid>\d+)-\w+")
#: Testing aid only: ``ingest()`` passes this variable's value (a source path relative
#: to its input) to the tasks, and the task decoding that file SIGKILLs its own worker,
#: as the kernel's OOM killer or a segfault in a C reader would.
TESTING_SIGKILL_ENV = "S2V_TESTING_SIGKILL_SOURCE"


def remove_orphaned_copies(directory: str | None = None) -> int:
    """Delete the local copies of remote inputs whose worker process is gone; return how many.

    A worker killed mid-task never runs its ``finally``; its copy (a whole
    night, possibly GiBs) would stay in the node's temporary directory.
    """
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory or tempfile.gettempdir()):
            match = _COPY_DIR.fullmatch(entry.name)
            if match and entry.is_dir(follow_symlinks=False) and not process_alive(int(match["pid"])):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
    return removed


@contextlib.contextmanager
def local_copy(uri: str | None) -> Iterator[str | None]:
    """A local path for ``uri``: the file itself when local, else a temporary download.

    The download lives in ``TMPDIR/s2v-ingest-<pid>-*`` (see :func:`remove_orphaned_copies`).
    """
    if uri is None or not is_uri(uri):
        yield None if uri is None else uri.removeprefix("file://")
        return
    fs, path = resolve(uri)
    directory = tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-")
    try:
        local = os.path.join(directory, "recording" + os.path.splitext(path)[1])
        with fs.open_input_stream(path) as source, open(local, "wb") as target:
            while chunk := source.read(1 << 24):
                target.write(chunk)
        yield local
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_atomically(table, output: str, site: str, recording_id: str) -> None:
    """Write a temporary hidden file, then rename it: readers never see a partial file."""
    fs, root = resolve(output)
    final = recording_file(root, site, recording_id)
    fs.create_dir(posixpath.dirname(final), recursive=True)
    # Hidden (pyarrow and Ray skip leading dots) and not ending in .parquet (globbing readers skip it).
    temporary = f"{posixpath.dirname(final)}/{TEMPORARY_PREFIX}{recording_id}.parquet.{uuid.uuid4().hex}"
    try:
        write_store_file(table, temporary, filesystem=fs)
        fs.move(temporary, final)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(temporary)
        raise


def file_names(source: RecordingSource, signal: str | None, hypnogram: str | None) -> dict[str, str]:
    """Every spelling of the input files a message may contain -> the pseudonymous label that replaces it."""
    names: dict[str, str] = {}
    for label, relative, uri, local in (
        (f"file {source.file_id}", source.source, source.signal_uri, signal),
        (f"hypnogram file {source.hypnogram_file_id}", source.hypnogram, source.hypnogram_uri, hypnogram),
    ):
        if relative is None:
            continue
        spellings = {relative, posixpath.basename(relative), uri, uri.removeprefix("file://"), resolve(uri)[1]}
        names |= {spelling: label for spelling in spellings | ({local} if local else set()) if spelling}
    return names


def scrub(text: str, names: dict[str, str]) -> str:
    """``text`` with every file name in ``names`` replaced by its label (longest names first)."""
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, names[name])
    return text


def ingest_one(row: dict, *, output: str, epochs_per_window: int, testing_sigkill_source: str | None = None) -> dict:
    """Decode one recording and write its Parquet file; return its manifest line.

    Runs inside a Ray task. ``row["task"]`` is the pickled
    :class:`~s2v_core.io.discovery.RecordingSource`, ``row["entry"]`` the
    manifest line the driver prepared (ids, hashes, size). Never raises for
    bad input: every failure becomes a ``quarantined`` entry whose reason
    names the file by its ``file_id``.
    """
    remove_orphaned_copies()
    source: RecordingSource = pickle.loads(row["task"])
    entry = ManifestEntry.from_json(row["entry"])
    if testing_sigkill_source is not None and source.source == testing_sigkill_source:
        os.kill(os.getpid(), signal.SIGKILL)
    names = file_names(source, None, None)
    try:
        with local_copy(source.signal_uri) as signal_path, local_copy(source.hypnogram_uri) as hypnogram:
            names = file_names(source, signal_path, hypnogram)
            decoded = decode_recording(
                signal_path,
                recording_id=source.recording_id,
                site=source.site,
                metadata=source.metadata,
                subject_id=source.metadata.subject_id,
                hypnogram_path=hypnogram,
                hypnogram_problem=source.hypnogram_problem,
                epochs_per_window=epochs_per_window,
            )
        write_atomically(decoded.table, output, source.site.name, source.recording_id)
        entry.status, entry.windows = "ok", decoded.windows
        entry.modalities, entry.channels = list(decoded.modalities), decoded.channels
        entry.unknown_channels = list(decoded.unknown_channels)
        entry.reason = "; ".join([*source.notes, *decoded.notes]) or None
    except UnreadableRecording as exc:
        entry.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bad recording must never stop the run
        entry.reason = f"file {source.file_id}: {type(exc).__name__}: {exc}"
    if entry.reason:
        entry.reason = scrub(entry.reason, names)
    # ru_maxrss is the peak of this worker process so far, in KiB on Linux.
    return {"entry": entry.to_json(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
