import pytest

from s2v_core.modalities import (
    MODALITY_KEYS,
    Modality,
    get_modality,
    match_channel,
    modality_index,
    parse_modalities,
)


def test_registry_has_the_nine_modalities_with_store_rates():
    assert MODALITY_KEYS == ("eeg", "eog", "emg", "ecg", "hr", "spo2", "airflow", "thorax", "abdomen")
    assert get_modality("eeg").samples_per_epoch == 3840
    assert get_modality("spo2").samples_per_epoch == 120
    assert get_modality("thorax").samples_per_epoch == 480


@pytest.mark.parametrize(
    "label,key",
    [
        ("EEG Fpz-Cz", "eeg"),
        ("c3-m2", "eeg"),
        ("EOG  horizontal", "eog"),
        ("EMG submental", "emg"),
        ("EKG", "ecg"),
        ("H.R.", "hr"),
        ("SaO2", "spo2"),
        ("NASAL PRES", "airflow"),
        ("THOR RES", "thorax"),
        ("ABDO RES", "abdomen"),
    ],
)
def test_aliases_match_case_insensitively(label, key):
    assert match_channel(label) == key


def test_unknown_channels_are_not_guessed():
    assert match_channel("EEG Pz-Oz") is None
    assert match_channel("Temp rectal") is None
    assert match_channel("EEG Pz-Oz", {"eeg pz-oz": "eeg"}) == "eeg"


def test_parse_modalities_orders_and_validates():
    assert parse_modalities("ecg,eeg") == ("eeg", "ecg")
    assert parse_modalities(None) == MODALITY_KEYS
    assert modality_index("abdomen") == 8
    with pytest.raises(ValueError, match="--modalities.*'eeeg'"):
        parse_modalities("eeeg")
    with pytest.raises(ValueError, match="twice"):
        parse_modalities("eeg,eeg")


@pytest.mark.parametrize("rate", [0, -4])
def test_a_store_rate_must_be_positive(rate):
    with pytest.raises(ValueError, match=r"modality 'x': store_rate_hz must be positive, found -?\d"):
        Modality("x", rate, "a.u.", ())


@pytest.mark.parametrize("rate", [4.5, 0.1, "128", True])
def test_a_store_rate_gives_whole_samples_per_epoch(rate):
    with pytest.raises(ValueError, match=r"modality 'x': store_rate_hz must be a whole number of Hz .*30-s epoch"):
        Modality("x", rate, "a.u.", ())


def test_a_numpy_integer_rate_is_a_whole_number():
    import numpy as np

    assert Modality("x", np.int64(8), "a.u.", ()).samples_per_epoch == 240
