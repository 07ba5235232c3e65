"""``STORE/manifest.jsonl``: one JSON object per input file, appended as recordings finish.

Fields: ``recording_id`` and ``subject_id`` (the store's pseudonymous ids),
``site``, ``file_id`` (a keyed hash of the input file's path: the manifest
holds no path; the link table written with ``s2v ingest --link-table`` maps
it back), ``status`` (``ok`` | ``quarantined`` | ``withdrawn``), ``reason``
(one line naming the file by its ``file_id`` and the problem; for ``ok``
rows the warnings, or null), ``windows``, ``modalities``, ``channels``
(modality -> channel label used), ``unknown_channels``, ``content_hash`` (a
keyed fingerprint of the signal file, to find duplicates within a site),
``inputs_hash`` (a keyed hash of everything that decides the windows:
signal, hypnogram, metadata row, site config; a recording is decoded again
when it changes), ``size_bytes`` and ``declared_hours`` (from the header,
when known). Nothing from EDF headers beyond channel labels.

A line is appended only after the recording's Parquet file is in place, so
an ``ok`` line always points at a complete file. ``withdrawn`` lines record
an erasure (``s2v ingest --prune``): the input is gone and so are its windows.
Later lines about the same ``(site, recording_id)`` supersede earlier ones.

Local stores append to ``manifest.jsonl``. Object stores have no append:
there each run writes its lines as numbered parts under ``STORE/_manifest/``
(a part every :data:`LINES_PER_PART` lines) and merges them into
``manifest.jsonl`` once, when it ends; the next run merges what a crashed
run left. Readers see ``manifest.jsonl`` followed by the parts.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.jsonl"
#: Where object-store runs put their manifest parts (readers of the store skip "_" names).
PARTS_DIR = "_manifest"
#: Lines per manifest part on an object store: a part is one PUT.
LINES_PER_PART = 64
STATUSES = ("ok", "quarantined", "withdrawn")


@dataclass
class ManifestEntry:
    """One line of the manifest (see the module docstring for the fields)."""

    recording_id: str | None
    site: str
    file_id: str | None
    status: str
    reason: str | None = None
    windows: int = 0
    modalities: list[str] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)
    unknown_channels: list[str] = field(default_factory=list)
    content_hash: str | None = None
    inputs_hash: str | None = None
    subject_id: str | None = None
    size_bytes: int | None = None
    declared_hours: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> ManifestEntry:
        # Unknown keys are ignored: a manifest from before ids were pseudonymised has a
        # "source" path, which is dropped the next time the manifest is rewritten.
        data = json.loads(line)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})


def recording_file(store_root: str, site: str, recording_id: str) -> str:
    """Path (on the store's filesystem) of a recording's Parquet file."""
    return f"{store_root}/site={site}/{recording_id}.parquet"


def _parse(text: str) -> list[ManifestEntry]:
    entries = []
    for line in text.splitlines():
        if line.strip():
            try:
                entries.append(ManifestEntry.from_json(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut by a crash mid-write: that recording is simply redone
    return entries


def _parts(fs: pafs.FileSystem, store_root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{store_root}/{PARTS_DIR}", allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".jsonl"))


def read_manifest(fs: pafs.FileSystem, store_root: str) -> list[ManifestEntry]:
    """All entries of the manifest (``manifest.jsonl``, then any parts), or an empty list."""
    paths = [f"{store_root}/{MANIFEST_NAME}"] + _parts(fs, store_root)
    entries = []
    for path in paths:
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as stream:
                entries += _parse(stream.read().decode("utf-8"))
    return entries


def rewrite_manifest(fs: pafs.FileSystem, store_root: str, entries: Iterable[ManifestEntry]) -> None:
    """Replace the manifest by ``entries`` (and drop any parts), through a temporary file and a rename.

    A crash here leaves either the old or the new manifest, never half of one.
    """
    path = f"{store_root}/{MANIFEST_NAME}"
    temporary = f"{store_root}/.{MANIFEST_NAME}.{uuid.uuid4().hex}"
    parts = _parts(fs, store_root)
    with fs.open_output_stream(temporary) as stream:
        stream.write("".join(e.to_json() + "\n" for e in entries).encode("utf-8"))
    fs.move(temporary, path)
    if parts:
        fs.delete_dir(f"{store_root}/{PARTS_DIR}")  # with its parts (and an object store's directory marker)


class ManifestWriter:
    """Appends entries to the manifest: one flushed line per recording, or parts on object stores.

    Parameters
    ----------
    fs, store_root
        The store's filesystem and root.
    run_id : str
        Names this run's parts (object stores).
    lines_per_part : int
        Lines buffered per part (object stores).
    """

    def __init__(
        self, fs: pafs.FileSystem, store_root: str, *, run_id: str | None = None, lines_per_part: int = LINES_PER_PART
    ) -> None:
        self._fs, self._root = fs, store_root
        self._path = f"{store_root}/{MANIFEST_NAME}"
        self._local = isinstance(fs, pafs.LocalFileSystem)
        self._run_id = run_id or uuid.uuid4().hex
        self._lines_per_part, self._pending, self._parts = lines_per_part, [], 0

    def append(self, entry: ManifestEntry) -> None:
        line = entry.to_json() + "\n"
        if self._local:
            with open(self._path, "ab") as handle:
                handle.write(line.encode("utf-8"))
                handle.flush()
            return
        self._pending.append(line)
        if len(self._pending) >= self._lines_per_part:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines as the run's next part (object stores)."""
        if self._local or not self._pending:
            return
        self._parts += 1
        part = posixpath.join(self._root, PARTS_DIR, f"{self._run_id}-{self._parts:06d}.jsonl")
        self._fs.create_dir(posixpath.dirname(part), recursive=True)
        with self._fs.open_output_stream(part) as stream:
            stream.write("".join(self._pending).encode("utf-8"))
        self._pending = []

    def close(self) -> None:
        """Flush, and on object stores merge every part into ``manifest.jsonl`` (one rewrite per run)."""
        self.flush()
        if not self._local and _parts(self._fs, self._root):
            rewrite_manifest(self._fs, self._root, read_manifest(self._fs, self._root))
