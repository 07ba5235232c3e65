"""Plain-text hypnograms: CSV/TSV stage lists and DREAMS ``[Hypnogram]`` files.

CSV/TSV (delimiter from the extension, else sniffed among ``,``, tab and
``;``): one row per scoring epoch. A header row is optional; when present,
the stage column is the one named ``stage``, ``sleep_stage``, ``label`` or
``hypnogram`` (else the last column), and an ``onset``/``start`` column in
seconds, if any, gives each epoch's start. Stage values are either stage
names (``W``, ``N1``, ``R``, ``Sleep stage 3``, ...) or integers in the store
coding (0=W 1=N1 2=N2 3=N3 4=REM, anything else -1).

DREAMS text: a ``[Hypnogram]`` header line, then one R&K code per line per
5-s epoch: 5=W, 4=REM, 3=S1, 2=S2, 1=S3, 0=S4 (S3 and S4 -> N3), others -1.
DREAMS recordings carry the same codes in a 1-Hz ``hypnogram`` channel,
read by :func:`read_dreams_channel`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from s2v_core.io.base import Hypnogram, StageEvent, UnreadableRecording
from s2v_core.io.stages import events_from_codes, stage_code
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.store import UNKNOWN_STAGE

#: DREAMS R&K code -> store code (S3 and S4 together are N3).
DREAMS_CODES = {5: 0, 4: 4, 3: 1, 2: 2, 1: 3, 0: 3}
DREAMS_EPOCH_SECONDS = 5.0
_STAGE_COLUMNS = ("stage", "sleep_stage", "sleep stage", "label", "hypnogram", "stages")
_ONSET_COLUMNS = ("onset", "start", "onset_s", "start_s", "time")


def _csv_value(text: str) -> int:
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        code = stage_code(text)
        return UNKNOWN_STAGE if code is None else code
    # Numbers are store codes; R&K numbers must be written as labels ("Sleep stage 4").
    return int(number) if number in (0, 1, 2, 3, 4) else UNKNOWN_STAGE


def read_stage_csv(path: str | os.PathLike, *, epoch_seconds: float = EPOCH_SECONDS) -> Hypnogram:
    """Read a CSV/TSV hypnogram with one stage per scoring epoch.

    Parameters
    ----------
    path : str or path-like
        ``.csv``, ``.tsv`` or ``.txt`` file.
    epoch_seconds : float
        Scoring epoch in seconds of rows without an onset column (30 s; 5 s
        for DREAMS-like files).
    """
    path = str(path)
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UnreadableRecording(f"{path}: empty hypnogram file")
    if path.lower().endswith(".tsv"):
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(lines[0] + "\n" + "\n".join(lines[1:5]), delimiters=",\t;").delimiter
        except csv.Error:
            delimiter = ","
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    first = [cell.strip().casefold() for cell in rows[0]]
    has_header = any(c in _STAGE_COLUMNS or c in _ONSET_COLUMNS for c in first) or (
        len(first) == 1 and stage_code(first[0]) is None and not _is_number(first[0])
    )
    stage_col, onset_col = len(first) - 1, None
    if has_header:
        stage_col = next((i for i, c in enumerate(first) if c in _STAGE_COLUMNS), len(first) - 1)
        onset_col = next((i for i, c in enumerate(first) if c in _ONSET_COLUMNS), None)
        rows = rows[1:]
    if not rows:
        raise UnreadableRecording(f"{path}: hypnogram has a header but no stage rows")
    first_row = 2 if has_header else 1
    for number, row in enumerate(rows, start=first_row):
        if len(row) <= max(stage_col, onset_col or 0):
            raise UnreadableRecording(
                f"{path}: non-empty row {number} has {len(row)} cells, expected at least "
                f"{max(stage_col, onset_col or 0) + 1}"
            )
        if onset_col is not None and not _is_number(row[onset_col]):
            # The row's text is never repeated: a misnamed file may hold patient data.
            raise UnreadableRecording(f"{path}: non-empty row {number}: the onset cell is not a number")
    codes = [_csv_value(row[stage_col]) for row in rows]
    if onset_col is None:
        events = events_from_codes(codes, epoch_seconds=epoch_seconds)
    else:
        events = tuple(StageEvent(float(row[onset_col]), epoch_seconds, code) for row, code in zip(rows, codes))
    return Hypnogram(
        events=tuple(sorted(events, key=lambda e: e.onset_seconds)), epoch_seconds=epoch_seconds, source=path
    )


def _is_number(text: str, *, finite: bool = False) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) or not finite


def read_dreams_txt(path: str | os.PathLike, *, epoch_seconds: float = DREAMS_EPOCH_SECONDS) -> Hypnogram:
    """Read a DREAMS ``[Hypnogram]`` text file (R&K codes, 5-s epochs).

    Parameters
    ----------
    path : str or path-like
        ``Hypnogram_excerptN.txt``.
    epoch_seconds : float
        Scoring epoch in seconds (DREAMS: 5 s).
    """
    path = str(path)
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    if not lines or not lines[0].startswith("["):
        raise UnreadableRecording(f"{path}: expected a '[Hypnogram]' header line, found another first line")
    bad = next((number for number, line in enumerate(lines[1:], start=2) if not _is_number(line, finite=True)), None)
    if bad is not None:
        raise UnreadableRecording(f"{path}: non-empty line {bad} is not a numeric DREAMS stage code")
    raw = [int(float(line)) for line in lines[1:]]
    codes = [DREAMS_CODES.get(value, UNKNOWN_STAGE) for value in raw]
    return Hypnogram(
        events=events_from_codes(codes, epoch_seconds=epoch_seconds), epoch_seconds=epoch_seconds, source=path
    )


def read_dreams_channel(
    values: np.ndarray, sample_rate_hz: float, *, source: str, epoch_seconds: float = DREAMS_EPOCH_SECONDS
) -> Hypnogram:
    """Read DREAMS R&K codes from a hypnogram *channel* (1 Hz in the DREAMS EDFs).

    Parameters
    ----------
    values : ndarray
        Physical values of the channel (R&K codes, constant within an epoch).
    sample_rate_hz : float
        Channel sampling rate in Hz.
    source : str
        File and channel, for messages.
    epoch_seconds : float
        Scoring epoch in seconds (5 s); each epoch takes the code at its centre.
    """
    per_epoch = sample_rate_hz * epoch_seconds
    n_epochs = int(len(values) // per_epoch)
    centres = ((np.arange(n_epochs) + 0.5) * per_epoch).astype(np.int64)
    raw = np.rint(np.asarray(values, dtype=np.float64)[centres]).astype(np.int64)
    codes = [DREAMS_CODES.get(int(value), UNKNOWN_STAGE) for value in raw]
    return Hypnogram(
        events=events_from_codes(codes, epoch_seconds=epoch_seconds), epoch_seconds=epoch_seconds, source=source
    )
