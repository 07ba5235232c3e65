"""The driver's half of ``s2v ingest``: what to decode, skip, refuse or erase, decided before Ray starts.

For each discovered recording the driver reads its header (a few hundred
bytes) and a keyed content fingerprint, then:

- **skips** it when the store has an ``ok`` line with the same
  ``inputs_hash`` (signal content, hypnogram, metadata row, site config,
  id mode, :data:`DECODER_VERSION`) and its Parquet file exists;
- **decodes it again** when any of those changed (the new file replaces the old);
- **refuses** it before decoding when it is a duplicate within its site
  (same id, or same content), when its header declares more than
  ``max_hours`` or the file is larger than ``max_file_gib``;
- and for recordings the store has but the inputs no longer do: marks them
  ``withdrawn`` and erases their windows with ``prune``, else keeps them and
  says how many are stale.

Each recording's task reserves the memory its decoding needs, estimated
from the header (:func:`decode_memory_bytes`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field

import pyarrow.fs as pafs

from pipelines.manifest import ManifestEntry, recording_file
from s2v_core.config import to_mapping
from s2v_core.io.base import UnreadableRecording
from s2v_core.io.discovery import RecordingSource, SiteListing, fingerprint
from s2v_core.io.edf import parse_layout
from s2v_core.io.identity import Identities
from s2v_core.io.metadata import RecordingMetadata
from s2v_core.locations import resolve
from s2v_core.recording import PLAUSIBLE_RATE_HZ

logger = logging.getLogger(__name__)

#: Bump when decoding changes what a recording's windows hold: every store then decodes again.
#: 2: NSRR XML scored events add ahi_scored / oahi_scored / odi_scored to the outcomes.
#: 3: NSRR XML scored events (and arousals) become per-epoch labels in the ``events`` column.
DECODER_VERSION = 3
_MIN_FINGERPRINT_BYTES = 256  # smaller files cannot be EDF; the reader reports why
_GIB = 1 << 30
#: Memory of a worker before it reads anything (Python, numpy, pyarrow, Ray), bytes.
_WORKER_BASE_BYTES = 512 << 20
#: Bytes per sample of the fastest channel while it is decoded: digital int16, float32
#: physical values, the resampler's float64 work arrays and its float32 result.
_BYTES_PER_SOURCE_SAMPLE = 24
#: Bytes per second of signal for the float16 windows of all nine modalities kept until the end.
_WINDOW_BYTES_PER_SECOND = 4096


@dataclass(frozen=True)
class IngestLimits:
    """Bounds that keep one recording from stalling or sinking a run."""

    # Attempts after the first when a recording's worker dies (OOM kill, a crash in a
    # C reader); then the recording is quarantined. Ray Data's default retries forever.
    task_retries: int = 2
    # Recordings whose header declares more than this many hours are quarantined
    # unread (a night is 6-12 h; a week-long ambulatory file needs its own run).
    max_hours: float = 48.0
    # Signal files larger than this (GiB) are quarantined unread (a 48-h 512-Hz PSG
    # with 30 channels is about 5 GiB).
    max_file_gib: float = 20.0

    def __post_init__(self) -> None:
        if self.task_retries < 0:
            raise ValueError(f"--task-retries: expected >= 0, found {self.task_retries}")
        if not self.max_hours > 0:
            raise ValueError(f"--max-hours: expected > 0, found {self.max_hours}")
        if not self.max_file_gib > 0:
            raise ValueError(f"--max-file-gib: expected > 0, found {self.max_file_gib}")


@dataclass(frozen=True)
class Task:
    """One recording to decode: its source, the manifest line prepared for it, its memory reservation."""

    source: RecordingSource
    entry: ManifestEntry
    memory_bytes: int
    replaces: bool  # the store holds an earlier version of this recording


@dataclass
class Plan:
    """What :func:`plan` decided."""

    tasks: list[Task] = field(default_factory=list)
    rejected: list[ManifestEntry] = field(default_factory=list)  # quarantined before decoding
    kept: list[ManifestEntry] = field(default_factory=list)  # manifest lines that stay as they are
    withdrawn: list[ManifestEntry] = field(default_factory=list)  # to erase (prune)
    stale: list[ManifestEntry] = field(default_factory=list)  # input gone, kept (no prune)
    skipped: int = 0


@dataclass(frozen=True)
class SignalFacts:
    """What the driver learns from a signal file without decoding it."""

    content_hash: str | None = None
    seconds: float | None = None  # readable duration declared by the header
    max_rate_hz: float | None = None  # fastest plausible channel
    problem: str | None = None  # the file could not be read at all


def decode_memory_bytes(seconds: float | None, max_rate_hz: float | None) -> int:
    """Memory (bytes) a worker needs to decode a recording of ``seconds`` whose fastest channel is ``max_rate_hz``.

    The decoder holds one channel at its source rate at a time plus the
    float16 windows done so far; measured peaks (``benchmarks/bench_ingest.py``:
    728 MiB for 8-h nights at 512 Hz) stay below this estimate.
    """
    if seconds is None or max_rate_hz is None:
        return _WORKER_BASE_BYTES
    return int(_WORKER_BASE_BYTES + seconds * (max_rate_hz * _BYTES_PER_SOURCE_SAMPLE + _WINDOW_BYTES_PER_SECOND))


def inspect_signal(source: RecordingSource, identities: Identities) -> SignalFacts:
    """Keyed fingerprint and header facts of a signal file (reads the header and a few blocks)."""
    if source.size_bytes < _MIN_FINGERPRINT_BYTES:
        return SignalFacts()
    fs, path = resolve(source.signal_uri)
    try:
        content_hash = fingerprint(fs, path, source.size_bytes, key=identities.fingerprint_key())
        with fs.open_input_file(path) as handle:
            layout = parse_layout(handle, source.size_bytes, f"file {source.file_id}")
    except UnreadableRecording:
        return SignalFacts(content_hash=content_hash)  # the worker says what is wrong, as for any file
    except OSError as exc:
        return SignalFacts(problem=f"file {source.file_id}: cannot be read ({type(exc).__name__})")
    header = layout.header
    rates = [
        c.sample_rate_hz
        for c in header.channels
        if math.isfinite(c.sample_rate_hz) and PLAUSIBLE_RATE_HZ[0] <= c.sample_rate_hz <= PLAUSIBLE_RATE_HZ[1]
    ]
    return SignalFacts(
        content_hash=content_hash, seconds=header.duration_seconds, max_rate_hz=max(rates) if rates else None
    )


def _small_file_hash(uri: str | None, identities: Identities) -> str | None:
    if uri is None:
        return None
    fs, path = resolve(uri)
    try:
        return fingerprint(fs, path, fs.get_file_info(path).size, key=identities.fingerprint_key())
    except OSError:
        return "unreadable"  # the worker reports it; a later readable version counts as a change


def inputs_hash(source: RecordingSource, facts: SignalFacts, identities: Identities, epochs_per_window: int) -> str:
    """A keyed hash of everything that decides a recording's windows."""
    return identities.digest(
        json.dumps(
            {
                "decoder": DECODER_VERSION,
                "signal": facts.content_hash or f"size:{source.size_bytes}",
                "hypnogram": _small_file_hash(source.hypnogram_uri, identities),
                "problem": source.hypnogram_problem,
                "metadata": asdict(source.metadata),
                "site": to_mapping(source.site),
                "ids": identities.mode,
                "epochs_per_window": epochs_per_window,
            },
            sort_keys=True,
            default=str,
        )
    )


