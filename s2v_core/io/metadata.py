"""Per-site metadata tables (CSV/TSV): age, sex, subject and outcome columns per recording.

Column names come from the site config's ``[metadata]`` section
(:class:`~s2v_core.io.site_config.MetadataConfig`); rows are matched to
recordings by the key column. Only the configured columns are read, so
names or birth dates a table might also hold never reach the store.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from s2v_core.io.site_config import MetadataConfig


@dataclass(frozen=True)
class RecordingMetadata:
    """What the store keeps about one night besides its signals.

    Parameters
    ----------
    subject_id : str or None
        Subject of the night (several nights per subject); None: use the key.
    age : float or None
        Age in years, None if unknown; ages above 89 are top-coded as 90.
    sex : int or None
        0 female, 1 male, None unknown.
    outcomes : dict of str to float
        Store outcome name -> value (NaN-free; missing values are left out).
    """

    subject_id: str | None = None
    age: float | None = None
    sex: int | None = None
    outcomes: dict[str, float] = field(default_factory=dict)


def _float(text: str | None) -> float | None:
    if text is None:
        return None
    text = text.strip()
    lowered = text.casefold()
    if lowered in ("yes", "true", "y"):
        return 1.0
    if lowered in ("no", "false", "n"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_site_metadata(text: str, config: MetadataConfig, *, source: str) -> dict[str, RecordingMetadata]:
    """Parse a site metadata table into ``{recording key: RecordingMetadata}``.

    Parameters
    ----------
    text : str
        Contents of the CSV (comma) or TSV (tab, detected from the header).
    config : MetadataConfig
        Column mapping of the site.
    source : str
        File name, for error messages.

    Raises
    ------
    ValueError
        A configured column is missing from the header, or a key repeats.
        Messages name the file, the option and line numbers, never a cell.
    """
    first_line = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    delimiter = "\t" if first_line.count("\t") > first_line.count(",") else ","
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")), delimiter=delimiter)
    columns = reader.fieldnames or []
    wanted = {
        "key_column": config.key_column,
        "subject_column": config.subject_column,
        "age_column": config.age_column,
        "sex_column": config.sex_column,
    }
    wanted |= {f"outcomes.{name}": column for name, column in config.outcomes.items()}
    missing = {option: column for option, column in wanted.items() if column is not None and column not in columns}
    if missing:
        # The first line is not repeated: in a table without a header it is a patient's row.
        raise ValueError(
            f"metadata table {source}: columns {missing} not found among the {len(columns)} "
            "columns of its first line (expected a header line naming the columns)"
        )
    table: dict[str, RecordingMetadata] = {}
    first_line_of: dict[str, int] = {}
    for row in reader:
        key = (row.get(config.key_column) or "").strip()
        if not key:
            continue
        if key in table:
            # Line numbers, not the key: keys are often names or hospital numbers.
            raise ValueError(
                f"metadata table {source}: line {reader.line_num} repeats the {config.key_column!r} "
                f"value of line {first_line_of[key]}; a key appears twice, expected one row per key"
            )
        first_line_of[key] = reader.line_num
        sex_raw = (row.get(config.sex_column) or "").strip() if config.sex_column else ""
        outcomes = {
            name: value for name, column in config.outcomes.items() if (value := _float(row.get(column))) is not None
        }
        table[key] = RecordingMetadata(
            subject_id=(row.get(config.subject_column) or "").strip() or None if config.subject_column else None,
            age=top_code_age(_float(row.get(config.age_column))) if config.age_column else None,
            sex=config.sex_values.get(sex_raw),
            outcomes=outcomes,
        )
    return table


#: Ages above this (years) are stored as :data:`TOP_CODED_AGE`: HIPAA Safe Harbor
#: counts ages over 89 as identifying (there are few such people).
OLDEST_EXACT_AGE = 89.0
TOP_CODED_AGE = 90.0


def top_code_age(age: float | None) -> float | None:
    """``age`` in years, with every age above 89 reported as 90 (``None`` stays ``None``)."""
    return TOP_CODED_AGE if age is not None and age > OLDEST_EXACT_AGE else age


def read_site_metadata(path: str, config: MetadataConfig) -> dict[str, RecordingMetadata]:
    """Read a local site metadata table; see :func:`parse_site_metadata`."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return parse_site_metadata(handle.read(), config, source=str(path))
