"""Site discovery: site vs parent directories, hypnogram matching, metadata rows, URIs, fingerprints."""

from __future__ import annotations

import shutil

import pyarrow.fs as pafs
import pytest

from s2v_core.io.discovery import discover_site, find_sites, fingerprint, join, resolve

SITE_TOML = '''name = "clinic"
signals = ["*-PSG.edf"]
key_regex = "^(?P<key>SC\\\\d{4})E0-PSG$"
[hypnogram]
format = "edf_annotations"
pattern = "{key}E?-Hypnogram.edf"
[metadata]
file = "subjects.csv"
key_column = "record"
subject_column = "subject"
'''


def _touch(path, content=b"0       "):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def site(tmp_path):
    folder = tmp_path / "clinic"
    _touch(folder / "site.toml", SITE_TOML.encode())
    _touch(folder / "subjects.csv", b"record,subject,age,sex\nSC4001,s1,33,F\nSC4002,s1,34,F\n")
    _touch(folder / "SC4001E0-PSG.edf")
    _touch(folder / "SC4001EC-Hypnogram.edf")
    _touch(folder / "night2" / "SC4002E0-PSG.edf")  # nested directories are searched
    _touch(folder / "night2" / "SC4002EH-Hypnogram.edf")
    _touch(folder / "night2" / "SC4002EJ-Hypnogram.edf")  # a second match: ambiguous
    _touch(folder / "SC4003E0-PSG.edf")  # no hypnogram, no metadata row
    _touch(folder / "SC4009EX-Hypnogram.edf")  # no signal
    _touch(folder / "notes-PSG.edf")  # key_regex does not match
    return folder


def test_a_site_directory_with_site_toml(site):
    [(config, uri)] = find_sites(str(site))
    assert config.name == "clinic" and uri == str(site)
    sources, orphans = discover_site(config, uri)
    by_source = {s.source: s for s in sources}
    assert sorted(by_source) == ["SC4001E0-PSG.edf", "SC4003E0-PSG.edf", "night2/SC4002E0-PSG.edf", "notes-PSG.edf"]
    first = by_source["SC4001E0-PSG.edf"]
    assert first.recording_id == "SC4001" and first.hypnogram == "SC4001EC-Hypnogram.edf"
    assert first.hypnogram_problem is None
    assert first.metadata.subject_id == "s1" and first.metadata.age == 33 and first.metadata.sex == 0
    assert "matches 2 files" in by_source["night2/SC4002E0-PSG.edf"].hypnogram_problem
    assert by_source["night2/SC4002E0-PSG.edf"].hypnogram is None
    assert "no hypnogram matching" in by_source["SC4003E0-PSG.edf"].hypnogram_problem
    assert by_source["SC4003E0-PSG.edf"].metadata.age is None
    unkeyed = by_source["notes-PSG.edf"]
    assert not unkeyed.key_matched and unkeyed.recording_id.startswith("clinic-")
    assert discover_site(config, uri)[0][-1].recording_id == unkeyed.recording_id  # stable
    assert sorted(o.source for o in orphans) == ["SC4009EX-Hypnogram.edf"]


def test_a_parent_of_sites_and_default_configs(site, tmp_path):
    _touch(tmp_path / "home study" / "a.edf")  # no site.toml: defaults named after the directory
    sites = find_sites(str(tmp_path))
    assert [config.name for config, _ in sites] == ["clinic", "home_study"]
    config, uri = sites[1]
    sources, _ = discover_site(config, uri, input_uri=str(tmp_path))
    assert [(s.source, s.recording_id, s.hypnogram) for s in sources] == [("home study/a.edf", "a", None)]


def test_site_config_override(site, tmp_path):
    override = _touch(tmp_path / "other.toml", b'name = "renamed"\n')
    [(config, _)] = find_sites(str(site), site_config=str(override))
    assert config.name == "renamed"


def test_unknown_site_toml_key_is_an_error_naming_the_file(tmp_path):
    _touch(tmp_path / "s" / "site.toml", b'name = "s"\nchanels = {}\n')
    with pytest.raises(ValueError, match=r"site\.toml.*chanels"):
        find_sites(str(tmp_path / "s"))


def test_missing_input_and_missing_metadata_table(tmp_path, site):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_sites(str(tmp_path / "nope"))
    (site / "subjects.csv").unlink()
    [(config, uri)] = find_sites(str(site))
    with pytest.raises(FileNotFoundError, match="subjects.csv"):
        discover_site(config, uri)


def test_uris_work_like_paths(site):
    [(config, uri)] = find_sites(site.as_uri())
    sources, _ = discover_site(config, uri)
    assert uri == site.as_uri() and len(sources) == 4
    assert sources[0].signal_uri.startswith("file://")
    fs, path = resolve(sources[0].signal_uri)
    assert isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(path).type == pafs.FileType.File


def test_joined_uris_keep_their_options_after_the_path():
    base = "s3://bucket/cohort?endpoint_override=10.0.0.5:9000&scheme=http"
    assert join(base, "shhs", "a.edf") == "s3://bucket/cohort/shhs/a.edf?endpoint_override=10.0.0.5:9000&scheme=http"
    assert resolve(join(base, "shhs/a.edf"))[1] == "bucket/cohort/shhs/a.edf"
    assert join("/data/cohort/", "shhs/a.edf") == "/data/cohort/shhs/a.edf"
    assert join(base, "") == join(base) == base


def test_fingerprint_finds_copies_not_edits(tmp_path):
    data = bytes(range(256)) * 20_000  # 5 MB
    original = _touch(tmp_path / "a.edf", data)
    copy = tmp_path / "b.edf"
    shutil.copy(original, copy)
    edited = _touch(tmp_path / "c.edf", data[:300] + b"\x00" + data[301:])
    fs = pafs.LocalFileSystem()
    prints = [fingerprint(fs, str(p), p.stat().st_size) for p in (original, copy, edited)]
    assert prints[0] == prints[1] != prints[2]
