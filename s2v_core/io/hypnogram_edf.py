"""EDF+ annotation hypnograms (Sleep-EDF R&K wording, HMC AASM wording).

Annotations whose text is a sleep stage (``"Sleep stage W/1/2/3/4/R/?"``,
``"Sleep stage N1/N2/N3"``, ``"Movement time"``) become stage events; other
annotations (``"Lights off"``, arousals) are skipped and counted in a note.
The annotations may sit in an annotation-only file or in the annotation
channel of the signal file itself.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from s2v_core.io.base import Hypnogram, StageEvent, UnreadableRecording
from s2v_core.io.edf import NumpyEdfReader, parse_tal, read_layout
from s2v_core.io.stages import stage_code
from s2v_core.modalities import EPOCH_SECONDS

logger = logging.getLogger(__name__)


def _annotations(path: str) -> list[tuple[float, float, str]]:
    """``(onset s, duration s, text)`` of every annotation, pyedflib first, numpy fallback."""
    layout = read_layout(path)
    if layout.consistent:
        try:
            import pyedflib

            reader = pyedflib.EdfReader(path)
            try:
                onsets, durations, texts = reader.readAnnotations()
            finally:
                reader.close()
            return [(float(o), float(d), str(t)) for o, d, t in zip(onsets, durations, texts)]
        except OSError as exc:
            logger.debug("pyedflib refused %s (%s); parsing annotations with numpy", path, exc)
    reader = NumpyEdfReader(path, layout=layout)
    try:
        return parse_tal(reader.read_annotation_bytes())
    finally:
        reader.close()


def read_edf_annotations(path: str | os.PathLike, *, epoch_seconds: float = EPOCH_SECONDS) -> Hypnogram:
    """Read the sleep stages of an EDF+ file's annotations.

    Parameters
    ----------
    path : str or path-like
        EDF+/BDF+ file (annotation-only or with signals).
    epoch_seconds : float
        Duration in seconds assumed for a stage annotation that has none.

    Returns
    -------
    Hypnogram
        Stage events in seconds from the file's start; ``epoch_seconds`` is
        the shortest stage duration found (the scoring epoch).
    """
    path = str(path)
    events, skipped = [], set()
    for onset, duration, text in _annotations(path):
        code = stage_code(text)
        if code is None:
            skipped.add(text)
            continue
        events.append(StageEvent(onset, duration if duration > 0 else epoch_seconds, code))
    if not events:
        raise UnreadableRecording(f"{path}: no sleep-stage annotations among {len(skipped)} annotation texts")
    events.sort(key=lambda e: e.onset_seconds)
    scoring_epoch = float(np.min([e.duration_seconds for e in events]))
    notes = (f"{path}: skipped {len(skipped)} non-stage annotation texts",) if skipped else ()
    return Hypnogram(events=tuple(events), epoch_seconds=scoring_epoch, source=path, notes=notes)
