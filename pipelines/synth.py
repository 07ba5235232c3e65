"""``s2v synth OUT``: write a synthetic multi-site PSG cohort.

    s2v synth cohort --sites 3 --recordings-per-site 4 --hours 1.0 --seed 0

A thin wrapper over :func:`s2v_core.synth.write_cohort`; see that function
for the layout of ``OUT`` (one directory per site with EDF/BDF signals,
hypnograms, a metadata CSV and the ``site.toml`` that ``s2v ingest`` reads).
"""

from __future__ import annotations

import argparse

from s2v_core.synth import ARCHETYPES, write_cohort


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (one sub-directory per site)")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--recordings-per-site", type=int, default=4, help="nights per site (default 4)")
    parser.add_argument("--hours", type=float, default=1.0, help="length of each night in hours (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed writes identical files (default 0)")
    parser.add_argument(
        "--archetypes",
        default=None,
        help=f"comma-separated archetypes to cycle through (default: all in turn): {','.join(ARCHETYPES)}",
    )


def run(args: argparse.Namespace) -> int:
    archetypes = tuple(a.strip() for a in args.archetypes.split(",") if a.strip()) if args.archetypes else None
    summary = write_cohort(
        args.out,
        sites=args.sites,
        recordings_per_site=args.recordings_per_site,
        hours=args.hours,
        seed=args.seed,
        archetypes=archetypes,
    )
    print(
        f"s2v synth: {len(summary.sites)} sites, {len(summary.recordings)} recordings, "
        f"{len(summary.files)} files, {summary.hours_written:.1f} recording-hours in "
        f"{summary.seconds:.1f} s ({summary.hours_per_second:.2f} h/s) -> {summary.root}"
    )
    return 0
