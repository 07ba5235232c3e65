"""Find the recordings of one or more inputs: sites, signal files, hypnograms, metadata rows.

An input is a site directory (with a ``site.toml``, or defaults named after
the directory) or a parent whose sub-directories are sites. Inputs are local
paths or URIs that :mod:`pyarrow.fs` understands (``file://``, ``s3://``,
``gs://``, ...); files are listed once per site, nothing is downloaded except
the small ``site.toml`` and metadata tables.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from s2v_core.io.metadata import RecordingMetadata, parse_site_metadata
from s2v_core.io.site_config import SITE_CONFIG_NAME, SiteConfig, load_site_config

logger = logging.getLogger(__name__)

_SIGNAL_SUFFIXES = (".edf", ".bdf", ".rec")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a local path or a pyarrow-understood URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), Path(uri).expanduser().resolve().as_posix()
    return pafs.FileSystem.from_uri(uri)


def join(base_uri: str, *relative: str) -> str:
    """``base_uri`` with ``/``-separated relative parts appended to its path.

    A URI keeps its scheme and its ``?options`` (``s3://b/in?endpoint_override=h:9000``
    joined with ``site/a.edf`` is ``s3://b/in/site/a.edf?endpoint_override=h:9000``).
    """
    parts = [part for part in relative if part]
    if not parts:
        return base_uri
    base, mark, options = base_uri.partition("?") if "://" in base_uri else (base_uri, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + options


@dataclass(frozen=True)
class RecordingSource:
    """One input recording as discovered (what a worker needs to decode it).

    Parameters
    ----------
    site : SiteConfig
        The site's config (channel mapping, hypnogram settings).
    input_uri : str
        The input (local path or URI) the recording was found under.
    source : str
        Signal file path relative to ``input_uri`` (``/``-separated).
    recording_id : str
        Site-given recording key (``key_regex``), or, when the file name does
        not match it, a stable hash of the site and path (``<site>-<16 hex>``).
    key_matched : bool
        False when ``recording_id`` is the hash fallback (no metadata row then).
    size_bytes : int
        Size of the signal file.
    hypnogram : str or None
        Hypnogram path relative to ``input_uri``, None when the site has none.
    hypnogram_problem : str or None
        Why no hypnogram is used although one was expected (missing, ambiguous).
    metadata : RecordingMetadata
        The site table's row (empty when there is none).
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

    @property
    def signal_uri(self) -> str:
        return join(self.input_uri, self.source)

    @property
    def hypnogram_uri(self) -> str | None:
        return join(self.input_uri, self.hypnogram) if self.hypnogram else None


@dataclass(frozen=True)
class OrphanHypnogram:
    """A hypnogram file that no signal file claims."""

    site: str
    input_uri: str
    source: str


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
        raise FileNotFoundError(f"--input {input_uri}: not a directory")
    if site_config is not None:
        return [(load_site_config(site_config), input_uri)]
    if _is_file(fs, posixpath.join(root, SITE_CONFIG_NAME)):
        return [(_load_config(fs, posixpath.join(root, SITE_CONFIG_NAME)), input_uri)]
    children = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    subdirs = [c for c in children if c.type == pafs.FileType.Directory]
    direct_signals = any(c.type == pafs.FileType.File and c.base_name.lower().endswith(_SIGNAL_SUFFIXES)
                         for c in children)
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
    import re

    return SiteConfig(name=re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "site")


def _matches(pattern: str, relative: str) -> bool:
    # Patterns without a directory part match at any depth (recursive search).
    return fnmatch.fnmatchcase(relative, pattern) or (
        "/" not in pattern and fnmatch.fnmatchcase(posixpath.basename(relative), pattern))


def discover_site(config: SiteConfig, site_uri: str, *, input_uri: str | None = None,
                  ) -> tuple[list[RecordingSource], list[OrphanHypnogram]]:
    """Signal files, their hypnograms and metadata rows of one site directory.

    Parameters
    ----------
    config : SiteConfig
        The site's config.
    site_uri : str
        The site directory (path or URI).
    input_uri : str, optional
        The ``--input`` it belongs to; ``source`` paths are relative to it
        (default: the site directory).
    """
    input_uri = input_uri or site_uri
    fs, site_root = resolve(site_uri)
    _, input_root = resolve(input_uri)
    files = {posixpath.relpath(f.path, site_root): f.size
             for f in fs.get_file_info(pafs.FileSelector(site_root, recursive=True))
             if f.type == pafs.FileType.File}
    prefix = posixpath.relpath(site_root, input_root)
    prefix = "" if prefix == "." else prefix + "/"

    hyp = config.hypnogram
    hyp_glob = hyp.pattern.replace("{key}", "*").replace("{stem}", "*")
    site_files = {SITE_CONFIG_NAME} | ({config.metadata.file} if config.metadata is not None else set())
    hypnogram_files = set() if hyp.format == "none" else {
        r for r in files if _matches(hyp_glob, r) and r not in site_files}
    signals = sorted(r for r in files if r not in hypnogram_files
                     and any(_matches(p, r) for p in config.signals))

    metadata: dict[str, RecordingMetadata] = {}
    if config.metadata is not None:
        table_path = posixpath.join(site_root, config.metadata.file)
        if not _is_file(fs, table_path):
            raise FileNotFoundError(f"site {config.name!r}: metadata table {config.metadata.file} not found "
                                    f"in {site_uri}")
        metadata = parse_site_metadata(_read_text(fs, table_path), config.metadata, source=table_path)

    sources, claimed = [], set()
    for relative in signals:
        key = config.recording_key(relative)
        directory, name = posixpath.split(relative)
        stem = posixpath.splitext(name)[0]
        hypnogram, problem = None, None
        if hyp.format != "none":
            wanted = hyp.pattern.format(key=key or stem, stem=stem)
            found = sorted(r for r in hypnogram_files
                           if posixpath.dirname(r) == directory
                           and fnmatch.fnmatchcase(posixpath.basename(r), wanted))
            if len(found) == 1:
                hypnogram = prefix + found[0]
                claimed.add(found[0])
            elif found:
                claimed.update(found)  # claimed (not orphans), but which one is meant is unclear
                problem = (f"{prefix}{relative}: hypnogram pattern {wanted!r} matches {len(found)} files "
                           f"({', '.join(found[:3])}); expected one")
            else:
                problem = f"{prefix}{relative}: no hypnogram matching {wanted!r}; stages set to -1"
        row = metadata.get(key) if key is not None else None
        if config.metadata is not None and key is not None and row is None:
            logger.warning("site %s: no metadata row for recording %s", config.name, key)
        sources.append(RecordingSource(
            site=config, input_uri=input_uri, source=prefix + relative,
            recording_id=key if key is not None else hashed_recording_id(config.name, relative),
            size_bytes=files[relative], hypnogram=hypnogram, hypnogram_problem=problem,
            metadata=row or RecordingMetadata(), key_matched=key is not None))
    orphans = [OrphanHypnogram(config.name, input_uri, prefix + r) for r in sorted(hypnogram_files - claimed)]
    return sources, orphans


def hashed_recording_id(site: str, relative_path: str) -> str:
    """A stable recording id from the site and the path (for files without a site-given key)."""
    digest = hashlib.blake2b(f"{site}/{relative_path}".encode("utf-8"), digest_size=8).hexdigest()
    return f"{site}-{digest}"


def fingerprint(fs: pafs.FileSystem, path: str, size: int, *, samples: int = 16,
                block: int = 65536) -> str:
    """A content fingerprint that finds byte-identical copies without reading whole nights.

    Hashes the size, the first MiB and ``samples`` blocks spread over the
    file (blake2b, hex). Two files with the same fingerprint are treated as
    the same recording.
    """
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with fs.open_input_file(path) as handle:
        digest.update(handle.read_at(min(size, 1 << 20), 0))
        if size > 1 << 20:
            for k in range(samples):
                offset = (1 << 20) + (size - (1 << 20) - block) * k // max(samples - 1, 1)
                digest.update(handle.read_at(block, max(offset, 0)))
    return digest.hexdigest()
