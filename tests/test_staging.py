"""Staging raw recordings (s2v_core.staging, no Ray) on the real files, and ``s2v stage`` on a folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from s2v_core.finetuning import FineTunedModel, FinetuneSpec, save_finetuned
from s2v_core.io.identity import Identities, PseudonymKey
from s2v_core.model import SleepEncoder, model_config
from s2v_core.staging import sleep_summary, stage_recording

IDENTITIES = Identities(PseudonymKey(b"s2v-test-pseudonym-key-0123456789abcdef", origin="test"))
PATIENT = "Doe_John_1961-02-03"
#: DREAMS labels that are not registry aliases, mapped the way a site config does for ingest.
DREAMS_SITE = (
    'name = "dreams"\n[channels]\n"C3-A1" = "eeg"\n"EOG1-A1" = "eog"\n"EMG1" = "emg"\n'
    '"NAF1" = "airflow"\n"VTH" = "thorax"\n"VAB" = "abdomen"\n'
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An (untrained) staging model over all nine modalities: outputs are arbitrary, their form is not."""
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=10))
    model = FineTunedModel(encoder, FinetuneSpec(task="staging", head="temporal"))
    return save_finetuned(model, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def dreams_site(tmp_path_factory):
    path = tmp_path_factory.mktemp("site") / "dreams.toml"
    path.write_text(DREAMS_SITE)
    return path


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_dreams_excerpt_staged_with_a_site_config(real_data, model_dir, dreams_site, tmp_path):
    source = real_data / "DREAMS_Spindles" / "excerpt3.edf"
    result = stage_recording(source, model=model_dir, out=tmp_path, identities=IDENTITIES, site_config=dreams_site)
    assert result.name.startswith("rec-") and "excerpt" not in result.name
    assert len(result.stages) == 60  # 30 min of 30-s epochs
    assert set(result.summary["modalities"]) >= {"eeg", "eog", "emg", "ecg", "airflow"}
    assert not {"hr", "spo2"} & set(result.summary["modalities"])  # AC-coupled SAO2, PULSE: implausible
    assert result.summary["channels"]["eeg"] == "C3-A1"
    assert np.allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    rows = _rows(result.files["csv"])
    assert len(rows) == 60 and rows[1]["onset_s"] == "30" and rows[-1]["epoch"] == "59"
    assert {r["stage"] for r in rows} <= {"W", "N1", "N2", "N3", "REM"}
    assert list(rows[0]) == ["epoch", "onset_s", "stage", "p_W", "p_N1", "p_N2", "p_N3", "p_REM"]
    summary = json.loads(open(result.files["summary"]).read())
    assert summary["time_in_bed_min"] == 30.0
    assert sum(summary["stage_minutes"].values()) == pytest.approx(30.0)
    assert 0 <= summary["total_sleep_time_min"] <= 30.0
    with open(result.files["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    for path in tmp_path.iterdir():
        assert "excerpt" not in path.name
        assert b"excerpt" not in path.read_bytes() and b"DREAMS" not in path.read_bytes()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_lora_and_full_models_stage(real_data, tmp_path, mode):
    """Their encoders train (grad on in features()); staging must still read them without gradients."""
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=10))
    model = save_finetuned(FineTunedModel(encoder, FinetuneSpec(task="staging", mode=mode)), tmp_path / "model")
    result = stage_recording(real_data / "SleepEDF_SC4001" / "short_psg.edf", model=model, identities=IDENTITIES)
    assert len(result.stages) == 10 and np.isfinite(result.probabilities).all()


def test_dreams_without_site_config_uses_what_maps(real_data, model_dir):
    result = stage_recording(real_data / "DREAMS_Spindles" / "excerpt3.edf", model=model_dir, identities=IDENTITIES)
    # The registry aliases alone map ECG, PULSE (hr) and SAO2 (spo2); the last two are AC-coupled
    # (centred on 0, no bpm or %), so only the ECG is used.
    assert result.summary["modalities"] == ["ecg"]
    why = [note for note in result.summary["notes"] if "spo2 (SAO2)" in note]
    assert len(why) == 1 and why[0].startswith(f"{result.summary['recording']}: ") and "AC-coupled" in why[0]
    assert not any("excerpt" in note or "DREAMS" in note for note in result.summary["notes"])
    assert len(result.stages) == 60 and (result.stages >= 0).all()


def test_sleep_edf_crop(real_data, model_dir, tmp_path):
    result = stage_recording(
        real_data / "SleepEDF_SC4001" / "short_psg.edf", model=model_dir, out=tmp_path, identities=IDENTITIES
    )
    assert len(result.stages) == 10  # 300 s
    # Its 1-Hz EMG envelope and respiration are too slow for their modalities: not used.
    assert result.summary["modalities"] == ["eeg", "eog"]
    assert len(_rows(result.files["csv"])) == 10


def test_openbci_bdf_and_what_cannot_be_staged(real_data, model_dir):
    source = real_data / "OpenBCI_COsleep" / "multiple_annotation_chans.bdf"
    result = stage_recording(source, model=model_dir, identities=IDENTITIES)
    assert len(result.stages) == 8  # 247 s: the ragged end is dropped
    assert result.summary["modalities"] == ["emg"]  # its ECG is flat (disconnected)
    with pytest.raises(ValueError, match=r"rec-[0-9a-f]{16}: the recording has emg; .*nothing in common") as caught:
        stage_recording(source, model=model_dir, identities=IDENTITIES, modalities=["eeg"])
    assert "multiple_annotation" not in str(caught.value)
    with pytest.raises(ValueError, match="no signal channels") as caught:
        stage_recording(real_data / "HMC_SN001" / "test_edfann.edf", model=model_dir, identities=IDENTITIES)
    assert "test_edfann" not in str(caught.value) and "HMC" not in str(caught.value)


def test_a_folder_with_a_broken_file_goes_on(real_data, model_dir, tmp_path):
    from s2v_core import stage

    folder = tmp_path / "clinic" / PATIENT
    folder.mkdir(parents=True)
    (folder / "psg.edf").symlink_to(real_data / "SleepEDF_SC4001" / "short_psg.edf")
    (folder / f"{PATIENT}.edf").write_bytes(b"0       " + b"not an EDF header" * 20)
    out, mapping = tmp_path / "out", tmp_path / "private" / "mapping.csv"
    mapping.parent.mkdir()
    results = stage([tmp_path / "clinic"], model=model_dir, out=out, mapping=mapping, identities=IDENTITIES)
    assert sorted(r["status"] for r in results) == ["failed", "ok"]
    failed = next(r for r in results if r["status"] == "failed")
    assert failed["reason"] and "\n" not in failed["reason"] and failed["name"] in failed["reason"]
    for path in out.rglob("*"):
        assert "Doe" not in path.name and b"Doe" not in path.read_bytes() and b"clinic" not in path.read_bytes()
    assert json.loads((out / "results.json").read_text()) == results
    assert {row["name"] for row in _rows(mapping)} == {r["name"] for r in results}
    with pytest.raises(ValueError, match="--mapping .*outside --out"):
        stage([tmp_path / "clinic"], model=model_dir, out=out, mapping=out / "m.csv", identities=IDENTITIES)


def test_sleep_summary_of_a_hand_made_night():
    # W W N1 N2 W N2 REM W W  (30-s epochs)
    stages = np.array([0, 0, 1, 2, 0, 2, 4, 0, 0])
    summary = sleep_summary(stages, ("W", "N1", "N2", "N3", "REM"))
    assert summary["time_in_bed_min"] == 4.5 and summary["total_sleep_time_min"] == 2.0
    assert summary["sleep_onset_latency_min"] == 1.0
    assert summary["waso_min"] == 0.5  # the wake epoch between N2 and N2; the final wake is not WASO
    assert summary["sleep_efficiency_percent"] == pytest.approx(100 * 2.0 / 4.5)
    assert summary["stage_percent_of_tst"] == {"N1": 25.0, "N2": 50.0, "N3": 0.0, "REM": 25.0}
    awake = sleep_summary(np.zeros(4, int), ("W", "NREM", "REM"))
    assert awake["total_sleep_time_min"] == 0 and awake["sleep_onset_latency_min"] is None
    assert awake["stage_percent_of_tst"] == {"NREM": None, "REM": None}


@pytest.mark.integration
def test_s2v_stage_folder_on_ray(ray_local, real_data, model_dir, tmp_path, capsys):
    from pipelines.cli import main as s2v

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, source in (
        ("a.edf", "SleepEDF_SC4001/short_psg.edf"),
        ("b.bdf", "OpenBCI_COsleep/multiple_annotation_chans.bdf"),
        ("c.edf", "HMC_SN001/test_edfann.edf"),
    ):
        (folder / name).symlink_to(real_data / source)
    key = tmp_path / "key"
    key.write_text("s2v-test-pseudonym-key-0123456789abcdef\n")
    out = tmp_path / "out"
    assert (
        s2v(["stage", str(folder), "--model", str(model_dir), "--out", str(out), "--pseudonym-key-file", str(key)]) == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["staged"], printed["failed"]) == (2, 1)
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["epochs"] for r in results) == [0, 8, 10]
    assert "no signal channels" in next(r["reason"] for r in results if r["status"] == "failed")
    assert len(list(out.glob("rec-*_hypnogram.png"))) == 2


