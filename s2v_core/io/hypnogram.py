"""Hypnogram dispatch: one reader per format, chosen by a table.

``read_hypnogram(path, format=...)`` returns a :class:`~s2v_core.io.base.Hypnogram`;
:func:`~s2v_core.io.stages.epoch_stages` turns it into 30-s stages and
:func:`~s2v_core.io.stages.align_stages` aligns them with the signal.
"""

from __future__ import annotations

import os
from pathlib import Path

from s2v_core.io.base import Hypnogram, UnreadableRecording
from s2v_core.io.hypnogram_csv import read_dreams_txt, read_stage_csv
from s2v_core.io.hypnogram_edf import read_edf_annotations
from s2v_core.io.hypnogram_xml import read_nsrr_xml
from s2v_core.modalities import EPOCH_SECONDS

#: Site-config format name -> reader(path, epoch_seconds) (the dispatch table).
HYPNOGRAM_READERS = {
    "edf_annotations": lambda path, epoch_seconds: read_edf_annotations(path),
    "nsrr_xml": lambda path, epoch_seconds: read_nsrr_xml(path),
    "csv": lambda path, epoch_seconds: read_stage_csv(path, epoch_seconds=epoch_seconds),
    "dreams_txt": lambda path, epoch_seconds: read_dreams_txt(path, epoch_seconds=epoch_seconds),
}
_BY_EXTENSION = {".edf": "edf_annotations", ".bdf": "edf_annotations", ".xml": "nsrr_xml", ".csv": "csv", ".tsv": "csv"}


def detect_format(path: str | os.PathLike) -> str:
    """The reader for ``format="auto"``: by extension, and by content for ``.txt``."""
    suffix = Path(path).suffix.lower()
    if suffix in _BY_EXTENSION:
        return _BY_EXTENSION[suffix]
    if suffix == ".txt":
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline().strip()
        return "dreams_txt" if first.startswith("[Hypnogram") else "csv"
    raise UnreadableRecording(
        f"{path}: cannot tell the hypnogram format from {suffix!r}; set [hypnogram].format to one of "
        f"{', '.join(HYPNOGRAM_READERS)}"
    )


def read_hypnogram(path: str | os.PathLike, *, format: str = "auto", epoch_seconds: float = EPOCH_SECONDS) -> Hypnogram:
    """Read a hypnogram file of any supported format.

    Parameters
    ----------
    path : str or path-like
        Hypnogram file.
    format : str
        ``"auto"`` or a key of :data:`HYPNOGRAM_READERS`.
    epoch_seconds : float
        Scoring epoch in seconds of formats without times (CSV, DREAMS text).
    """
    if not os.path.exists(path):
        raise UnreadableRecording(f"{path}: hypnogram file does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableRecording(f"{path}: empty hypnogram file")
    name = detect_format(path) if format == "auto" else format
    if name not in HYPNOGRAM_READERS:
        raise ValueError(f"hypnogram format {name!r}: expected auto or one of {', '.join(HYPNOGRAM_READERS)}")
    if name == "dreams_txt" and format == "auto" and epoch_seconds == EPOCH_SECONDS:
        epoch_seconds = 5.0  # DREAMS files are scored in 5-s epochs unless the site says otherwise
    return HYPNOGRAM_READERS[name](str(path), epoch_seconds)
