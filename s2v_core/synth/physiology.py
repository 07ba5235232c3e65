"""Electrophysiology of a synthetic night: EEG, EOG and chin EMG that follow the hypnogram.

The brain is modelled once per night at :data:`BRAIN_RATE_HZ` as a sum of
band-limited Gaussian rhythms on top of a 1/f background, each with a
stage-dependent amplitude envelope (AASM visual criteria made quantitative):

=====  ==========================================================================
W      posterior alpha (eyes closed) or low-voltage beta with muscle (eyes open),
       blinks and saccades in the EOG, high chin tone
N1     alpha gives way to theta, vertex sharp waves, slow rolling eye movements
N2     spindles (11-16 Hz, 0.5-2 s) and K-complexes on a theta/delta background
N3     high-amplitude slow waves (0.5-2 Hz, > 75 uV peak-to-peak), lowest arousability
REM    low-voltage mixed frequency with sawtooth theta, rapid eye movements,
       chin atonia interrupted by twitches
=====  ==========================================================================

Arousals add alpha/beta and muscle bursts. Each EEG channel mixes the shared
sources with location gains (frontal delta, occipital alpha) plus a local
part, so channels of a montage are correlated the way real derivations are.
The EOG sees horizontal eye movements (opposite polarity left vs right) plus
frontal EEG (slow waves, K-complexes), as real mastoid-referenced EOG does.
"""

from __future__ import annotations

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import signals as sig
from s2v_core.synth.hypnogram import N1, N2, N3, REM, W
from s2v_core.synth.night import Night

#: Rate in Hz at which the cortical sources are synthesised (covers 0-64 Hz).
BRAIN_RATE_HZ = 128
_CTRL = sig.CONTROL_RATE_HZ
_UNKNOWN = -1

#: Central-derivation RMS amplitude (uV) of each rhythm per stage, young adult.
#: Columns follow (W, N1, N2, N3, REM, movement); slow/delta of N2/N3 are scaled by depth.
STAGE_AMPLITUDE_UV: dict[str, tuple[float, ...]] = {
    "slow": (2.0, 3.0, 6.0, 8.0, 2.5, 8.0),
    "delta": (4.0, 6.5, 11.0, 12.0, 5.5, 10.0),
    "theta": (3.5, 7.5, 6.0, 6.0, 7.0, 6.0),
    "alpha": (9.0, 2.5, 1.8, 1.5, 3.0, 5.0),
    "beta": (4.0, 2.5, 1.8, 1.4, 2.8, 6.0),
    "background": (6.0, 7.0, 8.0, 8.5, 5.5, 10.0),
}
#: Extra slow/delta amplitude (uV) per unit of slow-wave depth in N2/N3.
DEPTH_AMPLITUDE_UV = {"slow": 26.0, "delta": 12.0}
#: Chin EMG RMS tone (uV) per stage: atonia in REM.
EMG_TONE_UV = (18.0, 10.0, 7.0, 6.0, 2.0, 45.0)
#: Location gains of the shared sources (scalp topography).
LOCATION_GAINS: dict[str, dict[str, float]] = {
    "frontal": {
        "slow": 1.3,
        "delta": 1.2,
        "theta": 1.0,
        "alpha": 0.5,
        "sigma": 0.8,
        "beta": 0.9,
        "background": 1.0,
        "kcomplex": 1.2,
        "vertex": 0.8,
        "sawtooth": 0.8,
    },
    "central": {
        "slow": 1.0,
        "delta": 1.0,
        "theta": 1.0,
        "alpha": 0.8,
        "sigma": 1.0,
        "beta": 1.0,
        "background": 1.0,
        "kcomplex": 1.0,
        "vertex": 1.0,
        "sawtooth": 1.0,
    },
    "occipital": {
        "slow": 0.6,
        "delta": 0.7,
        "theta": 0.8,
        "alpha": 1.6,
        "sigma": 0.6,
        "beta": 0.8,
        "background": 0.9,
        "kcomplex": 0.5,
        "vertex": 0.5,
        "sawtooth": 0.6,
    },
}
# Fraction of each channel's signal that is local (not shared with other derivations).
_LOCAL_FRACTION = 0.35


def _stage_column(stages: np.ndarray) -> np.ndarray:
    """Column index into the per-stage tables (movement/unknown is the last column)."""
    return np.where(stages == _UNKNOWN, 5, stages).astype(np.int64)


