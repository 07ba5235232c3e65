"""The typed contract every reader of :mod:`s2v_core.io` returns.

Readers are small modules, one per format, dispatched by a table (see
:mod:`s2v_core.io.edf` for signals and :mod:`s2v_core.io.hypnogram` for
stages). They all hand back the dataclasses below, never untyped dicts.

Privacy: the EDF patient and recording identification fields, the start
date and the start time are *never* copied into these dataclasses; the
readers skip them while parsing, so nothing downstream (store, manifest,
logs, MLflow) can leak them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class UnreadableRecording(ValueError):
    """A file that cannot be ingested; the message is the one-line quarantine reason.

    Messages name the file and the problem (what was expected, what was
    found), e.g. ``"a.edf: not an EDF/BDF file (version field b'PK\\x03\\x04...')"``.
    """


@dataclass(frozen=True)
class ChannelHeader:
    """One signal channel of a recording (no annotation channels).

    Parameters
    ----------
    index : int
        Position of the channel among the file's signals (annotation channels
        included), as the reader's ``read(index)`` expects it.
    label : str
        Channel label as written in the header, stripped.
    unit : str
        Physical unit normalised for display (``"uV"``, ``"mV"``, ``"%"``,
        ``"bpm"``; unknown strings kept as written). Values returned by
        ``read`` are in this unit.
    sample_rate_hz : float
        Samples per second.
    samples_per_record : int
        Samples of this channel in one data record.
    physical_min, physical_max : float
        Physical range declared in the header (in ``unit``).
    digital_min, digital_max : int
        Digital range declared in the header.
    """

    index: int
    label: str
    unit: str
    sample_rate_hz: float
    samples_per_record: int
    physical_min: float
    physical_max: float
    digital_min: int
    digital_max: int


@dataclass(frozen=True)
class SignalHeader:
    """What a signal reader reports about a recording (free of header PHI).

    Parameters
    ----------
    path : str
        The file that was read.
    file_type : str
        ``"EDF"``, ``"EDF+C"``, ``"BDF"`` or ``"BDF+C"``.
    n_records : int
        Complete data records that will be read.
    record_seconds : float
        Duration of one data record in seconds.
    channels : tuple of ChannelHeader
        Signal channels (annotation channels excluded).
    reader : str
        Which backend decoded the file (``"pyedflib"`` or ``"numpy"``, the
        fallback for non-compliant files).
    notes : tuple of str
        Problems the reader worked around (e.g. a truncated last record);
        each one line naming the file.
    """

    path: str
    file_type: str
    n_records: int
    record_seconds: float
    channels: tuple[ChannelHeader, ...]
    reader: str
    notes: tuple[str, ...] = ()

    @property
    def duration_seconds(self) -> float:
        """Duration of the readable data in seconds."""
        return self.n_records * self.record_seconds


class SignalFile(Protocol):
    """An open recording: its header and per-channel access to physical values."""

    header: SignalHeader

    def read(self, index: int) -> np.ndarray:
        """Physical values of channel ``index`` as float32 in ``channel.unit``."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StageEvent:
    """One scored interval of a hypnogram, relative to the recording start.

    Parameters
    ----------
    onset_seconds : float
        Start of the interval in seconds from the recording start.
    duration_seconds : float
        Length of the interval in seconds (a multiple of the scoring epoch).
    stage : int
        Store stage code: W=0 N1=1 N2=2 N3=3 REM=4, -1 unknown/movement.
    """

    onset_seconds: float
    duration_seconds: float
    stage: int


@dataclass(frozen=True)
class Hypnogram:
    """Stages of one night as read from a hypnogram file (before 30-s reduction).

    Parameters
    ----------
    events : tuple of StageEvent
        Scored intervals in onset order.
    epoch_seconds : float
        The file's scoring epoch in seconds (30 for AASM/R&K, 5 for DREAMS).
    source : str
        The file that was read.
    notes : tuple of str
        Labels that were not sleep stages and were skipped, etc.
    """

    events: tuple[StageEvent, ...]
    epoch_seconds: float
    source: str
    notes: tuple[str, ...] = ()

    @property
    def duration_seconds(self) -> float:
        """End of the last scored interval, in seconds from the recording start."""
        if not self.events:
            return 0.0
        return max(e.onset_seconds + e.duration_seconds for e in self.events)
