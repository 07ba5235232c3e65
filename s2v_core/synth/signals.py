"""Numerical building blocks shared by the physiology generators.

Everything works on whole nights at once (vectorised numpy) so that an 8-h
night costs a handful of FFTs and filters, not a Python loop per sample.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import scipy.fft
from scipy import signal as sps

from s2v_core.modalities import EPOCH_SECONDS

#: Rate in Hz of the slowly varying control signals (band envelopes, tone, arousal).
CONTROL_RATE_HZ = 16


def shaped_noise(samples: int, rate_hz: float, shape, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectrum ``shape(f)**2``, scaled to unit RMS.

    Parameters
    ----------
    samples : int
        Length of the output.
    rate_hz : float
        Sampling rate in Hz (``shape`` is a function of frequency in Hz).
    shape : callable
        Amplitude spectrum, ``shape(f) -> array`` for ``f`` in Hz.
    """
    length = scipy.fft.next_fast_len(samples, real=True)
    freqs = np.fft.rfftfreq(length, 1.0 / rate_hz).astype(np.float32)
    spectrum = (
        rng.standard_normal(freqs.size, dtype=np.float32) + 1j * rng.standard_normal(freqs.size, dtype=np.float32)
    ).astype(np.complex64)
    spectrum *= np.asarray(shape(freqs), dtype=np.float32)
    spectrum[0] = 0.0
    out = scipy.fft.irfft(spectrum, n=length, workers=2)[:samples].astype(np.float32)
    rms = float(np.sqrt(np.mean(out * out))) or 1.0
    return out / rms


def band(low: float, high: float, edge: float = 0.3):
    """Amplitude spectrum of a band with smooth (raised-cosine, ``edge`` Hz) flanks."""

    def shape(freqs: np.ndarray) -> np.ndarray:
        rise = np.clip((freqs - (low - edge)) / (2 * edge), 0.0, 1.0)
        fall = np.clip(((high + edge) - freqs) / (2 * edge), 0.0, 1.0)
        return np.sin(0.5 * np.pi * rise) ** 2 * np.sin(0.5 * np.pi * fall) ** 2

    return shape


def peak(centre: float, width: float):
    """Gaussian amplitude spectrum around ``centre`` Hz (an oscillatory rhythm)."""
    return lambda freqs: np.exp(-0.5 * ((freqs - centre) / width) ** 2)


def aperiodic(exponent: float, low: float, high: float):
    """1/f**exponent power spectrum between ``low`` and ``high`` Hz (the EEG background)."""

    def shape(freqs: np.ndarray) -> np.ndarray:
        f = np.maximum(freqs, low)
        return f ** (-exponent / 2.0) * band(low, high, edge=min(low, 2.0))(freqs)

    return shape


