"""Site discovery: site vs parent directories, hypnogram matching, metadata rows, URIs, fingerprints."""

from __future__ import annotations

import shutil

import pyarrow.fs as pafs
import pytest

from s2v_core.io.discovery import discover_site, find_sites, fingerprint
from s2v_core.io.identity import Identities, PseudonymKey
from s2v_core.locations import join, resolve

KEY = PseudonymKey(b"a test key of enough length", origin="test")
ORIGINAL = Identities(KEY, mode="original")
PSEUDONYMOUS = Identities(KEY)

SITE_TOML = """name = "clinic"
signals = ["*-PSG.edf"]
key_regex = "^(?P<key>SC\\\\d{4})E0-PSG$"
[hypnogram]
format = "edf_annotations"
pattern = "{key}E?-Hypnogram.edf"
[metadata]
file = "subjects.csv"
key_column = "record"
subject_column = "subject"
"""


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
    listing = discover_site(config, uri, identities=ORIGINAL)
    by_source = {s.source: s for s in listing.sources}
    assert sorted(by_source) == ["SC4001E0-PSG.edf", "SC4003E0-PSG.edf", "night2/SC4002E0-PSG.edf", "notes-PSG.edf"]
    first = by_source["SC4001E0-PSG.edf"]
    assert first.recording_id == "SC4001" and first.hypnogram == "SC4001EC-Hypnogram.edf"
    assert first.hypnogram_problem is None
    assert first.metadata.subject_id == "s1" and first.metadata.age == 33 and first.metadata.sex == 0
    assert "matches 2 files" in by_source["night2/SC4002E0-PSG.edf"].hypnogram_problem
    assert "SC4002" not in by_source["night2/SC4002E0-PSG.edf"].hypnogram_problem  # notes never repeat names
    assert by_source["night2/SC4002E0-PSG.edf"].hypnogram is None
    assert "no hypnogram matching" in by_source["SC4003E0-PSG.edf"].hypnogram_problem
    assert by_source["SC4003E0-PSG.edf"].metadata.age is None
    unkeyed = by_source["notes-PSG.edf"]
    assert not unkeyed.key_matched and len(unkeyed.recording_id) == 16 and "notes" not in unkeyed.recording_id
    assert discover_site(config, uri, identities=ORIGINAL).sources[-1].recording_id == unkeyed.recording_id  # stable
    assert [(f.source, f.reason) for f in listing.skipped] == [
        ("SC4009EX-Hypnogram.edf", "hypnogram with no matching signal file")
    ]


def test_a_parent_of_sites_and_default_configs(site, tmp_path):
    _touch(tmp_path / "home study" / "a.edf")  # no site.toml: defaults named after the directory
    sites = find_sites(str(tmp_path))
    assert [config.name for config, _ in sites] == ["clinic", "home_study"]
    config, uri = sites[1]
    sources = discover_site(config, uri, input_uri=str(tmp_path), identities=ORIGINAL).sources
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
        discover_site(config, uri, identities=ORIGINAL)


def test_uris_work_like_paths(site):
    [(config, uri)] = find_sites(site.as_uri())
    sources = discover_site(config, uri, identities=ORIGINAL).sources
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


def test_ids_are_keyed_hashes_that_hold_no_site_key(site):
    import pickle

    [(config, uri)] = find_sites(str(site))
    listing = discover_site(config, uri, identities=PSEUDONYMOUS)
    first = next(s for s in listing.sources if s.source == "SC4001E0-PSG.edf")
    assert first.recording_id == PSEUDONYMOUS.pseudonym("clinic", "SC4001") != "SC4001"
    assert first.metadata.subject_id == PSEUDONYMOUS.pseudonym("clinic", "s1")
    assert discover_site(config, uri, identities=PSEUDONYMOUS).sources[0] == listing.sources[0]  # stable
    other_key = Identities(PseudonymKey(b"another key of enough length", origin="test"))
    assert discover_site(config, uri, identities=other_key).sources[0].recording_id != first.recording_id
    # What a worker receives names the files it reads but holds no key or subject otherwise.
    shipped = pickle.dumps(first).replace(b"SC4001E0-PSG.edf", b"").replace(b"SC4001EC-Hypnogram.edf", b"")
    assert b"SC4001" not in shipped and first.metadata.subject_id != "s1"
    rows = {(row.kind, row.path): row for row in listing.links}
    assert rows[("signal", "SC4001E0-PSG.edf")].recording_key == "SC4001"
    assert rows[("signal", "SC4001E0-PSG.edf")].subject_id == first.metadata.subject_id
    assert rows[("hypnogram", "SC4001EC-Hypnogram.edf")].file_id == first.hypnogram_file_id


@pytest.mark.parametrize(
    "key, safe",
    [
        ("SC4001", True),
        ("1001", True),
        (".hidden", False),
        ("_x", False),
        (".tmp-evil", False),
        ("a/b", False),
        ("Doe John", False),
        ("", False),
    ],
)
def test_original_ids_are_kept_only_when_safe(key, safe):
    identifier, note = ORIGINAL.identifier("lab", key, what="recording key")
    assert (identifier == key) is safe and (note is None) is safe
    assert PSEUDONYMOUS.identifier("lab", key, what="recording key")[0] == PSEUDONYMOUS.pseudonym("lab", key)
    if note:
        assert key not in note or not key


