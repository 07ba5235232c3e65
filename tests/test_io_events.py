"""NSRR scored events → events per hour of sleep, and through decode_recording into the store's outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from s2v_core.io.events import event_indices, read_nsrr_events
from tests.test_io_edf import write_edf
from tests.test_io_hypnogram import EXPECTED, NSRR_XML


def _event(concept: str, start) -> str:
    kind = "SpO2 desaturation|SpO2 desaturation" if concept.startswith("SpO2") else "Respiratory|Respiratory"
    return (
        f"<ScoredEvent><EventType>{kind}</EventType><EventConcept>{concept}</EventConcept>"
        f"<Start>{start}</Start><Duration>10</Duration></ScoredEvent>"
    )


def _with_events(*events: str) -> str:
    return NSRR_XML.replace("</ScoredEvents>", "".join(events) + "</ScoredEvents>")


def test_indices_count_events_in_sleep_epochs_per_hour_of_sleep(tmp_path):
    # Stages (30-s): W W N1 N2 N2 N3 N3 REM ? ?  → 6 sleep epochs = 0.05 h.
    # NSRR_XML already holds an obstructive apnoea at 100 s (N2).
    path = tmp_path / "night-nsrr.xml"
    path.write_text(
        _with_events(
            _event("Hypopnea|Hypopnea", 160),  # N3: counted
            _event("Central apnea|Central Apnea", 20),  # wake: not counted
            _event("Hypopnea|Hypopnea", 250),  # unscored epoch: not counted
            _event("Hypopnea|Hypopnea", "nan"),  # no time: skipped
            _event("SpO2 desaturation|SpO2 desaturation", 215),  # REM
            _event("SpO2 desaturation|SpO2 desaturation", 5000),  # past the stages: not counted
        )
    )
    events = read_nsrr_events(path)
    assert sorted(events.onsets) == ["central_apnea", "desaturation", "hypopnea", "obstructive_apnea"]
    indices = event_indices(events, np.array(EXPECTED))
    assert indices == pytest.approx({"ahi_scored": 2 / 0.05, "oahi_scored": 2 / 0.05, "odi_scored": 1 / 0.05})


def test_no_index_without_sleep_or_without_scored_events(tmp_path):
    path = tmp_path / "night-nsrr.xml"
    path.write_text(NSRR_XML)
    events = read_nsrr_events(path)
    assert event_indices(events, np.zeros(10, int)) == {}  # awake all night
    assert "odi_scored" not in event_indices(events, np.array(EXPECTED))  # no desaturation was scored


def test_decode_recording_carries_the_indices_and_the_site_table_wins(tmp_path):
    from s2v_core.io.metadata import RecordingMetadata
    from s2v_core.io.site_config import SiteConfig
    from s2v_core.recording import decode_recording

    signal = write_edf(tmp_path / "night.edf", {"EEG": (100.0, np.random.default_rng(0).normal(size=100 * 300))})
    hypnogram = tmp_path / "night-nsrr.xml"
    hypnogram.write_text(_with_events(_event("Hypopnea|Hypopnea", 160)))
    site = SiteConfig(name="lab")  # hypnogram format auto: .xml is NSRR
    decoded = decode_recording(
        str(signal),
        recording_id="r",
        site=site,
        hypnogram_path=str(hypnogram),
        metadata=RecordingMetadata(outcomes={"ahi": 7.0, "oahi_scored": 3.0}),
        epochs_per_window=10,
    )
    outcomes = dict(decoded.table.column("outcomes")[0].as_py())
    assert outcomes == pytest.approx({"ahi": 7.0, "ahi_scored": 40.0, "oahi_scored": 3.0})
    broken = tmp_path / "broken.csv"
    broken.write_text("W\nN2\n")
    plain = decode_recording(str(signal), recording_id="r", site=site, hypnogram_path=str(broken), epochs_per_window=10)
    assert plain.table.column("outcomes")[0].as_py() == []


def test_synthetic_nsrr_night_gives_back_its_event_rate(tmp_path):
    """The synth writes every respiratory event it drew (in sleep) and one desaturation per event."""
    import datetime as dt

    from s2v_core.synth.night import draw_subject, simulate_night
    from s2v_core.synth.writers import write_nsrr_xml

    rng = np.random.default_rng(4)
    night = simulate_night(draw_subject(age=60.0, sex=1, ahi=25.0, rng=rng), epochs=960, rng=rng)
    path = tmp_path / "synth-nsrr.xml"
    write_nsrr_xml(path, night, start=dt.datetime(2020, 1, 1, 22, 0), rk=False, spo2_label="SpO2", airflow_label="Flow")
    stages = np.asarray(night.hypnogram.stages)
    sleep_hours = np.isin(stages, (1, 2, 3, 4)).sum() * 30 / 3600
    indices = event_indices(read_nsrr_events(path), stages)
    assert len(night.event_onsets_s) > 10
    assert indices["ahi_scored"] == pytest.approx(len(night.event_onsets_s) / sleep_hours)
    assert indices["odi_scored"] <= indices["ahi_scored"]  # a desaturation 10 s later may fall in wake


def _arousal(start, duration) -> str:
    return (
        "<ScoredEvent><EventType>Arousals|Arousals</EventType><EventConcept>ASDA arousal|Arousal (ASDA)"
        f"</EventConcept><Start>{start}</Start><Duration>{duration}</Duration></ScoredEvent>"
    )


def _spanning(concept: str, start, duration) -> str:
    return _event(concept, start).replace("<Duration>10</Duration>", f"<Duration>{duration}</Duration>")


def test_epoch_flags_mark_every_epoch_an_event_overlaps():
    from s2v_core.io.events import ScoredEvents, epoch_event_flags

    events = ScoredEvents(
        onsets={
            "obstructive_apnea": np.array([50.0]),  # 50-90 s: epochs 1 and 2
            "hypopnea": np.array([60.0, 290.0]),  # 60-70 s: epoch 2 only; 290-330 s clipped to epoch 9
            "desaturation": np.array([125.0]),  # no duration: the onset epoch 4
            "arousal": np.array([-10.0]),  # -10..5 s: epoch 0 (the part before the start is clipped)
        },
        durations={
            "obstructive_apnea": np.array([40.0]),
            "hypopnea": np.array([10.0, 40.0]),
            "desaturation": np.array([0.0]),
            "arousal": np.array([15.0]),
        },
        source="hand-made",
    )
    flags = epoch_event_flags(events, 10)
    assert flags.dtype == np.int8
    assert flags.tolist() == [8, 1, 1 | 2, 0, 4, 0, 0, 0, 0, 2]


def test_event_labels_round_trip_from_nsrr_xml_through_ingest_into_the_store(tmp_path):
    """XML events → decode_recording → Parquet store file → table_to_batch: the same per-epoch bits."""
    import pyarrow.parquet as pq

    from s2v_core.io.site_config import SiteConfig
    from s2v_core.recording import decode_recording
    from s2v_core.store import table_to_batch, write_store_file

    signal = write_edf(tmp_path / "night.edf", {"EEG": (100.0, np.random.default_rng(0).normal(size=100 * 600))})
    hypnogram = tmp_path / "night-nsrr.xml"
    hypnogram.write_text(
        _with_events(  # NSRR_XML: an obstructive apnoea at 100-112 s (epoch 3)
            _spanning("Hypopnea|Hypopnea", 170, 25),  # epochs 5, 6
            _spanning("SpO2 desaturation|SpO2 desaturation", 400, 30),  # epochs 13, 14
            _arousal(595, 10),  # epochs 19 (and 20, past the recording: clipped)
        )
    )
    decoded = decode_recording(
        str(signal), recording_id="r", site=SiteConfig(name="lab"), hypnogram_path=str(hypnogram), epochs_per_window=5
    )
    write_store_file(decoded.table, str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet")
    batch = table_to_batch(table, modalities=("eeg",), epochs_per_window=5)
    expected = np.zeros(20, dtype=np.int64)
    expected[[3]] |= 1
    expected[[5, 6]] |= 2
    expected[[13, 14]] |= 4
    expected[[19]] |= 8
    assert batch["events"].reshape(-1).tolist() == expected.tolist()
    assert batch["window_index"].tolist() == [0, 1, 2, 3]
    # A night whose hypnogram scores no events (a CSV) has no labels: null in the store, -1 in batches.
    stages_csv = tmp_path / "night.csv"
    stages_csv.write_text("stage\n" + "W\n" * 20)
    plain = decode_recording(
        str(signal), recording_id="r", site=SiteConfig(name="lab"), hypnogram_path=str(stages_csv), epochs_per_window=5
    )
    assert plain.table.column("events").null_count == 4
    assert (table_to_batch(plain.table, modalities=("eeg",), epochs_per_window=5)["events"] == -1).all()


def test_a_store_without_the_events_column_still_reads(tmp_path):
    """Stores written before the column existed: batches come without ``events``."""
    from s2v_core.store import table_to_batch
    from s2v_core.toystore import toy_windows

    table = toy_windows(site="a", recording_id="r", windows=2, epochs_per_window=3, rng=np.random.default_rng(0))
    old = table.drop_columns(["events"])
    batch = table_to_batch(old, modalities=("eeg",), epochs_per_window=3)
    assert "events" not in batch and batch["stages"].shape == (2, 3)


def test_synthetic_nsrr_xml_carries_apnoeas_and_arousals_as_epoch_labels(tmp_path):
    import datetime as dt

    from s2v_core.io.events import epoch_event_flags
    from s2v_core.synth.night import draw_subject, simulate_night
    from s2v_core.synth.writers import write_nsrr_xml

    rng = np.random.default_rng(5)
    night = simulate_night(draw_subject(age=55.0, sex=0, ahi=20.0, rng=rng), epochs=600, rng=rng)
    path = tmp_path / "synth-nsrr.xml"
    write_nsrr_xml(path, night, start=dt.datetime(2020, 1, 1, 22, 0), rk=True, spo2_label="SpO2", airflow_label="Flow")
    events = read_nsrr_events(path)
    assert events.onsets["arousal"].size == night.arousal_onsets_s.size > 0
    flags = epoch_event_flags(events, 600)
    onset_epochs = (night.event_onsets_s // 30).astype(int)
    assert ((flags[onset_epochs] & 3) > 0).all()  # every respiratory event's onset epoch is marked
    assert ((flags[(night.arousal_onsets_s // 30).astype(int)] & 8) > 0).all()
