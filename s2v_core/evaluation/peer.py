"""Reference peer for staging: YASA's pretrained sleep stager on the store's EEG.

YASA (Vallat & Walker 2021) ships LightGBM classifiers trained on NSRR
cohorts; :func:`yasa_stages` runs it on one night of store signals so that its
predictions can be scored with exactly the same metrics and folds as the
probes (it needs no training, so a fold only selects which windows count).

The store holds robust-normalised (dimensionless) signals, while YASA's
classifier was trained on µV. Signals are rescaled by nominal amplitudes
(:data:`NOMINAL_UV`) before staging; YASA's features are dominated by
relative band powers, but its absolute-amplitude features make this peer a
conservative reference, which reports must say.
"""

from __future__ import annotations

import logging

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS, get_modality

logger = logging.getLogger(__name__)

#: Typical inter-quartile amplitude (µV) restoring a physical scale to the
#: robust-normalised store signals: scalp EEG ~ 20 µV, EOG ~ 30 µV, chin EMG ~ 5 µV.
NOMINAL_UV = {"eeg": 20.0, "eog": 30.0, "emg": 5.0}
#: YASA computes features over a whole night and refuses recordings under 5 minutes.
MIN_EPOCHS = 10
#: YASA's hypnogram labels -> store stage codes.
_YASA_CODES = {"W": 0, "WAKE": 0, "N1": 1, "N2": 2, "N3": 3, "R": 4, "REM": 4}


def _short(label: object) -> str:
    return str(label).strip().upper()


def yasa_stages(
    eeg: np.ndarray,
    *,
    eog: np.ndarray | None = None,
    emg: np.ndarray | None = None,
    age: float | None = None,
    male: bool | None = None,
) -> np.ndarray:
    """Stage one contiguous stretch of a night with YASA's pretrained classifier.

    Parameters
    ----------
    eeg, eog, emg : ndarray, shape ``(epochs, 3840)``
        Robust-normalised store signals at 128 Hz, one row per 30-s epoch
        (EOG and EMG optional).
    age : float, optional
        Age in years; ``male`` the sex (YASA uses both when given).

    Returns
    -------
    ndarray, int64, shape ``(epochs,)``
        Stage codes W=0 N1=1 N2=2 N3=3 REM=4.
    """
    import warnings

    import mne
    import yasa

    epochs = eeg.shape[0]
    if epochs < MIN_EPOCHS:
        raise ValueError(f"YASA needs at least {MIN_EPOCHS} epochs (5 min), got {epochs}")
    rate = get_modality("eeg").store_rate_hz
    names, channels = ["EEG"], [eeg]
    for name, signal in (("EOG", eog), ("EMG", emg)):
        if signal is not None:
            names.append(name)
            channels.append(signal)
    # µV -> V: MNE holds volts, YASA multiplies back to µV.
    data = np.stack([c.reshape(-1) * NOMINAL_UV[n.lower()] * 1e-6 for n, c in zip(names, channels)])
    info = mne.create_info(names, sfreq=rate, ch_types=["eeg", "eog", "emg"][: len(names)], verbose=False)
    raw = mne.io.RawArray(data, info, verbose=False)
    metadata = {"age": float(age), "male": bool(male)} if age is not None and male is not None else None
    staging = yasa.SleepStaging(
        raw,
        eeg_name="EEG",
        eog_name="EOG" if eog is not None else None,
        emg_name="EMG" if emg is not None else None,
        metadata=metadata,
    )
    with warnings.catch_warnings():
        # YASA's shipped classifiers were pickled with an older scikit-learn.
        warnings.simplefilter("ignore")
        predicted = staging.predict()
    labels = predicted.hypno if hasattr(predicted, "hypno") else predicted  # yasa >= 0.7 returns a Hypnogram
    codes = np.array([_YASA_CODES.get(_short(s), 0) for s in np.asarray(labels).ravel()], dtype=np.int64)
    if codes.size != epochs:
        # YASA stages floor(duration / 30 s) epochs, which equals ours; guard anyway.
        raise ValueError(f"YASA returned {codes.size} epochs for {epochs} x {EPOCH_SECONDS} s of signal")
    return codes