def test_symbolic_links_stay_inside_the_site(tmp_path):
    site, outside = tmp_path / "site", tmp_path / "outside"
    _touch(site / "a.edf")
    _touch(site / "deep" / "b.edf")
    _touch(outside / "secret.edf")
    (site / "loop").symlink_to(".")  # a self-loop would multiply every file
    (site / "deep" / "up").symlink_to("..")  # a loop through a parent
    (site / "ring1").symlink_to("ring2")  # two links pointing at each other
    (site / "ring2").symlink_to("ring1")
    (site / "out").symlink_to(outside)  # out of the site
    (site / "gone.edf").symlink_to(site / "nowhere.edf")  # dangling
    (site / "alias.edf").symlink_to(site / "a.edf")  # inside: followed (a duplicate the ingest finds by content)
    [(config, uri)] = find_sites(str(site))
    listing = discover_site(config, uri, identities=ORIGINAL)
    assert sorted(s.source for s in listing.sources) == ["a.edf", "alias.edf", "deep/b.edf"]
    reasons = {f.source: f.reason for f in listing.skipped}
    assert set(reasons) == {"loop", "deep/up", "ring1", "ring2", "out", "gone.edf"}
    assert "loop" in reasons["loop"] and "loop" in reasons["deep/up"] and "loop" in reasons["ring1"]
    assert "outside the site" in reasons["out"] and "dangling" in reasons["gone.edf"]
    assert all(f.file_id == ORIGINAL.file_id("site", f.source) for f in listing.skipped)


def test_metadata_table_must_be_inside_the_site(tmp_path):
    from s2v_core.io.site_config import load_site_config

    for file in ("../x", "/etc/passwd", "a/../../x", "s3://bucket/x.csv"):
        config = tmp_path / "site.toml"
        config.write_text(f'name = "lab"\n[metadata]\nfile = "{file}"\n')
        with pytest.raises(ValueError, match=r"\[metadata\]\.file.*inside the site directory"):
            load_site_config(config)
    # a link to a table outside the site is not read either
    site = tmp_path / "lab"
    _touch(site / "a.edf")
    _touch(tmp_path / "secret.csv", b"recording_id,age\na,99\n")
    _touch(site / "site.toml", b'name = "lab"\n[metadata]\nfile = "subjects.csv"\n')
    (site / "subjects.csv").symlink_to(tmp_path / "secret.csv")
    [(config, uri)] = find_sites(str(site))
    with pytest.raises(FileNotFoundError, match="subjects.csv not found"):
        discover_site(config, uri, identities=ORIGINAL)


def test_hypnogram_patterns_climb_to_the_nsrr_annotation_folders(tmp_path):
    site = tmp_path / "shhs"
    _touch(
        site / "site.toml",
        b'name = "shhs1"\nsignals = ["polysomnography/edfs/shhs1/*.edf"]\n'
        b'key_regex = "^shhs1-(?P<key>\\\\d+)$"\n[hypnogram]\nformat = "nsrr_xml"\n'
        b'pattern = "../../annotations-events-nsrr/shhs1/shhs1-{key}-nsrr.xml"\n',
    )
    _touch(site / "polysomnography" / "edfs" / "shhs1" / "shhs1-200001.edf")
    _touch(site / "polysomnography" / "edfs" / "shhs1" / "shhs1-200002.edf")
    _touch(site / "polysomnography" / "annotations-events-nsrr" / "shhs1" / "shhs1-200001-nsrr.xml")
    _touch(site / "polysomnography" / "annotations-events-nsrr" / "shhs1" / "shhs1-299999-nsrr.xml")
    _touch(site / "polysomnography" / "annotations-events-profusion" / "shhs1" / "shhs1-200001-profusion.xml")
    [(config, uri)] = find_sites(str(site))
    listing = discover_site(config, uri, identities=ORIGINAL)
    by_key = {s.recording_id: s for s in listing.sources}
    assert by_key["200001"].hypnogram == "polysomnography/annotations-events-nsrr/shhs1/shhs1-200001-nsrr.xml"
    assert by_key["200002"].hypnogram is None and "no hypnogram matching" in by_key["200002"].hypnogram_problem
    assert [f.source for f in listing.skipped] == [
        "polysomnography/annotations-events-nsrr/shhs1/shhs1-299999-nsrr.xml"
    ]
    # a pattern that leaves the site is refused, not searched outside it
    escaping = config.__class__(
        name="x",
        hypnogram=config.hypnogram.__class__(pattern="../../../../x-{key}.xml"),
        signals=config.signals,
        key_regex=config.key_regex,
    )
    problem = discover_site(escaping, uri, identities=ORIGINAL).sources[0].hypnogram_problem
    assert "leads out of the site directory" in problem
