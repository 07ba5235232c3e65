"""The store side of ``s2v ingest``: its settings file, the link table, erasure, leftovers.

``STORE/ingest.json`` records the id mode, the pseudonym key's check value
(a keyed hash of a constant, never the key) and the window length; every
later ingest into the store must match them, so that one store never mixes
two keys' ids for the same nights. The link table is the one file that maps
store ids back to files and site keys: written only on request, outside
the store, readable by its owner only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.ingest_task import TEMPORARY_PREFIX
from pipelines.manifest import MANIFEST_NAME, ManifestEntry, read_manifest, recording_file
from s2v_core.io.discovery import LinkRow
from s2v_core.io.identity import Identities
from s2v_core.locations import is_uri, redact, resolve
from s2v_core.store import schema_info

logger = logging.getLogger(__name__)
#: The store's ingest settings: id mode, the key's check value, window length.
SETTINGS_NAME = "ingest.json"
LINK_COLUMNS = ("site", "kind", "path", "file_id", "recording_key", "recording_id", "subject_key", "subject_id")


def check_settings(
    fs: pafs.FileSystem,
    root: str,
    *,
    output: str,
    identities: Identities,
    epochs_per_window: int,
    previous: list[ManifestEntry],
) -> None:
    """Refuse to mix id modes, pseudonym keys or window lengths in one store; record them on first use."""
    wanted = {"ids": identities.mode, "key_check": identities.key.check_value(), "epochs_per_window": epochs_per_window}
    path = f"{root}/{SETTINGS_NAME}"
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as stream:
            found = json.loads(stream.read().decode("utf-8"))
        if found.get("epochs_per_window") != epochs_per_window:
            raise ValueError(
                f"--epochs-per-window {epochs_per_window}: the store at {redact(output)} was written "
                f"with {found.get('epochs_per_window')}; use {found.get('epochs_per_window')} or a new "
                "--output"
            )
        if found.get("ids") != identities.mode:
            raise ValueError(
                f"--ids {identities.mode}: the store at {redact(output)} holds {found.get('ids')} ids; "
                f"use --ids {found.get('ids')} or a new --output"
            )
        if found.get("key_check") != wanted["key_check"]:
            raise ValueError(
                f"pseudonym key from {identities.key.origin} (check value {wanted['key_check']}): the store at "
                f"{redact(output)} was written with another key (check value {found.get('key_check')}); the same "
                "nights would get other ids. Use that key (S2V_PSEUDONYM_KEY or --pseudonym-key-file) or a new "
                "--output"
            )
        return
    finished = [e for e in previous if e.status == "ok" and e.recording_id]
    if finished:
        # A store from before ingest.json: its ids are the sites' own keys.
        if identities.mode != "original":
            raise ValueError(
                f"--output {redact(output)}: this store was written before ids were pseudonymised "
                "(it has no ingest.json); ingest into a new --output, or pass --ids original"
            )
        with fs.open_input_file(recording_file(root, finished[0].site, finished[0].recording_id)) as handle:
            _, existing = schema_info(pq.read_schema(handle))
        if existing != epochs_per_window:
            raise ValueError(
                f"--epochs-per-window {epochs_per_window}: the store at {redact(output)} was written "
                f"with {existing}; use {existing} or a new --output"
            )
    with fs.open_output_stream(path) as stream:
        stream.write((json.dumps(wanted, indent=1) + "\n").encode("utf-8"))


def remove_stale_temporaries(fs: pafs.FileSystem, root: str) -> None:
    # Safe: this run holds the store's lease, so no other ingest is writing these.
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.startswith((TEMPORARY_PREFIX, f".{MANIFEST_NAME}")):
            logger.info("removing a temporary file left by an interrupted run")
            fs.delete_file(info.path)


def write_link_table(path: str, rows: list[LinkRow], *, store: str) -> Path:
    """Write (or extend) the link table at ``path``: CSV, mode 0600, never inside the store.

    Rows of earlier runs are kept; a row is identified by site, kind and path.
    """
    if is_uri(path):
        raise ValueError(f"--link-table {redact(path)}: expected a local file path (it must stay private)")
    target = Path(path).expanduser().resolve()
    if not is_uri(store):
        store_root = Path(resolve(store)[1])
        if target == store_root or store_root in target.parents:
            raise ValueError(
                f"--link-table {path}: inside the store {store}; it re-identifies the store's ids, "
                "so it must live outside the store, where only you can read it"
            )
    merged: dict[tuple[str, str, str], dict] = {}
    if target.is_file():
        with open(target, newline="", encoding="utf-8") as handle:
            merged = {(r["site"], r["kind"], r["path"]): r for r in csv.DictReader(handle)}
    for row in rows:
        values = {column: getattr(row, column) for column in LINK_COLUMNS}
        merged[(row.site, row.kind, row.path)] = {k: "" if v is None else v for k, v in values.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LINK_COLUMNS)
        writer.writeheader()
        writer.writerows(merged[key] for key in sorted(merged))
    os.chmod(temporary, 0o600)
    os.replace(temporary, target)
    return target


def delete_file(fs: pafs.FileSystem, path: str) -> bool:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True


def erase_unlisted(fs: pafs.FileSystem, root: str, sites: set[str]) -> int:
    """Delete windows files of ``sites`` that no ``ok`` manifest line points at (``--prune``)."""
    state: dict[tuple[str, str], str] = {}
    for entry in read_manifest(fs, root):
        # Quarantined lines are skipped: a duplicate shares its id with the ok line it duplicates.
        if entry.recording_id and entry.status != "quarantined":
            state[(entry.site, entry.recording_id)] = entry.status
    erased = 0
    for site in sites:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/site={site}", allow_not_found=True))
        for info in infos:
            if (
                info.type == pafs.FileType.File
                and info.base_name.endswith(".parquet")
                and not info.base_name.startswith((".", "_"))
                and state.get((site, info.base_name.removesuffix(".parquet"))) != "ok"
            ):
                fs.delete_file(info.path)
                erased += 1
    return erased
