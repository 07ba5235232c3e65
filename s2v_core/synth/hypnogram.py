"""A realistic sleep-stage process for one night, in 30-s epochs.

The night is built the way sleep is described clinically:

* a sleep-onset latency of wake (longer with age), entered through N1;
* NREM–REM cycles of about 90 minutes; in each cycle NREM descends through
  N1/N2 to N3 and climbs back before a REM period;
* N3 is concentrated in the first cycles and shrinks with age (slow-wave
  sleep halves between 20 and 70 years); REM periods lengthen across the
  night (a few minutes in cycle 1, 20–40 minutes towards morning);
* brief awakenings (1–3 epochs, followed by N1) occur more often with age,
  with sleep apnoea and late in the night; N2 is sprinkled with N1 epochs;
* movement time (unscored, -1) occasionally surrounds an awakening, and a
  long night ends with a final awakening.

Stages use the store's codes (W=0 N1=1 N2=2 N3=3 REM=4, -1 unknown). Each
N3 epoch also gets a ``depth`` in [0, 1]: the fraction of the epoch filled by
slow waves, which decides R&K stage 3 versus stage 4 (> 50 %, written as
stage 4 by R&K-scoring sites) and drives the delta amplitude of the EEG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.store import STAGE_CODES, UNKNOWN_STAGE

W, N1, N2, N3, REM = (STAGE_CODES[s] for s in ("W", "N1", "N2", "N3", "REM"))
_EPOCHS_PER_MINUTE = 60 // EPOCH_SECONDS
#: R&K: an epoch is stage 4 when slow waves fill more than half of it.
RK_STAGE4_DEPTH = 0.5


@dataclass(frozen=True)
class NightHypnogram:
    """The stage sequence of one synthetic night.

    Attributes
    ----------
    stages : numpy.ndarray
        int8, one store stage code per 30-s epoch (W=0 N1=1 N2=2 N3=3 REM=4, -1 movement).
    depth : numpy.ndarray
        float32 in [0, 1] per epoch: slow-wave fraction (N3 > 0.2, N2 below 0.25, else 0).
    """

    stages: np.ndarray
    depth: np.ndarray

    @property
    def epochs(self) -> int:
        """Number of 30-s epochs."""
        return int(self.stages.size)

    def rk_stages(self) -> np.ndarray:
        """R&K codes per epoch: 0 W, 1–4 sleep stages 1–4, 5 REM, -1 movement time."""
        rk = np.where(self.stages == REM, 5, self.stages).astype(np.int8)
        rk[(self.stages == N3) & (self.depth > RK_STAGE4_DEPTH)] = 4
        return rk


def _minutes(rng: np.random.Generator, mean: float, sd: float, low: float) -> int:
    return max(int(round(max(rng.normal(mean, sd), low) * _EPOCHS_PER_MINUTE)), 1)


def _cycle(rng: np.random.Generator, index: int, *, age: float, ahi: float) -> list[tuple[int, int]]:
    """One NREM-REM cycle as (stage, epochs) bouts."""
    length = _minutes(rng, 92.0, 10.0, 65.0)
    # REM lengthens across the night; the first REM period is short and may be skipped by the elderly.
    rem = _minutes(rng, min(6.0 + 8.0 * index, 35.0), 3.0, 2.0)
    # Slow-wave sleep: ~40 min in the first cycle at 20 years, shrinking ~1 %/year
    # and by about half with each cycle; severe apnoea fragments it further.
    sws_minutes = max(40.0 - 0.45 * (age - 20.0), 6.0) * (0.45**index) * (1.0 - min(ahi, 60.0) / 150.0)
    sws = _minutes(rng, sws_minutes, 0.25 * sws_minutes + 0.5, 0.0) if sws_minutes > 2.0 else 0
    nrem = max(length - rem - sws, 4 * _EPOCHS_PER_MINUTE)
    descent = max(int(nrem * rng.uniform(0.35, 0.55)), 2)
    ascent = max(nrem - descent, 2)
    bouts = [(N1, int(rng.integers(1, 4)))] if index == 0 or rng.random() < 0.4 else []
    bouts.append((N2, descent))
    if sws:
        bouts.append((N3, sws))
    bouts.append((N2, ascent))
    bouts.append((REM, rem))
    return bouts


def _fragment(stages: np.ndarray, rng: np.random.Generator, *, age: float, ahi: float) -> None:
    """Brief awakenings, N1 intrusions, N3/N2 alternation and movement time, in place."""
    epochs = stages.size
    hours = epochs * EPOCH_SECONDS / 3600.0
    asleep = np.flatnonzero(stages > 0)
    if asleep.size == 0:
        return
    # Brief awakenings: ~1/h at 20 y, ~3/h at 70 y, more with apnoea and towards morning.
    rate = 1.0 + 0.04 * max(age - 20.0, 0.0) + 0.04 * min(ahi, 60.0)
    count = rng.poisson(rate * hours)
    weights = 0.5 + np.linspace(0.0, 1.0, epochs)[asleep]
    weights *= np.where(stages[asleep] == N3, 0.2, 1.0)
    starts = rng.choice(asleep, size=min(count, asleep.size), replace=False, p=weights / weights.sum())
    for start in np.sort(starts):
        wake = int(rng.integers(1, 4))
        stages[start : start + wake] = W
        if rng.random() < 0.06:
            stages[start] = UNKNOWN_STAGE
        stages[start + wake : start + wake + int(rng.integers(1, 3))] = N1
    # Isolated N1 epochs inside N2 (light, unstable NREM).
    n2 = np.flatnonzero(stages == N2)
    if n2.size:
        stages[rng.choice(n2, size=rng.poisson(0.03 * n2.size), replace=True)] = N1
    # N3 bouts are interrupted by N2 epochs, more in the elderly.
    n3 = np.flatnonzero(stages == N3)
    if n3.size:
        stages[n3[rng.random(n3.size) < 0.05 + 0.002 * max(age - 20.0, 0.0)]] = N2


def _depth(stages: np.ndarray, rng: np.random.Generator, *, age: float) -> np.ndarray:
    """Slow-wave fraction per epoch: rises into each N3 bout, highest early in the night."""
    epochs = stages.size
    depth = np.zeros(epochs, dtype=np.float32)
    night_position = np.linspace(0.0, 1.0, epochs)
    young = np.clip(1.2 - 0.008 * (age - 20.0), 0.7, 1.2)
    n3 = stages == N3
    # Smooth "sleep pressure" within N3 bouts: deepest in the middle, dissipating across the night.
    kernel = np.hanning(2 * 3 * _EPOCHS_PER_MINUTE + 1)
    half = kernel.size // 2
    padded = np.pad(n3.astype(float), (half, half))
    smooth = np.convolve(padded, kernel / kernel.sum(), mode="valid")
    base = (0.35 + 0.55 * smooth) * young * (1.0 - 0.45 * night_position)
    depth[n3] = np.clip(base[n3] + rng.normal(0.0, 0.08, n3.sum()), 0.22, 1.0)
    n2 = stages == N2
    depth[n2] = np.clip(0.05 + 0.25 * smooth[n2] + rng.normal(0.0, 0.03, n2.sum()), 0.0, 0.2)
    return depth


def simulate_hypnogram(
    epochs: int,
    *,
    age: float,
    ahi: float,
    rng: np.random.Generator,
) -> NightHypnogram:
    """Simulate the hypnogram of one night that starts at lights-off.

    Parameters
    ----------
    epochs : int
        Length of the recording in 30-s epochs.
    age : float
        Age in years (more wake, less N3 with age).
    ahi : float
        Apnoea-hypopnoea index in events/h (more fragmentation, less N3).
    rng : numpy.random.Generator
        Source of randomness; the same state gives the same night.

    Returns
    -------
    NightHypnogram
        Stage codes and slow-wave depth per epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, found {epochs}")
    # Sleep-onset latency: ~10 min at 30 y, longer with age, log-normal spread.
    latency_minutes = float(np.clip(rng.lognormal(np.log(8.0 + 0.12 * max(age - 20.0, 0.0)), 0.45), 2.0, 60.0))
    bouts: list[tuple[int, int]] = [(W, max(int(latency_minutes * _EPOCHS_PER_MINUTE), 1))]
    index = 0
    while sum(n for _, n in bouts) < epochs:
        bouts += _cycle(rng, index, age=age, ahi=ahi)
        index += 1
    stages = np.concatenate([np.full(n, s, dtype=np.int8) for s, n in bouts])[:epochs]
    _fragment(stages, rng, age=age, ahi=ahi)
    # A night of four hours or more ends awake (the final awakening before lights-on).
    if epochs * EPOCH_SECONDS >= 4 * 3600:
        final = int(rng.integers(2, 12) * _EPOCHS_PER_MINUTE)
        stages[-final:] = W
    depth = _depth(stages, rng, age=age)
    return NightHypnogram(stages=stages, depth=depth)