def test_embed_recording_from_the_package_api(real_data, model_dir):
    from s2v_core import embed_recording

    embedding = embed_recording(real_data / "SleepEDF_SC4001" / "short_psg.edf", model=model_dir)
    assert embedding.features.shape == (10, 16) and embedding.windows == [(0, 10)]
    assert embedding.modalities == ("eeg", "eog") and embedding.present[:, :2].all()
    assert np.isfinite(embedding.features).all() and np.abs(embedding.features).sum() > 0


def test_recordings_are_encoded_in_the_windows_the_model_was_trained_on(real_data):
    from s2v_core import embed_recording

    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=10), ("eeg", "eog"))
    model = FineTunedModel(encoder, FinetuneSpec(task="staging3", head="temporal", epochs_per_window=4))
    embedding = embed_recording(real_data / "SleepEDF_SC4001" / "short_psg.edf", model=model)
    assert embedding.windows == [(0, 4), (4, 8), (8, 10)]  # the last window is shorter, never padded
    assert model.window_epochs == 4


def test_a_night_head_in_the_model_directory_stages_the_whole_recording(real_data, model_dir, dreams_site, tmp_path):
    import shutil

    from s2v_core import embed_recording
    from s2v_core.night_context import NightContextHead, save_night_head

    source = real_data / "DREAMS_Spindles" / "excerpt3.edf"
    plain = stage_recording(source, model=model_dir, identities=IDENTITIES, site_config=dreams_site)
    assert plain.summary["night_context"] is False
    with_head = shutil.copytree(model_dir, tmp_path / "model")
    torch.manual_seed(1)
    head = NightContextHead(16, 5, depth=1, heads=2, hidden=32, dropout=0.0)
    save_night_head(head, with_head)
    result = stage_recording(
        source, model=with_head, out=tmp_path / "out", identities=IDENTITIES, site_config=dreams_site
    )
    assert result.summary["night_context"] is True and len(result.stages) == 60
    assert json.loads(open(result.files["summary"]).read())["night_context"] is True
    # Stage 2 over the whole recording in epoch order: the night head's probabilities, not the window head's.
    features = embed_recording(source, model=model_dir, site_config=dreams_site).features
    with torch.no_grad():
        expected = torch.softmax(head.eval()(torch.from_numpy(features)), dim=-1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    assert not np.allclose(result.probabilities, plain.probabilities, atol=1e-3)


def _constant(model: FineTunedModel, logits) -> FineTunedModel:
    """``model`` with a head that outputs ``logits`` for every epoch, whatever the input."""
    with torch.no_grad():
        model.head.out.weight.zero_()
        model.head.out.bias.copy_(torch.as_tensor(logits, dtype=torch.float32))
    return model


def _encoder():
    torch.manual_seed(0)
    return SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=10))


