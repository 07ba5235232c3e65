"""The written cohort: layout, site configs, files read back by MNE and pyedflib, determinism, CLI."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import mne
import numpy as np
import pyedflib
import pytest

from pipelines.cli import main as s2v
from s2v_core.io.site_config import load_site_config
from s2v_core.modalities import EPOCH_SECONDS, match_channel
from s2v_core.synth import ARCHETYPES, DEFAULT_CYCLE, fake_identity, write_cohort
from s2v_core.synth.sites import site_names

HOURS = 0.25


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One site of every archetype, two short nights each."""
    return write_cohort(
        tmp_path_factory.mktemp("cohort"), sites=len(DEFAULT_CYCLE), recordings_per_site=2, hours=HOURS, seed=7
    )


def _signal_files(site_dir: Path, config) -> list[Path]:
    return sorted({p for pattern in config.signals for p in site_dir.rglob(pattern)})


def test_layout_one_directory_per_site_named_after_its_archetype(cohort):
    assert [s.name for s in cohort.sites] == list(DEFAULT_CYCLE)
    for site in cohort.sites:
        assert site.directory == cohort.root / site.name
        assert site.site_config.name == "site.toml" and site.site_config.is_file()
        assert site.metadata_path.is_file()
        assert len(site.recordings) == 2
    assert cohort.hours_written == pytest.approx(len(DEFAULT_CYCLE) * 2 * HOURS)
    assert cohort.hours_per_second > 0


def test_repeated_archetypes_get_numbered_site_names():
    keys = tuple(DEFAULT_CYCLE[i % len(DEFAULT_CYCLE)] for i in range(len(DEFAULT_CYCLE) + 2))
    names = site_names(keys)
    assert names[len(DEFAULT_CYCLE) :] == ("shhs_like_2", "mesa_like_2")
    assert len(set(names)) == len(names)


def test_every_site_config_loads_and_maps_every_channel(cohort):
    for site in cohort.sites:
        config = load_site_config(site.site_config)
        assert config.name == site.name
        files = _signal_files(site.directory, config)
        assert sorted(r.signal_path for r in site.recordings) == files
        for path in files:
            with pyedflib.EdfReader(str(path)) as reader:
                labels = reader.getSignalLabels()
            unmapped = [
                label
                for label in labels
                if match_channel(label, config.channels) is None and label not in config.ignore_channels
            ]
            assert unmapped == [], f"{path.name}: channels with no modality and not ignored"
            # Mapped channels land on the modality the archetype meant.
            spec = {c.label: c.modality for c in ARCHETYPES[site.archetype].channels}
            for label in labels:
                if spec[label] is not None:
                    assert match_channel(label, config.channels) == spec[label]


def test_signal_files_read_back_with_pyedflib_and_mne_as_configured(cohort):
    for site in cohort.sites:
        archetype = ARCHETYPES[site.archetype]
        for recording in site.recordings:
            with pyedflib.EdfReader(str(recording.signal_path)) as reader:
                assert reader.getSignalLabels() == [c.label for c in archetype.channels]
                assert list(reader.getSampleFrequencies()) == [c.rate_hz for c in archetype.channels]
                assert reader.getFileDuration() == pytest.approx(HOURS * 3600)
                assert [h["dimension"] for h in reader.getSignalHeaders()] == [c.unit for c in archetype.channels]
                values = reader.readSignal(0)
                assert values.size == archetype.channels[0].rate_hz * HOURS * 3600
                assert np.isfinite(values).all() and values.std() > 0
            read = mne.io.read_raw_bdf if archetype.signal_format == "bdf" else mne.io.read_raw_edf
            raw = read(recording.signal_path, preload=False, verbose="error")
            assert raw.ch_names == [c.label for c in archetype.channels]
            assert raw.info["sfreq"] == max(c.rate_hz for c in archetype.channels)
            assert raw.times[-1] == pytest.approx(HOURS * 3600, abs=1.0)


