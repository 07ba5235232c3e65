"""Decode one recording into store rows (no Ray: the ingest pipeline maps this over a cohort).

``decode_recording`` reads the signal file, maps its channels to the nine
modalities, resamples each chosen channel to the store rate, normalises it
robustly per recording, cuts windows of ``epochs_per_window`` 30-s epochs,
attaches the 30-s stages of the hypnogram, the site metadata and, for NSRR XML
hypnograms, the scored-event indices and per-epoch event labels
(:mod:`s2v_core.io.events`), and returns
an Arrow table that follows :func:`s2v_core.store.store_schema` exactly.
Memory is bounded by one recording: one channel at its source rate plus the
float16 windows of the channels done so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from s2v_core.io.base import ChannelHeader, UnreadableRecording
from s2v_core.io.edf import open_signal
from s2v_core.io.events import epoch_event_flags, event_indices, read_nsrr_events
from s2v_core.io.hypnogram import detect_format, read_hypnogram
from s2v_core.io.metadata import RecordingMetadata
from s2v_core.io.site_config import SiteConfig
from s2v_core.io.stages import stages_for_signal
from s2v_core.modalities import EPOCH_SECONDS, MODALITY_KEYS, get_modality, match_channel, normalise_label
from s2v_core.signal import (
    cut_windows,
    normalise,
    resample,
    robust_scale,
    window_bounds,
    window_in_range,
    window_quality,
)
from s2v_core.store import UNKNOWN_STAGE, store_schema

logger = logging.getLogger(__name__)

#: Sampling rates outside this range (Hz) are header errors, not recordings.
PLAUSIBLE_RATE_HZ = (0.1, 100_000.0)
#: A channel below store_rate / this factor cannot carry the modality's band
#: (e.g. Sleep-EDF's 1-Hz EMG envelope is not a 128-Hz EMG).
MIN_RATE_FACTOR = 4
#: SpO2 and heart rate may legitimately stay constant for a whole window.
_CONSTANT_PLAUSIBLE = {"spo2", "hr"}
_ANNOTATION_LIKE = {"edf annotations", "bdf annotations"}


@dataclass(frozen=True)
class DecodedRecording:
    """The store rows of one night and what the manifest says about it.

    Parameters
    ----------
    table : pyarrow.Table
        Rows following ``store_schema(epochs_per_window)``.
    windows : int
        Number of rows.
    modalities : tuple of str
        Modalities present in at least one window (registry order).
    channels : dict of str to str
        Modality -> channel label it was read from.
    unknown_channels : tuple of str
        Labels that match no modality and are not in ``ignore_channels``.
    notes : tuple of str
        One-line warnings (hypnogram length, NaN/flat windows, skipped channels).
    """

    table: pa.Table
    windows: int
    modalities: tuple[str, ...]
    channels: dict[str, str]
    unknown_channels: tuple[str, ...]
    notes: tuple[str, ...]


def choose_channels(
    channels: tuple[ChannelHeader, ...], site: SiteConfig
) -> tuple[dict[str, ChannelHeader], tuple[str, ...]]:
    """Pick one channel per modality; return ``(chosen, unknown labels)``.

    Preference: the registry aliases in registry order (the canonical
    derivations, e.g. ``C3-M2`` before ``C4-M1``, Sleep-EDF's ``Fpz-Cz``),
    then the site's ``[channels]`` entries in config order, then file order.
    A site that wants another channel lists the canonical one in
    ``ignore_channels``.
    """
    site_order = {normalise_label(label): rank for rank, label in enumerate(site.channels)}
    ignored = {normalise_label(label) for label in site.ignore_channels}
    candidates: dict[str, list[tuple[int, int, ChannelHeader]]] = {}
    unknown = []
    for position, channel in enumerate(channels):
        label = normalise_label(channel.label)
        if label in ignored:
            continue  # known to the site and unused, even when it would match a modality
        key = match_channel(channel.label, site.channels)
        if key is None:
            if label not in _ANNOTATION_LIKE:
                unknown.append(channel.label)
            continue
        aliases = [normalise_label(a) for a in get_modality(key).aliases]
        rank = aliases.index(label) if label in aliases else len(aliases) + site_order.get(label, len(site_order))
        candidates.setdefault(key, []).append((rank, position, channel))
    chosen = {key: min(options, key=lambda option: option[:2])[2] for key, options in candidates.items()}
    return chosen, tuple(unknown)


def _stages(
    hypnogram: str | None, hypnogram_format: str, hypnogram_epoch_seconds: float, n_epochs: int, notes: list[str]
) -> np.ndarray:
    if hypnogram is None:
        return np.full(n_epochs, UNKNOWN_STAGE, dtype=np.int8)
    try:
        scored = read_hypnogram(hypnogram, format=hypnogram_format, epoch_seconds=hypnogram_epoch_seconds)
        stages, aligned_notes = stages_for_signal(scored, n_epochs, source=hypnogram)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with a hypnogram costs only the stages
        # The signals are still good data: keep them with unknown stages.
        why = str(exc) if isinstance(exc, (UnreadableRecording, OSError)) else f"{hypnogram}: {type(exc).__name__}"
        notes.append(f"hypnogram unreadable, stages set to -1: {why}")
        return np.full(n_epochs, UNKNOWN_STAGE, dtype=np.int8)
    notes.extend(scored.notes)
    notes.extend(aligned_notes)
    return stages


def _with_scored_events(
    metadata: RecordingMetadata, hypnogram: str | None, hypnogram_format: str, stages: np.ndarray, notes: list[str]
) -> tuple[RecordingMetadata, np.ndarray | None]:
    """The event indices (``ahi_scored`` …) and per-epoch event labels of an NSRR XML hypnogram.

    Returns the metadata with the indices added to its outcomes (a value of
    the site's metadata table of the same name wins) and the labels of every
    epoch of ``stages`` (:func:`s2v_core.io.events.epoch_event_flags`), or
    None when the hypnogram is not NSRR XML. Unreadable events cost only the
    indices and the labels (a note says so).
    """
    if hypnogram is None:
        return metadata, None
    try:
        if (detect_format(hypnogram) if hypnogram_format == "auto" else hypnogram_format) != "nsrr_xml":
            return metadata, None
        events = read_nsrr_events(hypnogram)
    except Exception as exc:  # noqa: BLE001 - the stages and signals are still good data
        why = str(exc) if isinstance(exc, (UnreadableRecording, OSError)) else f"{hypnogram}: {type(exc).__name__}"
        notes.append(f"scored events unreadable, no event indices or labels: {why}")
        return metadata, None
    flags = epoch_event_flags(events, len(stages))
    indices = event_indices(events, stages)  # empty when no epoch is scored as sleep
    return (dataclasses.replace(metadata, outcomes={**indices, **metadata.outcomes}) if indices else metadata), flags


def _list_column(values: np.ndarray, present: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """``(rows, width)`` numpy -> Arrow list column, null where ``present`` is false."""
    rows, width = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    flat_values = np.ascontiguousarray(values.reshape(-1))
    if arrow_type == pa.float16():
        # Zero-copy from the buffer: pa.array() on float16 goes through pandas.
        flat = pa.Array.from_buffers(arrow_type, flat_values.size, [None, pa.py_buffer(flat_values)])
    else:
        flat = pa.array(flat_values, type=arrow_type)
    mask = None if present.all() else pa.array(~present)
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def _usable_channels(chosen: dict[str, ChannelHeader], signal_path: str) -> tuple[dict[str, ChannelHeader], list[str]]:
    """Drop channels whose sampling rate is implausible or too slow for their modality."""
    usable, rejected = {}, []
    for key, channel in chosen.items():
        rate, store_rate = channel.sample_rate_hz, get_modality(key).store_rate_hz
        if not (math.isfinite(rate) and PLAUSIBLE_RATE_HZ[0] <= rate <= PLAUSIBLE_RATE_HZ[1]):
            rejected.append(
                f"{signal_path}: channel {channel.label!r} has an absurd sampling rate {rate:g} Hz; {key} not used"
            )
        elif rate < store_rate / MIN_RATE_FACTOR:
            rejected.append(
                f"{signal_path}: channel {channel.label!r} at {rate:g} Hz is below "
                f"{store_rate / MIN_RATE_FACTOR:g} Hz, too slow for {key}; not used"
            )
        else:
            usable[key] = channel
    return usable, rejected


def _modality_windows(
    values: np.ndarray,
    channel: ChannelHeader,
    key: str,
    n_windows: int,
    epochs_per_window: int,
    notes: list[str],
    source: str,
) -> tuple[np.ndarray, np.ndarray] | None:
    """One channel -> ``(float16 windows (n_windows, E * samples_per_epoch), good mask)``.

    Windows with NaN/inf, a flat signal or (for modalities with a
    ``plausible`` range: SpO2, heart rate) mostly implausible values are
    marked not good (the modality is absent there, with a note); None when
    no window is good.
    """
    modality = get_modality(key)
    bounds = window_bounds(n_windows, epochs_per_window * EPOCH_SECONDS, channel.sample_rate_hz, values.size)
    values = values[: bounds[-1]]
    bad, flat = window_quality(values, bounds, constant_is_flat=key not in _CONSTANT_PLAUSIBLE)
    if bad.any() or flat.any():
        notes.append(
            f"{source}: {key} ({channel.label}): {int(bad.sum())} of {n_windows} windows with "
            f"NaN/inf, {int(flat.sum())} flat; modality absent there"
        )
    implausible = np.zeros_like(bad)
    if modality.plausible:
        implausible = ~window_in_range(values, bounds, modality.plausible) & ~(bad | flat)
    if implausible.any():
        expected = " or ".join(f"{low:g}-{high:g}" for low, high in modality.plausible)
        notes.append(
            f"{source}: {key} ({channel.label}): {int(implausible.sum())} of {n_windows} windows mostly "
            f"outside {expected} {modality.unit} (median {float(np.nanmedian(values)):.3g}: a disconnected "
            f"or AC-coupled channel?); modality absent there"
        )
    good = ~(bad | flat | implausible)
    if not good.any():
        return None
    if bad.any():
        values = np.where(np.isfinite(values), values, np.float32(0.0))
    resampled = resample(values, channel.sample_rate_hz, modality.store_rate_hz)
    windows = cut_windows(resampled, n_windows, epochs_per_window * modality.samples_per_epoch)
    # Statistics of the stored signal, from good windows only, so that a flat
    # or broken stretch does not set the scale of the rest of the night.
    center, spread = robust_scale(windows if good.all() else windows[good])
    return normalise(windows, center, spread).astype(np.float16), good


def _store_table(
    columns: dict[str, pa.Array],
    present: np.ndarray,
    stages: np.ndarray,
    events: np.ndarray | None,
    *,
    recording_id: str,
    subject_id: str,
    site: str,
    metadata: RecordingMetadata,
    epochs_per_window: int,
) -> pa.Table:
    """Assemble the rows of one night in the exact order and types of ``store_schema``."""
    n_windows = present.shape[0]
    everywhere = np.ones(n_windows, dtype=bool)
    window_stages = stages[: n_windows * epochs_per_window].reshape(n_windows, epochs_per_window)
    data = {
        "recording_id": pa.array([recording_id] * n_windows, pa.string()),
        "subject_id": pa.array([subject_id] * n_windows, pa.string()),
        "site": pa.array([site] * n_windows, pa.string()),
        "window_index": pa.array(np.arange(n_windows, dtype=np.int32)),
        "start_epoch": pa.array(np.arange(n_windows, dtype=np.int32) * epochs_per_window),
        "present": _list_column(present, everywhere, pa.bool_()),
        "stages": _list_column(window_stages, everywhere, pa.int8()),
        "age": pa.array([metadata.age] * n_windows, pa.float32()),
        "sex": pa.array([metadata.sex] * n_windows, pa.int8()),
        "outcomes": pa.array([sorted(metadata.outcomes.items())] * n_windows, pa.map_(pa.string(), pa.float64())),
        "events": (
            pa.nulls(n_windows, pa.list_(pa.int8()))
            if events is None
            else _list_column(
                events[: n_windows * epochs_per_window].reshape(n_windows, epochs_per_window), everywhere, pa.int8()
            )
        ),
    }
    for key in MODALITY_KEYS:
        data[key] = columns.get(key, pa.nulls(n_windows, pa.list_(pa.float16())))
    schema = store_schema(epochs_per_window)
    return pa.Table.from_arrays([data[field.name] for field in schema], schema=schema)


def decode_recording(
    signal_path: str,
    *,
    recording_id: str,
    site: SiteConfig,
    subject_id: str | None = None,
    metadata: RecordingMetadata | None = None,
    hypnogram_path: str | None = None,
    hypnogram_problem: str | None = None,
    epochs_per_window: int = 10,
) -> DecodedRecording:
    """Decode one local signal file (and its hypnogram) into store rows.

    Parameters
    ----------
    signal_path : str
        Local EDF/EDF+C/BDF file.
    recording_id : str
        Site-given recording id (never derived from header fields).
    site : SiteConfig
        Channel mapping, ignored channels and hypnogram settings of the site.
    subject_id : str, optional
        Subject of the night; default: ``metadata.subject_id`` or ``recording_id``.
    metadata : RecordingMetadata, optional
        Age (years), sex (0/1) and outcomes from the site table.
    hypnogram_path : str, optional
        Local hypnogram file; None: stages are -1.
    hypnogram_problem : str, optional
        Why there is no hypnogram (recorded as a note).
    epochs_per_window : int
        30-s epochs per store row (10 = 5 min).

    Returns
    -------
    DecodedRecording

    Raises
    ------
    UnreadableRecording
        With the one-line quarantine reason: unreadable file, no usable
        channel, implausible sampling rates, shorter than one window.
    """
    metadata = metadata or RecordingMetadata()
    notes: list[str] = [hypnogram_problem] if hypnogram_problem else []
    reader = open_signal(signal_path)
    try:
        header = reader.header
        notes.extend(header.notes)
        if not header.channels:
            raise UnreadableRecording(f"{signal_path}: no signal channels (annotation-only file?)")
        chosen, unknown = choose_channels(header.channels, site)
        usable, rejected = _usable_channels(chosen, signal_path)
        notes.extend(rejected)
        if not usable:
            found = ", ".join(f"{c.label} ({c.sample_rate_hz:g} Hz)" for c in header.channels[:12])
            why = (
                "; ".join(r.split(": ", 1)[1] for r in rejected)
                if rejected
                else f"no channel maps to a modality (found {found})"
            )
            raise UnreadableRecording(f"{signal_path}: no usable channel: {why}")
        window_seconds = epochs_per_window * EPOCH_SECONDS
        n_windows = int(header.duration_seconds // window_seconds)
        if n_windows < 1:
            raise UnreadableRecording(
                f"{signal_path}: {header.duration_seconds:g} s of signal is shorter "
                f"than one window ({window_seconds} s)"
            )
        n_epochs = int(header.duration_seconds // EPOCH_SECONDS)
        stages = _stages(hypnogram_path, site.hypnogram.format, site.hypnogram.epoch_seconds, n_epochs, notes)
        metadata, events = _with_scored_events(metadata, hypnogram_path, site.hypnogram.format, stages, notes)
        columns: dict[str, pa.Array] = {}
        present = np.zeros((n_windows, len(MODALITY_KEYS)), dtype=bool)
        for k, key in enumerate(MODALITY_KEYS):
            if key not in usable:
                continue
            # One channel at a time: memory stays at one channel plus the float16 windows so far.
            decoded = _modality_windows(
                reader.read(usable[key].index), usable[key], key, n_windows, epochs_per_window, notes, signal_path
            )
            if decoded is not None:
                windows, good = decoded
                columns[key] = _list_column(windows, good, pa.float16())
                present[:, k] = good
    finally:
        reader.close()
    if not present.any():
        raise UnreadableRecording(
            f"{signal_path}: every usable channel is NaN, flat or implausible in every window "
            f"({', '.join(f'{key} ({channel.label})' for key, channel in usable.items())})"
        )
    table = _store_table(
        columns,
        present,
        stages,
        events,
        recording_id=recording_id,
        subject_id=subject_id or metadata.subject_id or recording_id,
        site=site.name,
        metadata=metadata,
        epochs_per_window=epochs_per_window,
    )
    modalities = tuple(key for k, key in enumerate(MODALITY_KEYS) if present[:, k].any())
    return DecodedRecording(
        table=table,
        windows=n_windows,
        modalities=modalities,
        channels={key: usable[key].label for key in modalities},
        unknown_channels=unknown,
        notes=tuple(notes),
    )
