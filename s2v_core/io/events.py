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

An index is given only when its events were scored in the file (a file with
no desaturation event at all gives no ODI rather than 0), and none without a
sleep epoch. Hypopnoea criteria (3 % or 4 % desaturation, arousal) are the
scoring site's; NSRR tables also derive indices per criterion, which a site's
metadata table may carry instead (its values win, see ``s2v_core.recording``).
"""

from __future__ import annotations

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
#: Index name → the event kinds it counts.
INDICES = {
    "ahi_scored": ("obstructive_apnea", "central_apnea", "mixed_apnea", "hypopnea"),
    "oahi_scored": ("obstructive_apnea", "hypopnea"),
    "odi_scored": ("desaturation",),
}


@dataclass(frozen=True)
class ScoredEvents:
    """Onsets (seconds from the recording start) of each event kind found in a file."""

    onsets: dict[str, np.ndarray]
    source: str


def read_nsrr_events(path: str | os.PathLike) -> ScoredEvents:
    """Read the respiratory and desaturation events of an NSRR XML annotation file.

    Events with a non-numeric or non-finite ``Start`` are skipped; other event
    types (arousals, limb movements, stages) are ignored here.
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UnreadableRecording(f"{path}: not well-formed XML ({exc})") from None
    onsets: dict[str, list[float]] = {}
    for scored in root.iter("ScoredEvent"):
        concept = (scored.findtext("EventConcept") or "").split("|")[0].strip().casefold()
        kind = EVENT_KINDS.get(concept)
        if kind is None:
            continue
        try:
            onset = float(scored.findtext("Start") or "")
        except ValueError:
            continue
        if np.isfinite(onset):
            onsets.setdefault(kind, []).append(onset)
    return ScoredEvents(onsets={k: np.asarray(v, dtype=np.float64) for k, v in onsets.items()}, source=path)


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
