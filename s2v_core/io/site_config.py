"""Per-site configuration: which files are recordings, channel names, hypnograms, metadata.

A site directory holds a ``site.toml`` (or one is passed with
``--site-config``). Every key is optional except ``name``; unknown keys are
errors. Example (an SHHS-like site)::

    name = "shhs_like"
    signals = ["*.edf"]                    # glob patterns, relative to the site dir
    key_regex = "^(?P<key>shhs1-\\d+)"      # recording key from the signal file stem
    ignore_channels = ["POSITION", "LIGHT"]

    [channels]                             # site labels -> modality keys
    "EEG(sec)" = "eeg"
    "NEW AIR" = "airflow"

    [hypnogram]
    format = "nsrr_xml"                    # auto|edf_annotations|nsrr_xml|csv|dreams_txt|none
    pattern = "{key}-nsrr.xml"             # relative to the signal's directory (../ allowed); glob allowed
    epoch_seconds = 30.0                   # scoring epoch of csv / dreams_txt hypnograms

    [metadata]
    file = "shhs1-dataset.csv"             # inside the site directory
    key_column = "nsrrid"
    age_column = "age_s1"
    sex_column = "gender"
    sex_values = { "1" = 1, "2" = 0 }      # raw CSV value -> 0 female / 1 male

    [metadata.outcomes]                    # store outcome name -> CSV column
    ahi = "ahi_a0h3"
    hypertension = "htnderv_s1"
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

from s2v_core.config import from_mapping, load_mapping
from s2v_core.locations import has_scheme
from s2v_core.modalities import MODALITY_KEYS

SITE_CONFIG_NAME = "site.toml"
HYPNOGRAM_FORMATS = ("auto", "edf_annotations", "nsrr_xml", "csv", "dreams_txt", "none")


@dataclass(frozen=True)
class HypnogramConfig:
    # "auto" picks the reader from the file extension and content.
    format: str = "auto"
    # Where a signal's hypnogram lives, relative to the signal file's directory
    # ("../" climbs, as in NSRR's "../../annotations-events-nsrr/shhs1/shhs1-{key}-nsrr.xml",
    # but never out of the site directory); {key} is the recording key, {stem}
    # the signal file stem; glob characters allowed, the pattern must match at most one file.
    pattern: str = "{stem}-Hypnogram.edf"
    # Scoring epoch of CSV/text hypnograms that carry no times (DREAMS uses 5 s).
    epoch_seconds: float = 30.0


@dataclass(frozen=True)
class MetadataConfig:
    # CSV (or TSV by extension) relative to the site directory, and inside it.
    file: str = "metadata.csv"
    # Column whose value equals the recording key.
    key_column: str = "recording_id"
    # Column with the subject id (several nights per subject); None: key is the subject.
    subject_column: str | None = None
    age_column: str | None = "age"
    sex_column: str | None = "sex"
    # Raw CSV values -> 0 female / 1 male; anything else is unknown (null).
    sex_values: dict[str, int] = field(
        default_factory=lambda: {
            "F": 0,
            "f": 0,
            "female": 0,
            "Female": 0,
            "0": 0,
            "M": 1,
            "m": 1,
            "male": 1,
            "Male": 1,
            "1": 1,
        }
    )
    # Store outcome name -> CSV column, carried into the store's `outcomes` map.
    outcomes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteConfig:
    # Site name: the store partition value and the DASH "site" of every night.
    name: str
    # Glob patterns (relative to the site dir, searched recursively) of signal files.
    signals: tuple[str, ...] = ("*.edf", "*.bdf", "*.EDF", "*.BDF")
    # Regex applied to the signal file stem; its `key` group is the recording key
    # (recording_id and metadata key). The default takes the whole stem.
    key_regex: str = "^(?P<key>.+)$"
    # Site channel labels -> modality keys, in addition to the registry aliases.
    channels: dict[str, str] = field(default_factory=dict)
    # Labels known to be unused (e.g. position, light); not reported as unknown.
    ignore_channels: tuple[str, ...] = ()
    hypnogram: HypnogramConfig = HypnogramConfig()
    # None: no metadata table for this site (age/sex unknown, no outcomes).
    metadata: MetadataConfig | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"site name {self.name!r}: expected letters, digits, '_', '-', '.' only")
        bad = {label: key for label, key in self.channels.items() if key not in MODALITY_KEYS}
        if bad:
            raise ValueError(
                f"site {self.name!r} [channels]: unknown modality for {bad}; expected one of {', '.join(MODALITY_KEYS)}"
            )
        if self.hypnogram.format not in HYPNOGRAM_FORMATS:
            raise ValueError(
                f"site {self.name!r} [hypnogram].format: expected one of {', '.join(HYPNOGRAM_FORMATS)}, "
                f"found {self.hypnogram.format!r}"
            )
        try:
            pattern = re.compile(self.key_regex)
        except re.error as exc:
            raise ValueError(f"site {self.name!r} key_regex {self.key_regex!r}: {exc}") from None
        if "key" not in pattern.groupindex:
            raise ValueError(f"site {self.name!r} key_regex {self.key_regex!r}: expected a (?P<key>...) group")
        if self.metadata is not None and not is_inside(self.metadata.file):
            raise ValueError(
                f"site {self.name!r} [metadata].file {self.metadata.file!r}: expected a path inside "
                "the site directory (relative, without '..' leading out of it)"
            )

    def recording_key(self, signal_path: str | Path) -> str | None:
        """The recording key of a signal file, or None when ``key_regex`` does not match."""
        match = re.search(self.key_regex, Path(signal_path).stem)
        return match.group("key") if match else None


def is_inside(relative: str) -> bool:
    """Whether ``relative`` names something inside the directory it is relative to.

    False for absolute paths, drive letters, URIs and paths whose ``..``
    lead out (``../secret.txt``, ``a/../../b``).
    """
    text = relative.replace("\\", "/")
    if not text or has_scheme(text) or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return False
    normal = posixpath.normpath(text)
    return normal != ".." and not normal.startswith("../")


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config file (TOML, YAML or JSON)."""
    path = Path(path)
    data = load_mapping(path)
    if "name" not in data:
        raise ValueError(f"site config {path}: missing required key 'name'")
    return from_mapping(SiteConfig, data, source=str(path))


def default_site_config(site_dir: str | Path) -> SiteConfig:
    """The config of a site directory: its ``site.toml`` or defaults named after the directory."""
    site_dir = Path(site_dir)
    candidate = site_dir / SITE_CONFIG_NAME
    if candidate.is_file():
        return load_site_config(candidate)
    return SiteConfig(name=re.sub(r"[^A-Za-z0-9_.\-]", "_", site_dir.name) or "site")
