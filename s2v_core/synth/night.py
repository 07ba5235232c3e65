"""One synthetic night: the subject, the hypnogram, respiratory events and arousals.

Every signal of a recording is derived from this one description, so that
EEG, EOG, EMG, heart rate, respiration and SpO2 tell the same story: an
obstructive apnoea stops airflow while effort goes on, SpO2 falls after a
circulation delay, and the event ends in an arousal that raises EEG alpha,
chin EMG and heart rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth.hypnogram import N1, N2, N3, REM, NightHypnogram, W, simulate_hypnogram

#: Respiratory event kinds (AASM): obstructive apnoea, central apnoea, hypopnoea.
OBSTRUCTIVE, CENTRAL, HYPOPNOEA = 0, 1, 2
EVENT_NAMES = {OBSTRUCTIVE: "Obstructive apnea", CENTRAL: "Central apnea", HYPOPNOEA: "Hypopnea"}
# Relative event rate per stage: apnoeas cluster in REM and light NREM, are rare in N3.
_EVENT_STAGE_WEIGHT = {N1: 1.0, N2: 1.0, N3: 0.3, REM: 2.0}


@dataclass(frozen=True)
class Subject:
    """Who sleeps, and the physiological traits that make their signals theirs.

    Attributes
    ----------
    age : float
        Years.
    sex : int
        0 female, 1 male.
    ahi : float
        Apnoea-hypopnoea index in events per hour of sleep.
    heart_rate_bpm : float
        Resting heart rate in N2, beats per minute.
    breathing_rate_bpm : float
        Breathing rate in N2, breaths per minute.
    spo2_baseline : float
        Awake SpO2 in %.
    eeg_scale : float
        Subject EEG amplitude factor (skull thickness, sex, age).
    alpha_hz : float
        Individual alpha peak frequency in Hz (slower with age).
    spindle_hz : float
        Sleep-spindle frequency in Hz.
    """

    age: float
    sex: int
    ahi: float
    heart_rate_bpm: float
    breathing_rate_bpm: float
    spo2_baseline: float
    eeg_scale: float
    alpha_hz: float
    spindle_hz: float


def draw_subject(*, age: float, sex: int, ahi: float, rng: np.random.Generator) -> Subject:
    """Draw the physiological traits of a subject of given age, sex and AHI.

    Parameters
    ----------
    age : float
        Age in years.
    sex : int
        0 female, 1 male.
    ahi : float
        Apnoea-hypopnoea index in events per hour of sleep.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    Subject
        Resting heart rate (bpm), breathing rate (breaths/min), SpO2 baseline (%),
        EEG amplitude factor, alpha and spindle frequencies (Hz).
    """
    return Subject(
        age=float(age),
        sex=int(sex),
        ahi=float(ahi),
        heart_rate_bpm=float(np.clip(rng.normal(64.0 - 3.0 * sex, 7.0), 48.0, 90.0)),
        breathing_rate_bpm=float(np.clip(rng.normal(14.0, 1.5), 10.0, 20.0)),
        # SpO2 falls slightly with age and with apnoea severity.
        spo2_baseline=float(np.clip(rng.normal(97.0 - 0.03 * (age - 40.0) - 0.03 * ahi, 0.8), 91.0, 99.0)),
        # Women have higher EEG amplitudes; amplitude declines with age.
        eeg_scale=float(
            rng.lognormal(0.0, 0.15) * (1.1 if sex == 0 else 1.0) * np.clip(1.1 - 0.004 * (age - 20.0), 0.8, 1.15)
        ),
        alpha_hz=float(np.clip(rng.normal(10.4 - 0.015 * (age - 20.0), 0.5), 8.0, 12.0)),
        spindle_hz=float(np.clip(rng.normal(13.0, 0.5), 11.5, 14.5)),
    )


@dataclass(frozen=True)
class Night:
    """A subject's night: hypnogram, respiratory events and arousals (times in s from lights-off)."""

    subject: Subject
    hypnogram: NightHypnogram
    event_onsets_s: np.ndarray
    event_durations_s: np.ndarray
    event_kinds: np.ndarray
    # Peak SpO2 drop of each event in percentage points.
    event_desaturations: np.ndarray
    arousal_onsets_s: np.ndarray
    arousal_durations_s: np.ndarray

    @property
    def seconds(self) -> int:
        """Length of the night in seconds."""
        return self.hypnogram.epochs * EPOCH_SECONDS

    @property
    def sleep_hours(self) -> float:
        """Total sleep time in hours."""
        return float(np.isin(self.hypnogram.stages, (N1, N2, N3, REM)).sum() * EPOCH_SECONDS / 3600.0)


