"""Sleep-stage vocabulary, reduction to 30-s epochs and alignment with a signal.

Clinical conventions applied here, once for every hypnogram format:

* R&K stages 3 and 4 are both slow-wave sleep: they map to AASM N3.
* Movement time, unscored and ``?`` epochs map to -1 (unknown), as do gaps
  between scored intervals.
* Hypnograms scored in epochs shorter than 30 s (DREAMS: 5 s) are reduced to
  30-s epochs by majority; a tie goes to the stage scored first in the epoch.
* A hypnogram longer or shorter than its signal is aligned on the overlap
  (both start at the recording start): signal epochs outside the hypnogram
  get -1, hypnogram epochs beyond the signal are dropped, and a note says so.
  Nothing is ever shifted.
"""

from __future__ import annotations

import numpy as np

from s2v_core.io.base import Hypnogram, StageEvent
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.store import UNKNOWN_STAGE

#: Normalised label -> store code (W=0 N1=1 N2=2 N3=3 REM=4, -1 unknown).
STAGE_VOCABULARY: dict[str, int] = {
    "w": 0, "wake": 0, "awake": 0,
    "1": 1, "n1": 1, "s1": 1,
    "2": 2, "n2": 2, "s2": 2,
    # R&K stage 3 and stage 4 together are AASM N3 (slow-wave sleep).
    "3": 3, "4": 3, "n3": 3, "n4": 3, "s3": 3, "s4": 3, "sws": 3,
    "r": 4, "rem": 4,
    "?": UNKNOWN_STAGE, "m": UNKNOWN_STAGE, "mt": UNKNOWN_STAGE, "movement": UNKNOWN_STAGE,
    "movement time": UNKNOWN_STAGE, "unscored": UNKNOWN_STAGE, "unknown": UNKNOWN_STAGE,
    "artifact": UNKNOWN_STAGE, "-1": UNKNOWN_STAGE,
}
_PREFIXES = ("sleep stage ", "sleep_stage_", "stage ")
_SUFFIXES = (" sleep",)
# One grid cell per second: every scoring epoch in use (5, 20, 30 s) is a whole
# number of seconds, and a 24-h hypnogram is only 86,400 int8 cells.
_GRID_SECONDS = 1.0


def stage_code(label: str) -> int | None:
    """Store code of a stage label, or ``None`` when the label is not a sleep stage.

    Accepts Sleep-EDF/R&K wording (``"Sleep stage 4"``), AASM wording
    (``"Sleep stage N2"``), NSRR concepts (``"Stage 2 sleep|2"``,
    ``"REM sleep|5"``, ``"Wake|0"``) and short codes (``W``, ``N3``, ``R``).
    """
    text = " ".join(label.split("|")[0].strip().casefold().split())
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
    for suffix in _SUFFIXES:
        if text.endswith(suffix) and text != suffix.strip():
            text = text[: -len(suffix)]
    return STAGE_VOCABULARY.get(text)


def epoch_stages(hypnogram: Hypnogram, *, epoch_seconds: float = EPOCH_SECONDS) -> np.ndarray:
    """Stages per 30-s epoch from the recording start (int8, -1 where unscored).

    Parameters
    ----------
    hypnogram : Hypnogram
        Scored intervals in seconds from the recording start.
    epoch_seconds : float
        Output epoch length in seconds (30).

    Returns
    -------
    ndarray of int8, shape ``(ceil(duration / epoch_seconds),)``
    """
    if not hypnogram.events:
        return np.zeros(0, dtype=np.int8)
    cells_per_epoch = int(round(epoch_seconds / _GRID_SECONDS))
    n_epochs = int(np.ceil(hypnogram.duration_seconds / epoch_seconds - 1e-9))
    grid = np.full(n_epochs * cells_per_epoch, UNKNOWN_STAGE, dtype=np.int8)
    for event in hypnogram.events:
        start = max(int(round(event.onset_seconds / _GRID_SECONDS)), 0)
        stop = int(round((event.onset_seconds + event.duration_seconds) / _GRID_SECONDS))
        grid[start:stop] = event.stage
    return _majority(grid.reshape(n_epochs, cells_per_epoch))


def _majority(cells: np.ndarray) -> np.ndarray:
    """Most frequent code per row; ties go to the code that appears first in the row."""
    codes = np.arange(UNKNOWN_STAGE, 5, dtype=np.int8)
    width = cells.shape[1]
    score = np.empty((cells.shape[0], len(codes)), dtype=np.int64)
    for k, code in enumerate(codes):
        hits = cells == code
        first = np.where(hits.any(axis=1), hits.argmax(axis=1), width)
        # count dominates; among equal counts the earlier first occurrence wins.
        score[:, k] = hits.sum(axis=1) * (width + 1) + (width - first)
    return codes[score.argmax(axis=1)].astype(np.int8)


def align_stages(stages: np.ndarray, n_epochs: int, *, source: str) -> tuple[np.ndarray, str | None]:
    """Align 30-s hypnogram stages with a signal of ``n_epochs`` epochs.

    Returns ``(aligned, note)``: ``aligned`` has exactly ``n_epochs`` int8
    entries, taken from the overlap and -1 elsewhere; ``note`` is a one-line
    warning when the lengths differ, else ``None``.
    """
    aligned = np.full(n_epochs, UNKNOWN_STAGE, dtype=np.int8)
    overlap = min(len(stages), n_epochs)
    aligned[:overlap] = stages[:overlap]
    if len(stages) == n_epochs:
        return aligned, None
    relation = "longer" if len(stages) > n_epochs else "shorter"
    return aligned, (f"{source}: hypnogram ({len(stages)} epochs) is {relation} than the signal "
                     f"({n_epochs} epochs); stages aligned on the first {overlap} epochs, rest -1")


def events_from_codes(codes: np.ndarray | list[int], *, epoch_seconds: float,
                      onset_seconds: float = 0.0) -> tuple[StageEvent, ...]:
    """Consecutive epochs of ``epoch_seconds`` (store codes) as merged stage events."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size == 0:
        return ()
    change = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [codes.size]])
    return tuple(StageEvent(onset_seconds + float(a) * epoch_seconds, float(b - a) * epoch_seconds, int(codes[a]))
                 for a, b in zip(starts, stops))
