"""Store subsets: some of a store's Parquet files, named in one small JSON file.

A store subset is a JSON file ``{"store": ROOT, "files": [paths relative to ROOT]}``
whose name ends in :data:`SUBSET_SUFFIX`: readable wherever a store is (the
sweep's training and validation sides; links cannot point into object
storage). :func:`s2v_core.store.store_files` reads one like a store, and
:mod:`s2v_core.splits` finds the subset's store's ``splits.json``; both
import this module, so neither needs the other to know what a subset is.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence

import pyarrow.fs as pafs

from s2v_core.locations import is_uri, resolve

SUBSET_SUFFIX = ".subset.json"


def read_store_subset(filesystem: pafs.FileSystem, path: str) -> dict:
    """The record ``{"store": ROOT, "files": [...]}`` of the subset at ``path`` on ``filesystem``."""
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def write_store_subset(where: str, *, store: str, files: Sequence[str]) -> str:
    """Write a store subset: the ``files`` (paths from :func:`s2v_core.store.store_files`) of ``store``.

    ``where`` is a local path or a URI ending in :data:`SUBSET_SUFFIX`. The
    files are recorded relative to the store's root, along with the store's
    location, so that the subset reads the same from every node. Returns ``where``.

    Raises
    ------
    ValueError
        ``where`` lacks the suffix, or a file is not inside ``store``.
    """
    if not str(where).endswith(SUBSET_SUFFIX):
        raise ValueError(f"store subset {where}: expected a name ending in {SUBSET_SUFFIX}")
    _, root = resolve(str(store))
    relative = [posixpath.relpath(f, root) for f in files]
    outside = [f for f, r in zip(files, relative) if r.startswith("..")]
    if outside:
        raise ValueError(f"store subset {where}: expected files of the store {store}, found {outside[0]}")
    # Local stores are recorded by absolute path: the subset may be read from another directory.
    location = str(store) if is_uri(store) else root
    filesystem, path = resolve(str(where))
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write((json.dumps({"store": location, "files": relative}, indent=1) + "\n").encode("utf-8"))
    return str(where)
