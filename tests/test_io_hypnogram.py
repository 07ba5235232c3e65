"""Hypnogram readers: every format, generated and real, and the 30-s conventions they share."""

from __future__ import annotations

import numpy as np
import pytest

from s2v_core.io.base import Hypnogram, StageEvent, UnreadableRecording
from s2v_core.io.edf import open_edf
from s2v_core.io.hypnogram import HYPNOGRAM_READERS, detect_format, read_hypnogram
from s2v_core.io.hypnogram_csv import read_dreams_channel
from s2v_core.io.stages import align_stages, epoch_stages, events_from_codes, stage_code
from tests.test_io_edf import write_edf

NSRR_XML = """<?xml version="1.0" encoding="UTF-8"?>
<PSGAnnotation><SoftwareVersion>Compumedics</SoftwareVersion><EpochLength>30</EpochLength>
<ScoredEvents>
<ScoredEvent><EventType/><EventConcept>Recording Start Time</EventConcept><Start>0</Start><Duration>600</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Wake|0</EventConcept><Start>0</Start><Duration>60</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 1 sleep|1</EventConcept><Start>60</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 2 sleep|2</EventConcept><Start>90</Start><Duration>60</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 3 sleep|3</EventConcept><Start>150</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 4 sleep|4</EventConcept><Start>180</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>REM sleep|5</EventConcept><Start>210</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Movement|6</EventConcept><Start>240</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Unscored|9</EventConcept><Start>270</Start><Duration>30</Duration></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Obstructive apnea|Obstructive Apnea</EventConcept><Start>100</Start><Duration>12</Duration></ScoredEvent>
</ScoredEvents></PSGAnnotation>
"""
EXPECTED = [0, 0, 1, 2, 2, 3, 3, 4, -1, -1]


@pytest.mark.parametrize(
    "label, code",
    [
        ("Sleep stage W", 0),
        ("Sleep stage 1", 1),
        ("Sleep stage 2", 2),
        ("Sleep stage 3", 3),
        ("Sleep stage 4", 3),
        ("Sleep stage R", 4),
        ("Sleep stage ?", -1),
        ("Movement time", -1),
        ("Sleep stage N1", 1),
        ("Sleep stage N3", 3),
        ("Wake|0", 0),
        ("Stage 4 sleep|4", 3),
        ("REM sleep|5", 4),
        ("Unscored|9", -1),
        ("N2", 2),
        ("REM", 4),
        ("Lights off", None),
        ("Arousal", None),
    ],
)
def test_stage_vocabulary(label, code):
    assert stage_code(label) == code


def test_r_and_k_edf_annotations(tmp_path):
    labels = [
        "Sleep stage W",
        "Sleep stage W",
        "Sleep stage 1",
        "Sleep stage 2",
        "Sleep stage 2",
        "Sleep stage 3",
        "Sleep stage 4",
        "Sleep stage R",
        "Movement time",
        "Sleep stage ?",
    ]
    annotations = tuple((30.0 * i, 30.0, label) for i, label in enumerate(labels)) + ((45.0, 0.0, "Lights off"),)
    path = write_edf(
        tmp_path / "x-Hypnogram.edf",
        {"EEG": (100.0, np.random.default_rng(0).normal(size=30000))},
        annotations=annotations,
    )
    hypnogram = read_hypnogram(path)
    assert epoch_stages(hypnogram).tolist() == EXPECTED
    assert any("non-stage" in note for note in hypnogram.notes)


def test_nsrr_xml(tmp_path):
    path = tmp_path / "x-nsrr.xml"
    path.write_text(NSRR_XML)
    assert detect_format(path) == "nsrr_xml"
    assert epoch_stages(read_hypnogram(path)).tolist() == EXPECTED


