"""``STORE/manifest.jsonl``: one JSON object per input recording, appended as recordings finish.

Fields: ``recording_id``, ``site``, ``source`` (signal path relative to its
input), ``status`` (``ok`` | ``quarantined``), ``reason`` (one line naming the
file and the problem; for ``ok`` rows the warnings, or null), ``windows``,
``modalities``, plus ``channels`` (modality -> channel label used),
``unknown_channels`` and ``content_hash`` (the fingerprint used to find
duplicate recordings). Nothing from EDF headers beyond channel labels.

A line is appended only after the recording's Parquet file is in place, so
an ``ok`` line always points at a complete file. On a re-run the manifest is
compacted first: for the sites of the run, ``ok`` lines whose file exists
are kept (those recordings are skipped) and everything else is retried and
gets a fresh line; lines of other sites stay as they are.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

MANIFEST_NAME = "manifest.jsonl"


@dataclass
class ManifestEntry:
    """One line of the manifest (see the module docstring for the fields)."""

    recording_id: str | None
    site: str
    source: str
    status: str
    reason: str | None = None
    windows: int = 0
    modalities: list[str] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)
    unknown_channels: list[str] = field(default_factory=list)
    content_hash: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> "ManifestEntry":
        data = json.loads(line)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})


def recording_file(store_root: str, site: str, recording_id: str) -> str:
    """Path (on the store's filesystem) of a recording's Parquet file."""
    return f"{store_root}/site={site}/{recording_id}.parquet"


def read_manifest(fs: pafs.FileSystem, store_root: str) -> list[ManifestEntry]:
    """All entries of the manifest, or an empty list when there is none yet."""
    path = f"{store_root}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8")
    entries = []
    for line in text.splitlines():
        if line.strip():
            try:
                entries.append(ManifestEntry.from_json(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut by a crash mid-write: that recording is simply redone
    return entries


def compact_manifest(fs: pafs.FileSystem, store_root: str, *, redo_sites: set[str]) -> list[ManifestEntry]:
    """Drop the lines of ``redo_sites`` that this run will redo; return the lines kept.

    Lines of those sites are kept only when they are ``ok`` and their Parquet
    file exists (those recordings are skipped); quarantined lines are dropped
    because the run re-examines those files and writes fresh lines. Lines of
    other sites (other inputs ingested into the same store) are kept as they
    are. The manifest is rewritten through a temporary file and a rename, so
    a crash here leaves either the old or the new manifest, never half of one.
    """
    kept = []
    for entry in read_manifest(fs, store_root):
        if entry.site in redo_sites:
            if entry.status != "ok" or not entry.recording_id:
                continue
            target = recording_file(store_root, entry.site, entry.recording_id)
            if fs.get_file_info(target).type != pafs.FileType.File:
                continue
        kept.append(entry)
    path = f"{store_root}/{MANIFEST_NAME}"
    temporary = f"{store_root}/.{MANIFEST_NAME}.{uuid.uuid4().hex}"
    with fs.open_output_stream(temporary) as stream:
        stream.write("".join(e.to_json() + "\n" for e in kept).encode("utf-8"))
    fs.move(temporary, path)
    return kept


class ManifestWriter:
    """Appends entries to the manifest, one flushed line per recording."""

    def __init__(self, fs: pafs.FileSystem, store_root: str) -> None:
        self._fs, self._path = fs, f"{store_root}/{MANIFEST_NAME}"

    def append(self, entry: ManifestEntry) -> None:
        line = (entry.to_json() + "\n").encode("utf-8")
        if isinstance(self._fs, pafs.LocalFileSystem):
            with open(self._path, "ab") as handle:
                handle.write(line)
                handle.flush()
            return
        # Object stores have no append: rewrite the (small) manifest with the new line.
        existing = b""
        if self._fs.get_file_info(self._path).type == pafs.FileType.File:
            with self._fs.open_input_stream(self._path) as stream:
                existing = stream.read()
        with self._fs.open_output_stream(self._path) as stream:
            stream.write(existing + line)
