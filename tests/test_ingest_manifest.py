"""The manifest, the store's lease and the driver-side plan of ``s2v ingest`` (no Ray).

The plan decides, before anything is decoded: skip what is unchanged, decode
again what changed, refuse duplicates within a site, withdraw what vanished.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pyarrow.fs as pafs
import pytest
from pyarrow._fs import _MockFileSystem

from pipelines.ingest import discover
from pipelines.ingest_plan import IngestLimits, plan
from pipelines.manifest import LINES_PER_PART, PARTS_DIR, ManifestEntry, ManifestWriter, read_manifest, rewrite_manifest
from pipelines.store_lease import LEASE_NAME, StoreBusy, store_lease
from s2v_core.io.identity import Identities, PseudonymKey
from tests.test_io_edf import _channels, write_edf

IDS = Identities(PseudonymKey(b"the manifest tests' project key", origin="test"))
ORIGINAL = Identities(IDS.key, mode="original")


def _write(root, entries):
    writer = ManifestWriter(pafs.LocalFileSystem(), str(root))
    for entry in entries:
        writer.append(entry)


def test_lines_cut_by_a_crash_are_skipped_and_a_rewrite_is_atomic(tmp_path):
    _write(tmp_path, [ManifestEntry("a1", "a", "f1", "ok", windows=3), ManifestEntry("a2", "a", "f2", "ok")])
    with open(tmp_path / "manifest.jsonl", "a") as handle:
        handle.write('{"recording_id": "a4", "si')  # a line cut by a crash
    entries = read_manifest(pafs.LocalFileSystem(), str(tmp_path))
    assert [e.recording_id for e in entries] == ["a1", "a2"]
    rewrite_manifest(pafs.LocalFileSystem(), str(tmp_path), entries[:1])
    assert read_manifest(pafs.LocalFileSystem(), str(tmp_path)) == entries[:1]
    assert not list(tmp_path.glob(".manifest*"))


def test_an_old_manifest_loses_its_paths_when_rewritten(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"recording_id": "a1", "site": "a", "source": "Doe_John/Doe_John.edf", "status": "ok"}) + "\n"
    )
    fs = pafs.LocalFileSystem()
    rewrite_manifest(fs, str(tmp_path), read_manifest(fs, str(tmp_path)))
    assert "Doe_John" not in (tmp_path / "manifest.jsonl").read_text()


def test_object_stores_get_per_run_parts_not_a_rewrite_per_line():
    fs = _MockFileSystem()  # not a LocalFileSystem: no append, as on s3://
    fs.create_dir("store")
    writes = []

    class Counting(ManifestWriter):
        def flush(self):
            writes.append(len(self._pending))
            super().flush()

    writer = Counting(fs, "store", run_id="run1")
    lines = 2 * LINES_PER_PART + 5
    for k in range(lines):
        writer.append(ManifestEntry(f"r{k}", "a", f"f{k}", "ok"))
    parts = fs.get_file_info(pafs.FileSelector(f"store/{PARTS_DIR}"))
    assert len(parts) == 2 and writes == [LINES_PER_PART, LINES_PER_PART]  # a PUT per part, not per line
    assert len(read_manifest(fs, "store")) == 2 * LINES_PER_PART  # readers see the parts already
    writer.close()
    assert [e.recording_id for e in read_manifest(fs, "store")] == [f"r{k}" for k in range(lines)]
    assert fs.get_file_info(pafs.FileSelector(f"store/{PARTS_DIR}", allow_not_found=True)) == []


# -- the store's lease ----------------------------------------------------------------------------


def test_a_second_ingest_into_the_same_store_is_refused(tmp_path):
    fs = pafs.LocalFileSystem()
    with store_lease(fs, str(tmp_path), store="STORE") as run_id:
        lease = json.loads((tmp_path / LEASE_NAME).read_text())
        assert lease["run_id"] == run_id and lease["pid"] == os.getpid()
        with pytest.raises(StoreBusy, match=rf"--output STORE: another ingest .*run {run_id}"):
            with store_lease(fs, str(tmp_path), store="STORE"):
                pass
    assert not (tmp_path / LEASE_NAME).exists()  # released


@pytest.mark.parametrize("holder", ["expired", "dead process"])
def test_a_stale_lease_is_taken_over(tmp_path, holder):
    if holder == "expired":
        lease = {"run_id": "old", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    else:
        finished = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
        )
        lease = {
            "run_id": "old",
            "host": socket.gethostname(),
            "pid": int(finished.stdout),
            "expires": time.time() + 3600,
        }
    (tmp_path / LEASE_NAME).write_text(json.dumps(lease))
    with store_lease(pafs.LocalFileSystem(), str(tmp_path), store="STORE") as run_id:
        assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == run_id != "old"


# -- the plan ---------------------------------------------------------------------------------------


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "cohort"
    for site in ("a", "b"):
        (root / site).mkdir(parents=True)
        (root / site / "site.toml").write_text(f'name = "{site}"\n[hypnogram]\nformat = "none"\n')
        write_edf(root / site / "1001.edf", _channels(), file_type="edf")  # the same key at both sites
    write_edf(root / "a" / "1002.edf", _channels(30), file_type="edf")
    shutil.copy(root / "a" / "1002.edf", root / "a" / "1002_copy.edf")  # same content, other name
    (root / "a" / "sub").mkdir()
    write_edf(root / "a" / "sub" / "1002.edf", _channels(40), file_type="edf")  # same key, other content
    return root


def _finish(decided) -> list[ManifestEntry]:
    """The manifest after a run in which every task decoded fine."""
    return decided.kept + [replace(t.entry, status="ok", windows=1) for t in decided.tasks] + decided.withdrawn


def _sources(decided) -> dict[str, str]:
    return {t.source.source: t.entry.file_id for t in decided.tasks}


def test_cross_site_id_reuse_keeps_both_nights_and_duplicates_within_a_site_are_refused(cohort):
    for identities in (IDS, ORIGINAL):
        decided = plan(
            discover([str(cohort)], site_config=None, identities=identities), previous=[], identities=identities
        )
        kept = {(t.source.site.name, t.source.source) for t in decided.tasks}
        assert {("a", "a/1001.edf"), ("b", "b/1001.edf")} <= kept  # same key and content, two sites
        ids = {t.source.source: t.entry.recording_id for t in decided.tasks}
        assert (ids["a/1001.edf"] == ids["b/1001.edf"] == "1001") is (identities is ORIGINAL)
        reasons = {e.file_id: e.reason for e in decided.rejected}
        assert len(decided.tasks) == 3 and len(reasons) == 2
        copy = identities.file_id("a", "a/1002_copy.edf")
        assert "same content as file" in reasons[copy] and "site 'a'" in reasons[copy]
        nested = identities.file_id("a", "a/sub/1002.edf")
        assert "duplicate recording_id" in reasons[nested]
        for reason in reasons.values():
            assert "1002_copy" not in reason and "sub/" not in reason  # files are named by file_id only


def test_unchanged_inputs_are_skipped_and_changed_ones_decoded_again(cohort):
    sites = discover([str(cohort)], site_config=None, identities=IDS)
    first = _finish(plan(sites, previous=[], identities=IDS))
    again = plan(sites, previous=first, identities=IDS)
    assert (again.skipped, again.tasks) == (3, [])
    # the content of one input changes (a replaced file), the config of the other site changes
    write_edf(cohort / "a" / "1001.edf", _channels(50), file_type="edf")
    (cohort / "b" / "site.toml").write_text('name = "b"\nignore_channels = ["ECG"]\n[hypnogram]\nformat = "none"\n')
    sites = discover([str(cohort)], site_config=None, identities=IDS)
    changed = plan(sites, previous=first, identities=IDS)
    assert sorted(_sources(changed)) == ["a/1001.edf", "b/1001.edf"] and changed.skipped == 1
    assert all(t.replaces for t in changed.tasks)
    # a different window length is a change too
    assert not plan(sites, previous=_finish(changed), identities=IDS, epochs_per_window=5).skipped


def test_vanished_inputs_are_stale_and_pruning_withdraws_them(cohort):
    sites = discover([str(cohort)], site_config=None, identities=IDS)
    first = _finish(plan(sites, previous=[], identities=IDS))
    gone = next(e for e in first if e.site == "b")
    (cohort / "b" / "1001.edf").unlink()
    sites = discover([str(cohort)], site_config=None, identities=IDS)
    kept = plan(sites, previous=first, identities=IDS)
    assert kept.stale == [gone] and gone in kept.kept and not kept.withdrawn
    pruned = plan(sites, previous=first, identities=IDS, prune=True)
    [withdrawn] = pruned.withdrawn
    assert (withdrawn.recording_id, withdrawn.status) == (gone.recording_id, "withdrawn")
    assert gone not in pruned.kept and "windows erased" in withdrawn.reason
    # the withdrawal stays in the manifest as the record of an erasure
    assert withdrawn in plan(sites, previous=_finish(pruned), identities=IDS, prune=True).kept


def test_oversized_recordings_are_refused_from_their_header(cohort):
    sites = discover([str(cohort)], site_config=None, identities=IDS)
    decided = plan(sites, previous=[], identities=IDS, limits=IngestLimits(max_hours=45 / 3600))
    assert {t.source.source for t in decided.tasks} == {"a/1002.edf"}  # 30 s; the 60-s files declare more
    reasons = [e.reason for e in decided.rejected if "--max-hours" in e.reason]
    assert len(reasons) == 2 and "declares 0.0 h" not in reasons[0]
    small = plan(sites, previous=[], identities=IDS, limits=IngestLimits(max_file_gib=1e-6))
    assert not small.tasks and all("--max-file-gib" in e.reason for e in small.rejected if e.recording_id)
    task = plan(sites, previous=[], identities=IDS).tasks[0]
    assert task.entry.declared_hours == round(60 / 3600, 3) and task.memory_bytes > 512 << 20
