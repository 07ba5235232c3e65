"""Heart, breathing and oxygen of a synthetic night, and the non-physiological channels.

* Heart rate follows the stage (highest and most variable in W and REM,
  lowest in N3), breathing (respiratory sinus arrhythmia), apnoeas
  (bradycardia during the event, tachycardia at the terminating arousal).
  The ECG is a PQRST template placed at beat times integrated from it.
* Breathing rate and regularity follow the stage (regular in N3, irregular
  in REM/W). An obstructive apnoea stops airflow while thoracic and
  abdominal effort continue out of phase (paradoxical breathing); a central
  apnoea stops both; a hypopnoea halves airflow. Recovery breaths are large.
* SpO2 falls after each event with a circulation delay of ~20 s, by the
  event's desaturation depth, and recovers within ~15 s; oximeters report
  whole percent and sometimes drop out (probe off: 0 %).
"""

from __future__ import annotations

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import signals as sig
from s2v_core.synth.hypnogram import REM, W
from s2v_core.synth.night import CENTRAL, HYPOPNOEA, OBSTRUCTIVE, Night

#: Rate in Hz at which breathing and heart rate are synthesised.
RESP_RATE_HZ = 32
_CTRL = sig.CONTROL_RATE_HZ
# Heart-rate offset (bpm) and breathing-rate factor per stage column (W, N1, N2, N3, REM, movement).
_HR_OFFSET = (8.0, 3.0, 0.0, -3.0, 6.0, 12.0)
_BREATH_FACTOR = (1.12, 1.03, 1.0, 0.96, 1.1, 1.2)
# Irregularity of breathing (relative frequency jitter) per stage column.
_BREATH_IRREGULARITY = (0.25, 0.12, 0.06, 0.03, 0.22, 0.3)
#: Delay in s between an event's end and its SpO2 nadir (lung-to-finger circulation time).
SPO2_DELAY_S = 20.0


def _column(stages: np.ndarray) -> np.ndarray:
    return np.where(stages < 0, 5, stages).astype(np.int64)