def moving_average(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average of ``width`` samples, same length as ``x`` (edges held)."""
    width = max(int(width), 1)
    if width == 1:
        return np.asarray(x, dtype=np.float32)
    padded = np.pad(np.asarray(x, dtype=np.float32), (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, np.full(width, 1.0 / width, dtype=np.float32), mode="valid").astype(np.float32)


def epochs_to_control(values: np.ndarray, *, smooth_seconds: float = 4.0) -> np.ndarray:
    """Per-epoch values held for 30 s at :data:`CONTROL_RATE_HZ`, edges smoothed over ``smooth_seconds``."""
    held = np.repeat(np.asarray(values, dtype=np.float32), EPOCH_SECONDS * CONTROL_RATE_HZ)
    return moving_average(held, int(smooth_seconds * CONTROL_RATE_HZ))


def slow_jitter(samples: int, rng: np.random.Generator, *, sd: float, correlation_seconds: float = 20.0) -> np.ndarray:
    """Log-normal multiplicative drift at the control rate (amplitudes wander within a stage)."""
    cutoff = 1.0 / correlation_seconds
    noise = shaped_noise(samples, CONTROL_RATE_HZ, lambda f: np.exp(-0.5 * (f / cutoff) ** 2), rng)
    return np.exp(sd * noise).astype(np.float32)


def add_bursts(
    control: np.ndarray,
    onsets_s: np.ndarray,
    durations_s: np.ndarray,
    amplitudes: np.ndarray,
    *,
    rate_hz: float = CONTROL_RATE_HZ,
) -> None:
    """Add Hann-shaped bursts (waxing-waning) to ``control`` in place."""
    for onset, duration, amplitude in zip(onsets_s, durations_s, amplitudes):
        start = int(onset * rate_hz)
        length = max(int(duration * rate_hz), 3)
        stop = min(start + length, control.size)
        if start >= control.size or stop <= start:
            continue
        control[start:stop] += amplitude * np.hanning(length + 2)[1 : stop - start + 1]


def to_rate(control: np.ndarray, from_hz: float, to_hz: float, samples: int) -> np.ndarray:
    """Linear interpolation of a slowly varying control signal onto another time grid."""
    if from_hz == to_hz and control.size == samples:
        return control
    ratio = to_hz / from_hz
    if ratio == int(ratio) and ratio > 1:
        # Integer up-sampling: broadcast (sample, phase) instead of a general search.
        step = int(ratio)
        base = control.astype(np.float32, copy=False)
        nxt = np.append(base[1:], base[-1:])
        frac = (np.arange(step, dtype=np.float32) / step)[None, :]
        out = (base[:, None] + (nxt - base)[:, None] * frac).ravel()
        if out.size < samples:
            out = np.pad(out, (0, samples - out.size), mode="edge")
        return out[:samples]
    t_out = np.arange(samples, dtype=np.float64) / to_hz
    t_in = np.arange(control.size, dtype=np.float64) / from_hz
    return np.interp(t_out, t_in, control).astype(np.float32)


def resample(x: np.ndarray, from_hz: int, to_hz: int, samples: int) -> np.ndarray:
    """Band-limited (polyphase, anti-aliased) resampling, trimmed/padded to ``samples``."""
    if from_hz != to_hz:
        ratio = Fraction(int(to_hz), int(from_hz))
        x = sps.resample_poly(x, ratio.numerator, ratio.denominator)
    if x.size < samples:
        x = np.pad(x, (0, samples - x.size), mode="edge")
    return x[:samples].astype(np.float32, copy=False)


def high_pass(x: np.ndarray, rate_hz: float, cutoff_hz: float) -> np.ndarray:
    """First-order high-pass (an AC-coupled amplifier input)."""
    sos = sps.butter(1, cutoff_hz, btype="highpass", fs=rate_hz, output="sos")
    return sps.sosfilt(sos, x).astype(np.float32)


def muscle_noise(samples: int, rate_hz: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS broadband muscle activity: white noise above 10 Hz, up to 0.45 × rate."""
    white = rng.standard_normal(samples, dtype=np.float32)
    high = min(150.0, 0.45 * rate_hz)
    if high <= 12.0:
        return white
    sos = sps.butter(2, [10.0, high], btype="bandpass", fs=rate_hz, output="sos")
    out = sps.sosfilt(sos, white).astype(np.float32)
    return out / (float(np.std(out)) or 1.0)


def mains(samples: int, rate_hz: int, mains_hz: int, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Power-line interference (50 or 60 Hz) with a slowly drifting amplitude; zero if aliased."""
    if amplitude <= 0.0 or rate_hz <= 2 * mains_hz:
        return np.zeros(samples, dtype=np.float32)
    # The sampled sinusoid repeats every rate/gcd(rate, mains) samples: tile one period.
    period = rate_hz // np.gcd(rate_hz, mains_hz)
    one = np.sin(2 * np.pi * mains_hz * np.arange(period) / rate_hz + rng.uniform(0, 2 * np.pi))
    wave = np.tile(one.astype(np.float32), samples // period + 1)[:samples]
    # Amplitude drifts over tens of minutes (loads switching on and off): one value per second.
    seconds = -(-samples // rate_hz)
    t = np.arange(seconds, dtype=np.float32)
    drift = amplitude * (1.0 + 0.5 * np.sin(2 * np.pi * t / rng.uniform(600, 2400) + rng.uniform(0, 2 * np.pi)))
    wave *= np.repeat(drift.astype(np.float32), rate_hz)[:samples]
    return wave


def place_waveforms(
    samples: int, rate_hz: float, onsets_s: np.ndarray, template: np.ndarray, amplitudes: np.ndarray
) -> np.ndarray:
    """Sum of copies of ``template`` starting at ``onsets_s`` (s) scaled by ``amplitudes``."""
    impulses = np.zeros(samples, dtype=np.float32)
    index = np.round(np.asarray(onsets_s) * rate_hz).astype(np.int64)
    keep = (index >= 0) & (index < samples)
    np.add.at(impulses, index[keep], np.asarray(amplitudes, dtype=np.float32)[keep])
    return sps.oaconvolve(impulses, template.astype(np.float32))[:samples].astype(np.float32)
