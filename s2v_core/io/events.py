"""Scored respiratory and desaturation events of NSRR XML files → per-night event indices.

NSRR annotation files (SHHS, MESA, CHAT …) score, next to the stages,
``ScoredEvent`` elements such as::

    <EventType>Respiratory|Respiratory</EventType>
    <EventConcept>Obstructive apnea|Obstructive Apnea</EventConcept>   (also Central / Mixed apnea)
    <EventConcept>Hypopnea|Hypopnea</EventConcept>
    <EventConcept>SpO2 desaturation|SpO2 desaturation</EventConcept>

:func:`event_indices` turns them into the clinical indices the store carries
as outcomes: events per hour of sleep, counting events that start in a 30-s
epoch scored as sleep (N1, N2, N3, REM), the AASM convention of dividing by
total sleep time:

- ``ahi_scored``: apnoeas + hypopnoeas per hour of sleep (events/h);
- ``oahi_scored``: obstructive apnoeas + hypopnoeas per hour (events/h);
- ``odi_scored``: oxygen desaturations per hour of sleep (events/h).

:func:`epoch_event_flags` turns the same events, and the arousals
(``EventType`` ``Arousals|Arousals``), into per-epoch labels for the store's
``events`` column: one bitmask per 30-s epoch (:data:`EVENT_FLAGS`), an event
marking every epoch its ``[Start, Start + Duration)`` span overlaps.

An index is given only when its events were scored in the file (a file with
no desaturation event at all gives no ODI rather than 0), and none without a
sleep epoch. Hypopnoea criteria (3 % or 4 % desaturation, arousal) are the
scoring site's; NSRR tables also derive indices per criterion, which a site's
metadata table may carry instead (its values win, see ``s2v_core.recording``).
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from s2v_core.io.base import UnreadableRecording
from s2v_core.modalities import EPOCH_SECONDS

#: EventConcept (before the ``|``, lower case) → event kind.
EVENT_KINDS = {
    "obstructive apnea": "obstructive_apnea",
    "central apnea": "central_apnea",
    "mixed apnea": "mixed_apnea",
    "hypopnea": "hypopnea",
    "obstructive hypopnea": "hypopnea",
    "central hypopnea": "hypopnea",
    "spo2 desaturation": "desaturation",
}
#: ``EventType`` (before the ``|``, lower case) whose events are arousals, whatever their concept
#: (NSRR writes ``Arousal|Arousal ()``, ``ASDA arousal|Arousal (ASDA)``, ``Arousal (Standard)`` …).
AROUSAL_EVENT_TYPE = "arousals"
#: Per-epoch label bits of the store's ``events`` column: flag → the event kinds that set it.
EVENT_FLAGS: dict[str, tuple[tuple[str, ...], int]] = {
    "apnea": (("obstructive_apnea", "central_apnea", "mixed_apnea"), 1),
    "hypopnea": (("hypopnea",), 2),
    "desaturation": (("desaturation",), 4),
    "arousal": (("arousal",), 8),
}
#: Index name → the event kinds it counts.
INDICES = {
    "ahi_scored": ("obstructive_apnea", "central_apnea", "mixed_apnea", "hypopnea"),
    "oahi_scored": ("obstructive_apnea", "hypopnea"),
    "odi_scored": ("desaturation",),
}


@dataclass(frozen=True)
class ScoredEvents:
    """Onsets and durations (seconds from the recording start) of each event kind found in a file."""

    onsets: dict[str, np.ndarray]
    source: str
    # Seconds per event, aligned with ``onsets`` (0 where the file gives none or a bad one).
    durations: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def read_nsrr_events(path: str | os.PathLike) -> ScoredEvents:
    """Read the respiratory, desaturation and arousal events of an NSRR XML annotation file.

    Events with a non-numeric or non-finite ``Start`` are skipped; other event
    types (limb movements, stages) are ignored here.
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UnreadableRecording(f"{path}: not well-formed XML ({exc})") from None
    onsets: dict[str, list[float]] = {}
    durations: dict[str, list[float]] = {}
    for scored in root.iter("ScoredEvent"):
        concept = (scored.findtext("EventConcept") or "").split("|")[0].strip().casefold()
        event_type = (scored.findtext("EventType") or "").split("|")[0].strip().casefold()
        kind = "arousal" if event_type == AROUSAL_EVENT_TYPE else EVENT_KINDS.get(concept)
        if kind is None:
            continue
        onset, duration = _seconds(scored.findtext("Start")), _seconds(scored.findtext("Duration"))
        if onset is None:
            continue
        onsets.setdefault(kind, []).append(onset)
        durations.setdefault(kind, []).append(duration if duration is not None and duration > 0 else 0.0)
    return ScoredEvents(
        onsets={k: np.asarray(v, dtype=np.float64) for k, v in onsets.items()},
        source=path,
        durations={k: np.asarray(v, dtype=np.float64) for k, v in durations.items()},
    )


def _seconds(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def epoch_event_flags(events: ScoredEvents, n_epochs: int) -> np.ndarray:
    """Per-epoch event labels: ``int8 (n_epochs,)``, the OR of :data:`EVENT_FLAGS` bits.

    An event marks each 30-s epoch that its span ``[onset, onset + duration)``
    overlaps (an event without a duration marks the epoch of its onset), so a
    40-s apnoea starting at 50 s marks epochs 1 and 2. Parts outside
    ``0 .. n_epochs`` are clipped. Epochs without an event are 0: the file
    scored events and found none there.

    Parameters
    ----------
    events : ScoredEvents
        From :func:`read_nsrr_events`; onsets and durations in s from the recording start.
    n_epochs : int
        Epochs of the night (30 s each).
    """
    flags = np.zeros(n_epochs, dtype=np.int8)
    for kinds, bit in EVENT_FLAGS.values():
        for kind in kinds:
            if kind not in events.onsets:
                continue
            onsets = events.onsets[kind]
            durations = events.durations.get(kind, np.zeros_like(onsets))
            first = np.floor(onsets / EPOCH_SECONDS).astype(np.int64)
            # The last epoch the span reaches into ([start, end) half-open), at least the first.
            last = np.maximum(first, np.ceil((onsets + durations) / EPOCH_SECONDS).astype(np.int64) - 1)
            for a, b in zip(np.clip(first, 0, n_epochs), np.clip(last + 1, 0, n_epochs)):
                flags[a:b] |= bit
    return flags


def event_indices(events: ScoredEvents, stages: np.ndarray) -> dict[str, float]:
    """Events per hour of sleep (see the module docstring) from the night's 30-s stage codes.

    Parameters
    ----------
    events : ScoredEvents
    stages : ndarray
        One code per 30-s epoch from the recording start (W=0, N1=1, N2=2, N3=3, REM=4, −1 unknown).

    Returns
    -------
    dict of str to float
        The indices whose events the file scored (events/h); empty without a sleep epoch.
    """
    stages = np.asarray(stages)
    asleep = (stages >= 1) & (stages <= 4)
    sleep_hours = asleep.sum() * EPOCH_SECONDS / 3600.0
    if sleep_hours == 0:
        return {}
    indices = {}
    for name, kinds in INDICES.items():
        scored = [events.onsets[k] for k in kinds if k in events.onsets]
        if not scored:
            continue
        epochs = np.floor(np.concatenate(scored) / EPOCH_SECONDS).astype(np.int64)
        inside = (epochs >= 0) & (epochs < len(stages))
        count = int(asleep[epochs[inside]].sum())
        indices[name] = count / sleep_hours
    return indices