@pytest.fixture(scope="module")
def asleep_model(tmp_path_factory):
    """A staging model that calls every epoch N2 (so every staged epoch is sleep)."""
    model = _constant(FineTunedModel(_encoder(), FinetuneSpec(task="staging", head="temporal")), [0, 0, 9, 0, 0])
    return save_finetuned(model, tmp_path_factory.mktemp("asleep") / "model")


def _events_model(directory, *, logit: float, modalities=(), threshold: float | None = 0.3, rate: float = 0.0):
    spec = FinetuneSpec(task="events", head="temporal", modalities=tuple(modalities))
    model = _constant(FineTunedModel(_encoder(), spec), [logit])
    extra = {"event_threshold": threshold, "event_threshold_from": "val nights (closest AHI, MAE)"}
    if rate:
        extra["events_per_epoch"] = rate
    return save_finetuned(model, directory, extra=extra if threshold is not None else None)


def test_event_index_of_a_hand_made_night():
    from s2v_core.staging import EventDetector, event_index

    detector = EventDetector(FineTunedModel(_encoder(), FinetuneSpec(task="events")), threshold=0.5)
    probability = np.array([0.9, 0.9, 0.1, 0.8, np.nan, 0.9])
    stages = np.array([2, 2, 2, 0, 2, 2])  # the event in wake (epoch 3) and the unread epoch 4 do not count
    ahi = event_index(probability, stages, detector=detector, modalities=["airflow"])
    assert (ahi["events"], ahi["event_epochs"]) == (2, 3)
    assert ahi["events_per_hour"] == pytest.approx(2 / (5 * 30 / 3600))  # 48 events/h of sleep
    assert ahi["severity"] == "severe" and ahi["reason"] is None
    dense = EventDetector(detector.model, threshold=0.5, events_per_epoch=0.75)  # the 2-epoch run holds 1.5
    assert event_index(probability, stages, detector=dense, modalities=["airflow"])["events"] == 2.5
    with pytest.raises(ValueError, match="--events-model: events_per_epoch: expected a finite number >= 0"):
        EventDetector(detector.model, events_per_epoch=float("nan"))
    awake = event_index(probability, np.zeros(6, int), detector=detector, modalities=["airflow"])
    assert awake["events_per_hour"] is None and awake["severity"] is None
    with pytest.raises(ValueError, match="--events-model: expected a respiratory-event detector.*'staging'"):
        EventDetector(FineTunedModel(_encoder(), FinetuneSpec(task="staging")))
    with pytest.raises(ValueError, match="--events-model: expected a respiratory-event detector.*'arousal'"):
        EventDetector(FineTunedModel(_encoder(), FinetuneSpec(task="arousal")))


