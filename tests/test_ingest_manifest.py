"""The manifest and the driver-side plan of ``s2v ingest`` (no Ray): compaction, skips, duplicates."""

from __future__ import annotations

import shutil

import pyarrow.fs as pafs

from pipelines.ingest import discover, plan
from pipelines.manifest import ManifestEntry, ManifestWriter, compact_manifest, read_manifest
from tests.test_io_edf import _channels, write_edf


def _write(root, entries):
    writer = ManifestWriter(pafs.LocalFileSystem(), str(root))
    for entry in entries:
        writer.append(entry)


def test_compaction_redoes_only_the_sites_of_the_run(tmp_path):
    (tmp_path / "site=a").mkdir()
    (tmp_path / "site=a" / "a1.parquet").write_bytes(b"PAR1")
    _write(tmp_path, [
        ManifestEntry("a1", "a", "a1.edf", "ok", windows=3),
        ManifestEntry("a2", "a", "a2.edf", "ok", windows=3),  # its file is gone: redo
        ManifestEntry("a3", "a", "a3.edf", "quarantined", reason="a3.edf: empty file"),
        ManifestEntry("b1", "b", "b1.edf", "quarantined", reason="b1.edf: empty file"),  # another input
    ])
    with open(tmp_path / "manifest.jsonl", "a") as handle:
        handle.write('{"recording_id": "a4", "si')  # a line cut by a crash
    kept = compact_manifest(pafs.LocalFileSystem(), str(tmp_path), redo_sites={"a"})
    assert [(e.site, e.recording_id) for e in kept] == [("a", "a1"), ("b", "b1")]
    assert read_manifest(pafs.LocalFileSystem(), str(tmp_path)) == kept
    assert not list(tmp_path.glob(".manifest*"))


def test_plan_skips_finished_and_quarantines_duplicates(tmp_path):
    site = tmp_path / "lab"
    site.mkdir()
    write_edf(site / "n1.edf", _channels(), file_type="edf")
    shutil.copy(site / "n1.edf", site / "n1_copy.edf")
    write_edf(site / "n2.edf", _channels(30), file_type="edf")
    (site / "n2-Hypnogram.edf").write_bytes(b"")  # claimed by n2 (read later)
    (site / "x-Hypnogram.edf").write_bytes(b"")  # claimed by nobody
    sites = discover([str(site)], site_config=None)
    tasks, rejected, skipped = plan(sites, finished=[])
    # n2 has a hypnogram, so it is preferred; of the two identical files the first by path is kept
    assert [source.source for source, _ in tasks] == ["n2.edf", "n1.edf"]
    reasons = {e.source: e.reason for e in rejected}
    assert reasons == {"x-Hypnogram.edf": "x-Hypnogram.edf: hypnogram with no matching signal file",
                       "n1_copy.edf": "n1_copy.edf: duplicate recording, same content as n1.edf"}
    finished = [ManifestEntry("n1", "lab", "n1.edf", "ok", windows=2, content_hash=tasks[1][1])]
    tasks, rejected, skipped = plan(sites, finished=finished)
    assert [source.source for source, _ in tasks] == ["n2.edf"] and skipped == 1
    assert any("same content as n1.edf" in e.reason for e in rejected)
