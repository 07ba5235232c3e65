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
