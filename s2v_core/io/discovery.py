"""Find the recordings of one or more inputs: sites, signal files, hypnograms, metadata rows.

An input is a site directory (with a ``site.toml``, or defaults named after
the directory) or a parent whose sub-directories are sites. Inputs are local
paths or URIs that :mod:`pyarrow.fs` understands (``file://``, ``s3://``,
``gs://``, ...); files are listed once per site, nothing is downloaded except
the small ``site.toml`` and metadata tables.

Local sites are walked without leaving them: a symbolic link is followed
only when its target is inside the site directory and not yet listed;
dangling links, links out of the site and link loops are reported as
skipped files. Recording and subject ids, and the names of files in the
manifest, are pseudonymised here (:mod:`s2v_core.io.identity`), so what a
Ray worker receives holds no site key; only the link table (written on
request) maps them back.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs

from s2v_core.io.edf import SIGNAL_READERS
from s2v_core.io.identity import Identities
from s2v_core.io.metadata import RecordingMetadata, parse_site_metadata
from s2v_core.io.site_config import SITE_CONFIG_NAME, SiteConfig, load_site_config
from s2v_core.locations import join, redact, resolve

logger = logging.getLogger(__name__)

#: What discovery counts as a recording: exactly the suffixes the signal-reader table can open.
_SIGNAL_SUFFIXES = tuple(SIGNAL_READERS)


@dataclass(frozen=True)
class RecordingSource:
    """One input recording as discovered: what a worker needs to decode it, and nothing more.

    It holds no original key: ids are already pseudonymised (see
    :class:`~s2v_core.io.identity.Identities`); ``source`` is needed to read
    the file and never written anywhere (the manifest has ``file_id``).

    Parameters
    ----------
    site : SiteConfig
        The site's config (channel mapping, hypnogram settings).
    input_uri : str
        The input (local path or URI) the recording was found under.
    source : str
        Signal file path relative to ``input_uri`` (``/``-separated).
    file_id : str
        Pseudonymous name of the signal file (keyed hash of site and ``source``).
    recording_id : str
        The store's id of the night: the keyed hash of the site's recording key
        (``key_regex``), or of the path when the file name does not match it.
    size_bytes : int
        Size of the signal file.
    hypnogram : str or None
        Hypnogram path relative to ``input_uri``, None when the site has none.
    hypnogram_file_id : str or None
        Pseudonymous name of the hypnogram file.
    hypnogram_problem : str or None
        Why no hypnogram is used although one was expected (missing, ambiguous).
    metadata : RecordingMetadata
        The site table's row (empty when there is none), its ``subject_id``
        pseudonymised like the recording id.
    key_matched : bool
        False when the file name does not match ``key_regex`` (no metadata row then).
    notes : tuple of str
        One-line notes about the ids (unsafe key replaced, no metadata row);
        they never repeat a key or a path.
    """

    site: SiteConfig
    input_uri: str
    source: str
    recording_id: str
    size_bytes: int
    hypnogram: str | None
    hypnogram_problem: str | None
    metadata: RecordingMetadata
    key_matched: bool = True
    file_id: str = ""
    hypnogram_file_id: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def signal_uri(self) -> str:
        return join(self.input_uri, self.source)

    @property
    def hypnogram_uri(self) -> str | None:
        return join(self.input_uri, self.hypnogram) if self.hypnogram else None


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not ingested and deserves a manifest line (an orphan hypnogram, a bad link).

    ``source`` (relative to the input) is for the link table only; ``reason``
    never names the file.
    """

    site: str
    source: str
    file_id: str
    reason: str


@dataclass(frozen=True)
class LinkRow:
    """One line of the link table: how a site's own names map to the store's (restricted; see ingest)."""

    site: str
    path: str
    file_id: str
    kind: str  # "signal", "hypnogram" or "skipped"
    recording_key: str | None = None
    recording_id: str | None = None
    subject_key: str | None = None
    subject_id: str | None = None