class Electrophysiology:
    """Brain, eye and chin-muscle activity of one night; channels are derived views of it.

    Parameters
    ----------
    night : Night
        The night to render.
    rng : numpy.random.Generator
        Source of randomness (consumed in a fixed order: the same state gives the same night).
    """

    def __init__(self, night: Night, rng: np.random.Generator) -> None:
        self.night = night
        self.rng = rng
        self.seconds = night.seconds
        self.brain_samples = self.seconds * BRAIN_RATE_HZ
        self.control_samples = self.seconds * _CTRL
        self._controls = self._build_controls()
        self._sources: dict[str, np.ndarray] | None = None
        self._gaze: np.ndarray | None = None
        self._muscle: dict[int, np.ndarray] = {}
        self._tone: dict[int, np.ndarray] = {}

    # -- slowly varying controls (16 Hz) ------------------------------------------------
    def _build_controls(self) -> dict[str, np.ndarray]:
        night, rng = self.night, self.rng
        stages, depth = night.hypnogram.stages, night.hypnogram.depth
        column = _stage_column(stages)
        young = float(np.clip(1.25 - 0.009 * (night.subject.age - 20.0), 0.55, 1.3))
        # Wake alpha needs closed eyes: drowsy wake at lights-off mostly closed, night awakenings mixed.
        eyes_closed = np.where(rng.random(stages.size) < 0.6, 1.3, 0.35)
        eyes_closed = sig.moving_average(eyes_closed, 3)
        controls = {}
        for name, table in STAGE_AMPLITUDE_UV.items():
            per_epoch = np.asarray(table, dtype=np.float32)[column]
            if name in DEPTH_AMPLITUDE_UV:
                per_epoch = per_epoch + DEPTH_AMPLITUDE_UV[name] * depth * young
            if name == "alpha":
                per_epoch = np.where(stages == W, per_epoch * eyes_closed, per_epoch)
            if name == "beta":
                per_epoch = np.where(stages == W, per_epoch * (1.8 - 0.6 * eyes_closed), per_epoch)
            jitter = sig.slow_jitter(self.control_samples, rng, sd=0.18)
            controls[name] = sig.epochs_to_control(per_epoch) * jitter * night.subject.eeg_scale
        tone = np.asarray(EMG_TONE_UV, dtype=np.float32)[column] * rng.lognormal(0.0, 0.25)
        controls["emg"] = sig.epochs_to_control(tone, smooth_seconds=3.0) * sig.slow_jitter(
            self.control_samples, rng, sd=0.25, correlation_seconds=10.0
        )
        controls["sigma"] = np.zeros(self.control_samples, dtype=np.float32)
        self._add_spindles(controls["sigma"], young)
        # Arousals: alpha and beta bursts with a jump in chin tone.
        onsets, durations = night.arousal_onsets_s, night.arousal_durations_s
        ones = np.ones(onsets.size)
        sig.add_bursts(controls["alpha"], onsets, durations, 9.0 * ones * night.subject.eeg_scale)
        sig.add_bursts(controls["beta"], onsets, durations, 5.0 * ones * night.subject.eeg_scale)
        sig.add_bursts(controls["emg"], onsets, durations, rng.uniform(8.0, 25.0, onsets.size))
        # REM twitches: brief phasic bursts of chin EMG on top of atonia.
        twitches = self._events_in(REM, rate_per_epoch=2.0)
        sig.add_bursts(
            controls["emg"], twitches, rng.uniform(0.15, 0.5, twitches.size), rng.uniform(5.0, 15.0, twitches.size)
        )
        return controls

    def _events_in(self, stage: int, *, rate_per_epoch: float) -> np.ndarray:
        """Poisson event times (s) within the epochs of ``stage``."""
        epochs = np.flatnonzero(self.night.hypnogram.stages == stage)
        counts = self.rng.poisson(rate_per_epoch, epochs.size)
        starts = np.repeat(epochs * float(EPOCH_SECONDS), counts)
        return np.sort(starts + self.rng.uniform(0.0, EPOCH_SECONDS - 2.0, starts.size))

    def _add_spindles(self, sigma: np.ndarray, young: float) -> None:
        """Spindle envelopes: ~4/min in N2, fewer in N3 and N1, smaller with age."""
        rng = self.rng
        times = np.concatenate(
            [
                self._events_in(N2, rate_per_epoch=2.0),
                self._events_in(N3, rate_per_epoch=0.7),
                self._events_in(N1, rate_per_epoch=0.1),
            ]
        )
        durations = rng.uniform(0.5, 2.0, times.size)
        amplitudes = rng.uniform(10.0, 28.0, times.size) * np.sqrt(young) * self.night.subject.eeg_scale
        sig.add_bursts(sigma, times, durations, amplitudes)
        sigma += 0.8 * self.night.subject.eeg_scale  # residual sigma activity between spindles

    # -- shared cortical sources (128 Hz) -----------------------------------------------
    def _build_sources(self) -> dict[str, np.ndarray]:
        rng, n, fs = self.rng, self.brain_samples, BRAIN_RATE_HZ
        subject = self.night.subject
        shapes = {
            "slow": sig.band(0.4, 1.5, edge=0.2),
            "delta": sig.aperiodic(1.0, 1.5, 4.0),
            "theta": sig.band(4.0, 8.0, edge=0.8),
            "alpha": sig.peak(subject.alpha_hz, 0.7),
            "sigma": sig.peak(subject.spindle_hz, 0.6),
            "beta": sig.band(16.0, 30.0, edge=2.0),
            "background": sig.aperiodic(1.0, 0.5, 45.0),
        }
        sources = {}
        for name, shape in shapes.items():
            envelope = sig.to_rate(self._controls[name], _CTRL, fs, n)
            sources[name] = sig.shaped_noise(n, fs, shape, rng) * envelope
        sources["kcomplex"], sources["vertex"], sources["sawtooth"] = self._graphoelements()
        # The local part of each derivation: a copy of the 1/f background at an offset
        # (independent within seconds) scaled by the overall amplitude.
        overall = sig.to_rate(self._controls["background"] + 0.5 * self._controls["delta"], _CTRL, fs, n)
        sources["local"] = sig.shaped_noise(n, fs, sig.aperiodic(1.2, 0.5, 45.0), rng) * overall
        return sources

    def _graphoelements(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K-complexes (N2), vertex sharp waves (N1), sawtooth waves (REM), in uV."""
        rng, n, fs = self.rng, self.brain_samples, BRAIN_RATE_HZ
        scale = self.night.subject.eeg_scale
        t = np.arange(int(1.5 * fs)) / fs
        # K-complex: sharp surface-negative wave followed by a slow positive one (~1 s in all).
        kc_template = -np.exp(-0.5 * ((t - 0.25) / 0.07) ** 2) + 0.7 * np.exp(-0.5 * ((t - 0.65) / 0.17) ** 2)
        kc_times = self._events_in(N2, rate_per_epoch=0.7)
        kcomplex = sig.place_waveforms(n, fs, kc_times, kc_template, rng.uniform(50, 110, kc_times.size) * scale)
        vx_template = -np.exp(-0.5 * ((t[: fs // 2] - 0.2) / 0.05) ** 2)
        vx_times = self._events_in(N1, rate_per_epoch=0.6)
        vertex = sig.place_waveforms(n, fs, vx_times, vx_template, rng.uniform(30, 70, vx_times.size) * scale)
        # Sawtooth trains: 2-5 s of 2-4 Hz triangular waves, central maximum.
        sawtooth = np.zeros(n, dtype=np.float32)
        for onset in self._events_in(REM, rate_per_epoch=0.4):
            length = int(rng.uniform(2.0, 5.0) * fs)
            start = int(onset * fs)
            stop = min(start + length, n)
            phase = np.arange(stop - start) / fs * rng.uniform(2.0, 4.0)
            wave = 2.0 * (phase % 1.0) - 1.0
            sawtooth[start:stop] += rng.uniform(15, 35) * scale * wave * np.hanning(stop - start)
        return kcomplex, vertex, sawtooth

    def cortex(self, location: str) -> np.ndarray:
        """EEG of a derivation at ``location`` (frontal/central/occipital), uV at 128 Hz."""
        if location not in LOCATION_GAINS:
            raise ValueError(f"EEG location {location!r}: expected one of {sorted(LOCATION_GAINS)}")
        if self._sources is None:
            self._sources = self._build_sources()
        gains = LOCATION_GAINS[location]
        shared = sum(gains[name] * self._sources[name] for name in gains)
        shift = int(self.rng.integers(BRAIN_RATE_HZ * 5, BRAIN_RATE_HZ * 60))
        local = np.roll(self._sources["local"], shift)
        return (np.sqrt(1.0 - _LOCAL_FRACTION) * shared + np.sqrt(_LOCAL_FRACTION) * local).astype(np.float32)

    # -- eyes ------------------------------------------------------------------------
    def gaze(self) -> np.ndarray:
        """Horizontal eye position signal (uV at the EOG, AC-coupled) at 128 Hz."""
        if self._gaze is None:
            self._gaze = self._build_gaze()
        return self._gaze

    def _build_gaze(self) -> np.ndarray:
        rng, n, fs = self.rng, self.brain_samples, BRAIN_RATE_HZ
        stages = self.night.hypnogram.stages
        # Rapid eye movements come in phasic bursts in REM; scanning saccades in wake.
        bursts = self._events_in(REM, rate_per_epoch=1.2)
        per_burst = rng.integers(2, 8, bursts.size)
        rem_times = (
            np.repeat(bursts, per_burst) + np.concatenate([np.cumsum(rng.uniform(0.25, 0.9, k)) for k in per_burst])
            if bursts.size
            else np.zeros(0)
        )
        wake_times = self._events_in(W, rate_per_epoch=12.0)
        times = np.concatenate([rem_times, wake_times])
        amplitude = np.concatenate([rng.uniform(60, 200, rem_times.size), rng.uniform(30, 110, wake_times.size)])
        order = np.argsort(times)
        times, amplitude = times[order], amplitude[order]
        # Gaze jumps to a new position (mean-reverting, random side) with a ~60 ms rise.
        targets = amplitude * rng.choice([-1.0, 1.0], times.size)
        position = np.zeros(n, dtype=np.float32)
        index = np.clip((times * fs).astype(np.int64), 0, n - 1)
        steps = np.diff(np.concatenate([[0.0], targets]))
        np.add.at(position, index, steps.astype(np.float32))
        position = np.cumsum(position)
        position = sig.moving_average(position, int(0.06 * fs))
        # Slow rolling eye movements at sleep onset and in N1 (0.1-0.4 Hz).
        sem_epoch = np.where(stages == N1, 1.0, 0.0)
        drowsy = (stages == W) & (np.roll(stages, -1) == N1)
        sem_epoch = np.where(drowsy, 0.7, sem_epoch)
        sem = sig.to_rate(sig.epochs_to_control(sem_epoch * rng.uniform(60, 120), smooth_seconds=10.0), _CTRL, fs, n)
        sem_wave = sig.shaped_noise(n, fs, sig.band(0.1, 0.4, edge=0.05), rng)
        position = position + sem * sem_wave
        # Blinks: vertical, but the horizontal derivation picks up part of them.
        blinks = self._events_in(W, rate_per_epoch=6.0)
        t = np.arange(int(0.4 * fs)) / fs
        blink = np.exp(-0.5 * ((t - 0.15) / 0.05) ** 2)
        position += sig.place_waveforms(n, fs, blinks, blink, rng.uniform(30, 80, blinks.size))
        # EOG amplifiers are AC-coupled (~0.3 Hz): a held gaze decays back to baseline.
        return sig.high_pass(position, fs, 0.3)

    # -- muscle ----------------------------------------------------------------------
    def muscle(self, rate_hz: int) -> np.ndarray:
        """Unit-RMS broadband muscle noise at ``rate_hz``: a window into one bank per rate.

        Each call starts the window 5-60 s later into a longer bank, so channels get
        noise that is independent at the scale of a muscle burst without a new draw.
        """
        samples = self.seconds * rate_hz
        if rate_hz not in self._muscle:
            self._muscle[rate_hz] = sig.muscle_noise(samples + 60 * rate_hz, rate_hz, self.rng)
        shift = int(self.rng.integers(rate_hz * 5, rate_hz * 60))
        return self._muscle[rate_hz][shift : shift + samples]

    def emg_tone(self, rate_hz: int, samples: int) -> np.ndarray:
        """Chin EMG RMS envelope (uV) on a ``rate_hz`` grid (cached per rate)."""
        if rate_hz not in self._tone:
            self._tone[rate_hz] = sig.to_rate(self._controls["emg"], _CTRL, rate_hz, samples)
        return self._tone[rate_hz]

    # -- channels --------------------------------------------------------------------
    def eeg(self, location: str, rate_hz: int) -> np.ndarray:
        """An EEG derivation in uV at ``rate_hz`` (brain + scalp muscle)."""
        samples = self.seconds * rate_hz
        out = sig.resample(self.cortex(location), BRAIN_RATE_HZ, rate_hz, samples)
        # Scalp muscles follow chin tone: wake and arousals carry high-frequency EMG into the EEG.
        out += 0.25 * self.emg_tone(rate_hz, samples) * self.muscle(rate_hz)
        return out

    def eog(self, side: str, rate_hz: int) -> np.ndarray:
        """A horizontal EOG derivation in uV: eye movements (polarity by side) + frontal EEG."""
        samples = self.seconds * rate_hz
        polarity = -1.0 if side == "right" else 1.0
        brain = polarity * self.gaze() + 0.6 * self.cortex("frontal")
        out = sig.resample(brain, BRAIN_RATE_HZ, rate_hz, samples)
        out += 0.3 * self.emg_tone(rate_hz, samples) * self.muscle(rate_hz)
        return out

    def emg(self, rate_hz: int) -> np.ndarray:
        """Chin EMG in uV at ``rate_hz``: broadband noise shaped by tone."""
        samples = self.seconds * rate_hz
        return self.emg_tone(rate_hz, samples) * self.muscle(rate_hz)

    def emg_envelope(self, rate_hz: int) -> np.ndarray:
        """Chin EMG RMS envelope in uV (Sleep-EDF writes its submental EMG this way at 1 Hz)."""
        samples = self.seconds * rate_hz
        tone = self.emg_tone(rate_hz, samples)
        return tone * self.rng.lognormal(0.0, 0.15, samples).astype(np.float32)
