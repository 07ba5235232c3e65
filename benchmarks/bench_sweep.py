"""A scaling sweep end to end with its pre-registered forecast; prints one JSON object.

    .venv/bin/python benchmarks/bench_sweep.py [--workdir DIR]           # the full run (~60 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_sweep.py --quick                   # a smoke run (minutes): does not fit a law
    .venv/bin/python benchmarks/bench_sweep.py --data STORE --device gpu # an ingested store, trials on GPUs

Writes a toy store with train/val/test subjects (:func:`s2v_core.toystore.write_toy_store`)
unless ``--data`` names a store, runs :func:`tune.sweep.sweep` on a local
Ray and prints the selected law, both exponents' 95 % intervals, the
verdicts in words, and the forecast of the held-out largest size (and
count) written *before* those trials ran, scored against them next to the
no-scaling forecast (the loss at the next-smaller size, measured in the same
run). ``targets`` says whether both exponents' intervals exclude 0 and
whether the largest-N forecast is within 10 % and better than no scaling.

The full grid is sized for 2 CPU cores and about an hour: 5 sizes (width
and depth together) x 4 modality counts (1, 2, 2 and 1 random subsets) x 3
seeds = 90 trials of 40 steps at batch 8, one trial at a time (a trial holds
both cores: its process and one Train worker). A trial is mostly Ray Train
start-up and scoring: the ``--quick`` trials took 40-90 s each on a shared
2-core machine under a load of ~20, so the full run is ~60 min on two free
cores and longer on a busy machine (an estimate, not a measurement of the
full run). Nothing here checks time: the figures are what they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

FULL = {
    "widths": (16, 24, 32, 48, 64),
    "depths": (1, 2, 2, 3, 4),
    "modality_counts": (2, 3, 4, 6),
    "subsets_per_count": 2,
    "seeds": 3,
    "steps": 40,
}
QUICK = {
    "widths": (8, 12, 16),
    "depths": (1, 1, 1),
    "modality_counts": (2, 3),
    "subsets_per_count": 1,
    "seeds": 1,
    "steps": 2,
}
#: Relative error the held-out-largest-N forecast must stay within.
EXTRAPOLATION_TARGET = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the store and SWEEP_DIR go (default: a temp dir)")
    parser.add_argument("--data", default=None, help="an existing store with splits.json (default: a toy store)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes; too small to fit a law")
    parser.add_argument("--scoring-pairs", default="eeg-ecg")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from s2v_core.toystore import write_toy_store
    from tune.plan import SweepConfig, parse_pairs
    from tune.sweep import sweep

    grid = QUICK if args.quick else FULL
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s2v-bench-sweep-"))
    store = (
        Path(args.data)
        if args.data
        else write_toy_store(
            workdir / "store",
            sites=3,
            recordings_per_site=6,
            windows_per_recording=6,
            epochs_per_window=4,
            modalities=("eeg", "eog", "emg", "ecg", "hr", "spo2"),
            seed=0,
            val_per_site=1,
            test_per_site=1,
        )
    )
    cfg = SweepConfig(
        data=str(store),
        output=str(workdir / "sweep"),
        widths=grid["widths"],
        depths=grid["depths"],
        modality_counts=grid["modality_counts"],
        subsets_per_count=grid["subsets_per_count"],
        seeds=grid["seeds"],
        steps=grid["steps"],
        global_batch=8,
        device=args.device,
        scoring_pairs=parse_pairs(args.scoring_pairs),
        max_concurrent=1,
        bootstrap=20 if args.quick else 200,
        score_windows=32 if args.quick else 128,
        probe_windows=32 if args.quick else 256,
        validation_batch=8,
    )
    started = time.monotonic()
    try:
        # Tune prints its progress table to stdout; keep stdout for the one JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            report = sweep(cfg, num_cpus=args.num_cpus)
    finally:
        ray.shutdown()
    elapsed = time.monotonic() - started

    loss = report["loss"]
    selected = loss.get("forms", {}).get(loss.get("selected"), {})
    ci = selected.get("ci", {})
    verdicts = loss.get("verdicts", {})
    n_forecast = report["extrapolation"].get("forecasts", {}).get("n", {})
    law_error, naive_error = n_forecast.get("relative_error"), n_forecast.get("no_scaling_relative_error")
    matched_error = n_forecast.get("relative_error_where_no_scaling")
    targets = {
        "alpha_interval_excludes_0": bool(verdicts.get("N", {}).get("identified")),
        "beta_interval_excludes_0": bool(verdicts.get("M", {}).get("identified")),
        "extrapolation_n_within_10pct": law_error is not None and law_error <= EXTRAPOLATION_TARGET,
        "extrapolation_n_beats_no_scaling": bool(n_forecast.get("beats_no_scaling")),
    }
    print(
        json.dumps(
            {
                "benchmark": "sweep",
                "mode": "quick smoke run: too few sizes and counts to fit or judge a law" if args.quick else "full",
                "store": "toy" if not args.data else str(store),
                "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
                "compute": report["design"].get("compute"),
                "trials": report["counts"],
                "seconds": round(elapsed, 1),
                "selected_law": loss.get("law"),
                "selected_by": loss.get("selected_by"),
                "params": selected.get("params"),
                "alpha_ci95": ci.get("alpha"),
                "beta_ci95": ci.get("beta"),
                "verdicts": report["verdicts"],
                "fit_error": loss.get("error"),
                "extrapolation": report["extrapolation_summary"],
                "baseline_no_scaling_relative_error": naive_error,
                # law / no-scaling on the same held-out cells (< 1: the law forecasts better)
                "extrapolation_error_ratio": (
                    matched_error / naive_error if matched_error is not None and naive_error else None
                ),
                "targets": targets,
                "targets_met": all(targets.values()),
                "scaling_json": str(Path(cfg.output) / "scaling.json"),
                "scaling_png": str(Path(cfg.output) / "scaling.png"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