@pytest.mark.parametrize(
    "text, suffix",
    [
        ("stage\nW\nW\nN1\nN2\nN2\nN3\nS4\nR\nMT\n?\n", ".csv"),
        ("epoch\tstage\n0\t0\n1\t0\n2\t1\n3\t2\n4\t2\n5\t3\n6\t3\n7\t4\n8\t-1\n9\t9\n", ".tsv"),
        ("0\n0\n1\n2\n2\n3\n3\n4\n-1\n-1\n", ".csv"),
        ("onset,stage\n0,W\n30,W\n60,N1\n90,N2\n120,N2\n150,N3\n180,N3\n210,REM\n", ".csv"),
    ],
)
def test_csv_and_tsv(tmp_path, text, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_text(text)
    stages = epoch_stages(read_hypnogram(path)).tolist()
    assert stages == EXPECTED[: len(stages)] and len(stages) >= 8


def test_five_second_csv_is_reduced_by_majority(tmp_path):
    # epoch 0: 4xN2 2xW -> N2; epoch 1: 3xW 3xN1 tie -> W scored first; epoch 2: S4 (R&K) -> N3.
    rows = ["N2", "N2", "W", "N2", "W", "N2", "W", "W", "N1", "N1", "W", "N1"] + ["Sleep stage 4"] * 6
    path = tmp_path / "x.csv"
    path.write_text("\n".join(rows) + "\n")
    hypnogram = read_hypnogram(path, epoch_seconds=5.0)
    assert hypnogram.epoch_seconds == 5.0
    assert epoch_stages(hypnogram).tolist() == [2, 0, 3]


def test_gaps_between_events_are_unknown():
    hypnogram = Hypnogram(events=(StageEvent(0, 30, 2), StageEvent(90, 30, 4)), epoch_seconds=30, source="x")
    assert epoch_stages(hypnogram).tolist() == [2, -1, -1, 4]


@pytest.mark.parametrize(
    "n_epochs, expected, warned",
    [
        (4, [1, 2, 3, 4], False),
        (2, [1, 2], True),
        (6, [1, 2, 3, 4, -1, -1], True),
    ],
)
def test_alignment_on_the_overlap_never_shifts(n_epochs, expected, warned):
    aligned, note = align_stages(np.array([1, 2, 3, 4], dtype=np.int8), n_epochs, source="h.edf")
    assert aligned.tolist() == expected and aligned.dtype == np.int8
    assert (note is not None) == warned
    if warned:
        assert "h.edf" in note and ("longer" in note or "shorter" in note)


def test_events_from_codes_merges_runs():
    events = events_from_codes([0, 0, 2, 2, 2, 4], epoch_seconds=30)
    assert [(e.onset_seconds, e.duration_seconds, e.stage) for e in events] == [(0, 60, 0), (60, 90, 2), (150, 30, 4)]


def test_sleep_edf_full_night_hypnogram(real_data):
    hypnogram = read_hypnogram(real_data / "SleepEDF_SC4001" / "SC4001EC-Hypnogram.edf")
    stages = epoch_stages(hypnogram)
    assert hypnogram.epoch_seconds == 30 and len(stages) == 2880  # 0-86,400 s
    assert stages[0] == 0 and stages[-1] == -1  # starts awake, ends with "Sleep stage ?"
    assert set(np.unique(stages)) == {-1, 0, 1, 2, 3, 4}
    # first sleep: "Sleep stage 1" at 30,630 s
    assert stages[30630 // 30] == 1 and stages[30630 // 30 - 1] == 0
    # aligned to the 300-s crop of its signal: 10 epochs, all wake, with a warning
    aligned, note = align_stages(stages, 10, source="SC4001EC-Hypnogram.edf")
    assert aligned.tolist() == [0] * 10 and "longer" in note


def test_hmc_aasm_annotation_only_file(real_data):
    hypnogram = read_hypnogram(real_data / "HMC_SN001" / "test_edfann.edf")
    stages = epoch_stages(hypnogram)
    assert len(stages) == 854 and set(np.unique(stages)) == {0, 1, 2, 3, 4}
    assert any("non-stage" in note for note in hypnogram.notes)  # "Lights off/on" skipped


def test_dreams_text_and_channel_agree(real_data):
    folder = real_data / "DREAMS_Spindles"
    text = read_hypnogram(folder / "Hypnogram_excerpt3.txt")
    assert detect_format(folder / "Hypnogram_excerpt3.txt") == "dreams_txt" and text.epoch_seconds == 5
    from_text = epoch_stages(text)
    assert len(from_text) == 60  # 360 five-second epochs -> 60 thirty-second epochs
    reader = open_edf(folder / "excerpt3.edf")
    channel = next(c for c in reader.header.channels if c.label == "hypnogram")
    from_channel = epoch_stages(
        read_dreams_channel(reader.read(channel.index), channel.sample_rate_hz, source="excerpt3.edf:hypnogram")
    )
    np.testing.assert_array_equal(from_text, from_channel)
    # R&K codes 1 and 0 (S3, S4) both become N3; raw code 5 is wake.
    raw = [int(line) for line in (folder / "Hypnogram_excerpt3.txt").read_text().split()[1:]]
    assert 1 in raw and 3 in from_text.tolist()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.xml", "<PSGAnnotation><ScoredEvents></ScoredEvents>", "not well-formed"),
        ("x.xml", "<PSGAnnotation><ScoredEvents></ScoredEvents></PSGAnnotation>", "no ScoredEvent"),
        ("x.csv", "", "empty hypnogram"),
        ("x.txt", "[Hypnogram]\nfive\n", "not a numeric DREAMS stage code"),
        ("x.hyp", "W\n", "cannot tell the hypnogram format"),
    ],
)
def test_bad_hypnograms_are_refused_with_a_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UnreadableRecording, match=message) as caught:
        read_hypnogram(path)
    assert name in str(caught.value)