class Cardiorespiratory:
    """Heart, respiration and oximetry of one night; channels are derived views of it.

    Parameters
    ----------
    night : Night
        The night to render.
    rng : numpy.random.Generator
        Source of randomness.
    """

    def __init__(self, night: Night, rng: np.random.Generator) -> None:
        self.night = night
        self.rng = rng
        self.seconds = night.seconds
        self.samples = self.seconds * RESP_RATE_HZ
        column = _column(night.hypnogram.stages)
        self._build_breathing(column)
        self._build_heart_rate(column)
        self._beats: np.ndarray | None = None

    def _event_gate(self, kinds: tuple[int, ...], depth: float, fs: float) -> np.ndarray:
        """Multiplicative gate: 1 normally, ``depth`` during events of ``kinds`` (1-s ramps)."""
        gate = np.ones(self.seconds * int(fs), dtype=np.float32)
        night = self.night
        for onset, duration, kind in zip(night.event_onsets_s, night.event_durations_s, night.event_kinds):
            if kind not in kinds:
                continue
            start, stop = int(onset * fs), int((onset + duration) * fs)
            gate[start:stop] = depth
        return sig.moving_average(gate, int(fs))

    def _build_breathing(self, column: np.ndarray) -> None:
        night, rng, fs, n = self.night, self.rng, RESP_RATE_HZ, self.samples
        base_hz = night.subject.breathing_rate_bpm / 60.0
        factor = sig.epochs_to_control(np.asarray(_BREATH_FACTOR)[column], smooth_seconds=20.0)
        irregular = sig.epochs_to_control(np.asarray(_BREATH_IRREGULARITY)[column], smooth_seconds=20.0)
        jitter = sig.shaped_noise(factor.size, _CTRL, sig.peak(0.0, 0.05), rng)
        freq = sig.to_rate(base_hz * factor * (1.0 + irregular * jitter), _CTRL, fs, n)
        self.phase = 2 * np.pi * np.cumsum(np.clip(freq, 0.05, 1.0)) / fs
        # Tidal volume: stable in N3, variable in REM and wake.
        tidal = sig.to_rate(
            np.exp(0.8 * irregular * sig.shaped_noise(factor.size, _CTRL, sig.peak(0.0, 0.03), rng)), _CTRL, fs, n
        )
        recovery = np.zeros(self.seconds * _CTRL, dtype=np.float32)
        ends = night.event_onsets_s + night.event_durations_s
        sig.add_bursts(recovery, ends, np.full(ends.size, 12.0), np.full(ends.size, 0.8))
        tidal = tidal * (1.0 + sig.to_rate(recovery, _CTRL, fs, n))
        # Airflow stops in apnoeas (obstructive and central), is halved in hypopnoeas.
        flow_gate = self._event_gate((OBSTRUCTIVE, CENTRAL), 0.05, fs) * self._event_gate((HYPOPNOEA,), 0.45, fs)
        effort_gate = self._event_gate((CENTRAL,), 0.05, fs) * self._event_gate((HYPOPNOEA,), 0.8, fs)
        # Paradox: abdomen moves against the thorax while the airway is closed.
        paradox = (1.0 - self._event_gate((OBSTRUCTIVE,), 0.0, fs)) * np.pi * 0.9
        self.airflow_signal = (tidal * flow_gate * (np.sin(self.phase) + 0.2 * np.sin(2 * self.phase))).astype(
            np.float32
        )
        self.thorax_signal = (0.9 * tidal * effort_gate * np.sin(self.phase - np.pi / 2)).astype(np.float32)
        self.abdomen_signal = (tidal * effort_gate * np.sin(self.phase - np.pi / 2 - 0.3 - paradox)).astype(np.float32)

    def _build_heart_rate(self, column: np.ndarray) -> None:
        night, rng, fs, n = self.night, self.rng, RESP_RATE_HZ, self.samples
        offset = sig.epochs_to_control(np.asarray(_HR_OFFSET)[column], smooth_seconds=10.0)
        drift = 2.0 * sig.shaped_noise(offset.size, _CTRL, sig.peak(0.0, 0.01), rng)
        surge = np.zeros(offset.size, dtype=np.float32)
        # Arousals accelerate the heart by ~10 bpm; apnoeas slow it a little.
        sig.add_bursts(
            surge,
            night.arousal_onsets_s,
            night.arousal_durations_s + 6.0,
            rng.uniform(6.0, 14.0, night.arousal_onsets_s.size),
        )
        slow = 1.0 - self._event_gate((OBSTRUCTIVE, CENTRAL), 0.0, _CTRL) * 1.0
        hr = night.subject.heart_rate_bpm + offset + drift + surge - 4.0 * slow
        # Respiratory sinus arrhythmia: ~+-3 bpm, larger in the young.
        rsa = (4.0 - 0.03 * night.subject.age) * np.sin(self.phase)
        self.heart_rate = np.clip(sig.to_rate(hr, _CTRL, fs, n) + rsa, 35.0, 180.0).astype(np.float32)

    # -- channels --------------------------------------------------------------------
    def beats(self) -> np.ndarray:
        """Beat times in s, integrated from the instantaneous heart rate."""
        if self._beats is None:
            cycles = np.cumsum(self.heart_rate.astype(np.float64) / 60.0 / RESP_RATE_HZ)
            after = np.flatnonzero(np.diff(np.floor(cycles)) > 0) + 1
            # Interpolate within the sample where the beat counter crosses an integer.
            before = cycles[after - 1]
            fraction = (np.floor(cycles[after]) - before) / (cycles[after] - before)
            self._beats = (after - 1 + fraction) / RESP_RATE_HZ
        return self._beats

    def ecg(self, rate_hz: int) -> np.ndarray:
        """ECG lead in mV at ``rate_hz``: PQRST template at each beat, baseline wander, noise."""
        rng = self.rng
        samples = self.seconds * rate_hz
        t = np.arange(int(0.7 * rate_hz)) / rate_hz
        waves = (
            (0.12, 0.10, 0.025),
            (-0.12, 0.19, 0.008),
            (1.0, 0.21, 0.010),
            (-0.25, 0.23, 0.010),
            (0.3, 0.45, 0.045),
        )  # (mV, centre s, width s): P Q R S T
        template = sum(a * np.exp(-0.5 * ((t - c) / w) ** 2) for a, c, w in waves)
        beats = self.beats() - 0.21
        amplitude = rng.uniform(0.7, 1.4) * (1.0 + 0.05 * rng.standard_normal(beats.size))
        out = sig.place_waveforms(samples, rate_hz, beats, template, amplitude)
        wander = sig.resample(0.05 * np.sin(self.phase), RESP_RATE_HZ, rate_hz, samples)
        return out + wander + 0.02 * rng.standard_normal(samples, dtype=np.float32)

    def hr(self, rate_hz: int) -> np.ndarray:
        """Pulse rate in bpm at ``rate_hz`` as an oximeter reports it (4-s average, whole bpm)."""
        smooth = sig.moving_average(self.heart_rate, 4 * RESP_RATE_HZ)
        return np.round(sig.resample(smooth, RESP_RATE_HZ, rate_hz, self.seconds * rate_hz))

    def respiration(self, kind: str, rate_hz: int) -> np.ndarray:
        """Airflow, thorax or abdomen (a.u., ~unit amplitude) at ``rate_hz``."""
        source = {"airflow": self.airflow_signal, "thorax": self.thorax_signal, "abdomen": self.abdomen_signal}[kind]
        noisy = source + 0.03 * self.rng.standard_normal(source.size, dtype=np.float32)
        return sig.resample(noisy, RESP_RATE_HZ, rate_hz, self.seconds * rate_hz)

    def spo2(self, rate_hz: int) -> np.ndarray:
        """SpO2 in whole % at ``rate_hz``: baseline, event desaturations, rare probe-off dropouts."""
        night, rng = self.night, self.rng
        t = np.arange(self.seconds * rate_hz) / rate_hz
        value = np.full(t.size, night.subject.spo2_baseline, dtype=np.float64)
        value += 0.4 * sig.to_rate(
            sig.shaped_noise(self.seconds * _CTRL, _CTRL, sig.peak(0.0, 0.005), rng), _CTRL, rate_hz, t.size
        )
        # REM and wake: baseline shifts of a fraction of a percent.
        column = _column(night.hypnogram.stages)
        value += sig.to_rate(
            sig.epochs_to_control(
                np.where(column == REM, -0.5, 0.0) + np.where(column == W, 0.3, 0.0), smooth_seconds=60.0
            ),
            _CTRL,
            rate_hz,
            t.size,
        )
        for onset, duration, depth in zip(night.event_onsets_s, night.event_durations_s, night.event_desaturations):
            fall = onset + SPO2_DELAY_S * 0.5
            nadir = onset + duration + SPO2_DELAY_S * 0.5
            back = nadir + rng.uniform(10.0, 18.0)
            lo, hi = np.searchsorted(t, [fall, back])
            value[lo:hi] -= np.interp(t[lo:hi], [fall, nadir, back], [0.0, depth, 0.0])
        value = np.clip(np.round(value), 50.0, 100.0)
        for _ in range(rng.poisson(1.0)):
            start = int(rng.uniform(0, max(self.seconds - 60, 1)) * rate_hz)
            value[start : start + int(rng.uniform(5, 30) * rate_hz)] = 0.0
        return value.astype(np.float32)


