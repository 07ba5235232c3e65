"""Hand-crafted features: each recovers the physiology it names on signals with a known answer."""

import numpy as np

from s2v_core.evaluation.features import FEATURES, epoch_features, feature_names
from s2v_core.modalities import MODALITY_KEYS, get_modality


def _time(key, epochs=2):
    modality = get_modality(key)
    return np.arange(epochs * modality.samples_per_epoch).reshape(epochs, -1) / modality.store_rate_hz


def _batch(**signals):
    present = np.zeros((1, len(MODALITY_KEYS)), dtype=bool)
    batch = {}
    for key, values in signals.items():
        batch[key] = values[None].astype(np.float32)
        present[0, MODALITY_KEYS.index(key)] = True
    return {**batch, "present": present}


def _feature(features, key, name):
    return features[0, :, feature_names(context=False).index(f"{key}.{name}")]


def test_features_recover_known_rhythms_rates_and_levels():
    rng = np.random.default_rng(0)
    t128, t16, t4 = _time("eeg"), _time("airflow"), _time("hr")
    alpha_eeg = np.sin(2 * np.pi * 10 * t128) + 0.05 * rng.standard_normal(t128.shape)
    delta_eog = np.sin(2 * np.pi * 1.5 * t128)
    beats = np.zeros_like(t128)
    beats[:, ::96] = 1.0  # one R peak every 0.75 s at 128 Hz: 80 beats/min
    breathing = np.sin(2 * np.pi * (15 / 60) * t16)  # 15 breaths/min
    spo2 = np.full(t4.shape, 96.0)
    spo2[1, 40:60] = 90.0
    features = epoch_features(
        _batch(eeg=alpha_eeg, eog=delta_eog, ecg=beats, airflow=breathing, hr=60 + 0 * t4, spo2=spo2), context=False
    )
    assert features.shape == (1, 2, sum(len(v) for v in FEATURES.values()))
    assert (_feature(features, "eeg", "rel_alpha") > 0.9).all()
    assert (_feature(features, "eog", "rel_delta") > 0.9).all()
    np.testing.assert_allclose(_feature(features, "ecg", "heart_rate_bpm"), 80.0, rtol=0.01)
    np.testing.assert_allclose(_feature(features, "airflow", "rate_per_min"), 15.0, atol=1.0)
    # Epoch 2: 20 of 120 samples at 90 % → mean 95 %, minimum 90 %, depth 5 points.
    np.testing.assert_allclose(_feature(features, "spo2", "depth"), [0.0, 5.0], atol=1e-5)
    # Absent modalities are NaN (the probe imputes them); present ones never are.
    assert np.isnan(_feature(features, "emg", "log_variance")).all()
    assert not np.isnan(_feature(features, "hr", "mean")).any()


def test_context_appends_the_window_mean():
    t128 = _time("eeg", epochs=3)
    features = epoch_features(_batch(eeg=np.sin(2 * np.pi * 10 * t128)), modalities=("eeg",))
    own, context = features[..., :6], features[..., 6:]
    np.testing.assert_allclose(context, np.broadcast_to(own.mean(axis=1, keepdims=True), own.shape), rtol=1e-5)
    assert len(feature_names(("eeg",))) == 12