def test_dispatch_table_covers_the_site_config_formats():
    from s2v_core.io.site_config import HYPNOGRAM_FORMATS

    assert set(HYPNOGRAM_READERS) == set(HYPNOGRAM_FORMATS) - {"auto", "none"}


def _xml(events) -> str:
    scored = "".join(
        f"<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>{concept}</EventConcept>"
        f"<Start>{start}</Start><Duration>{duration}</Duration></ScoredEvent>"
        for concept, start, duration in events
    )
    return f"<PSGAnnotation><ScoredEvents>{scored}</ScoredEvents></PSGAnnotation>"


def test_absurd_and_non_finite_times_cost_nothing(tmp_path):
    from s2v_core.io.stages import stages_for_signal

    path = tmp_path / "x-nsrr.xml"
    # A 1e12-s onset would size a 1-TB stage grid; NaN and inf times cannot be placed at all.
    path.write_text(
        _xml(
            [
                ("Wake|0", 0, 60),
                ("Stage 2 sleep|2", 60, 30),
                ("REM sleep|5", "1e12", 30),
                ("Stage 1 sleep|1", "nan", 30),
                ("Stage 3 sleep|3", 90, "inf"),
                ("Wake|0", 120, -30),
            ]
        )
    )
    hypnogram = read_hypnogram(path)
    stages, notes = stages_for_signal(hypnogram, 6, source=str(path))
    assert stages.tolist() == [0, 0, 2, -1, -1, -1]
    assert any("3 of 6 stage events have a non-finite" in note for note in notes)
    assert any("longer than the signal" in note for note in notes)
    assert all(str(path) in note for note in notes)  # notes name the hypnogram file
    assert len(epoch_stages(hypnogram)) == 3  # without a signal length too: the absurd event is dropped


def test_a_bad_hypnogram_drops_only_the_stages(tmp_path):
    from s2v_core.io.site_config import HypnogramConfig, SiteConfig
    from s2v_core.recording import decode_recording

    signal = write_edf(tmp_path / "night.edf", {"EEG": (100.0, np.random.default_rng(0).normal(size=100 * 600))})
    site = SiteConfig(name="lab", hypnogram=HypnogramConfig(format="nsrr_xml"))
    for name, events in (
        ("nan.xml", [("Wake|0", "nan", 30)]),
        ("huge.xml", [("Wake|0", "1e12", 30)]),
        ("mixed.xml", [("Wake|0", 0, 300), ("REM sleep|5", "nan", 30)]),
    ):
        (tmp_path / name).write_text(_xml(events))
        decoded = decode_recording(
            str(signal), recording_id="r", site=site, hypnogram_path=str(tmp_path / name), epochs_per_window=10
        )
        stages = table_stages(decoded.table)
        assert decoded.windows == 2 and len(stages) == 20
        if name == "mixed.xml":
            assert stages[:10] == [0] * 10 and stages[10:] == [-1] * 10
        else:
            assert stages == [-1] * 20
        assert any(name in note for note in decoded.notes)


def table_stages(table) -> list[int]:
    return [stage for window in table.column("stages").to_pylist() for stage in window]


@pytest.mark.parametrize(
    "name, content",
    [
        ("x.csv", "onset,stage\n0,W\nDoe_John_1961,N1\n"),
        ("x.txt", "[Hypnogram]\n5\nDoe_John_1961\n"),
        ("x.txt", "Doe_John_1961 first line\n5\n"),
        (
            "x.xml",
            "<PSGAnnotation><ScoredEvents><ScoredEvent><EventType>Stages|Stages</EventType>"
            "<EventConcept>Doe_John_1961</EventConcept><Start>x</Start><Duration>30</Duration>"
            "</ScoredEvent></ScoredEvents></PSGAnnotation>",
        ),
    ],
)
def test_messages_never_repeat_file_contents(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UnreadableRecording) as caught:
        read_hypnogram(path, format={"x.csv": "csv", "x.txt": "dreams_txt", "x.xml": "nsrr_xml"}[name])
    assert "Doe_John" not in str(caught.value) and "1961" not in str(caught.value)
    assert name in str(caught.value)


def test_site_config_formats_are_the_reader_table():
    # site_config cannot import the readers (import cycle through the store), so a test keeps
    # the two lists in step: a reader added to the table must be a valid [hypnogram].format.
    from s2v_core.io.hypnogram import HYPNOGRAM_READERS
    from s2v_core.io.site_config import HYPNOGRAM_FORMATS

    assert HYPNOGRAM_FORMATS == ("auto", *HYPNOGRAM_READERS, "none")
