"""Storage locations: local paths and URIs, the one place that says which is which.

A *location* is what a user passes as ``--input``/``--data``/``--output``/
``--checkpoint``: a local path or a URI that :mod:`pyarrow.fs` understands
(``file://``, ``s3://bucket/key``, ``gs://…``), possibly with options such as
``?endpoint_override=host:port&scheme=http``. Two questions are asked of a
location, and each has one answer here:

=======================  ===============  ==================  ===========
question                 ``/tmp/x``        ``file:///tmp/x``   ``s3://b/k``
=======================  ===============  ==================  ===========
:func:`has_scheme`       no               yes                 yes
:func:`is_uri`           no               no                  yes
=======================  ===============  ==================  ===========

``has_scheme`` is about syntax (pyarrow must parse it; ``?options`` belong to
it; it is never a path relative to anything); ``is_uri`` is about where the
bytes are (not on this machine's file system: no SQLite store, no
``torch.load``, no private link table there).

Locations may carry credentials (``s3://KEY:SECRET@bucket``, ``?token=``):
:func:`redact` removes them from anything logged, recorded, or shown.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["REDACTED", "absolute", "has_scheme", "is_uri", "join", "redact", "redact_values", "resolve"]


def has_scheme(location: str | Path) -> bool:
    """Whether ``location`` is written as a URI (``scheme://…``, ``file://`` included).

    Parameters
    ----------
    location : str or Path
        A local path or a URI.

    Returns
    -------
    bool
        True when pyarrow must parse ``location`` as a URI rather than a path.
    """
    return "://" in str(location)


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names remote storage (``s3://``, ``gs://``…) rather than this machine's disk.

    A ``file://`` URI is local: it names a path on this machine.

    Parameters
    ----------
    location : str or Path
        A local path or a URI.

    Returns
    -------
    bool
        True for a URI of any scheme but ``file``.
    """
    return has_scheme(location) and not str(location).startswith("file://")


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a local path or a pyarrow-understood URI.

    Parameters
    ----------
    location : str or Path
        A local path (made absolute, ``~`` expanded) or a URI.

    Returns
    -------
    tuple of (pyarrow.fs.FileSystem, str)
        The filesystem and the path within it.
    """
    text = str(location)
    if not has_scheme(text):
        return pafs.LocalFileSystem(), Path(text).expanduser().resolve().as_posix()
    return pafs.FileSystem.from_uri(text)


def join(location: str | Path, *relative: str) -> str:
    """``location`` with ``/``-separated relative parts appended to its path.

    A URI keeps its scheme and its ``?options`` (``s3://b/in?endpoint_override=h:9000``
    joined with ``site/a.edf`` is ``s3://b/in/site/a.edf?endpoint_override=h:9000``).

    Parameters
    ----------
    location : str or Path
        A local path or a URI.
    *relative : str
        Parts to append; empty parts are skipped.

    Returns
    -------
    str
        The joined location (``location`` itself when nothing is appended).
    """
    text = str(location)
    parts = [part for part in relative if part]
    if not parts:
        return text
    base, mark, options = text.partition("?") if has_scheme(text) else (text, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + options


def absolute(location: str | Path) -> str:
    """A local path made absolute (as recorded in run metadata); a URI as given."""
    return str(location) if is_uri(location) else resolve(str(location))[1]


# -- credentials ------------------------------------------------------------------------------

#: Query-parameter names (split on "_", "-", ".") that carry a credential.
_SECRET_PARTS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "signature",
        "sig",
        "credential",
        "credentials",
        "sessiontoken",
        "apikey",
        "auth",
        "authorization",
    }
)
_SECRET_NAMES = ("access_key", "secret_key", "access-key", "secret-key", "accesskey", "secretkey", "key")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#'\"]+@)")
_QUERY = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&\s#'\"]*)")
REDACTED = "***"


def _secret_name(name: str) -> bool:
    lowered = name.casefold()
    return bool(set(re.split(r"[_.\-]", lowered)) & _SECRET_PARTS) or lowered.endswith(_SECRET_NAMES)


def redact(text: str) -> str:
    """``text`` with credentials in URIs replaced by ``***``.

    The user-info part (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``)
    and the values of query parameters whose name marks a secret (``token``,
    ``secret_key``, ``X-Amz-Signature``, ``sig`` ...) go; paths and options
    such as ``endpoint_override`` stay. Use on anything a location may reach
    before it is logged, recorded or shown.
    """
    text = _USERINFO.sub(lambda m: m["scheme"] + REDACTED + "@", str(text))
    return _QUERY.sub(
        lambda m: f"{m['lead']}{m['name']}={REDACTED}" if _secret_name(m["name"]) and m["value"] else m.group(0), text
    )


def redact_values(data):
    """``data`` (nested dicts, lists, strings) with :func:`redact` applied to every string in it."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {key: redact_values(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_values(value) for value in data)
    return data