@dataclass(frozen=True)
class SiteListing:
    """What :func:`discover_site` found in one site directory."""

    site: str
    sources: list[RecordingSource]
    skipped: list[SkippedFile]
    links: list[LinkRow]


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8", errors="replace")


def _load_config(fs: pafs.FileSystem, path: str) -> SiteConfig:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SITE_CONFIG_NAME
        local.write_text(_read_text(fs, path))
        try:
            return load_site_config(local)
        except (ValueError, TypeError) as exc:
            raise ValueError(str(exc).replace(str(local), path)) from None


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def find_sites(input_uri: str, *, site_config: str | None = None) -> list[tuple[SiteConfig, str]]:
    """The ``(config, site URI)`` pairs of an input.

    Parameters
    ----------
    input_uri : str
        Site directory or parent of site directories (path or URI).
    site_config : str, optional
        Config file overriding the input's own ``site.toml``; the input is
        then one site.
    """
    fs, root = resolve(input_uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"--input {redact(input_uri)}: not a directory")
    if site_config is not None:
        return [(load_site_config(site_config), input_uri)]
    if _is_file(fs, posixpath.join(root, SITE_CONFIG_NAME)):
        return [(_load_config(fs, posixpath.join(root, SITE_CONFIG_NAME)), input_uri)]
    children = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    subdirs = [c for c in children if c.type == pafs.FileType.Directory]
    direct_signals = any(
        c.type == pafs.FileType.File and c.base_name.lower().endswith(_SIGNAL_SUFFIXES) for c in children
    )
    if direct_signals or not subdirs:
        return [(_default_config(info.base_name or root), input_uri)]
    sites = []
    for child in sorted(subdirs, key=lambda c: c.base_name):
        child_uri = join(input_uri, child.base_name)
        toml = posixpath.join(child.path, SITE_CONFIG_NAME)
        config = _load_config(fs, toml) if _is_file(fs, toml) else _default_config(child.base_name)
        sites.append((config, child_uri))
    return sites


def _default_config(name: str) -> SiteConfig:

    return SiteConfig(name=re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "site")


def _matches(pattern: str, relative: str) -> bool:
    # Patterns without a directory part match at any depth (recursive search).
    return fnmatch.fnmatchcase(relative, pattern) or (
        "/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(relative), pattern)
    )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_local(site_root: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Files under a local site directory, following links only where they stay inside it.

    Returns ``({relative path: size}, [(relative path, problem)])``. A link
    that leads out of the site, a dangling link and a link loop (a link to a
    directory already listed, e.g. ``loop -> .``) are not followed and are
    reported; each directory is listed once, so no loop can hang or
    multiply the listing.
    """
    real_root = os.path.realpath(site_root)
    files: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    visited = {real_root}
    pending = [(site_root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.append((prefix.rstrip("/") or ".", f"directory cannot be listed ({exc.strerror})"))
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_symlink():
                try:
                    target = os.path.realpath(entry.path, strict=True)
                except FileNotFoundError:
                    problems.append((relative, "dangling symbolic link (its target does not exist); not followed"))
                    continue
                except OSError:
                    problems.append((relative, "symbolic link loop (the link resolves to itself); not followed"))
                    continue
                if not _inside(target, real_root):
                    problems.append((relative, "symbolic link to outside the site directory; not followed"))
                    continue
                if os.path.isdir(target):
                    if target in visited:
                        problems.append((relative, "symbolic link loop (a directory already listed); not followed"))
                        continue
                    visited.add(target)
                    pending.append((entry.path, relative + "/"))
                elif os.path.isfile(target):
                    files[relative] = os.path.getsize(target)
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.realpath(entry.path)
                if real not in visited:
                    visited.add(real)
                    pending.append((entry.path, relative + "/"))
            elif entry.is_file(follow_symlinks=False):
                files[relative] = entry.stat(follow_symlinks=False).st_size
    return files, problems


def list_site_files(fs: pafs.FileSystem, site_root: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``({path relative to site_root: size}, [(path, problem)])`` of every file of a site.

    Local sites are walked by :func:`_walk_local` (symbolic links are
    confined to the site); object stores have no links.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(site_root)
    files = {
        posixpath.relpath(f.path, site_root): f.size
        for f in fs.get_file_info(pafs.FileSelector(site_root, recursive=True))
        if f.type == pafs.FileType.File
    }
    return files, []


def _glob_literal(text: str) -> str:
    """``text`` with glob characters escaped, so that a key containing ``[`` or ``*`` matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def hypnogram_candidates(
    pattern: str, signal: str, hypnogram_files: set[str], *, key: str, stem: str
) -> list[str] | None:
    """The hypnogram files a signal's pattern matches, or ``None`` when it leads out of the site.

    ``pattern`` is relative to the signal's directory and may climb with
    ``../`` (NSRR: ``../../annotations-events-nsrr/shhs1/shhs1-{key}-nsrr.xml``);
    glob characters match within one path segment.
    """
    wanted = pattern.format(key=_glob_literal(key), stem=_glob_literal(stem))
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(signal), wanted))
    if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
        return None
    parts = resolved.split("/")
    return sorted(
        r
        for r in hypnogram_files
        if r.count("/") == len(parts) - 1 and all(fnmatch.fnmatchcase(a, b) for a, b in zip(r.split("/"), parts))
    )


