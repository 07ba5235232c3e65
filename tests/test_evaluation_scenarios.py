"""Robustness scenarios: single modalities, all-but-one and device set-ups."""

import pytest

from s2v_core.evaluation.scenarios import DEVICE_SCENARIOS, robustness_scenarios
from s2v_core.modalities import MODALITY_KEYS


def test_all_nine_give_single_leave_one_out_and_device_scenarios():
    scenarios = robustness_scenarios(MODALITY_KEYS)
    assert len(scenarios) == 9 + 9 + len(DEVICE_SCENARIOS)
    assert scenarios["only:ecg"] == ("ecg",)
    assert scenarios["without:eeg"] == MODALITY_KEYS[1:]
    assert scenarios["home_sleep_test"] == ("hr", "spo2", "airflow", "thorax", "abdomen")
    assert scenarios["wearable"] == ("hr", "spo2", "thorax")
    assert scenarios["eeg_headband"] == ("eeg", "eog")


def test_scenarios_are_restricted_to_available_modalities():
    scenarios = robustness_scenarios(["ecg", "eeg"])
    assert set(scenarios) == {"only:eeg", "only:ecg", "without:eeg", "without:ecg", "psg", "eeg_headband"}
    assert scenarios["psg"] == ("eeg", "ecg") and scenarios["eeg_headband"] == ("eeg",)
    assert set(robustness_scenarios(["hr"])) == {"only:hr", "psg", "home_sleep_test", "wearable"}


def test_selecting_scenarios_by_name():
    assert robustness_scenarios(MODALITY_KEYS, names=["wearable"]) == {"wearable": ("hr", "spo2", "thorax")}
    with pytest.raises(ValueError, match="unknown scenario 'smartwatch'"):
        robustness_scenarios(MODALITY_KEYS, names=["smartwatch"])