def _respiratory_events(hypnogram: NightHypnogram, ahi: float, rng: np.random.Generator):
    stages = hypnogram.stages
    weights = np.array([_EVENT_STAGE_WEIGHT.get(int(s), 0.0) for s in stages])
    sleep_hours = np.isin(stages, (N1, N2, N3, REM)).sum() * EPOCH_SECONDS / 3600.0
    target = rng.poisson(ahi * sleep_hours)
    if target == 0 or weights.sum() == 0:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=np.int8), empty
    # Draw more candidates than needed, drop overlaps, keep `target` of them.
    candidates = int(target * 1.6) + 4
    epochs = rng.choice(stages.size, size=candidates, p=weights / weights.sum())
    onsets = epochs * EPOCH_SECONDS + rng.uniform(0.0, EPOCH_SECONDS, candidates)
    kinds = rng.choice([OBSTRUCTIVE, CENTRAL, HYPOPNOEA], size=candidates, p=[0.3, 0.08, 0.62])
    in_rem = stages[epochs] == REM
    # AASM: events last at least 10 s; REM events are longer.
    durations = np.clip(rng.lognormal(np.log(np.where(kinds == HYPOPNOEA, 18.0, 21.0)), 0.3), 10.0, 60.0)
    durations *= np.where(in_rem, 1.3, 1.0)
    order = np.argsort(onsets)
    onsets, durations, kinds, in_rem = onsets[order], durations[order], kinds[order], in_rem[order]
    keep = np.zeros(candidates, dtype=bool)
    free_from = -np.inf
    for i in range(candidates):
        # At least 10 s of recovery breathing between events.
        if onsets[i] >= free_from and onsets[i] + durations[i] < stages.size * EPOCH_SECONDS - 30:
            keep[i] = True
            free_from = onsets[i] + durations[i] + 10.0
    chosen = np.flatnonzero(keep)
    chosen = np.sort(rng.choice(chosen, size=min(target, chosen.size), replace=False))
    onsets, durations, kinds, in_rem = onsets[chosen], durations[chosen], kinds[chosen], in_rem[chosen]
    # Every scored event desaturates by >= 3 % (the AHI 3 % rule); apnoeas, long and REM events more.
    depth = 3.0 + rng.exponential(1.5, onsets.size) + np.where(kinds == HYPOPNOEA, 0.0, 0.12 * durations)
    depth *= np.where(in_rem, 1.3, 1.0)
    return onsets, durations, kinds.astype(np.int8), np.clip(depth, 3.0, 25.0)


def simulate_night(subject: Subject, *, epochs: int, rng: np.random.Generator) -> Night:
    """Simulate the hypnogram, respiratory events and arousals of one night.

    Parameters
    ----------
    subject : Subject
        Who sleeps (age, sex, AHI and physiological traits).
    epochs : int
        Night length in 30-s epochs.
    rng : numpy.random.Generator
        Source of randomness.
    """
    hypnogram = simulate_hypnogram(epochs, age=subject.age, ahi=subject.ahi, rng=rng)
    onsets, durations, kinds, desaturations = _respiratory_events(hypnogram, subject.ahi, rng)
    # Most apnoeas and many hypopnoeas end in an arousal (3-15 s), the rest of the
    # arousals are spontaneous (~5-15 per hour of sleep, more with age).
    ends_in_arousal = rng.random(onsets.size) < np.where(kinds == HYPOPNOEA, 0.6, 0.9)
    event_arousals = onsets[ends_in_arousal] + durations[ends_in_arousal] - 1.0
    sleep_epochs = np.flatnonzero(np.isin(hypnogram.stages, (N1, N2, REM)))
    spontaneous_count = rng.poisson((5.0 + 0.12 * subject.age) * len(sleep_epochs) * EPOCH_SECONDS / 3600.0)
    spontaneous = (
        (
            rng.choice(sleep_epochs, size=spontaneous_count) * EPOCH_SECONDS
            + rng.uniform(0, EPOCH_SECONDS, spontaneous_count)
        )
        if sleep_epochs.size
        else np.zeros(0)
    )
    arousal_onsets = np.sort(np.concatenate([event_arousals, spontaneous]))
    arousal_durations = rng.uniform(3.0, 14.0, arousal_onsets.size)
    # Awakening epochs themselves are arousals too: their onset is the epoch start.
    awakenings = np.flatnonzero((hypnogram.stages[1:] == W) & (hypnogram.stages[:-1] > W)) + 1
    arousal_onsets = np.concatenate([arousal_onsets, awakenings * float(EPOCH_SECONDS)])
    arousal_durations = np.concatenate([arousal_durations, np.full(awakenings.size, 15.0)])
    order = np.argsort(arousal_onsets, kind="stable")
    return Night(
        subject=subject,
        hypnogram=hypnogram,
        event_onsets_s=onsets,
        event_durations_s=durations,
        event_kinds=kinds,
        event_desaturations=desaturations,
        arousal_onsets_s=arousal_onsets[order],
        arousal_durations_s=arousal_durations[order],
    )
