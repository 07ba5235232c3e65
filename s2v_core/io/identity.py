"""Pseudonymous identifiers: what the store calls a night, a subject and a file.

Sites name recordings after people more often than one would hope
(``Doe_John_1961-02-03.edf``, hospital numbers, dates of birth). The store
therefore never holds a site's own keys: by default ``recording_id`` and
``subject_id`` are keyed hashes of the site and the original key
(HMAC-SHA256 under a project secret, first :data:`PSEUDONYM_HEX` hex digits),
so the same key at the same site always gives the same id (re-ingests,
subject-level splits) and nobody without the secret can go back.

The secret comes from, in this order: a key file (``--pseudonym-key-file``),
the environment variable :data:`PSEUDONYM_KEY_ENV`, or a key generated once
in a user-private file (:func:`default_key_path`, mode 0600). Only where it
came from is ever logged; the key itself never reaches the store, the
manifest, logs or MLflow. A *check value* (a keyed hash of a constant) lets
the ingest refuse to mix two keys in one store without revealing the key.

``mode="original"`` keeps the site's keys (for cohorts whose keys are already
pseudonymous, e.g. NSRR ids that must be joined with NSRR tables); keys that
are not safe as ids (see :data:`SAFE_ID`) still become keyed hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PSEUDONYM_KEY_ENV = "S2V_PSEUDONYM_KEY"
#: ``pseudonymous`` (the default) or ``original`` (site keys kept when safe).
ID_MODES = ("pseudonymous", "original")
#: Hex digits kept from the HMAC: 64 bits, no collision in any cohort of this world.
PSEUDONYM_HEX = 16
#: Shortest secret accepted, in characters (a short key is a guessable key).
MIN_KEY_CHARACTERS = 16
#: Ids the store can hold as they are: a letter or digit first (readers skip
#: files starting with "." or "_", and ".tmp-" is the ingest's own temporaries),
#: then letters, digits, "_", "-", "."; short enough for a file name.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_CHECK_MESSAGE = b"sleep2vec pseudonym key check"


@dataclass(frozen=True)
class PseudonymKey:
    """The project secret and where it came from (never the secret in ``repr``).

    Parameters
    ----------
    secret : bytes
        The key material.
    origin : str
        ``"S2V_PSEUDONYM_KEY"`` or the key file's path: what may be logged.
    """

    secret: bytes = field(repr=False)
    origin: str

    def check_value(self) -> str:
        """A keyed hash of a constant: tells two keys apart without revealing either."""
        return hmac.new(self.secret, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def default_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/sleep2vec/pseudonym.key`` (default ``~/.config/sleep2vec/pseudonym.key``)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", str(Path.home()))) / ".config")
    return Path(base) / "sleep2vec" / "pseudonym.key"


def _checked(text: str, where: str) -> bytes:
    text = text.strip()
    if len(text) < MIN_KEY_CHARACTERS:
        raise ValueError(
            f"{where}: expected a pseudonym key of at least {MIN_KEY_CHARACTERS} characters, found {len(text)}"
        )
    return text.encode("utf-8")


def _read_key_file(path: Path, *, option: str) -> PseudonymKey:
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("pseudonym key file %s is readable by other users; chmod 600 it", path)
    return PseudonymKey(_checked(path.read_text(encoding="utf-8"), f"{option} {path}"), origin=str(path))


def _generate_key_file(path: Path) -> PseudonymKey:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: two ingests starting together must not write two different keys.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path, option="pseudonym key file")
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    logger.warning(
        "generated a new pseudonym key at %s (mode 0600). Keep it and back it up: the same key gives "
        "the same ids on every re-ingest, and whoever holds it can link ids to the sites' own keys",
        path,
    )
    return _read_key_file(path, option="pseudonym key file")


def load_pseudonym_key(
    key_file: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None
) -> PseudonymKey:
    """The project secret: ``key_file``, else ``S2V_PSEUDONYM_KEY``, else the generated default file.

    Parameters
    ----------
    key_file : path, optional
        A file holding the key (``--pseudonym-key-file``); surrounding
        whitespace is ignored.
    environ : mapping, optional
        Environment to read (default ``os.environ``).

    Raises
    ------
    FileNotFoundError
        ``key_file`` does not exist.
    ValueError
        The key is shorter than :data:`MIN_KEY_CHARACTERS` characters.
    """
    environ = os.environ if environ is None else environ
    if key_file is not None:
        key = _read_key_file(Path(key_file), option="--pseudonym-key-file")
    elif environ.get(PSEUDONYM_KEY_ENV):
        key = PseudonymKey(_checked(environ[PSEUDONYM_KEY_ENV], PSEUDONYM_KEY_ENV), origin=PSEUDONYM_KEY_ENV)
    else:
        path = default_key_path(environ)
        key = _read_key_file(path, option="pseudonym key file") if path.is_file() else _generate_key_file(path)
    logger.info("pseudonym key from %s (check value %s)", key.origin, key.check_value())
    return key


@dataclass(frozen=True)
class Identities:
    """How original keys and file paths become the ids the store and the manifest hold.

    Parameters
    ----------
    key : PseudonymKey
        The project secret (needed in both modes: unsafe keys, file ids and
        content fingerprints are keyed hashes).
    mode : str
        ``"pseudonymous"`` (default) or ``"original"``.
    """

    key: PseudonymKey
    mode: str = "pseudonymous"

    def __post_init__(self) -> None:
        if self.mode not in ID_MODES:
            raise ValueError(f"--ids: expected one of {', '.join(ID_MODES)}, found {self.mode!r}")

    def _hash(self, domain: str, site: str, text: str) -> str:
        message = "\x00".join((domain, site, text)).encode("utf-8")
        return hmac.new(self.key.secret, message, hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]

    def pseudonym(self, site: str, original: str) -> str:
        """The keyed hash of ``original`` at ``site`` (16 lowercase hex digits)."""
        return self._hash("id", site, original)

    def identifier(self, site: str, original: str, *, what: str) -> tuple[str, str | None]:
        """The store id of a site's key, and a note when an unsafe original was replaced.

        ``what`` names the key in the note (``"recording key"``, ``"subject"``);
        the note never repeats the key.
        """
        if self.mode == "pseudonymous":
            return self.pseudonym(site, original), None
        if SAFE_ID.fullmatch(original):
            return original, None
        return self.pseudonym(site, original), (
            f"{what} is not a safe id (expected letters, digits, '_', '-', '.', starting with a letter or "
            "digit, at most 128 characters); stored as its keyed hash"
        )

    def file_id(self, site: str, relative_path: str) -> str:
        """A pseudonymous name of an input file (site + path relative to its input)."""
        return self._hash("file", site, relative_path)

    def digest(self, text: str) -> str:
        """A keyed 128-bit hash of ``text`` (hex), for fingerprints that must not identify content."""
        return hmac.new(self.key.secret, b"digest\x00" + text.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def fingerprint_key(self) -> bytes:
        """A 32-byte key for :func:`s2v_core.io.discovery.fingerprint` derived from the secret."""
        return hmac.new(self.key.secret, b"fingerprint", hashlib.sha256).digest()
