"""Subject-level train / val / test splits, stored with the store.

Every subject of a store belongs to exactly one split, and all of its nights
share it. The split of a subject is a pure function of its site, its
``subject_id`` and a :class:`SplitConfig`: a keyed hash (BLAKE2b keyed by the
seed) of ``site`` and ``subject_id`` is read as a number ``u`` in [0, 1) and
compared with the cumulative fractions. So re-ingesting more nights or more
sites never moves an existing subject, and a new subject lands in each split
with the configured probability (the fractions hold in expectation, not
exactly: a store of 40 subjects may have 3 or 6 test subjects at 10 %).

The assignment lives in ``STORE/splits.json``::

    {"format": 1, "store_id": "5f0c…", "seed": 0, "fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
     "method": "blake2b-keyed(site, subject_id)",
     "assigned": [{"site": "shhs1", "subject_id": "200077", "split": "test"}, ...],
     "used_by": ["runs/tiny", ...]}

``assigned`` (optional) lists subjects whose split is given explicitly and
takes precedence over the hash: a published test set to reproduce, or a
small store whose few subjects must each land somewhere
(``s2v split --assign FILE.csv``).

``store_id`` is a random identifier drawn when the file is first written and
kept by every later write: a pretraining run records it with the splits it
trained on, so ``s2v evaluate`` can tell whether the subjects it scores are
ones the encoder saw, wherever the store has been copied to since.

``used_by`` lists the pretraining runs that trained on the ``train`` subjects
of this assignment; ``s2v split --reassign`` refuses to change an assignment a
run has used unless forced, because that run's "unseen" subjects would no
longer be unseen.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from s2v_core.locations import join, resolve
from s2v_core.run_layout import TRAINING_RECORD_FILE
from s2v_core.store_subset import SUBSET_SUFFIX, read_store_subset

SPLITS_FILE = "splits.json"
SPLITS_FORMAT = 1
SPLIT_NAMES = ("train", "val", "test")
HASH_METHOD = "blake2b-keyed(site, subject_id)"


class MissingSplitsError(ValueError):
    """A store without ``splits.json`` (written before splits existed)."""


@dataclass(frozen=True)
class SplitConfig:
    """How subjects are assigned to splits (see the module docstring)."""

    seed: int = 0  # the hash key; another seed reassigns every subject
    train: float = 0.8  # expected fraction of subjects that pretrain and fit probes
    val: float = 0.1  # expected fraction used for model selection and early stopping
    test: float = 0.1  # expected fraction every reported figure is measured on
    # Explicit (site, subject_id, split) assignments that take precedence over the hash.
    assigned: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        for row in self.assigned:
            if len(row) != 3 or row[2] not in SPLIT_NAMES:
                raise ValueError(
                    f"splits: expected assignments (site, subject_id, split) with split one of "
                    f"{', '.join(SPLIT_NAMES)}, found {row!r}"
                )
        fractions = (self.train, self.val, self.test)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"splits: seed must be an integer >= 0, found {self.seed!r}")
        if any(not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(
                f"splits: fractions must lie in [0, 1], found train={self.train!r}, "
                f"val={self.val!r}, test={self.test!r}"
            )
        if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"splits: fractions must sum to 1, found {self.train} + {self.val} + {self.test} = {sum(fractions):g}"
            )
        if self.train <= 0 or self.test <= 0:
            raise ValueError(
                f"splits: train and test fractions must be > 0, found train={self.train}, test={self.test}"
            )

    @property
    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    @functools.cached_property
    def explicit(self) -> dict[tuple[str, str], str]:
        return {(site, subject): split for site, subject, split in self.assigned}

    @property
    def fingerprint(self) -> str:
        """A short digest of the whole assignment rule (seed, fractions, explicit subjects)."""
        text = json.dumps([self.seed, self.fractions, sorted(self.assigned)], sort_keys=True)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def parse_fractions(text: str, *, option: str = "--fractions") -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → ``(0.8, 0.1, 0.1)`` (train, val, test), with an error naming ``option``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"{option}: expected three numbers train,val,test (e.g. 0.8,0.1,0.1), found {text!r}"
        ) from None
    if len(values) != 3:
        raise ValueError(f"{option}: expected three numbers train,val,test, found {len(values)} in {text!r}")
    return values  # type: ignore[return-value]


def subject_unit(site: str, subject_id: str, *, seed: int) -> float:
    """The subject's position ``u`` in [0, 1): a keyed hash of site and subject id."""
    key = seed.to_bytes(8, "little")
    digest = hashlib.blake2b(f"{site}\x1f{subject_id}".encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def subject_split(site: str, subject_id: str, config: SplitConfig) -> str:
    """The split (``train``, ``val`` or ``test``) of one subject."""
    explicit = config.explicit.get((str(site), str(subject_id)))
    if explicit is not None:
        return explicit
    u = subject_unit(site, subject_id, seed=config.seed)
    if u < config.train:
        return "train"
    if u < config.train + config.val:
        return "val"
    return "test"


def assign_splits(sites: Sequence[str], subjects: Sequence[str], config: SplitConfig) -> np.ndarray:
    """The split of each row (``sites[i]``, ``subjects[i]``), as a str array (memoised per subject)."""
    if len(sites) != len(subjects):
        raise ValueError(f"assign_splits: {len(sites)} sites for {len(subjects)} subjects")
    cache: dict[tuple[str, str], str] = {}
    out = np.empty(len(sites), dtype=object)
    for i, key in enumerate(zip(map(str, sites), map(str, subjects))):
        if key not in cache:
            cache[key] = subject_split(key[0], key[1], config)
        out[i] = cache[key]
    return out.astype(str)


def _check_split_names(splits: Iterable[str], *, option: str) -> tuple[str, ...]:
    chosen = tuple(splits)
    unknown = [s for s in chosen if s not in SPLIT_NAMES]
    if unknown or not chosen:
        raise ValueError(f"{option}: expected some of {', '.join(SPLIT_NAMES)}, found {', '.join(unknown) or 'none'}")
    return chosen


def splits_location(store: str) -> str:
    """Where a store's ``splits.json`` is (a store subset reads its store's)."""
    filesystem, path = resolve(str(store))
    if path.endswith(SUBSET_SUFFIX):
        return join(read_store_subset(filesystem, path)["store"], SPLITS_FILE)
    return join(str(store), SPLITS_FILE)


def read_split_file(store: str) -> dict:
    """The parsed ``splits.json`` of ``store``; :class:`MissingSplitsError` names the command that adds it."""
    location = splits_location(store)
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise MissingSplitsError(
            f"store {store} has no subject splits ({SPLITS_FILE}); it was ingested before splits existed. "
            f"Run `s2v split --data {store}` once to assign every subject to train/val/test"
        )
    with filesystem.open_input_stream(path) as stream:
        data = json.loads(stream.read().decode("utf-8"))
    if data.get("format") != SPLITS_FORMAT:
        raise ValueError(f"{location}: expected splits format {SPLITS_FORMAT}, found {data.get('format')!r}")
    return data


def read_splits(store: str) -> SplitConfig:
    """The :class:`SplitConfig` stored with ``store``."""
    data = read_split_file(store)
    fractions = data.get("fractions") or {}
    assigned = tuple((str(a["site"]), str(a["subject_id"]), str(a["split"])) for a in data.get("assigned") or ())
    return SplitConfig(
        seed=int(data["seed"]),
        train=float(fractions["train"]),
        val=float(fractions["val"]),
        test=float(fractions["test"]),
        assigned=assigned,
    )


def read_assignments(text: str, *, source: str) -> tuple[tuple[str, str, str], ...]:
    """Parse a CSV with columns ``site``, ``subject_id``, ``split`` into explicit assignments."""
    reader = csv.DictReader(io.StringIO(text))
    missing = {"site", "subject_id", "split"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(
            f"{source}: expected CSV columns site, subject_id, split; missing {', '.join(sorted(missing))}"
        )
    rows = []
    for number, row in enumerate(reader, start=2):
        if row["split"] not in SPLIT_NAMES:
            # The split column only: other cells may identify a person.
            raise ValueError(
                f"{source}, line {number}: expected split one of {', '.join(SPLIT_NAMES)}, found {row['split']!r}"
            )
        rows.append((row["site"], row["subject_id"], row["split"]))
    return tuple(rows)


def write_splits(store: str, config: SplitConfig, *, used_by: Sequence[str] = ()) -> str:
    """Write ``STORE/splits.json`` (atomically on local disks), keeping its ``store_id``; returns its location."""
    location = splits_location(store)
    filesystem, path = resolve(location)
    try:
        store_id = read_split_file(store).get("store_id") or uuid.uuid4().hex
    except MissingSplitsError:
        store_id = uuid.uuid4().hex
    body = {
        "format": SPLITS_FORMAT,
        "store_id": store_id,
        "seed": config.seed,
        "fractions": config.fractions,
        "method": HASH_METHOD,
        "assigned": [{"site": a, "subject_id": b, "split": c} for a, b, c in config.assigned],
        "used_by": sorted(set(used_by)),
    }
    data = (json.dumps(body, indent=1) + "\n").encode("utf-8")
    temporary = posixpath.join(posixpath.dirname(path), f".{SPLITS_FILE}.tmp")
    with filesystem.open_output_stream(temporary) as stream:
        stream.write(data)
    filesystem.move(temporary, path)
    return location


def ensure_splits(store: str, config: SplitConfig | None = None) -> SplitConfig:
    """The store's split config, writing the default (or ``config``) when it has none yet."""
    try:
        return read_splits(store)
    except MissingSplitsError:
        chosen = config or SplitConfig()
        write_splits(store, chosen)
        return chosen


def split_record(store: str, splits: Sequence[str]) -> dict:
    """What a run records about the subjects it used: store id, assignment and split names."""
    data = read_split_file(store)
    return {
        "store_id": data.get("store_id"),
        "assignment": read_splits(store).fingerprint,
        "splits": list(select_splits(splits, option="splits")),
    }


def record_use(store: str, run: str) -> None:
    """Add ``run`` to the store's ``used_by`` list (a pretraining run trained on its train split)."""
    data = read_split_file(store)
    if run in data.get("used_by", []):
        return
    write_splits(store, read_splits(store), used_by=[*data.get("used_by", []), run])


def select_splits(splits: Iterable[str], *, option: str = "--split") -> tuple[str, ...]:
    """Validate split names (``train``/``val``/``test``) given to an option."""
    return _check_split_names(splits, option=option)


def training_record_location(encoder_dir: str) -> str:
    return join(str(encoder_dir), TRAINING_RECORD_FILE)


def read_training_record(encoder_dir: str) -> dict | None:
    """The record of the subjects an encoder was pretrained on, or ``None`` when it has none."""
    filesystem, path = resolve(training_record_location(encoder_dir))
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def seen_splits(record: dict | None, store_record: dict) -> tuple[str, ...] | None:
    """Splits of the store described by ``store_record`` whose subjects trained the encoder.

    ``record`` is the encoder's :func:`read_training_record`; ``store_record``
    the :func:`split_record` of the store being scored. Returns ``()`` when the
    encoder was pretrained on another store (none of these subjects seen, as
    far as store identity tells), the trained split names when it is the same
    store with the same assignment, every split when the assignment changed
    since (nothing can be called unseen), and ``None`` when the encoder's
    pretraining subjects are unknown.
    """
    if record is None or not record.get("store_id"):
        return None
    if record["store_id"] != store_record.get("store_id"):
        return ()
    same = record.get("assignment") == store_record.get("assignment")
    return tuple(record.get("splits") or ()) if same else SPLIT_NAMES
