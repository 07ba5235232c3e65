"""``s2v split --data STORE``: show (or assign) the subject-level train / val / test split.

    s2v split --data store                                  # counts per site and split
    s2v split --data store --reassign --seed 3 --fractions 0.6,0.2,0.2
    s2v split --data store --reassign --assign published_test_set.csv   # columns site,subject_id,split

A store ingested with this version already has ``STORE/splits.json``; an
older store gets the default assignment (seed 0, 80/10/10) the first time
this command runs. ``--reassign`` writes a new seed or new fractions and
refuses when a pretraining run has trained on the current assignment (its
held-out subjects would no longer be held out) unless ``--force`` is given.
The assignment itself is :mod:`s2v_core.splits`: a keyed hash of site and
subject, so more nights or more sites never move an existing subject.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from s2v_core.splits import (
    SPLIT_NAMES,
    MissingSplitsError,
    SplitConfig,
    assign_splits,
    parse_fractions,
    read_assignments,
    read_split_file,
    read_splits,
    write_splits,
)
from s2v_core.store import open_store


def split_counts(store: str) -> dict:
    """Subjects, nights and windows per site and split (and in total) of ``store``."""
    table = open_store(store).to_table(columns=["site", "subject_id", "recording_id"])
    sites = np.asarray(table.column("site").to_pylist())
    subjects = np.asarray(table.column("subject_id").to_pylist())
    nights = np.char.add(np.char.add(sites.astype(str), "/"), np.asarray(table.column("recording_id").to_pylist()))
    splits = assign_splits(sites, subjects, read_splits(store))
    per_site: dict[str, dict[str, dict[str, int]]] = {}
    for site in sorted(set(sites)):
        rows = sites == site
        per_site[site] = {s: _count(rows & (splits == s), subjects, nights) for s in SPLIT_NAMES}
    total = {s: _count(splits == s, subjects, nights) for s in SPLIT_NAMES}
    return {"sites": per_site, "total": total}


def _count(rows: np.ndarray, subjects: np.ndarray, nights: np.ndarray) -> dict[str, int]:
    return {"subjects": len(set(subjects[rows])), "nights": len(set(nights[rows])), "windows": int(rows.sum())}


def assign(
    store: str,
    *,
    seed: int | None = None,
    fractions: tuple[float, float, float] | None = None,
    assigned: tuple[tuple[str, str, str], ...] | None = None,
    reassign: bool = False,
    force: bool = False,
) -> SplitConfig:
    """Ensure ``store`` has a split assignment; with ``reassign``, replace it (see the module docstring)."""
    open_store(store)  # a clear error for a missing or empty store first
    try:
        current, data = read_splits(store), read_split_file(store)
    except MissingSplitsError:
        current, data = None, {"used_by": []}
    if current is not None and not reassign:
        if seed is not None or fractions is not None or assigned is not None:
            raise ValueError(
                f"--seed/--fractions/--assign: the store {store} already has an assignment "
                f"(seed {current.seed}, fractions {current.fractions}); pass --reassign to replace it"
            )
        return current
    base = current or SplitConfig()
    train, val, test = fractions or (base.train, base.val, base.test)
    chosen = SplitConfig(
        seed=base.seed if seed is None else seed,
        train=train,
        val=val,
        test=test,
        assigned=base.assigned if assigned is None else assigned,
    )
    used_by = list(data.get("used_by") or [])
    if current is not None and chosen != current and used_by and not force:
        raise ValueError(
            f"--reassign: the current assignment of {store} was used to pretrain "
            f"{', '.join(used_by)}; their held-out subjects would no longer be held out. "
            f"Pass --force to reassign anyway"
        )
    write_splits(store, chosen, used_by=used_by if chosen == current else ())
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="store written by `s2v ingest` (a path or a URI)")
    parser.add_argument("--reassign", action="store_true", help="replace the assignment (new --seed/--fractions)")
    parser.add_argument("--seed", type=int, default=None, help="hash key of the assignment (default 0)")
    parser.add_argument("--fractions", default=None, help="train,val,test fractions (default 0.8,0.1,0.1)")
    parser.add_argument(
        "--assign",
        default=None,
        help="CSV with columns site,subject_id,split: explicit splits that override the hash "
        "(e.g. a published test set)",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --reassign: replace an assignment that a pretraining run has used"
    )
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def run(args: argparse.Namespace) -> int:
    fractions = parse_fractions(args.fractions) if args.fractions else None
    assigned = None
    if args.assign:
        with open(args.assign, encoding="utf-8") as handle:
            assigned = read_assignments(handle.read(), source=args.assign)
    config = assign(
        args.data, seed=args.seed, fractions=fractions, assigned=assigned, reassign=args.reassign, force=args.force
    )
    counts = split_counts(args.data)
    if args.json:
        print(json.dumps({"seed": config.seed, "fractions": config.fractions, **counts}))
        return 0
    print(
        f"store {args.data}: seed {config.seed}, fractions "
        + ", ".join(f"{k} {v:g}" for k, v in config.fractions.items())
    )
    header = f"{'site':<24}" + "".join(f"{s + ' subj/nights/windows':>30}" for s in SPLIT_NAMES)
    print(header)
    for site, row in [*counts["sites"].items(), ("total", counts["total"])]:
        cells = "".join(f"{row[s]['subjects']:>14}/{row[s]['nights']:>6}/{row[s]['windows']:>8}" for s in SPLIT_NAMES)
        print(f"{site:<24}{cells}")
    return 0
