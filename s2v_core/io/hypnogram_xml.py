"""NSRR XML hypnograms (``PSGAnnotation`` / ``ScoredEvent`` files of SHHS, MESA, ...).

Stage events have ``EventType`` ``"Stages|Stages"`` and an ``EventConcept``
such as ``"Wake|0"``, ``"Stage 2 sleep|2"``, ``"Stage 4 sleep|4"`` (R&K,
mapped to N3), ``"REM sleep|5"``, ``"Unscored|9"`` (-1). ``Start`` and
``Duration`` are seconds from the recording start.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from s2v_core.io.base import Hypnogram, StageEvent, UnreadableRecording
from s2v_core.io.stages import stage_code


def read_nsrr_xml(path: str | os.PathLike) -> Hypnogram:
    """Read the sleep stages of an NSRR XML annotation file.

    Parameters
    ----------
    path : str or path-like
        NSRR ``*-nsrr.xml`` / ``*-profusion``-converted XML file.

    Returns
    -------
    Hypnogram
        Stage events in seconds from the recording start, as written (times
        that are not finite are kept here and dropped, with a note, by
        :func:`~s2v_core.io.stages.stages_for_signal`).
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UnreadableRecording(f"{path}: not well-formed XML ({exc})") from None
    events, unknown = [], set()
    for number, scored in enumerate(root.iter("ScoredEvent"), start=1):
        event_type = (scored.findtext("EventType") or "").strip()
        if not event_type.casefold().startswith("stages"):
            continue
        concept = (scored.findtext("EventConcept") or "").strip()
        code = stage_code(concept)
        if code is None:
            unknown.add(concept)
            code = -1
        try:
            onset = float(scored.findtext("Start") or "")
            duration = float(scored.findtext("Duration") or "")
        except ValueError:
            # Which event, not what it holds: the file's text is never repeated in a message.
            raise UnreadableRecording(
                f"{path}: ScoredEvent {number} (a stage) lacks a numeric Start/Duration"
            ) from None
        events.append(StageEvent(onset, duration, code))
    if not events:
        raise UnreadableRecording(f"{path}: no ScoredEvent with EventType 'Stages|Stages'")
    events.sort(key=lambda e: e.onset_seconds)
    notes = (f"{path}: {len(unknown)} unknown stage concepts read as -1",) if unknown else ()
    scoring_epoch = float(np.min([e.duration_seconds for e in events]))
    return Hypnogram(events=tuple(events), epoch_seconds=scoring_epoch, source=path, notes=notes)
