"""Resampling (with anti-aliasing), window quality, robust normalisation, windowing."""

from __future__ import annotations

import numpy as np
import pytest

from s2v_core.signal import (
    CLIP,
    cut_windows,
    normalise,
    resample,
    robust_scale,
    window_bounds,
    window_in_range,
    window_quality,
)


@pytest.mark.parametrize("source_hz, target_hz", [(512, 128), (256, 128), (125, 128), (50, 128), (200, 4), (1, 4)])
def test_resample_keeps_length_and_in_band_sine(source_hz, target_hz):
    seconds = 60
    t = np.arange(seconds * source_hz) / source_hz
    frequency = min(source_hz, target_hz) / 8  # well inside both bands
    out = resample(np.sin(2 * np.pi * frequency * t).astype(np.float32), source_hz, target_hz)
    assert out.dtype == np.float32 and abs(out.size - seconds * target_hz) <= 1
    expected = np.sin(2 * np.pi * frequency * np.arange(out.size) / target_hz)
    middle = slice(out.size // 10, -out.size // 10)  # away from edge effects
    np.testing.assert_allclose(out[middle], expected[middle], atol=0.02)


def test_resample_removes_content_above_the_new_nyquist():
    source_hz, target_hz = 512, 128
    t = np.arange(60 * source_hz) / source_hz
    alias = np.sin(2 * np.pi * 100 * t)  # 100 Hz would fold to 28 Hz without an anti-alias filter
    out = resample(alias.astype(np.float32), source_hz, target_hz)
    assert np.abs(out[200:-200]).max() < 0.01


def test_resample_rejects_non_positive_rates():
    with pytest.raises(ValueError, match="sampling rates"):
        resample(np.zeros(10, np.float32), 0, 128)


def test_window_quality_finds_nan_and_flat_windows():
    values = np.random.default_rng(0).normal(size=4 * 100).astype(np.float32)
    values[110] = np.nan  # window 1
    values[200:300] = 3.0  # window 2 flat
    values[350] = np.inf  # window 3
    bounds = window_bounds(4, 10.0, 10.0, values.size)
    bad, flat = window_quality(values, bounds)
    assert bad.tolist() == [False, True, False, True]
    assert flat.tolist() == [False, False, True, False]


def test_window_in_range_needs_half_of_the_samples_inside_one_range():
    values = np.concatenate(
        [
            np.full(10, 96.0),  # percent
            np.full(10, 0.95),  # a fraction of 1
            np.r_[np.full(5, 97.0), np.zeros(5)],  # half the window off the finger: kept
            np.r_[np.full(4, 97.0), np.zeros(6)],  # most of it off: out
            np.r_[np.full(9, np.nan), 97.0],  # NaN is never inside
            np.linspace(-0.5, 0.5, 10),  # AC-coupled, centred on 0
        ]
    ).astype(np.float32)
    bounds = window_bounds(6, 10.0, 1.0, values.size)
    inside = window_in_range(values, bounds, ((40.0, 101.0), (0.4, 1.01)))
    assert inside.tolist() == [True, True, True, False, False, False]
    assert window_in_range(values, bounds, ((40.0, 101.0),)).tolist() == [True, False, True, False, False, False]


def test_constant_spo2_is_not_flat_unless_disconnected():
    values = np.concatenate([np.full(100, 97.0), np.zeros(100)]).astype(np.float32)
    bounds = window_bounds(2, 25.0, 4.0, values.size)
    _, flat = window_quality(values, bounds, constant_is_flat=False)
    assert flat.tolist() == [False, True]


def test_robust_scale_ignores_outliers():
    values = np.random.default_rng(0).normal(5.0, 2.0, 100_000).astype(np.float32)
    values[:500] = 1e6  # electrode pops
    center, spread = robust_scale(values)
    assert abs(center - 5.0) < 0.1 and abs(spread - 2.0) < 0.1
    out = normalise(values.copy(), center, spread)
    assert out.max() == CLIP and abs(np.median(out)) < 0.05


def test_robust_scale_of_constant_signal_is_finite():
    assert robust_scale(np.full(100, 3.0, np.float32)) == (3.0, 1.0)


def test_cut_windows_pads_rounding_shortfall_only():
    windows = cut_windows(np.arange(19, dtype=np.float32), 2, 10)
    assert windows.shape == (2, 10) and windows[1, -1] == 18
    assert cut_windows(np.arange(25, dtype=np.float32), 2, 10)[1, -1] == 19
