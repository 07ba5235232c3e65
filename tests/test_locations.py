"""Locations: one answer to "is this a URI?", joins that keep options, and the store's subset record."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from s2v_core.io.site_config import is_inside
from s2v_core.locations import has_scheme, is_uri, join, resolve
from s2v_core.splits import splits_location


@pytest.mark.parametrize(
    ("location", "scheme", "remote"),
    [
        ("/tmp/x", False, False),
        ("run/x", False, False),
        (Path("/tmp/x"), False, False),
        ("file:///tmp/x", True, False),
        ("s3://b/k?endpoint_override=h:1", True, True),
        ("gs://b/k", True, True),
    ],
)
def test_one_answer_to_is_this_a_uri(location, scheme, remote):
    assert has_scheme(location) is scheme
    assert is_uri(location) is remote


def test_a_file_uri_resolves_to_the_local_path(tmp_path):
    filesystem, path = resolve(tmp_path.as_uri())
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == tmp_path.as_posix()
    assert resolve(str(tmp_path))[1] == tmp_path.as_posix()


def test_joins_keep_options_of_uris_only():
    assert join("s3://b/store?scheme=http", "splits.json") == "s3://b/store/splits.json?scheme=http"
    assert join(Path("/tmp/store"), "a", "", "b") == "/tmp/store/a/b"
    assert join("/tmp/what?.edf", "x") == "/tmp/what?.edf/x"  # a '?' in a local name is part of the name


def test_the_splits_file_of_a_local_store(tmp_path):
    assert splits_location(f"{tmp_path}/") == f"{tmp_path}/splits.json"


def test_a_path_with_a_scheme_is_never_inside_a_site():
    assert not is_inside("file:///etc/passwd") and not is_inside("s3://b/k") and is_inside("a/b.edf")


def test_a_subset_of_a_local_store_records_its_absolute_path(tmp_path):
    from s2v_core.store_subset import write_store_subset

    store = tmp_path / "store"
    (store / "site=a").mkdir(parents=True)
    part = store / "site=a" / "part.parquet"
    part.write_bytes(b"")
    for given in (str(store), store.as_uri()):
        where = write_store_subset(str(tmp_path / "train.subset.json"), store=given, files=[part.as_posix()])
        assert json.loads(Path(where).read_text())["store"] == store.as_posix()