def _prefer(candidate: tuple[RecordingSource, ManifestEntry, SignalFacts]) -> tuple:
    # Among duplicates keep the copy that has a hypnogram and a metadata row, then the first by path.
    source = candidate[0]
    return (
        source.hypnogram is None,
        source.metadata == RecordingMetadata(subject_id=source.metadata.subject_id),
        source.source,
    )


def plan(
    sites: list[SiteListing],
    *,
    previous: list[ManifestEntry],
    identities: Identities,
    limits: IngestLimits = IngestLimits(),
    epochs_per_window: int = 10,
    prune: bool = False,
    store: tuple[pafs.FileSystem, str] | None = None,
) -> Plan:
    """Decide what this run decodes, skips, refuses and erases (see the module docstring).

    Parameters
    ----------
    sites : list of SiteListing
        What discovery found, one listing per site.
    previous : list of ManifestEntry
        The store's manifest as it is.
    identities : Identities
        Keys of the fingerprints and hashes.
    limits : IngestLimits
        Size and duration bounds.
    epochs_per_window : int
        The store's window length (part of ``inputs_hash``).
    prune : bool
        Withdraw recordings whose input is gone.
    store : (filesystem, root), optional
        Where the windows files are, to check that a finished recording's
        file still exists (default: trust the manifest).
    """
    result = Plan()
    run_sites = {listing.site for listing in sites}
    latest: dict[tuple[str, str], ManifestEntry] = {}
    for entry in previous:
        if entry.site not in run_sites:
            result.kept.append(entry)  # another input's site: not this run's business
        elif entry.recording_id and entry.status != "quarantined":
            # The latest ok/withdrawn line of a night. Quarantined lines are re-examined by every
            # run; one may share its id with an ok line (a duplicate) and must not hide it.
            latest[(entry.site, entry.recording_id)] = entry

    def file_exists(entry: ManifestEntry) -> bool:
        if store is None:
            return True
        fs, root = store
        return fs.get_file_info(recording_file(root, entry.site, entry.recording_id)).type == pafs.FileType.File

    discovered, candidates = set(), []
    seen_ids: dict[tuple[str, str], str] = {}
    seen_hashes: dict[tuple[str, str], str] = {}
    for listing in sites:
        for source in listing.sources:
            site = source.site.name
            discovered.add((site, source.recording_id))
            facts = inspect_signal(source, identities)
            entry = ManifestEntry(
                recording_id=source.recording_id,
                site=site,
                file_id=source.file_id,
                status="quarantined",
                content_hash=facts.content_hash,
                inputs_hash=inputs_hash(source, facts, identities, epochs_per_window),
                subject_id=source.metadata.subject_id,
                size_bytes=source.size_bytes,
                declared_hours=None if facts.seconds is None else round(facts.seconds / 3600, 3),
                reason=facts.problem,
            )
            before = latest.get((site, source.recording_id))
            if (
                before is not None
                and before.status == "ok"
                and before.inputs_hash == entry.inputs_hash
                and (site, source.recording_id) not in seen_ids
                and file_exists(before)
            ):
                result.kept.append(before)
                result.skipped += 1
                seen_ids[(site, source.recording_id)] = source.file_id
                if before.content_hash:
                    seen_hashes[(site, before.content_hash)] = source.file_id
                continue
            candidates.append((source, entry, facts))
        result.rejected += [
            ManifestEntry(
                recording_id=None,
                site=f.site,
                file_id=f.file_id,
                status="quarantined",
                reason=f"file {f.file_id}: {f.reason}",
            )
            for f in listing.skipped
        ]

    for source, entry, facts in sorted(candidates, key=_prefer):
        site, key = source.site.name, (source.site.name, source.recording_id)
        if entry.reason is None and facts.seconds is not None and facts.seconds > limits.max_hours * 3600:
            entry.reason = (
                f"file {source.file_id}: its header declares {facts.seconds / 3600:.3g} h of signal, "
                f"more than --max-hours {limits.max_hours:g}; not decoded"
            )
        elif entry.reason is None and source.size_bytes > limits.max_file_gib * _GIB:
            entry.reason = (
                f"file {source.file_id}: {source.size_bytes / _GIB:.1f} GiB, more than "
                f"--max-file-gib {limits.max_file_gib:g}; not decoded"
            )
        elif entry.reason is None and key in seen_ids:
            entry.reason = (
                f"file {source.file_id}: duplicate recording_id {source.recording_id!r} at site "
                f"{site!r} (already from file {seen_ids[key]})"
            )
        elif entry.reason is None and entry.content_hash and (site, entry.content_hash) in seen_hashes:
            entry.reason = (
                f"file {source.file_id}: duplicate recording, same content as file "
                f"{seen_hashes[(site, entry.content_hash)]} at site {site!r}"
            )
        if entry.reason:
            result.rejected.append(entry)
            continue
        seen_ids[key] = source.file_id
        if entry.content_hash:
            seen_hashes[(site, entry.content_hash)] = source.file_id
        before = latest.get(key)
        result.tasks.append(
            Task(
                source=source,
                entry=entry,
                memory_bytes=decode_memory_bytes(facts.seconds, facts.max_rate_hz),
                replaces=before is not None and before.status == "ok",
            )
        )

    for key, entry in latest.items():
        if key in discovered:
            continue  # superseded by this run's line (or kept above)
        if entry.status == "withdrawn":
            result.kept.append(entry)  # the record of an erasure stays
        elif entry.status == "ok" and prune:
            result.withdrawn.append(
                ManifestEntry(
                    recording_id=entry.recording_id,
                    site=entry.site,
                    file_id=entry.file_id,
                    status="withdrawn",
                    subject_id=entry.subject_id,
                    reason=f"file {entry.file_id}: input no longer present; windows erased (--prune)",
                )
            )
        elif entry.status == "ok":
            result.kept.append(entry)
            result.stale.append(entry)
    return result
