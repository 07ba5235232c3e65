"""``s2v ingest`` over a store's life on a real local Ray: dying workers, changed, deleted and pruned
inputs, ids the store would hide, ids shared by sites, the NSRR layout of the README, mixed keys.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipelines.ingest import ingest
from pipelines.ingest_config import IngestConfig
from pipelines.ingest_plan import IngestLimits
from pipelines.ingest_task import TESTING_SIGKILL_ENV, remove_orphaned_copies
from s2v_core.io.identity import PSEUDONYM_KEY_ENV
from s2v_core.store import open_store, table_to_batch
from tests.test_io_edf import write_edf
from tests.test_recording import _night

pytestmark = pytest.mark.integration
SECONDS = 600  # two 10-epoch windows: enough to be a night, short enough for 2 cores
REPO = Path(__file__).resolve().parents[1]


def _site(root: Path, name: str, files: dict[str, int], *, toml: str = "") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site.toml").write_text(
        f'name = "{name}"\nignore_channels = ["Position"]\n[hypnogram]\nformat = "none"\n{toml}'
    )
    for file, seed in files.items():
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        write_edf(folder / file, _night(SECONDS, seed=seed), file_type="edf")
    return folder


def _lines(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]


def _links(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle) if row["kind"] == "signal"}


def test_a_recording_that_kills_its_worker_is_quarantined_and_the_run_finishes(ray_local, tmp_path, monkeypatch):
    cohort = tmp_path / "cohort"
    _site(cohort, "lab", {"good1.edf": 1, "killer.edf": 2, "good2.edf": 3})
    # Testing aid: the task decoding lab/killer.edf SIGKILLs its own worker, every attempt.
    monkeypatch.setenv(TESTING_SIGKILL_ENV, "lab/killer.edf")
    store = tmp_path / "store"
    summary = ingest(
        IngestConfig(
            inputs=[str(cohort)],
            output=str(store),
            epochs_per_window=10,
            link_table=str(tmp_path / "links.csv"),
            limits=IngestLimits(task_retries=1),
        )
    )
    assert (summary.ok, summary.quarantined) == (2, 1)
    killer = _links(tmp_path / "links.csv")["lab/killer.edf"]
    [line] = [line for line in _lines(store) if line["status"] == "quarantined"]
    assert line["file_id"] == killer["file_id"] and line["recording_id"] == killer["recording_id"]
    assert line["reason"].startswith(f"file {killer['file_id']}: the worker decoding it died 2 times")
    size_mib = (cohort / "lab" / "killer.edf").stat().st_size / (1 << 20)
    assert f"{size_mib:.1f} MiB" in line["reason"] and "declaring 0.167 h" in line["reason"]
    assert open_store(str(store)).count_rows() == 4  # the two good nights, 2 windows each
    # The next run tries it again (a transient OOM may not recur); here it dies again.
    again = ingest(
        IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, limits=IngestLimits(task_retries=0))
    )
    assert (again.ok, again.skipped, again.quarantined) == (0, 2, 1)


def test_copies_of_remote_inputs_left_by_dead_workers_are_removed(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = tmp_path / f"s2v-ingest-{int(finished.stdout)}-abc123"
    alive = tmp_path / f"s2v-ingest-{os.getpid()}-def456"
    other = tmp_path / "someone-elses-dir"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "recording.edf").write_bytes(b"0" * 1024)
    assert remove_orphaned_copies(str(tmp_path)) == 1
    assert not dead.exists() and alive.exists() and other.exists()
    assert tempfile.gettempdir()  # the default place the tasks sweep


def test_changed_deleted_and_pruned_inputs(ray_local, tmp_path):
    cohort = tmp_path / "cohort"
    # sub/c.edf has c.edf's key: a duplicate, quarantined, whose line must not erase c's windows
    site = _site(cohort, "lab", {"a.edf": 1, "b.edf": 2, "c.edf": 3, "sub/c.edf": 4})
    store, links = tmp_path / "store", tmp_path / "links.csv"
    first = ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, link_table=str(links)))
    ids = {path: row["recording_id"] for path, row in _links(links).items() if path != "lab/sub/c.edf"}
    assert (first.ok, first.quarantined) == (3, 1)
    files = {path: store / "site=lab" / f"{rid}.parquet" for path, rid in ids.items()}
    before = {path: file.read_bytes() for path, file in files.items()}
    # a.edf is replaced by another recording, b.edf is deleted, c.edf stays
    write_edf(site / "a.edf", _night(SECONDS + 300, seed=11), file_type="edf")
    (site / "b.edf").unlink()
    second = ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10))
    assert (second.ok, second.skipped, second.stale, second.withdrawn, second.quarantined) == (1, 1, 1, 0, 1)
    assert files["lab/a.edf"].read_bytes() != before["lab/a.edf"]  # decoded again
    assert open_store(str(store)).to_table(filter=pads.field("recording_id") == ids["lab/a.edf"]).num_rows == 3
    assert files["lab/b.edf"].read_bytes() == before["lab/b.edf"]  # kept until --prune
    assert files["lab/c.edf"].read_bytes() == before["lab/c.edf"]
    # --prune erases what has no input any more
    pruned = ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, prune=True))
    assert (pruned.ok, pruned.skipped, pruned.withdrawn, pruned.stale) == (0, 2, 1, 0)
    assert not files["lab/b.edf"].exists()
    assert ids["lab/b.edf"] not in set(
        open_store(str(store)).to_table(columns=["recording_id"]).column("recording_id").to_pylist()
    )
    [withdrawn] = [line for line in _lines(store) if line["status"] == "withdrawn"]
    assert withdrawn["recording_id"] == ids["lab/b.edf"] and "erased" in withdrawn["reason"]
    # an orphan windows file (a crash between the file and its line) is erased by --prune too
    orphan = store / "site=lab" / "0123456789abcdef.parquet"
    orphan.write_bytes(files["lab/c.edf"].read_bytes())
    ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, prune=True))
    assert not orphan.exists() and [line["status"] for line in _lines(store)].count("withdrawn") == 1
    assert files["lab/c.edf"].read_bytes() == before["lab/c.edf"]  # the duplicate's line erased nothing


def test_ids_readers_would_hide_and_ids_shared_by_sites(ray_local, tmp_path):
    cohort = tmp_path / "cohort"
    # With --ids original, keys that start with "." or "_" would be files the store's readers skip,
    # and ".tmp-*" files the next run deletes; the same key at two sites is two nights.
    _site(cohort, "alpha", {"1001.edf": 1, "_under.edf": 2, ".hidden.edf": 3, ".tmp-evil.edf": 4})
    _site(cohort, "beta", {"1001.edf": 1})  # the same key, even the same bytes, at another site
    store, links = tmp_path / "store", tmp_path / "links.csv"
    summary = ingest(
        IngestConfig(
            inputs=[str(cohort)], output=str(store), epochs_per_window=10, ids="original", link_table=str(links)
        )
    )
    assert (summary.ok, summary.quarantined) == (5, 0)
    rows = _links(links)
    assert rows["alpha/1001.edf"]["recording_id"] == rows["beta/1001.edf"]["recording_id"] == "1001"
    for path in ("alpha/_under.edf", "alpha/.hidden.edf", "alpha/.tmp-evil.edf"):
        assert re.fullmatch(r"[0-9a-f]{16}", rows[path]["recording_id"])
        line = next(line for line in _lines(store) if line["file_id"] == rows[path]["file_id"])
        assert "not a safe id" in line["reason"] and Path(path).stem not in line["reason"]
    table = open_store(str(store)).to_table(columns=["site", "recording_id"])
    assert table.num_rows == 10 and sorted(set(table.column("site").to_pylist())) == ["alpha", "beta"]
    again = ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, ids="original"))
    assert (again.ok, again.skipped) == (0, 5) and open_store(str(store)).count_rows() == 10  # nothing swept
    # The store remembers its id mode and key: mixing them would give the same nights two ids.
    with pytest.raises(ValueError, match="--ids pseudonymous: the store .* holds original ids"):
        ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PSEUDONYM_KEY_ENV, "another project's key, long enough")
        with pytest.raises(ValueError, match="was written with another key"):
            ingest(IngestConfig(inputs=[str(cohort)], output=str(store), epochs_per_window=10, ids="original"))
    with pytest.raises(ValueError, match="--link-table .* inside the store"):
        ingest(
            IngestConfig(
                inputs=[str(cohort)],
                output=str(store),
                epochs_per_window=10,
                ids="original",
                link_table=str(store / "l.csv"),
            )
        )
    assert stat.S_IMODE(links.stat().st_mode) == 0o600


def _readme_nsrr_site_toml() -> str:
    """The NSRR site.toml exactly as the README shows it."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("NSRR cohorts") :]
    return re.search(r"```toml\n(.*?)```", section, re.S).group(1)