def auxiliary(kind: str, night: Night, rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Channels the store ignores but sites record: position, light, temperature, snore, activity, marker."""
    seconds = night.seconds
    samples = seconds * rate_hz
    stages = night.hypnogram.stages
    if kind == "position":
        # Body position changes at some awakenings: supine/left/right/prone codes.
        per_epoch = np.zeros(stages.size)
        current = int(rng.integers(0, 4))
        for epoch in range(stages.size):
            if stages[epoch] == W and rng.random() < 0.15:
                current = int(rng.integers(0, 4))
            per_epoch[epoch] = current
        return np.repeat(per_epoch, EPOCH_SECONDS * rate_hz).astype(np.float32)
    if kind == "light":
        return np.zeros(samples, dtype=np.float32)  # lights are off for the whole recording
    if kind == "temperature":
        # Core temperature falls ~0.5 degC across the night.
        return (37.0 - 0.5 * np.linspace(0.0, 1.0, samples) + 0.02 * rng.standard_normal(samples)).astype(np.float32)
    if kind == "snore":
        tone = np.where(np.isin(stages, (2, 3)), 0.3, 0.05)
        env = sig.to_rate(sig.epochs_to_control(tone), _CTRL, rate_hz, samples)
        return (env * rng.standard_normal(samples)).astype(np.float32)
    if kind == "activity":
        moving = np.where((stages == W) | (stages < 0), 0.3, 0.01)
        env = sig.to_rate(sig.epochs_to_control(moving), _CTRL, rate_hz, samples)
        return (1.0 + env * np.abs(rng.standard_normal(samples))).astype(np.float32)
    if kind == "marker":
        return np.zeros(samples, dtype=np.float32)
    raise ValueError(f"auxiliary channel kind {kind!r} has no generator")
