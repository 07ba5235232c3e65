"""A small scaling sweep end to end; prints one JSON object.

    .venv/bin/python benchmarks/bench_sweep.py [--workdir DIR] [--widths 8,16,32,64] [--modality-counts 2,3,5]
    .venv/bin/python benchmarks/bench_sweep.py --data STORE ...   # e.g. an ingested `s2v synth` cohort

Writes a toy store (:func:`s2v_core.toystore.write_toy_store`) unless
``--data`` names a store, runs
:func:`tune.sweep.sweep` over widths x modality counts on a local Ray, and
prints the fitted exponents with their intervals, the goodness of fit, the
extrapolation error to the largest width and, as its baseline measured in
the same run, the error of the naive "no scaling" forecast (the largest
width's loss predicted by the next-largest width's loss at the same M);
``extrapolation_error_ratio`` < 1 means the law forecasts better than that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the store and SWEEP_DIR go (default: a temp dir)")
    parser.add_argument("--data", default=None, help="an existing store to sweep on (default: a toy store)")
    parser.add_argument("--anchor", default="eeg", help="modality every subset holds")
    parser.add_argument("--widths", default="8,16,32,64")
    parser.add_argument("--modality-counts", default="2,3,5")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from s2v_core.toystore import write_toy_store
    from tune.sweep import SweepConfig, sweep

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s2v-bench-sweep-"))
    store = Path(args.data) if args.data else write_toy_store(
        workdir / "store", sites=3, recordings_per_site=4, windows_per_recording=6, epochs_per_window=4,
        modalities=("eeg", "eog", "emg", "ecg", "hr", "spo2"), seed=0)
    cfg = SweepConfig(data=str(store), output=str(workdir / "sweep"),
                      widths=tuple(int(v) for v in args.widths.split(",")),
                      modality_counts=tuple(int(v) for v in args.modality_counts.split(",")),
                      steps=args.steps, global_batch=args.global_batch, anchor=args.anchor)
    started = time.monotonic()
    try:
        # Tune prints its progress table to stdout; keep stdout for the one JSON object.
        with contextlib.redirect_stdout(sys.stderr):
            report = sweep(cfg, num_cpus=args.num_cpus)
    finally:
        ray.shutdown()
    elapsed = time.monotonic() - started

    finished = [t for t in report["trials"] if t["status"] == "finished"]
    largest = max(t["width"] for t in finished)
    below = max(t["width"] for t in finished if t["width"] < largest)
    loss = {(t["width"], t["modality_count"]): t["val_loss"] for t in finished}
    naive = [abs(loss[(below, m)] - loss[(largest, m)]) / loss[(largest, m)]
             for (w, m) in loss if w == largest and (below, m) in loss]
    fit, extrapolation = report["fit"], report["extrapolation"]
    law_error = extrapolation.get("relative_error")
    print(json.dumps({
        "benchmark": "sweep",
        "store": "toy" if not args.data else str(store),
        "grid": {"widths": list(cfg.widths), "modality_counts": list(cfg.modality_counts),
                 "steps": cfg.steps, "global_batch": cfg.global_batch, "anchor": cfg.anchor},
        "reference_modalities": report.get("trials", [{}])[0].get("reference_modalities"),
        "trials": report["counts"],
        "seconds": round(elapsed, 1),
        "fit": {k: fit.get(k) for k in ("law", "params", "ci", "r2_log", "rmse_log", "error") if k in fit},
        "extrapolation": extrapolation,
        "baseline_no_scaling_relative_error": float(np.mean(naive)) if naive else None,
        "extrapolation_error_ratio": (law_error / float(np.mean(naive))
                                      if law_error is not None and naive and np.mean(naive) > 0 else None),
        "scaling_json": str(Path(cfg.output) / "scaling.json"),
        "scaling_png": str(Path(cfg.output) / "scaling.png"),
    }, indent=2))


if __name__ == "__main__":
    main()
