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
* Events are clipped to the signal before the stage grid is allocated, and
  events with non-finite times are ignored with a note: a broken hypnogram
  costs its stages, never memory or the night.
"""

from __future__ import annotations

import numpy as np

from s2v_core.io.base import Hypnogram, StageEvent
from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.store import UNKNOWN_STAGE

#: Normalised label -> store code (W=0 N1=1 N2=2 N3=3 REM=4, -1 unknown).
STAGE_VOCABULARY: dict[str, int] = {
    "w": 0,
    "wake": 0,
    "awake": 0,
    "1": 1,
    "n1": 1,
    "s1": 1,
    "2": 2,
    "n2": 2,
    "s2": 2,
    # R&K stage 3 and stage 4 together are AASM N3 (slow-wave sleep).
    "3": 3,
    "4": 3,
    "n3": 3,
    "n4": 3,
    "s3": 3,
    "s4": 3,
    "sws": 3,
    "r": 4,
    "rem": 4,
    "?": UNKNOWN_STAGE,
    "m": UNKNOWN_STAGE,
    "mt": UNKNOWN_STAGE,
    "movement": UNKNOWN_STAGE,
    "movement time": UNKNOWN_STAGE,
    "unscored": UNKNOWN_STAGE,
    "unknown": UNKNOWN_STAGE,
    "artifact": UNKNOWN_STAGE,
    "-1": UNKNOWN_STAGE,
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
            text = text[len(prefix) :]
    for suffix in _SUFFIXES:
        if text.endswith(suffix) and text != suffix.strip():
            text = text[: -len(suffix)]
    return STAGE_VOCABULARY.get(text)


#: Longest hypnogram span read (s): a week. Events beyond are dropped, so an absurd
#: onset (1e10 s) can never size the stage grid (it would be 9.3 GiB).
MAX_HYPNOGRAM_SECONDS = 7 * 86_400.0


def usable_events(
    hypnogram: Hypnogram, *, max_seconds: float | None = None
) -> tuple[tuple[StageEvent, ...], tuple[str, ...]]:
    """The events that can be placed on a recording, clipped to ``[0, max_seconds)``.

    Events with a non-finite onset or duration, or a negative duration, are
    dropped; events starting at or after ``max_seconds`` (the signal's length,
    at most :data:`MAX_HYPNOGRAM_SECONDS`) are dropped and the others cut
    there. Returns ``(events, notes)``; each note is one line naming
    ``hypnogram.source`` and counting what was dropped (never the values).
    """
    limit = MAX_HYPNOGRAM_SECONDS if max_seconds is None else min(float(max_seconds), MAX_HYPNOGRAM_SECONDS)
    kept, broken, beyond = [], 0, 0
    for event in hypnogram.events:
        onset, duration = event.onset_seconds, event.duration_seconds
        if not (np.isfinite(onset) and np.isfinite(duration)) or duration < 0:
            broken += 1
        elif onset >= limit:
            beyond += 1
        else:
            kept.append(StageEvent(onset, min(duration, limit - onset), event.stage))
    notes = []
    if broken:
        notes.append(
            f"{hypnogram.source}: {broken} of {len(hypnogram.events)} stage events have a non-finite "
            "onset/duration or a negative duration; ignored"
        )
    if beyond and max_seconds is None:
        notes.append(
            f"{hypnogram.source}: {beyond} stage events start more than "
            f"{MAX_HYPNOGRAM_SECONDS / 86_400:g} days after the recording start; ignored"
        )
    return tuple(kept), tuple(notes)


def epoch_stages(
    hypnogram: Hypnogram, *, epoch_seconds: float = EPOCH_SECONDS, max_seconds: float | None = None
) -> np.ndarray:
    """Stages per 30-s epoch from the recording start (int8, -1 where unscored).

    Parameters
    ----------
    hypnogram : Hypnogram
        Scored intervals in seconds from the recording start.
    epoch_seconds : float
        Output epoch length in seconds (30).
    max_seconds : float, optional
        Length of the signal in seconds: events are clipped there before the
        stage grid is allocated (see :func:`usable_events`, which also drops
        events with non-finite times).

    Returns
    -------
    ndarray of int8, shape ``(ceil(duration / epoch_seconds),)``
        ``duration`` is the end of the last usable event.
    """
    events, _ = usable_events(hypnogram, max_seconds=max_seconds)
    if not events:
        return np.zeros(0, dtype=np.int8)
    cells_per_epoch = int(round(epoch_seconds / _GRID_SECONDS))
    end = max(e.onset_seconds + e.duration_seconds for e in events)
    n_epochs = int(np.ceil(end / epoch_seconds - 1e-9))
    grid = np.full(n_epochs * cells_per_epoch, UNKNOWN_STAGE, dtype=np.int8)
    for event in events:
        start = max(int(round(event.onset_seconds / _GRID_SECONDS)), 0)
        stop = int(round((event.onset_seconds + event.duration_seconds) / _GRID_SECONDS))
        grid[start:stop] = event.stage
    return _majority(grid.reshape(n_epochs, cells_per_epoch))


def stages_for_signal(hypnogram: Hypnogram, n_epochs: int, *, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """30-s stages of a hypnogram aligned with a signal of ``n_epochs`` epochs, and the notes.

    Events are clipped to the signal before anything is allocated (an onset
    of 1e10 s costs nothing); events with non-finite times are ignored with
    a note; a hypnogram longer or shorter than the signal is aligned on the
    overlap with a note (see :func:`align_stages`).
    """
    signal_seconds = n_epochs * EPOCH_SECONDS
    events, notes = usable_events(hypnogram, max_seconds=signal_seconds)
    stages = epoch_stages(
        Hypnogram(events=events, epoch_seconds=hypnogram.epoch_seconds, source=hypnogram.source),
        max_seconds=signal_seconds,
    )
    # The hypnogram's own length, for the note only: counted, never allocated.
    finite_ends = [
        e.onset_seconds + e.duration_seconds
        for e in hypnogram.events
        if np.isfinite(e.onset_seconds) and np.isfinite(e.duration_seconds) and e.duration_seconds >= 0
    ]
    scored_epochs = int(np.ceil(max(finite_ends) / EPOCH_SECONDS - 1e-9)) if finite_ends else 0
    aligned, note = align_stages(stages, n_epochs, source=source, scored_epochs=scored_epochs)
    return aligned, notes + ((note,) if note else ())


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


def align_stages(
    stages: np.ndarray, n_epochs: int, *, source: str, scored_epochs: int | None = None
) -> tuple[np.ndarray, str | None]:
    """Align 30-s hypnogram stages with a signal of ``n_epochs`` epochs.

    Returns ``(aligned, note)``: ``aligned`` has exactly ``n_epochs`` int8
    entries, taken from the overlap and -1 elsewhere; ``note`` is a one-line
    warning when the lengths differ, else ``None``. ``scored_epochs`` is the
    hypnogram's own length when ``stages`` were already clipped to the signal
    (default ``len(stages)``).
    """
    scored = len(stages) if scored_epochs is None else scored_epochs
    aligned = np.full(n_epochs, UNKNOWN_STAGE, dtype=np.int8)
    overlap = min(len(stages), n_epochs)
    aligned[:overlap] = stages[:overlap]
    if scored == n_epochs:
        return aligned, None
    relation = "longer" if scored > n_epochs else "shorter"
    return aligned, (
        f"{source}: hypnogram ({scored} epochs) is {relation} than the signal "
        f"({n_epochs} epochs); stages aligned on the first {min(scored, n_epochs)} epochs, rest -1"
    )


def events_from_codes(
    codes: np.ndarray | list[int], *, epoch_seconds: float, onset_seconds: float = 0.0
) -> tuple[StageEvent, ...]:
    """Consecutive epochs of ``epoch_seconds`` (store codes) as merged stage events."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size == 0:
        return ()
    change = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [codes.size]])
    return tuple(
        StageEvent(onset_seconds + float(a) * epoch_seconds, float(b - a) * epoch_seconds, int(codes[a]))
        for a, b in zip(starts, stops)
    )