def discover_site(
    config: SiteConfig,
    site_uri: str,
    *,
    identities: Identities,
    input_uri: str | None = None,
) -> SiteListing:
    """Signal files, their hypnograms and metadata rows of one site directory.

    Parameters
    ----------
    config : SiteConfig
        The site's config.
    site_uri : str
        The site directory (path or URI).
    identities : Identities
        How keys and paths become store ids (pseudonymous by default).
    input_uri : str, optional
        The ``--input`` it belongs to; ``source`` paths are relative to it
        (default: the site directory).

    Returns
    -------
    SiteListing
        The recordings, the files skipped with a reason (orphan hypnograms,
        links not followed) and the link-table rows. Nothing logged here
        names a recording or a file.
    """
    input_uri = input_uri or site_uri
    fs, site_root = resolve(site_uri)
    _, input_root = resolve(input_uri)
    files, link_problems = list_site_files(fs, site_root)
    prefix = posixpath.relpath(site_root, input_root)
    prefix = "" if prefix == "." else prefix + "/"
    site = config.name

    hyp = config.hypnogram
    # Which files are hypnograms: their name matches the pattern's last segment (any directory).
    hyp_glob = posixpath.basename(hyp.pattern).replace("{key}", "*").replace("{stem}", "*")
    site_files = {SITE_CONFIG_NAME} | ({config.metadata.file} if config.metadata is not None else set())
    hypnogram_files = (
        set()
        if hyp.format == "none"
        else {r for r in files if fnmatch.fnmatchcase(posixpath.basename(r), hyp_glob) and r not in site_files}
    )
    signals = sorted(r for r in files if r not in hypnogram_files and any(_matches(p, r) for p in config.signals))

    metadata: dict[str, RecordingMetadata] = {}
    if config.metadata is not None:
        table = posixpath.normpath(config.metadata.file)
        # Looked up in the confined listing: a link to a table outside the site is not read.
        if table not in files:
            raise FileNotFoundError(
                f"site {site!r}: metadata table {config.metadata.file} not found in {redact(site_uri)}"
            )
        metadata = parse_site_metadata(
            _read_text(fs, posixpath.join(site_root, table)),
            config.metadata,
            source=posixpath.join(redact(site_uri), table),
        )

    sources, links, claimed, without_row = [], [], set(), 0
    for relative in signals:
        key = config.recording_key(relative)
        stem = posixpath.splitext(posixpath.basename(relative))[0]
        notes: list[str] = []
        if key is None:
            recording_id = identities.pseudonym(site, relative)
            notes.append(
                f"file name does not match key_regex {config.key_regex!r}; recording_id is the keyed "
                "hash of its path (no metadata row)"
            )
        else:
            recording_id, note = identities.identifier(site, key, what="recording key")
            notes += [note] if note else []
        hypnogram, problem, hypnogram_id = None, None, None
        if hyp.format != "none":
            found = hypnogram_candidates(hyp.pattern, relative, hypnogram_files, key=key or stem, stem=stem)
            if found is None:
                problem = f"hypnogram pattern {hyp.pattern!r} leads out of the site directory; stages set to -1"
            elif len(found) == 1:
                hypnogram = prefix + found[0]
                hypnogram_id = identities.file_id(site, hypnogram)
                claimed.add(found[0])
            elif found:
                claimed.update(found)  # claimed (not orphans), but which one is meant is unclear
                problem = (
                    f"hypnogram pattern {hyp.pattern!r} matches {len(found)} files, expected one; stages set to -1"
                )
            else:
                problem = f"no hypnogram matching the pattern {hyp.pattern!r}; stages set to -1"
        row = metadata.get(key) if key is not None else None
        if config.metadata is not None and key is not None and row is None:
            without_row += 1
            notes.append("no row for this recording's key in the metadata table (age, sex, outcomes unknown)")
        row = row or RecordingMetadata()
        subject_key = row.subject_id or key
        subject_id = recording_id
        if row.subject_id is not None:
            subject_id, note = identities.identifier(site, row.subject_id, what="subject")
            notes += [note] if note else []
        source = prefix + relative
        file_id = identities.file_id(site, source)
        sources.append(
            RecordingSource(
                site=config,
                input_uri=input_uri,
                source=source,
                recording_id=recording_id,
                size_bytes=files[relative],
                hypnogram=hypnogram,
                hypnogram_problem=problem,
                metadata=replace(row, subject_id=subject_id),
                key_matched=key is not None,
                file_id=file_id,
                hypnogram_file_id=hypnogram_id,
                notes=tuple(notes),
            )
        )
        links.append(LinkRow(site, source, file_id, "signal", key, recording_id, subject_key, subject_id))
        if hypnogram:
            links.append(LinkRow(site, hypnogram, hypnogram_id, "hypnogram", key, recording_id))
    if without_row:
        logger.warning(
            "site %s: %d of %d recordings have no row in the metadata table", site, without_row, len(signals)
        )
    skipped = [(prefix + r, "hypnogram with no matching signal file") for r in sorted(hypnogram_files - claimed)]
    skipped += [(prefix + r, problem) for r, problem in link_problems]
    if link_problems:
        logger.warning("site %s: %d symbolic links not followed (see the manifest)", site, len(link_problems))
    skipped_files = [SkippedFile(site, path, identities.file_id(site, path), reason) for path, reason in skipped]
    links += [LinkRow(site, f.source, f.file_id, "skipped") for f in skipped_files]
    return SiteListing(site=site, sources=sources, skipped=skipped_files, links=links)


def fingerprint(
    fs: pafs.FileSystem, path: str, size: int, *, key: bytes = b"", samples: int = 16, block: int = 65536
) -> str:
    """A content fingerprint that finds byte-identical copies without reading whole nights.

    Hashes the size, the first MiB and ``samples`` blocks spread over the
    file (blake2b, hex). Two files with the same fingerprint are treated as
    the same recording. With ``key`` (up to 64 bytes; see
    :meth:`~s2v_core.io.identity.Identities.fingerprint_key`) the hash is
    keyed: the first MiB holds the EDF header, and an unkeyed hash of it
    would let anyone holding a file check whether it is in the store.
    """
    digest = hashlib.blake2b(str(size).encode(), digest_size=16, key=key[:64])
    with fs.open_input_file(path) as handle:
        digest.update(handle.read_at(min(size, 1 << 20), 0))
        if size > 1 << 20:
            for k in range(samples):
                offset = (1 << 20) + (size - (1 << 20) - block) * k // max(samples - 1, 1)
                digest.update(handle.read_at(block, max(offset, 0)))
    return digest.hexdigest()