def _nsrr_xml(stages: list[int]) -> str:
    concepts = {0: "Wake|0", 1: "Stage 1 sleep|1", 2: "Stage 2 sleep|2", 3: "Stage 3 sleep|3", 4: "REM sleep|5"}
    events = "".join(
        f"<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>{concepts[s]}</EventConcept>"
        f"<Start>{30 * i}.0</Start><Duration>30.0</Duration></ScoredEvent>"
        for i, s in enumerate(stages)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<PSGAnnotation><SoftwareVersion>Compumedics'
        "</SoftwareVersion><EpochLength>30</EpochLength><ScoredEvents><ScoredEvent><EventType/><EventConcept>"
        f"Recording Start Time</EventConcept><Start>0</Start><Duration>{30 * len(stages)}.0</Duration>"
        f"<ClockTime>00.00.00 23.00.00</ClockTime></ScoredEvent>{events}</ScoredEvents></PSGAnnotation>\n"
    )


def test_the_nsrr_layout_of_the_readme_gets_its_stages(ray_local, tmp_path):
    # shhs/ as NSRR ships it: polysomnography/edfs/shhs1, polysomnography/annotations-events-nsrr/shhs1, datasets/
    shhs = tmp_path / "shhs"
    (shhs / "site.toml").parent.mkdir(parents=True)
    (shhs / "site.toml").write_text(_readme_nsrr_site_toml())
    rng = np.random.default_rng(0)
    expected = {}
    for nsrrid in ("200001", "200002"):
        channels = {
            label: (rate, rng.normal(0, 30, int(rate * SECONDS)))
            for label, rate in (
                ("EEG(sec)", 125.0),
                ("ECG", 125.0),
                ("EMG", 125.0),
                ("EOG(L)", 50.0),
                ("EEG", 125.0),
                ("THOR RES", 10.0),
                ("ABDO RES", 10.0),
                ("NEW AIR", 10.0),
                ("H.R.", 1.0),
                ("POSITION", 1.0),
            )
        }
        channels["SaO2"] = (1.0, 95 + rng.integers(-2, 3, SECONDS).astype(float))
        edf = shhs / "polysomnography" / "edfs" / "shhs1" / f"shhs1-{nsrrid}.edf"
        edf.parent.mkdir(parents=True, exist_ok=True)
        write_edf(edf, channels, file_type="edf")
        expected[nsrrid] = rng.integers(0, 5, SECONDS // 30).tolist()
        xml = shhs / "polysomnography" / "annotations-events-nsrr" / "shhs1" / f"shhs1-{nsrrid}-nsrr.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(_nsrr_xml(expected[nsrrid]))
        profusion = xml.parents[1].parent / "annotations-events-profusion" / "shhs1" / f"shhs1-{nsrrid}-profusion.xml"
        profusion.parent.mkdir(parents=True, exist_ok=True)
        profusion.write_text("<CMPStudyConfig/>")  # NSRR's other annotation folder: not a hypnogram here
    (shhs / "datasets").mkdir()
    (shhs / "datasets" / "shhs1-dataset-0.21.0.csv").write_text(
        "nsrrid,age_s1,gender,ahi_a0h3,htnderv_s1\n200001,63,1,12.5,1\n200002,93,2,3.1,0\n"
    )
    store = tmp_path / "store"
    summary = ingest(
        IngestConfig(
            inputs=[str(shhs)],
            output=str(store),
            epochs_per_window=10,
            ids="original",
            link_table=str(tmp_path / "links.csv"),
        )
    )
    assert (summary.ok, summary.quarantined) == (2, 0)
    for line in _lines(store):
        assert line["reason"] is None or "hypnogram" not in line["reason"], line["reason"]
    table = open_store(str(store)).to_table()
    for nsrrid, stages in expected.items():
        rows = table.filter(pads.field("recording_id") == nsrrid).sort_by("window_index")
        batch = table_to_batch(rows, epochs_per_window=10)
        assert batch["stages"].reshape(-1).tolist() == stages  # every epoch staged, none -1
        assert batch["age"][0] == {"200001": 63, "200002": 90}[nsrrid]  # 93 top-coded
    assert _links(tmp_path / "links.csv")["polysomnography/edfs/shhs1/shhs1-200001.edf"]["recording_id"] == "200001"
