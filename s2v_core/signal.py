"""Signal processing of the ingest: resampling, window quality, robust normalisation, windowing.

All functions work on one channel of one night as a 1-D float32 array and
avoid float64 copies of whole nights (an 8-h 512-Hz channel is 59 MB in
float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

#: Largest numerator/denominator of the resampling ratio (512 -> 128 Hz is 1/4,
#: 125 -> 128 Hz is 128/125; 1000 covers every PSG rate in use).
MAX_RATIO_TERM = 1000
#: Normalised values are clipped here: robust z-scores beyond +-50 are artefacts
#: (electrode pops, clipping) and would only eat float16 range.
CLIP = 50.0


def resample(values: np.ndarray, source_hz: float, target_hz: float) -> np.ndarray:
    """Resample one channel with a polyphase filter (anti-aliasing included).

    Parameters
    ----------
    values : ndarray, shape (n,)
        Samples at ``source_hz``; must be finite (fill NaN first).
    source_hz, target_hz : float
        Sampling rates in Hz.

    Returns
    -------
    ndarray of float32, shape ``(round(n * target_hz / source_hz),)`` up to one sample
    """
    if source_hz <= 0 or target_hz <= 0:
        raise ValueError(f"sampling rates must be > 0 Hz, got {source_hz} -> {target_hz}")
    ratio = Fraction(target_hz / source_hz).limit_denominator(MAX_RATIO_TERM)
    values = np.asarray(values, dtype=np.float32)
    if ratio == 1:
        return values
    # scipy's default Kaiser-windowed FIR (cut-off at the lower Nyquist) is the
    # anti-alias filter; padtype="line" avoids an edge transient at both ends.
    return resample_poly(values, ratio.numerator, ratio.denominator, padtype="line").astype(np.float32, copy=False)


def window_bounds(n_windows: int, window_seconds: float, rate_hz: float, n_samples: int) -> np.ndarray:
    """Sample index of each window start and of the last window's end (``n_windows + 1`` ints)."""
    bounds = np.floor(np.arange(n_windows + 1) * window_seconds * rate_hz + 1e-9).astype(np.int64)
    return np.minimum(bounds, n_samples)


def window_quality(
    values: np.ndarray, bounds: np.ndarray, *, constant_is_flat: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Which windows contain NaN/inf and which are flat (a disconnected sensor).

    Parameters
    ----------
    values : ndarray, shape (n,)
        One channel at its source rate.
    bounds : ndarray of int
        From :func:`window_bounds`; every window must hold at least one sample.
    constant_is_flat : bool
        True for signals that are never constant for a whole window when
        connected (EEG, ECG, respiration). SpO2 and heart rate can be constant
        for minutes, so for them only a constant value <= 0 counts as flat.

    Returns
    -------
    bad_values, flat : ndarray of bool, shape (n_windows,)
    """
    starts = bounds[:-1]
    segment = values[: bounds[-1]]
    high = np.maximum.reduceat(segment, starts)
    low = np.minimum.reduceat(segment, starts)
    # max/min propagate NaN, and any +-inf shows up in one of them.
    bad_values = ~(np.isfinite(high) & np.isfinite(low))
    constant = (high - low) <= 0
    flat = constant if constant_is_flat else constant & (high <= 0)
    return bad_values, flat & ~bad_values


def window_in_range(values: np.ndarray, bounds: np.ndarray, ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Which windows have at least half of their samples inside one of ``ranges`` (inclusive).

    Parameters
    ----------
    values : ndarray, shape (n,)
        One channel at its source rate, in its physical unit.
    bounds : ndarray of int
        From :func:`window_bounds`; every window must hold at least one sample.
    ranges : sequence of (low, high)
        Plausible values (NaN is never inside).

    Returns
    -------
    ndarray of bool, shape (n_windows,)
    """
    segment = values[: bounds[-1]]
    inside = np.zeros(segment.shape, dtype=bool)
    for low, high in ranges:
        inside |= (segment >= low) & (segment <= high)
    counts = np.add.reduceat(inside.astype(np.int64), bounds[:-1])
    return 2 * counts >= np.diff(bounds)


def robust_scale(values: np.ndarray, *, max_samples: int = 200_000) -> tuple[float, float]:
    """Median and robust spread (IQR / 1.349, the SD of a normal) of finite values (any shape).

    A strided subsample of at most ``max_samples`` values keeps this cheap
    on whole nights. A zero spread falls back to the SD, then to 1.
    """
    values = values.reshape(-1)
    stride = max(1, values.size // max_samples)
    sample = values[::stride]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    q25, median, q75 = np.percentile(sample, [25, 50, 75])
    spread = (q75 - q25) / 1.349
    if not spread > 0:
        spread = float(np.std(sample))
    if not spread > 0:
        spread = 1.0
    return float(median), float(spread)


def normalise(values: np.ndarray, center: float, spread: float) -> np.ndarray:
    """``(values - center) / spread`` clipped to +-:data:`CLIP`, in place on a float32 array."""
    values -= np.float32(center)
    values *= np.float32(1.0 / spread)
    np.clip(values, -CLIP, CLIP, out=values)
    return values


def cut_windows(values: np.ndarray, n_windows: int, samples_per_window: int) -> np.ndarray:
    """Reshape the first ``n_windows`` windows into ``(n_windows, samples_per_window)``.

    A resampled channel may be short by a sample or two of rounding; the
    gap is filled with the last value (edge padding) rather than dropping
    a window.
    """
    needed = n_windows * samples_per_window
    if values.size < needed:
        values = np.pad(values, (0, needed - values.size), mode="edge")
    return values[:needed].reshape(n_windows, samples_per_window)
