"""``s2v ingest`` end to end on a real local Ray: bad inputs, store round-trip, idempotence, de-identification."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipelines.cli import main as s2v
from pipelines.ingest import ingest
from pipelines.ingest_config import IngestConfig
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.store import schema_info, store_schema, table_to_batch
from tests.test_io_edf import FAKE_PATIENT, write_edf
from tests.test_recording import _hypnogram, _night

pytestmark = pytest.mark.integration
SECONDS = 1800  # half-hour nights keep the Ray runs short on 2 cores


def _patch(path: Path, offset: int, text: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(text)] = text
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two sites of good nights plus every kind of bad input the ingest must survive."""
    root = tmp_path_factory.mktemp("cohort")
    expected_stages = {}
    for site in ("alpha", "beta"):
        folder = root / site
        folder.mkdir()
        (folder / "site.toml").write_text(
            f'name = "{site}"\nignore_channels = ["Position"]\n'
            '[hypnogram]\nformat = "csv"\npattern = "{stem}.csv"\n'
            '[metadata]\nfile = "subjects.csv"\nsubject_column = "subject"\n'
            '[metadata.outcomes]\nahi = "ahi"\n'
        )
        rows = ["recording_id,subject,age,sex,ahi"]
        for r in range(2):
            key = f"{site}{r}"
            write_edf(folder / f"{key}.edf", _night(SECONDS, seed=10 * len(site) + r), file_type="edf+")
            expected_stages[key] = _hypnogram(folder / f"{key}.csv", SECONDS // 30, seed=r)
            rows.append(f"{key},{site}-s{r},{50 + r},{'FM'[r]},{3.5 * (r + 1)}")
        (folder / "subjects.csv").write_text("\n".join(rows) + "\n")

    bad = root / "alpha"
    (bad / "empty.edf").write_bytes(b"")
    (bad / "notedf.edf").write_bytes(b"<html>this is not a recording</html>" * 20)
    (bad / "orphan.csv").write_text("W\nN1\n")  # a hypnogram with no signal
    shutil.copy(bad / "alpha0.edf", bad / "alpha0_copy.edf")  # same content, other name
    sub = bad / "again"
    sub.mkdir()
    write_edf(sub / "alpha1.edf", _night(SECONDS, seed=99), file_type="edf")  # same recording_id as alpha/alpha1
    write_edf(bad / "nohyp.edf", _night(SECONDS, seed=5), file_type="edf")  # kept, stages -1
    write_edf(bad / "truncated.edf", _night(SECONDS, seed=6), file_type="edf")
    raw = (bad / "truncated.edf").read_bytes()
    (bad / "truncated.edf").write_bytes(raw[: len(raw) * 2 // 3 + 123])  # cut mid-record
    write_edf(bad / "liar.edf", _night(SECONDS, seed=7), file_type="edf")
    _patch(bad / "liar.edf", 236, b"99999   ")  # declares far more records than it holds
    write_edf(bad / "absurd.edf", _night(SECONDS, seed=8), file_type="edf")
    _patch(bad / "absurd.edf", 244, b"1e-7    ")  # record duration -> GHz sampling rates
    night = _night(SECONDS, seed=9)
    ecg = night["ECG"][1]
    ecg[256 * 600 : 256 * 900] = 0.0  # flat for all of window 2 (600-900 s)
    write_edf(bad / "flat.edf", night, file_type="edf")
    write_edf(bad / "nan.edf", _night(SECONDS, seed=11), file_type="edf")
    # physical maximum of channel 4 (ECG) = "nan": every ECG value decodes to NaN
    n_signals = 7
    _patch(bad / "nan.edf", 256 + n_signals * (16 + 80 + 8 + 8) + 3 * 8, b"nan     ")
    (root / "expected_stages.json").write_text(json.dumps({k: v.tolist() for k, v in expected_stages.items()}))
    return root


@pytest.fixture(scope="module")
def store(cohort, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    summary = ingest(
        IngestConfig(
            inputs=[str(cohort)], output=str(out), epochs_per_window=10, link_table=str(out.parent / "links.csv")
        )
    )
    return out, summary


def _dataset(store_root: Path) -> pads.Dataset:
    # exclude_invalid_files: the store root also holds manifest.jsonl, which is not Parquet.
    return pads.dataset(store_root, format="parquet", partitioning="hive", exclude_invalid_files=True)


def links(store_root: Path, name: str = "links.csv") -> list[dict]:
    """The link table the fixture asked for (the only place paths and keys are kept)."""
    with open(store_root.parent / name, newline="") as handle:
        return list(csv.DictReader(handle))


def recording_ids(store_root: Path, name: str = "links.csv") -> dict[str, str]:
    """Site key -> store recording_id, from the link table."""
    return {row["recording_key"]: row["recording_id"] for row in links(store_root, name) if row["kind"] == "signal"}


def _manifest(store_root: Path, name: str = "links.csv") -> dict[str, dict]:
    """Manifest lines by input path (the manifest itself only has file ids)."""
    paths = {row["file_id"]: row["path"] for row in links(store_root, name)}
    lines = [json.loads(line) for line in (store_root / "manifest.jsonl").read_text().splitlines()]
    by_source = {paths[line["file_id"]]: line for line in lines}
    assert len(by_source) == len(lines), "one manifest line per input"
    return by_source


def test_bad_input_never_stops_the_run_and_is_named(store):
    out, summary = store
    manifest = _manifest(out)
    quarantined = {source: line["reason"] for source, line in manifest.items() if line["status"] == "quarantined"}
    assert set(quarantined) == {
        "alpha/empty.edf",
        "alpha/notedf.edf",
        "alpha/orphan.csv",
        "alpha/alpha0_copy.edf",
        "alpha/again/alpha1.edf",
        "alpha/absurd.edf",
    }
    assert "empty file" in quarantined["alpha/empty.edf"]
    assert "not an EDF/BDF file" in quarantined["alpha/notedf.edf"]
    assert "hypnogram with no matching signal" in quarantined["alpha/orphan.csv"]
    assert f"same content as file {manifest['alpha/alpha0.edf']['file_id']}" in quarantined["alpha/alpha0_copy.edf"]
    assert (
        f"duplicate recording_id {manifest['alpha/alpha1.edf']['recording_id']!r}"
        in quarantined["alpha/again/alpha1.edf"]
    )
    assert "absurd sampling rate" in quarantined["alpha/absurd.edf"]
    for source, reason in quarantined.items():
        assert reason.startswith(f"file {manifest[source]['file_id']}: ") and "\n" not in reason
        assert source not in reason and Path(source).name not in reason
    ok = {source: line for source, line in manifest.items() if line["status"] == "ok"}
    assert set(ok) == {
        "alpha/alpha0.edf",
        "alpha/alpha1.edf",
        "beta/beta0.edf",
        "beta/beta1.edf",
        "alpha/nohyp.edf",
        "alpha/truncated.edf",
        "alpha/liar.edf",
        "alpha/flat.edf",
        "alpha/nan.edf",
    }
    assert "no hypnogram" in ok["alpha/nohyp.edf"]["reason"]
    assert "truncated" in ok["alpha/truncated.edf"]["reason"] and ok["alpha/truncated.edf"]["windows"] == 3
    assert "declares 99999" in ok["alpha/liar.edf"]["reason"] and ok["alpha/liar.edf"]["windows"] == 6
    assert "ecg (ECG): 0 of 6 windows with NaN/inf, 1 flat" in ok["alpha/flat.edf"]["reason"]
    assert "ecg (ECG): 6 of 6 windows with NaN/inf" in ok["alpha/nan.edf"]["reason"]
    assert "ecg" not in ok["alpha/nan.edf"]["modalities"]
    assert ok["alpha/alpha0.edf"]["reason"] is None
    assert ok["alpha/alpha0.edf"]["modalities"] == ["eeg", "eog", "ecg", "spo2", "airflow"]
    assert ok["alpha/alpha0.edf"]["unknown_channels"] == []  # Position is ignored by the site
    assert summary.ok == 9 and summary.quarantined == 6 and summary.skipped == 0
    assert summary.windows == sum(line["windows"] for line in ok.values())


def test_store_round_trip(store, cohort):
    out, summary = store
    ids = recording_ids(out)
    dataset = _dataset(out)
    files = sorted(Path(f).relative_to(out).as_posix() for f in dataset.files)
    assert f"site=alpha/{ids['alpha0']}.parquet" in files and len(files) == 9
    table = dataset.to_table()
    assert table.num_rows == summary.windows
    for path in dataset.files:
        assert schema_info(pads.dataset(path).schema) == (1, 10)
        assert pads.dataset(path).schema.equals(store_schema(10), check_metadata=False)
    expected = json.loads((cohort / "expected_stages.json").read_text())
    for key in ("alpha0", "alpha1", "beta0", "beta1"):
        rows = table.filter(pads.field("recording_id") == ids[key]).sort_by("window_index")
        batch = table_to_batch(rows, epochs_per_window=10)
        assert rows.num_rows == 6 and rows.column("window_index").to_pylist() == list(range(6))
        np.testing.assert_array_equal(batch["stages"].reshape(-1), expected[key])
        assert batch["present"][:, [MODALITY_KEYS.index(k) for k in ("eeg", "ecg", "spo2")]].all()
        assert not batch["present"][:, MODALITY_KEYS.index("emg")].any()
    beta1 = table_to_batch(table.filter(pads.field("recording_id") == ids["beta1"]), epochs_per_window=10)
    assert beta1["age"][0] == 51 and beta1["sex"][0] == 1
    subject = table.filter(pads.field("recording_id") == ids["beta1"]).column("subject_id")[0].as_py()
    assert (
        subject
        == next(r["subject_id"] for r in links(out) if r["recording_key"] == "beta1" and r["kind"] == "signal")
        != "beta-s1"
    )
    nohyp = table_to_batch(table.filter(pads.field("recording_id") == ids["nohyp"]), epochs_per_window=10)
    assert (nohyp["stages"] == -1).all() and np.isnan(nohyp["age"]).all()
    flat = table_to_batch(
        table.filter(pads.field("recording_id") == ids["flat"]).sort_by("window_index"), epochs_per_window=10
    )
    assert flat["present"][:, MODALITY_KEYS.index("ecg")].tolist() == [True, True, False, True, True, True]


def test_rerun_skips_finished_and_recovers_from_a_crash(store, cohort):
    out, first = store
    files_before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    # Same inputs as URIs: nothing is redone, nothing is written twice.
    again = ingest(IngestConfig(inputs=[cohort.as_uri()], output=out.as_uri(), epochs_per_window=10))
    assert (again.ok, again.skipped, again.windows) == (0, 9, 0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == files_before
    assert len(_manifest(out)) == 15
    # A crash: one file lost before its manifest line, a partial temporary file, a cut manifest line.
    beta1 = recording_ids(out)["beta1"]
    (out / "site=beta" / f"{beta1}.parquet").unlink()
    (out / "site=beta" / f".tmp-{beta1}.parquet.0123").write_bytes(b"PAR1 partial")
    with open(out / "manifest.jsonl", "a") as handle:
        handle.write('{"recording_id": "beta0", "site": "be')
    assert len(_dataset(out).files) == len(list(out.rglob("*.parquet"))) == 8  # the partial file is invisible
    third = ingest(IngestConfig(inputs=[str(cohort)], output=str(out), epochs_per_window=10))
    assert (third.ok, third.skipped) == (1, 8)
    assert not list(out.rglob(".tmp-*"))
    table = _dataset(out).to_table(columns=["recording_id", "window_index"])
    pairs = list(zip(table.column("recording_id").to_pylist(), table.column("window_index").to_pylist()))
    assert len(pairs) == len(set(pairs)) == first.windows  # no window written twice, none lost
    with pytest.raises(ValueError, match="--epochs-per-window 5"):
        ingest(IngestConfig(inputs=[str(cohort)], output=str(out), epochs_per_window=5))


def test_synthetic_cohort_through_the_cli_is_deidentified(ray_local, tmp_path, capsys, caplog, monkeypatch):
    from s2v_core.synth import write_cohort

    cohort = write_cohort(tmp_path / "cohort", sites=6, recordings_per_site=1, hours=0.5, seed=3)
    assert cohort.phi
    out = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow must not put artifacts in the current directory
    caplog.set_level("DEBUG")
    assert s2v(["ingest", "--input", str(tmp_path / "cohort"), "--output", str(out), "--epochs-per-window", "5"]) == 0
    printed = capsys.readouterr()
    assert "ingested 6 recordings" in printed.out and str(out / "manifest.jsonl") in printed.out
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    manifest = {line["file_id"]: line for line in lines}
    assert {line["status"] for line in manifest.values()} == {"ok"}
    assert {line["site"] for line in manifest.values()} == {s.name for s in cohort.sites}
    dataset = _dataset(out)
    assert dataset.to_table().num_rows == sum(line["windows"] for line in manifest.values()) == 6 * 12
    from mlflow.tracking import MlflowClient

    [run] = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]).search_runs(
        [
            MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
            .get_experiment_by_name("s2v-ingest")
            .experiment_id
        ]
    )
    assert run.data.metrics["ok"] == 6 and run.data.metrics["hours_per_s"] > 0
    assert list((tmp_path / "mlruns" / "mlartifacts").rglob("manifest.jsonl"))
    # De-identification: no byte of any output (store, manifest, MLflow, printed text, logs) carries header PHI.
    blobs = [p.read_bytes() for folder in (out, tmp_path / "mlruns") for p in folder.rglob("*") if p.is_file()]
    blobs += [printed.out.encode(), printed.err.encode(), caplog.text.encode()]
    # Nor the sites' own keys and file names: the store's ids are keyed hashes.
    names = {r.signal_path.stem for r in cohort.recordings} | {r.signal_path.name for r in cohort.recordings}
    for secret in set(cohort.phi) | {FAKE_PATIENT} | names:
        for blob in blobs:
            assert secret.encode() not in blob and secret.upper().encode() not in blob
    assert not (tmp_path / "cwd" / "mlruns").exists()


def test_real_recordings_through_the_pipeline(ray_local, real_data, tmp_path):
    """DREAMS (non-compliant EDF, 5-s text hypnogram) and the Sleep-EDF crop, read in place."""
    dreams = tmp_path / "dreams.toml"
    dreams.write_text(
        'name = "dreams"\nsignals = ["excerpt3.edf"]\n'
        'ignore_channels = ["FP1-A1", "EOG2-A1", "POS", "PHONO", "PULSE", "hypnogram", "hypnogram_aut"]\n'
        '[channels]\n"C3-A1" = "eeg"\n"O1-A1" = "eeg"\n"EOG1-A1" = "eog"\n"EMG1" = "emg"\n"NAF1" = "airflow"\n'
        '"VTH" = "thorax"\n"VAB" = "abdomen"\n"SAO2" = "spo2"\n"PR" = "hr"\n'
        '[hypnogram]\nformat = "dreams_txt"\npattern = "Hypnogram_{stem}.txt"\nepoch_seconds = 5.0\n'
    )
    sleepedf = tmp_path / "sleepedf.toml"
    sleepedf.write_text(
        'name = "sleepedf"\nsignals = ["short_psg.edf"]\nkey_regex = "^(?P<key>short_psg)$"\n'
        '[hypnogram]\npattern = "SC4001EC-Hypnogram.edf"\n'
    )
    out = tmp_path / "store"
    first = ingest(
        IngestConfig(
            inputs=[str(real_data / "DREAMS_Spindles")],
            output=str(out),
            site_config=str(dreams),
            epochs_per_window=5,
            link_table=str(tmp_path / "links.csv"),
        )
    )
    second = ingest(
        IngestConfig(
            inputs=[str(real_data / "SleepEDF_SC4001")],
            output=str(out),
            site_config=str(sleepedf),
            epochs_per_window=5,
            link_table=str(tmp_path / "links.csv"),
        )
    )
    assert (first.ok, second.ok) == (1, 1)
    manifest = _manifest(out)
    ids = recording_ids(out)
    excerpt = manifest["excerpt3.edf"]
    assert excerpt["status"] == "ok" and excerpt["windows"] == 12
    assert "spo2" not in excerpt["modalities"] and len(excerpt["modalities"]) == 7  # SAO2, PR AC-coupled
    assert excerpt["channels"]["eeg"] == "C3-A1" and excerpt["unknown_channels"] == [
        "event_pneumo",
        "event_pneumo_aut",
        "event_neuro",
    ]
    # the other excerpts' hypnograms have no signal here: listed, not lost silently
    orphans = [s for s, line in manifest.items() if s.startswith("Hypnogram_") and line["status"] == "quarantined"]
    assert len(orphans) == 7
    crop = manifest["short_psg.edf"]
    assert crop["windows"] == 2 and crop["modalities"] == ["eeg", "eog"] and "longer than the signal" in crop["reason"]
    table = _dataset(out).to_table()
    stages = table_to_batch(
        table.filter(pads.field("recording_id") == ids["excerpt3"]).sort_by("window_index"), epochs_per_window=5
    )["stages"].reshape(-1)
    assert len(stages) == 60 and 3 in stages.tolist() and -1 not in stages.tolist()
    crop_stages = table_to_batch(table.filter(pads.field("recording_id") == ids["short_psg"]), epochs_per_window=5)
    assert (crop_stages["stages"] == 0).all()
