"""Physiology of written nights, measured on the files read back with MNE and pyedflib.

The hypnogram comes from the written NSRR XML / EDF+ files and the signals
from the EDF/BDF, so these tests see exactly what the ingest will see.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET

import mne
import numpy as np
import pyedflib
import pytest
from scipy import signal as sps
from scipy.stats import spearmanr

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import write_cohort

W, N1, N2, N3, REM = 0, 1, 2, 3, 4
_NSRR = {"0": W, "1": N1, "2": N2, "3": N3, "4": N3, "5": REM}


@pytest.fixture(scope="module")
def psg(tmp_path_factory):
    """Two 3-h SHHS-like nights (EEG/EMG 125 Hz, EOG 50 Hz, 60 Hz mains): W, N1-N3 and a first REM period."""
    return write_cohort(
        tmp_path_factory.mktemp("psg"), sites=1, recordings_per_site=2, hours=3.0, seed=11, archetypes=("shhs_like",)
    ).sites[0]


def _nsrr_stages(path) -> np.ndarray:
    stages = []
    for event in ET.parse(path).getroot().iter("ScoredEvent"):
        if event.findtext("EventType") == "Stages|Stages":
            code = event.findtext("EventConcept").split("|")[1]
            stages += [_NSRR.get(code, -1)] * int(float(event.findtext("Duration")) // EPOCH_SECONDS)
    return np.asarray(stages)


def _epochs(values: np.ndarray, rate: float, count: int) -> np.ndarray:
    samples = int(EPOCH_SECONDS * rate)
    return values[: count * samples].reshape(count, samples)


def _per_stage(psg, measure, picks=("EEG", "EMG", "EOG(L)")) -> dict[int, float]:
    """Median over all epochs of both nights of ``measure(raw, epochs)`` per stage."""
    values: dict[int, list[float]] = {}
    for recording in psg.recordings:
        stages = _nsrr_stages(recording.hypnogram_path)
        raw = mne.io.read_raw_edf(recording.signal_path, include=list(picks), preload=True, verbose="error")
        for stage, value in zip(stages, measure(raw, stages.size)):
            values.setdefault(int(stage), []).append(float(value))
    return {stage: float(np.median(v)) for stage, v in values.items()}


def _relative_power(raw, count, low, high):
    eeg = _epochs(raw.get_data(picks=["EEG"])[0] * 1e6, raw.info["sfreq"], count)
    freqs, psd = sps.welch(eeg, fs=raw.info["sfreq"], nperseg=int(4 * raw.info["sfreq"]), axis=-1)
    total = psd[:, (freqs >= 0.5) & (freqs < 30)].sum(axis=1)
    return psd[:, (freqs >= low) & (freqs < high)].sum(axis=1) / total


def test_nights_contain_every_stage(psg):
    stages = np.concatenate([_nsrr_stages(r.hypnogram_path) for r in psg.recordings])
    assert {W, N1, N2, N3, REM} <= set(stages.tolist())
    assert stages.size == 2 * 3 * 3600 // EPOCH_SECONDS


def test_eeg_relative_delta_orders_n3_above_n2_above_wake(psg):
    delta = _per_stage(psg, lambda raw, n: _relative_power(raw, n, 0.5, 4.0))
    assert delta[N3] > delta[N2] > delta[W]
    assert delta[N3] > 0.6  # slow waves dominate N3


def test_eeg_relative_alpha_is_higher_awake_than_in_n2(psg):
    alpha = _per_stage(psg, lambda raw, n: _relative_power(raw, n, 8.0, 12.0))
    assert alpha[W] > 2 * alpha[N2]


def test_eeg_sigma_from_spindles_is_higher_in_n2_than_in_rem(psg):
    sigma = _per_stage(psg, lambda raw, n: _relative_power(raw, n, 11.0, 16.0))
    assert sigma[N2] > sigma[REM]


def test_chin_emg_is_lowest_in_rem(psg):
    def rms(raw, count):
        emg = raw.get_data(picks=["EMG"])[0] * 1e6
        high = sps.sosfiltfilt(sps.butter(4, 10.0, "highpass", fs=raw.info["sfreq"], output="sos"), emg)
        return np.sqrt(np.mean(_epochs(high, raw.info["sfreq"], count) ** 2, axis=1))

    emg = _per_stage(psg, rms)
    assert emg[REM] < emg[N2] < emg[W]
    assert emg[REM] < 0.5 * emg[W]


def test_rapid_eye_movements_are_conjugate_in_rem_while_eeg_leaks_in_phase(psg):
    # The clinical sign of REMs: left and right EOG deflect in opposite directions,
    # while frontal EEG (slow waves, K-complexes) reaches both in phase.
    def correlation(raw, count):
        rate = raw.info["sfreq"]
        sos = sps.butter(2, [0.3, 5.0], "bandpass", fs=rate, output="sos")
        left, right = (
            _epochs(sps.sosfiltfilt(sos, raw.get_data(picks=[name])[0]), rate, count) for name in ("EOG(L)", "EOG(R)")
        )
        left = left - left.mean(axis=1, keepdims=True)
        right = right - right.mean(axis=1, keepdims=True)
        return (left * right).sum(axis=1) / np.sqrt((left**2).sum(axis=1) * (right**2).sum(axis=1))

    def amplitude(raw, count):
        return _epochs(raw.get_data(picks=["EOG(L)"])[0] * 1e6, raw.info["sfreq"], count).std(axis=1)

    corr = _per_stage(psg, correlation, picks=["EOG(L)", "EOG(R)"])
    assert corr[REM] < 0 < corr[N2]
    assert corr[N3] > 0.5
    eog = _per_stage(psg, amplitude)
    assert eog[REM] > 1.5 * eog[N2]


def test_heart_rate_and_site_mains_read_back_with_pyedflib(psg):
    for recording in psg.recordings:
        stages = _nsrr_stages(recording.hypnogram_path)
        with pyedflib.EdfReader(str(recording.signal_path)) as reader:
            labels = reader.getSignalLabels()
            hr = reader.readSignal(labels.index("H.R."))
            eeg = reader.readSignal(labels.index("EEG"))
            eeg_rate = reader.getSampleFrequency(labels.index("EEG"))
        # Within a subject, the heart is slowest in N3 and faster awake and in REM.
        per_epoch = _epochs(hr, 1, stages.size).mean(axis=1)
        assert np.median(per_epoch[stages == W]) > np.median(per_epoch[stages == N3]) + 3
        assert np.median(per_epoch[stages == REM]) > np.median(per_epoch[stages == N3]) + 3
        # SHHS-like sites sit on 60 Hz mains: a narrow line in the EEG spectrum.
        freqs, psd = sps.welch(eeg, fs=eeg_rate, nperseg=int(8 * eeg_rate))
        assert psd[np.argmin(np.abs(freqs - 60.0))] > 20 * np.median(psd[(freqs > 50) & (freqs < 58)])


def _events(path, concept: str) -> list[tuple[float, float]]:
    return [
        (float(e.findtext("Start")), float(e.findtext("Duration")))
        for e in ET.parse(path).getroot().iter("ScoredEvent")
        if e.findtext("EventConcept") == concept
    ]


def test_obstructive_apnoea_stops_airflow_while_effort_goes_on_out_of_phase(psg):
    checked = 0
    for recording in psg.recordings:
        with pyedflib.EdfReader(str(recording.signal_path)) as reader:
            labels = reader.getSignalLabels()
            flow, thorax, abdomen = (reader.readSignal(labels.index(n)) for n in ("NEW AIR", "THOR RES", "ABDO RES"))
            rate = reader.getSampleFrequency(labels.index("NEW AIR"))
        others = [
            e
            for name in ("Obstructive apnea", "Central apnea", "Hypopnea")
            for e in _events(recording.hypnogram_path, f"{name}|{name}")
        ]
        for onset, duration in _events(recording.hypnogram_path, "Obstructive apnea|Obstructive apnea"):
            during = slice(int((onset + 3) * rate), int((onset + duration - 2) * rate))
            before = slice(int((onset - 40) * rate), int((onset - 10) * rate))
            # Compare with undisturbed breathing: no other event (or its recovery) in the 60 s before.
            if onset < 60 or any(onset - 60 < start + length < onset for start, length in others):
                continue
            assert flow[during].std() < 0.3 * flow[before].std()
            assert thorax[during].std() > 0.5 * thorax[before].std()
            # Paradoxical breathing: thorax and abdomen move against each other.
            assert (
                np.corrcoef(thorax[during], abdomen[during])[0, 1]
                < 0
                < np.corrcoef(thorax[before], abdomen[before])[0, 1]
            )
            checked += 1
    assert checked >= 3


def _desaturations(spo2: np.ndarray, rate: float) -> int:
    """Oxygen desaturation events: drops of >= 3 % below the preceding 2-min maximum (probe-off excluded)."""
    per_second = spo2[:: int(rate)]
    valid = per_second > 50
    count, in_event = 0, False
    for i in range(120, per_second.size):
        window = per_second[i - 120 : i][valid[i - 120 : i]]
        if not valid[i] or window.size == 0:
            continue
        dropped = per_second[i] <= window.max() - 3
        if dropped and not in_event:
            count += 1
        in_event = dropped if dropped else (in_event and per_second[i] < window.max() - 1)
    return count


def test_spo2_desaturation_count_rises_with_ahi(tmp_path):
    site = write_cohort(tmp_path, sites=1, recordings_per_site=8, hours=1.0, seed=5, archetypes=("hst_like",)).sites[0]
    with site.metadata_path.open() as handle:
        ahi = [float(row["ahi_3pct"]) for row in csv.DictReader(handle)]
    counts = []
    for recording in site.recordings:
        with pyedflib.EdfReader(str(recording.signal_path)) as reader:
            index = reader.getSignalLabels().index("SpO2")
            counts.append(_desaturations(reader.readSignal(index), reader.getSampleFrequency(index)))
    assert np.ptp(ahi) > 10  # the site's population spans mild to severe apnoea
    assert spearmanr(ahi, counts).statistic > 0.8
    assert counts[int(np.argmax(ahi))] > counts[int(np.argmin(ahi))] + 5
