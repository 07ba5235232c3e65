"""Hand-crafted per-epoch features: the baseline a sleep researcher computes with scipy.

What every learned representation must beat on the same windows and the same
probe. Per 30-s epoch, from the store's signals (robust-normalised per
recording, so absolute levels are gone but within-night variation is kept):

========  =================================================================
eeg, eog  relative power in delta 0.5-4, theta 4-8, alpha 8-12, sigma 12-16
          and beta 16-30 Hz, and log total power 0.5-30 Hz (Welch, 4-s
          segments) — the AASM bands YASA's features are built on
emg       log power 10-60 Hz (muscle tone, REM atonia) and log variance
ecg       heart rate and RR-interval variability from R peaks (beats/min, s)
hr        mean, standard deviation and range of the pulse rate
spo2      mean, minimum and mean minus minimum (a desaturation depth)
airflow,  breathing rate (dominant frequency 0.1-0.7 Hz, breaths/min),
thorax,   amplitude (standard deviation) and breath-to-breath variability
abdomen   (coefficient of variation of the envelope)
========  =================================================================

Each epoch also gets the mean of its window's features (context, as the
encoder's backbone sees the whole window). Absent modalities are NaN; the
probe imputes them and adds missing-value indicators.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from scipy import signal

from s2v_core.modalities import MODALITY_KEYS, get_modality

BANDS_HZ = {"delta": (0.5, 4.0), "theta": (4.0, 8.0), "alpha": (8.0, 12.0), "sigma": (12.0, 16.0), "beta": (16.0, 30.0)}
#: Feature names per modality, in the order :func:`epoch_features` writes them.
FEATURES: dict[str, tuple[str, ...]] = {
    "eeg": (*(f"rel_{b}" for b in BANDS_HZ), "log_power"),
    "eog": (*(f"rel_{b}" for b in BANDS_HZ), "log_power"),
    "emg": ("log_power_10_60", "log_variance"),
    "ecg": ("heart_rate_bpm", "rr_sd_s"),
    "hr": ("mean", "sd", "range"),
    "spo2": ("mean", "min", "depth"),
    "airflow": ("rate_per_min", "amplitude", "variability"),
    "thorax": ("rate_per_min", "amplitude", "variability"),
    "abdomen": ("rate_per_min", "amplitude", "variability"),
}


def _band_features(x: np.ndarray, fs: float) -> np.ndarray:
    freqs, psd = signal.welch(x, fs=fs, nperseg=int(4 * fs), axis=-1)
    total_band = (freqs >= 0.5) & (freqs <= 30.0)
    total = psd[..., total_band].sum(axis=-1) + 1e-12
    relative = [psd[..., (freqs >= lo) & (freqs < hi)].sum(axis=-1) / total for lo, hi in BANDS_HZ.values()]
    return np.stack([*relative, np.log(total)], axis=-1)


def _emg_features(x: np.ndarray, fs: float) -> np.ndarray:
    freqs, psd = signal.welch(x, fs=fs, nperseg=int(4 * fs), axis=-1)
    high = psd[..., (freqs >= 10.0) & (freqs <= 60.0)].sum(axis=-1)
    return np.stack([np.log(high + 1e-12), np.log(x.var(axis=-1) + 1e-12)], axis=-1)


def _ecg_features(x: np.ndarray, fs: float) -> np.ndarray:
    out = np.full((*x.shape[:-1], 2), np.nan)
    flat = x.reshape(-1, x.shape[-1])
    for i, epoch in enumerate(flat):
        # R peaks are the epoch's most prominent deflections; flip inverted leads.
        lead = epoch if np.abs(epoch.max()) >= np.abs(epoch.min()) else -epoch
        peaks, _ = signal.find_peaks(lead, distance=int(0.33 * fs), height=0.5 * np.percentile(lead, 99.5))
        if peaks.size >= 3:
            rr = np.diff(peaks) / fs
            out.reshape(-1, 2)[i] = (60.0 / rr.mean(), rr.std())
    return out


def _breathing_features(x: np.ndarray, fs: float) -> np.ndarray:
    freqs, psd = signal.welch(x, fs=fs, nperseg=min(x.shape[-1], int(16 * fs)), axis=-1)
    band = (freqs >= 0.1) & (freqs <= 0.7)
    rate = freqs[band][np.argmax(psd[..., band], axis=-1)] * 60.0
    envelope = np.abs(signal.hilbert(x - x.mean(axis=-1, keepdims=True), axis=-1))
    variability = envelope.std(axis=-1) / (envelope.mean(axis=-1) + 1e-9)
    return np.stack([rate, x.std(axis=-1), variability], axis=-1)


def _slow_features(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "hr":
        return np.stack([x.mean(axis=-1), x.std(axis=-1), x.max(axis=-1) - x.min(axis=-1)], axis=-1)
    low = x.min(axis=-1)
    return np.stack([x.mean(axis=-1), low, x.mean(axis=-1) - low], axis=-1)


def epoch_features(batch: Mapping[str, np.ndarray], *, modalities=MODALITY_KEYS, context: bool = True) -> np.ndarray:
    """Hand-crafted features ``(N, E, F)`` of the windows of a store batch (NaN where a modality is absent).

    Parameters
    ----------
    batch : mapping
        :func:`s2v_core.store.table_to_batch` output: one ``(N, E, samples_per_epoch)``
        array per modality at its store rate (128 Hz EEG/EOG/EMG/ECG, 16 Hz
        respiration, 4 Hz HR/SpO2) and ``present`` ``bool (N, 9)``.
    modalities : sequence of str
        Modalities to compute features for (those missing from ``batch`` give NaN).
    context : bool
        Append the window mean of every feature (``F`` doubles).
    """
    present = np.asarray(batch["present"], dtype=bool)
    rows = present.shape[0]
    epochs = next(np.asarray(batch[k]).shape[1] for k in MODALITY_KEYS if k in batch)
    blocks = []
    for key in modalities:
        width = len(FEATURES[key])
        values = np.full((rows, epochs, width), np.nan)
        if key in batch:
            have = present[:, MODALITY_KEYS.index(key)]
            x = np.asarray(batch[key], dtype=np.float64)[have]
            fs = get_modality(key).store_rate_hz
            if x.size:
                if key in ("eeg", "eog"):
                    values[have] = _band_features(x, fs)
                elif key == "emg":
                    values[have] = _emg_features(x, fs)
                elif key == "ecg":
                    values[have] = _ecg_features(x, fs)
                elif key in ("hr", "spo2"):
                    values[have] = _slow_features(x, key)
                else:
                    values[have] = _breathing_features(x, fs)
        blocks.append(values)
    features = np.concatenate(blocks, axis=-1)
    if context:
        with warnings.catch_warnings():  # an absent modality's features are all NaN: so is their mean
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(features, axis=1, keepdims=True)
        features = np.concatenate([features, np.broadcast_to(mean, features.shape)], axis=-1)
    return features.astype(np.float32)


def feature_names(modalities=MODALITY_KEYS, *, context: bool = True) -> list[str]:
    names = [f"{key}.{name}" for key in modalities for name in FEATURES[key]]
    return names + [f"{n}.window_mean" for n in names] if context else names
