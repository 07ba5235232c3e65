"""Decoding one recording into store rows: schema, windows, stage alignment, modality mask, bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from s2v_core.io.base import UnreadableRecording
from s2v_core.io.metadata import RecordingMetadata
from s2v_core.io.site_config import HypnogramConfig, SiteConfig
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.recording import choose_channels, decode_recording
from s2v_core.store import store_schema, table_to_batch
from tests.test_io_edf import write_edf

SITE = SiteConfig(name="lab", hypnogram=HypnogramConfig(format="csv"))
STAGE_NAMES = ["W", "N1", "N2", "N3", "R"]


def _night(seconds: int, seed: int = 0) -> dict[str, tuple[float, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "C3-M2": (256.0, rng.normal(0, 30, 256 * seconds)),
        "C4-M1": (256.0, rng.normal(0, 30, 256 * seconds)),
        "E1-M2": (256.0, rng.normal(0, 50, 256 * seconds)),
        "ECG": (256.0, rng.normal(0, 400, 256 * seconds)),
        "SpO2": (1.0, 95 + rng.integers(-2, 3, seconds).astype(float)),
        "Flow": (32.0, rng.normal(0, 1, 32 * seconds)),
        "Position": (1.0, rng.integers(0, 4, seconds).astype(float)),
    }


def _hypnogram(path, n_epochs, seed=0):
    stages = np.random.default_rng(seed).integers(0, 5, n_epochs)
    path.write_text("stage\n" + "\n".join(STAGE_NAMES[s] for s in stages) + "\n")
    return stages


def test_round_trip_schema_windows_stages_and_mask(tmp_path):
    signal = write_edf(tmp_path / "r1.edf", _night(1230), file_type="edf+")  # 41 epochs -> 4 windows of 10
    stages = _hypnogram(tmp_path / "r1.csv", 41)
    metadata = RecordingMetadata(subject_id="s1", age=51.0, sex=0, outcomes={"ahi": 7.5})
    decoded = decode_recording(
        str(signal),
        recording_id="r1",
        site=SITE,
        metadata=metadata,
        hypnogram_path=str(tmp_path / "r1.csv"),
        epochs_per_window=10,
    )
    table = decoded.table
    assert table.schema.equals(store_schema(10), check_metadata=True)
    table.validate(full=True)
    assert decoded.windows == table.num_rows == 4  # the ragged 41st epoch is dropped
    assert decoded.modalities == ("eeg", "eog", "ecg", "spo2", "airflow")
    assert decoded.channels["eeg"] == "C3-M2"  # registry alias order: C3-M2 before C4-M1
    assert decoded.unknown_channels == ("Position",)
    batch = table_to_batch(table, epochs_per_window=10)
    np.testing.assert_array_equal(batch["stages"], stages[:40].reshape(4, 10))
    assert batch["present"].all(axis=0).tolist() == [k in decoded.modalities for k in MODALITY_KEYS]
    assert batch["eeg"].shape == (4, 10, 3840) and batch["spo2"].shape == (4, 10, 120)
    assert abs(float(np.median(batch["eeg"]))) < 0.1 and 0.7 < float(np.std(batch["eeg"])) < 1.3
    assert table.column("recording_id").to_pylist() == ["r1"] * 4
    assert table.column("subject_id").to_pylist() == ["s1"] * 4
    assert table.column("start_epoch").to_pylist() == [0, 10, 20, 30]
    assert batch["age"].tolist() == [51.0] * 4 and batch["sex"].tolist() == [0.0] * 4
    assert table.column("outcomes").to_pylist()[0] == [("ahi", 7.5)]
    assert table.column("emg").null_count == 4


def test_nan_and_flat_stretches_mark_the_modality_absent_in_those_windows(tmp_path):
    night = _night(1200)
    ecg = night["ECG"][1].copy()
    ecg[256 * 700 : 256 * 701] = 0.0
    ecg[256 * 300 : 256 * 600] = ecg[256 * 300]  # window 1 flat (300-600 s)
    night["ECG"] = (256.0, ecg)
    signal = write_edf(tmp_path / "r.edf", night, file_type="edf")
    decoded = decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)
    present = table_to_batch(decoded.table, epochs_per_window=10)["present"]
    ecg_index = MODALITY_KEYS.index("ecg")
    assert present[:, ecg_index].tolist() == [True, False, True, True]
    assert present[:, MODALITY_KEYS.index("eeg")].all()
    assert any("ecg (ECG)" in note and "1 flat" in note for note in decoded.notes)


def test_signal_without_hypnogram_is_kept_with_unknown_stages(tmp_path):
    signal = write_edf(tmp_path / "r.edf", _night(600), file_type="edf")
    decoded = decode_recording(
        str(signal),
        recording_id="r",
        site=SITE,
        epochs_per_window=10,
        hypnogram_problem="r.edf: no hypnogram matching 'r.csv'; stages set to -1",
    )
    assert decoded.windows == 2
    assert (table_to_batch(decoded.table, epochs_per_window=10)["stages"] == -1).all()
    assert "no hypnogram" in decoded.notes[0]


def test_short_hypnogram_is_aligned_on_the_overlap(tmp_path):
    signal = write_edf(tmp_path / "r.edf", _night(600), file_type="edf")
    stages = _hypnogram(tmp_path / "r.csv", 15)
    decoded = decode_recording(
        str(signal), recording_id="r", site=SITE, epochs_per_window=10, hypnogram_path=str(tmp_path / "r.csv")
    )
    got = table_to_batch(decoded.table, epochs_per_window=10)["stages"].reshape(-1)
    assert got[:15].tolist() == stages.tolist() and (got[15:] == -1).all()
    assert any("shorter than the signal" in note for note in decoded.notes)


def test_unreadable_hypnogram_keeps_the_signals(tmp_path):
    signal = write_edf(tmp_path / "r.edf", _night(600), file_type="edf")
    (tmp_path / "r.xml").write_text("<oops")
    decoded = decode_recording(
        str(signal),
        recording_id="r",
        site=SiteConfig(name="lab"),
        hypnogram_path=str(tmp_path / "r.xml"),
        epochs_per_window=10,
    )
    assert decoded.windows == 2 and "hypnogram unreadable" in decoded.notes[0]


def test_channel_choice_registry_aliases_then_site_entries(tmp_path):
    night = _night(600)
    night["EEG Pz-Oz"] = night.pop("C4-M1")
    signal = write_edf(tmp_path / "r.edf", night, file_type="edf")
    from s2v_core.io.edf import open_edf

    channels = open_edf(signal).header.channels
    site = SiteConfig(name="lab", channels={"EEG Pz-Oz": "eeg", "Position": "thorax"}, ignore_channels=("Flow",))
    chosen, unknown = choose_channels(channels, site)
    assert chosen["eeg"].label == "C3-M2" and chosen["thorax"].label == "Position"
    assert unknown == () and "airflow" not in chosen  # ignored channels are skipped entirely
    # ignoring the canonical derivation makes the site's own label the choice
    site = SiteConfig(name="lab", channels={"EEG Pz-Oz": "eeg"}, ignore_channels=("C3-M2",))
    assert choose_channels(channels, site)[0]["eeg"].label == "EEG Pz-Oz"


def test_too_short_recording_is_quarantined(tmp_path):
    signal = write_edf(tmp_path / "r.edf", _night(200), file_type="edf")
    with pytest.raises(UnreadableRecording, match="shorter than one window"):
        decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)


def test_absurd_sampling_rate_is_quarantined(tmp_path):
    signal = write_edf(tmp_path / "r.edf", _night(600), file_type="edf")
    raw = bytearray(signal.read_bytes())
    raw[244:252] = b"1e-7    "  # record duration: 256 samples per 0.1 us
    signal.write_bytes(bytes(raw))
    with pytest.raises(UnreadableRecording, match="absurd sampling rate") as caught:
        decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)
    assert "r.edf" in str(caught.value)


def test_no_known_channel_is_quarantined(tmp_path):
    signal = write_edf(tmp_path / "r.edf", {"Xyz": (100.0, np.ones(60000))}, file_type="edf")
    with pytest.raises(UnreadableRecording, match="no channel maps to a modality"):
        decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)


def test_all_flat_is_quarantined(tmp_path):
    signal = write_edf(tmp_path / "r.edf", {"EEG": (100.0, np.zeros(60000))}, file_type="edf")
    with pytest.raises(UnreadableRecording, match=r"NaN, flat or implausible in every window \(eeg \(EEG\)\)"):
        decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)


def test_implausible_spo2_and_heart_rate_windows_are_absent(tmp_path):
    """A probe off the finger (SpO2 0 %) and an AC-coupled pulse channel are not SpO2 and heart rate."""
    night = _night(1200)
    spo2 = night["SpO2"][1].copy()
    spo2[300:600] = np.abs(np.random.default_rng(2).normal(0.0, 1.0, 300))  # window 1: probe off, noise near 0
    spo2[620:680] = 0.0  # a minute off within window 2: most of the window is still SpO2
    night["SpO2"] = (1.0, spo2)
    night["HR"] = (1.0, np.random.default_rng(1).normal(0.0, 0.3, 1200))  # centred on 0
    signal = write_edf(tmp_path / "r.edf", night, file_type="edf")
    decoded = decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)
    present = table_to_batch(decoded.table, epochs_per_window=10)["present"]
    assert present[:, MODALITY_KEYS.index("spo2")].tolist() == [True, False, True, True]
    assert "hr" not in decoded.modalities and "eeg" in decoded.modalities
    assert any("spo2 (SpO2): 1 of 4 windows mostly outside 40-101" in note for note in decoded.notes)
    assert any("hr (HR): 4 of 4 windows mostly outside 20-250 bpm" in note for note in decoded.notes)


def test_only_implausible_channels_is_quarantined(tmp_path):
    signal = write_edf(tmp_path / "r.edf", {"SaO2": (1.0, np.linspace(-0.5, 0.5, 600))}, file_type="edf")
    with pytest.raises(UnreadableRecording, match=r"implausible in every window \(spo2 \(SaO2\)\)"):
        decode_recording(str(signal), recording_id="r", site=SITE, epochs_per_window=10)


def test_dreams_excerpt_with_its_five_second_hypnogram(real_data):
    folder = real_data / "DREAMS_Spindles"
    site = SiteConfig(
        name="dreams",
        channels={
            "C3-A1": "eeg",
            "EOG1-A1": "eog",
            "EMG1": "emg",
            "NAF1": "airflow",
            "VTH": "thorax",
            "VAB": "abdomen",
            "SAO2": "spo2",
            "PR": "hr",
        },
        ignore_channels=("POS", "PHONO", "hypnogram", "hypnogram_aut"),
        hypnogram=HypnogramConfig(format="dreams_txt", epoch_seconds=5.0),
    )
    decoded = decode_recording(
        str(folder / "excerpt3.edf"),
        recording_id="excerpt3",
        site=site,
        hypnogram_path=str(folder / "Hypnogram_excerpt3.txt"),
        epochs_per_window=10,
    )
    assert decoded.windows == 6  # 30 min
    # Its SAO2 and PR are AC-coupled (centred on 0): not SpO2 and heart rate, whatever the site maps.
    assert set(decoded.modalities) == {"eeg", "eog", "emg", "ecg", "airflow", "thorax", "abdomen"}
    assert any("spo2 (SAO2): 6 of 6 windows mostly outside" in note for note in decoded.notes)
    stages = table_to_batch(decoded.table, epochs_per_window=10)["stages"].reshape(-1)
    assert len(stages) == 60 and set(np.unique(stages)) <= {0, 1, 2, 3, 4} and 3 in stages
    assert "FP1-A1" in decoded.unknown_channels and "hypnogram" not in decoded.unknown_channels


def test_sleep_edf_crop_with_its_full_night_hypnogram(real_data):
    folder = real_data / "SleepEDF_SC4001"
    decoded = decode_recording(
        str(folder / "short_psg.edf"),
        recording_id="SC4001",
        site=SiteConfig(name="sleepedf"),
        hypnogram_path=str(folder / "SC4001EC-Hypnogram.edf"),
        epochs_per_window=5,
    )
    assert decoded.windows == 2 and decoded.modalities == ("eeg", "eog")
    assert (table_to_batch(decoded.table, epochs_per_window=5)["stages"] == 0).all()  # the first 5 min are wake
    assert any("longer than the signal" in note for note in decoded.notes)
    assert any("EMG submental" in note and "too slow" in note for note in decoded.notes)


def test_openbci_bdf_flat_ecg_is_absent(real_data):
    decoded = decode_recording(
        str(real_data / "OpenBCI_COsleep" / "multiple_annotation_chans.bdf"),
        recording_id="cosleep",
        epochs_per_window=2,
        site=SiteConfig(name="openbci", channels={"C3": "eeg", "EOG": "eog"}),
    )
    assert decoded.windows == 4 and decoded.modalities == ("eeg", "eog", "emg")
    assert any("ecg (ECG)" in note and "4 flat" in note for note in decoded.notes)
    assert isinstance(decoded.table, pa.Table)