def test_rates_span_1_to_512_hz_and_one_site_writes_24_bit_bdf(cohort):
    rates = {c.rate_hz for s in cohort.sites for c in ARCHETYPES[s.archetype].channels}
    assert min(rates) == 1 and max(rates) == 512
    bdf = [r.signal_path for s in cohort.sites for r in s.recordings if r.signal_path.suffix == ".bdf"]
    assert bdf
    head = bdf[0].read_bytes()[:8]
    assert head[0] == 0xFF and head[1:8] == b"BIOSEMI"


def _epochs_of(path: Path, style: str) -> list[str]:
    """Stage label per 30-s epoch, read without the project's own readers."""
    if style in ("edf_rk", "edf_aasm"):
        annotations = mne.read_annotations(path)
        labels = []
        for onset, duration, text in zip(annotations.onset, annotations.duration, annotations.description):
            if text.startswith("Sleep stage") or text == "Movement time":
                assert onset == pytest.approx(len(labels) * EPOCH_SECONDS)
                labels += [text] * int(round(duration / EPOCH_SECONDS))
        return labels
    if style == "nsrr_xml":
        labels = []
        for event in ET.parse(path).getroot().iter("ScoredEvent"):
            if event.findtext("EventType") == "Stages|Stages":
                assert float(event.findtext("Start")) == pytest.approx(len(labels) * EPOCH_SECONDS)
                labels += [event.findtext("EventConcept")] * int(float(event.findtext("Duration")) // EPOCH_SECONDS)
        return labels
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [row["stage"] for row in rows]


def test_hypnograms_cover_the_night_in_the_site_wording(cohort):
    wording = {
        "edf_rk": {
            "Sleep stage W",
            "Sleep stage 1",
            "Sleep stage 2",
            "Sleep stage 3",
            "Sleep stage 4",
            "Sleep stage R",
            "Sleep stage ?",
            "Movement time",
        },
        "edf_aasm": {
            "Sleep stage W",
            "Sleep stage N1",
            "Sleep stage N2",
            "Sleep stage N3",
            "Sleep stage R",
            "Sleep stage ?",
        },
        "nsrr_xml": {
            "Wake|0",
            "Stage 1 sleep|1",
            "Stage 2 sleep|2",
            "Stage 3 sleep|3",
            "Stage 4 sleep|4",
            "REM sleep|5",
            "Movement|6",
        },
        "csv": {"W", "N1", "N2", "N3", "REM", "?"},
    }
    for site in cohort.sites:
        archetype = ARCHETYPES[site.archetype]
        config = load_site_config(site.site_config)
        for recording in site.recordings:
            pattern = config.hypnogram.pattern.format(key=recording.key, stem=recording.signal_path.stem)
            assert list(recording.signal_path.parent.glob(pattern)) == [recording.hypnogram_path]
            labels = _epochs_of(recording.hypnogram_path, archetype.hypnogram_style)
            expected = int(HOURS * 3600 / EPOCH_SECONDS)
            # Sleep-EDF appends one unscored epoch after the recording, as the real files do.
            assert len(labels) == expected + (archetype.hypnogram_style == "edf_rk")
            assert set(labels) <= wording[archetype.hypnogram_style]
            assert labels[0] in ("Sleep stage W", "Wake|0", "W")  # every night starts awake at lights-off


def test_metadata_tables_match_site_config(cohort):
    for site in cohort.sites:
        config = load_site_config(site.site_config)
        meta = config.metadata
        with site.metadata_path.open() as handle:
            rows = list(csv.DictReader(handle))
        assert [row[meta.key_column] for row in rows] == [r.key for r in site.recordings]
        for row, recording in zip(rows, site.recordings):
            assert config.recording_key(recording.signal_path) == row[meta.key_column]
            assert meta.sex_values[row[meta.sex_column]] == recording.sex
            assert float(row[meta.age_column]) == pytest.approx(recording.age, abs=1.0)
            assert float(row[meta.outcomes["ahi"]]) >= 0
            assert row[meta.outcomes["hypertension"]] in ("0", "1")
            if meta.subject_column:
                assert row[meta.subject_column] == recording.subject


def test_sites_differ_in_age_mix():
    young = ARCHETYPES["wearable_like"].population.age_mean
    old = ARCHETYPES["mesa_like"].population.age_mean
    assert old - young > 20


def test_fake_patient_header_is_written_and_never_reaches_tables(cohort):
    names = set()
    for site_index, site in enumerate(cohort.sites):
        for index, recording in enumerate(site.recordings):
            identity = recording.identity
            assert identity == fake_identity(seed=7, site=site_index, recording=index)
            with pyedflib.EdfReader(str(recording.signal_path)) as reader:
                # pyedflib shows EDF+ underscores as spaces
                assert reader.getPatientName() == identity.patient_name.replace("_", " ")
                assert reader.getPatientCode() == identity.patient_code
                assert reader.getBirthdate().upper() == identity.birthdate_text.replace("-", " ")
            header = recording.signal_path.read_bytes()[8:256].decode("ascii")  # BDF byte 0 is 0xFF
            assert identity.patient_name in header and identity.birthdate_text in header
            if recording.hypnogram_path.suffix == ".edf":  # scoring exports repeat the patient fields
                assert identity.patient_name in recording.hypnogram_path.read_bytes()[8:88].decode("ascii")
            names.add(identity.patient_name)
    assert len(names) > 1
    texts = [p for p in cohort.files if p.suffix in (".csv", ".toml", ".xml")]
    for path in texts:
        content = path.read_text()
        leaked = [s for s in cohort.phi if s in content]
        assert leaked == [], f"{path.name} contains header PHI"


def test_same_seed_identical_bytes_and_different_seed_different_nights(tmp_path):
    kwargs = dict(sites=len(DEFAULT_CYCLE), recordings_per_site=1, hours=0.05)
    first = write_cohort(tmp_path / "a", seed=3, **kwargs)
    second = write_cohort(tmp_path / "b", seed=3, **kwargs)
    other = write_cohort(tmp_path / "c", seed=4, **kwargs)
    relative = [p.relative_to(first.root) for p in first.files]
    assert relative == [p.relative_to(second.root) for p in second.files]
    for path in relative:
        assert (first.root / path).read_bytes() == (second.root / path).read_bytes(), path
    signals = [r.signal_path.relative_to(first.root) for r in first.recordings]
    assert all((first.root / p).read_bytes() != (other.root / p).read_bytes() for p in signals)


def test_cli_writes_a_cohort_and_rejects_bad_options(tmp_path, capsys):
    out = tmp_path / "cli"
    assert s2v(["synth", str(out), "--sites", "2", "--recordings-per-site", "1", "--hours", "0.02", "--seed", "1"]) == 0
    assert "2 sites, 2 recordings" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["mesa_like", "shhs_like"]
    assert s2v(["synth", str(out), "--sites", "0"]) == 2
    assert "sites must be >= 1" in capsys.readouterr().err
    assert s2v(["synth", str(out), "--archetypes", "nope"]) == 2
    assert (
        s2v(
            [
                "synth",
                str(tmp_path / "one"),
                "--sites",
                "1",
                "--recordings-per-site",
                "1",
                "--hours",
                "0.02",
                "--archetypes",
                "psg_512",
            ]
        )
        == 0
    )
    assert (tmp_path / "one" / "psg_512" / "SN001.edf").is_file()


def test_rewriting_refuses_a_site_directory_with_other_files(tmp_path):
    write_cohort(tmp_path, sites=1, recordings_per_site=2, hours=0.02, seed=0)
    write_cohort(tmp_path, sites=1, recordings_per_site=2, hours=0.02, seed=0)  # same files: overwritten
    # One night fewer would leave a stale recording behind for the ingest to pick up.
    with pytest.raises(ValueError, match="shhs1-200002"):
        write_cohort(tmp_path, sites=1, recordings_per_site=1, hours=0.02, seed=0)
    with pytest.raises(ValueError, match="at most 200 recordings"):
        write_cohort(tmp_path / "big", sites=3, recordings_per_site=201, hours=0.02)
    assert not (tmp_path / "big").exists()  # nothing written when any site would fail
    with pytest.raises(ValueError, match="hours"):
        write_cohort(tmp_path / "short", hours=0.001)
