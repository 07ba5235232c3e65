"""The synthetic stage process and night events: sleep architecture as clinicians describe it."""

from __future__ import annotations

import numpy as np
import pytest

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import draw_subject, simulate_hypnogram, simulate_night
from s2v_core.synth.hypnogram import N1, N2, N3, REM, W
from s2v_core.synth.night import HYPOPNOEA

EIGHT_HOURS = 8 * 3600 // EPOCH_SECONDS
SEEDS = range(24)


def _nights(age: float, ahi: float = 5.0):
    return [simulate_hypnogram(EIGHT_HOURS, age=age, ahi=ahi, rng=np.random.default_rng(s)) for s in SEEDS]


def _rem_periods(stages: np.ndarray) -> list[int]:
    """Start epochs of REM periods (REM runs separated by > 15 min of other stages)."""
    rem = np.flatnonzero(stages == REM)
    if rem.size == 0:
        return []
    return [int(rem[0])] + [int(b) for a, b in zip(rem[:-1], rem[1:]) if b - a > 30]


def test_nights_start_awake_and_follow_90_minute_cycles():
    for night in _nights(40.0):
        stages = night.stages
        assert stages[0] == W
        onset = int(np.flatnonzero(stages > W)[0])
        periods = _rem_periods(stages)
        assert 3 <= len(periods) <= 6
        # REM latency 50-130 min after sleep onset; later cycles ~60-125 min apart.
        assert 50 <= (periods[0] - onset) / 2 <= 130
        assert 60 <= np.median(np.diff(periods)) / 2 <= 125


def test_slow_wave_sleep_early_rem_late_and_realistic_proportions():
    nights = _nights(30.0)
    half = EIGHT_HOURS // 2
    n3_early = np.mean([(n.stages[:half] == N3).sum() for n in nights])
    n3_late = np.mean([(n.stages[half:] == N3).sum() for n in nights])
    rem_early = np.mean([(n.stages[:half] == REM).sum() for n in nights])
    rem_late = np.mean([(n.stages[half:] == REM).sum() for n in nights])
    assert n3_early > 3 * n3_late
    assert rem_late > 2 * rem_early
    fractions = np.mean([[np.mean(n.stages == s) for s in (W, N1, N2, N3, REM)] for n in nights], axis=0)
    # Healthy adult architecture: N2 about half the night, REM ~20 %, N3 10-20 %.
    assert 0.45 < fractions[2] < 0.7
    assert 0.15 < fractions[4] < 0.3
    assert 0.08 < fractions[3] < 0.25
    assert 0.02 < fractions[1] < 0.12


def test_slow_wave_sleep_falls_and_awakenings_rise_with_age():
    young, old = _nights(25.0), _nights(75.0)
    assert np.mean([np.mean(n.stages == N3) for n in young]) > 1.8 * np.mean([np.mean(n.stages == N3) for n in old])

    def awakenings(night):
        return int(np.sum((night.stages[1:] == W) & (night.stages[:-1] > W)))

    assert all(awakenings(n) >= 2 for n in young)
    assert np.mean([awakenings(n) for n in old]) > np.mean([awakenings(n) for n in young])


def test_rk_stage_4_marks_the_deepest_slow_wave_sleep():
    night = _nights(25.0)[0]
    rk = night.rk_stages()
    assert set(np.unique(rk)) <= {-1, 0, 1, 2, 3, 4, 5}
    assert np.array_equal(rk == 5, night.stages == REM)
    assert np.array_equal((rk == 3) | (rk == 4), night.stages == N3)
    assert (rk == 4).sum() > 0
    assert night.depth[rk == 4].min() > night.depth[rk == 3].max() - 1e-6


def test_same_generator_state_same_night_and_bad_length_rejected():
    a = simulate_hypnogram(500, age=50, ahi=10, rng=np.random.default_rng(1))
    b = simulate_hypnogram(500, age=50, ahi=10, rng=np.random.default_rng(1))
    c = simulate_hypnogram(500, age=50, ahi=10, rng=np.random.default_rng(2))
    assert np.array_equal(a.stages, b.stages) and np.array_equal(a.depth, b.depth)
    assert not np.array_equal(a.stages, c.stages)
    assert simulate_hypnogram(1, age=50, ahi=10, rng=np.random.default_rng(0)).epochs == 1
    with pytest.raises(ValueError, match="epochs"):
        simulate_hypnogram(0, age=50, ahi=10, rng=np.random.default_rng(0))


@pytest.mark.parametrize("ahi", [2.0, 15.0, 45.0])
def test_respiratory_events_follow_ahi_during_sleep_only(ahi):
    counts = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        subject = draw_subject(age=55, sex=1, ahi=ahi, rng=rng)
        night = simulate_night(subject, epochs=EIGHT_HOURS, rng=rng)
        counts.append(night.event_onsets_s.size / night.sleep_hours)
        epochs = (night.event_onsets_s // EPOCH_SECONDS).astype(int)
        assert np.all(night.hypnogram.stages[epochs] > W)
        ends = night.event_onsets_s + night.event_durations_s
        assert np.all(night.event_onsets_s[1:] >= ends[:-1])  # events never overlap
        assert np.all(night.event_durations_s >= 10.0)  # AASM minimum duration
        assert np.all(night.event_desaturations >= 3.0)  # 3 % rule
        if night.event_kinds.size > 10:
            assert 0.4 < np.mean(night.event_kinds == HYPOPNOEA) < 0.85
    assert np.mean(counts) == pytest.approx(ahi, rel=0.25, abs=1.0)