def test_stage_with_an_event_detector_reports_the_ahi(real_data, asleep_model, dreams_site, tmp_path):
    from pipelines.stage import stage_paths
    from s2v_core.staging import load_event_detector

    source = real_data / "DREAMS_Spindles" / "excerpt3.edf"
    always = _events_model(tmp_path / "always", logit=9.0)
    detector = load_event_detector(always)
    assert (detector.threshold, detector.threshold_from) == (0.3, "val nights (closest AHI, MAE)")
    assert detector.events_per_epoch == 0.0  # no rate in finetuned.json (older models): one event per run
    result = stage_recording(
        source,
        model=asleep_model,
        events_model=always,
        out=tmp_path / "out",
        identities=IDENTITIES,
        site_config=dreams_site,
    )
    ahi = result.summary["ahi"]
    # Every epoch asleep (N2) and holding an event: one run of 60 epochs in 0.5 h of sleep.
    assert (ahi["events"], ahi["event_epochs"], ahi["events_per_hour"]) == (1, 60, 2.0)
    assert ahi["severity"] == "normal" and ahi["threshold"] == 0.3 and "airflow" in ahi["modalities"]
    rows = _rows(result.files["csv"])
    assert list(rows[0])[-1] == "p_event" and float(rows[0]["p_event"]) > 0.99
    assert json.loads(open(result.files["summary"]).read())["ahi"] == ahi
    # A rate fitted on val nights travels in finetuned.json: the 60-epoch run holds 30 events.
    dense = load_event_detector(_events_model(tmp_path / "dense", logit=9.0, rate=0.5))
    assert dense.events_per_epoch == 0.5
    dense_ahi = stage_recording(
        source, model=asleep_model, events_model=dense, identities=IDENTITIES, site_config=dreams_site
    ).summary["ahi"]
    assert (dense_ahi["events"], dense_ahi["events_per_hour"], dense_ahi["severity"]) == (30.0, 60.0, "severe")
    never = _events_model(tmp_path / "never", logit=-9.0, threshold=None)
    assert load_event_detector(never).threshold == 0.5
    # The CLI's path, one file, no Ray: the result line carries the AHI.
    (results,) = stage_paths(
        [str(source)],
        model=str(asleep_model),
        out=str(tmp_path / "cli"),
        site_config=str(dreams_site),
        events_model=str(never),
    )
    assert results["status"] == "ok" and results["ahi"] == 0.0


def test_a_recording_the_detector_cannot_read_is_staged_without_ahi(real_data, asleep_model, model_dir, tmp_path):
    from pipelines.stage import stage_paths

    breathing = _events_model(tmp_path / "breathing", logit=9.0, modalities=("airflow", "thorax", "abdomen"))
    result = stage_recording(
        real_data / "SleepEDF_SC4001" / "short_psg.edf",
        model=asleep_model,
        events_model=breathing,
        identities=IDENTITIES,
    )
    assert len(result.stages) == 10 and result.summary["ahi"] == {
        "events_per_hour": None,
        "reason": "the events model reads airflow, thorax, abdomen; the recording gives eeg, eog",
    }
    with pytest.raises(ValueError, match="--events-model: expected a respiratory-event detector"):
        stage_paths(
            [str(real_data / "SleepEDF_SC4001")],
            model=str(asleep_model),
            out=str(tmp_path / "o"),
            events_model=str(model_dir),
        )
    with pytest.raises(FileNotFoundError, match="--events-model .*not a fine-tuned model"):
        stage_paths(
            [str(real_data / "SleepEDF_SC4001")],
            model=str(asleep_model),
            out=str(tmp_path / "o"),
            events_model=str(tmp_path),
        )
