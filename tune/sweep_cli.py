"""``s2v sweep``'s options → :class:`~tune.plan.SweepConfig` → :func:`~tune.sweep.sweep`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tune.plan import SweepConfig, parse_pairs
from tune.sweep import sweep


def _numbers(option: str, kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option}: expected comma-separated {kind.__name__}s, found {text!r}"
            ) from None

    return parse


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    try:
        return parse_pairs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SweepConfig(data="", output="", widths=(1,), modality_counts=(2,))
    parser.add_argument("--data", required=True, help="the store with its splits.json (a path or a URI)")
    parser.add_argument(
        "--output",
        required=True,
        help="SWEEP_DIR for Tune state, predictions.json, scaling.json/png: a local or shared path",
    )
    parser.add_argument(
        "--widths",
        required=True,
        type=_numbers("--widths", int),
        help="encoder widths, e.g. 16,24,32,48,64 (>= 5 sizes for a law)",
    )
    parser.add_argument(
        "--modality-counts",
        required=True,
        type=_numbers("--modality-counts", int),
        help="numbers of pretraining modalities, e.g. 2,3,5,9",
    )
    parser.add_argument(
        "--depths",
        type=_numbers("--depths", int),
        default=(),
        help="one depth per width (default: round(width / --width-per-block))",
    )
    parser.add_argument(
        "--width-per-block",
        type=int,
        default=defaults.width_per_block,
        help="shape kept across sizes when depths are derived",
    )
    parser.add_argument(
        "--subsets-per-count", type=int, default=defaults.subsets_per_count, help="random modality subsets per count"
    )
    parser.add_argument(
        "--scoring-pairs",
        type=_pairs,
        default=(),
        help="pairs every trial is scored on and every subset holds, e.g. eeg-ecg (default: one seeded pair)",
    )
    parser.add_argument("--seeds", type=int, default=defaults.seeds, help="seeds per point")
    parser.add_argument("--objective", default=defaults.objective, help="objective preset (paper: random pair)")
    parser.add_argument(
        "--ema",
        action="store_true",
        help="keep the preset's EMA weights (off: short trials would save a lagging average)",
    )
    parser.add_argument("--model", default=defaults.model, help="named model size the widths override")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps per trial (fixed compute)")
    parser.add_argument("--global-batch", type=int, default=defaults.global_batch, help="windows per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate at --lr-base-width")
    parser.add_argument(
        "--lr-base-width",
        type=int,
        default=defaults.lr_base_width,
        help="width at which --lr applies (lr scales as base / width)",
    )
    parser.add_argument(
        "--lr-multipliers",
        type=_numbers("--lr-multipliers", float),
        default=defaults.lr_multipliers,
        help="learning-rate grid per trial, best on val",
    )
    parser.add_argument(
        "--workers-per-trial",
        type=int,
        default=defaults.workers_per_trial,
        help="Ray Train workers per trial (1 CPU or 1 GPU each)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default=defaults.device,
        help="trial workers' device (auto: GPUs when the cluster has one per worker)",
    )
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=defaults.cpus_per_trial,
        help="CPUs of each trial's own process (launch + scoring), besides its workers",
    )
    parser.add_argument(
        "--max-concurrent", type=int, default=defaults.max_concurrent, help="trials at once (0: as many as fit)"
    )
    parser.add_argument(
        "--score-windows", type=int, default=defaults.score_windows, help="val and test windows scored per trial"
    )
    parser.add_argument(
        "--probe-windows", type=int, default=defaults.probe_windows, help="train windows the staging probe is fitted on"
    )
    parser.add_argument(
        "--no-preregister",
        action="store_true",
        help="run every trial at once, without a forecast of the largest size and count",
    )
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="bootstrap refits")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures, help="retries per trial")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --output")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        data=args.data,
        output=args.output,
        widths=args.widths,
        modality_counts=args.modality_counts,
        depths=args.depths,
        width_per_block=args.width_per_block,
        subsets_per_count=args.subsets_per_count,
        scoring_pairs=args.scoring_pairs,
        seeds=args.seeds,
        objective=args.objective,
        ema=args.ema,
        model=args.model,
        steps=args.steps,
        global_batch=args.global_batch,
        lr=args.lr,
        lr_base_width=args.lr_base_width,
        lr_multipliers=args.lr_multipliers,
        workers_per_trial=args.workers_per_trial,
        device=args.device,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent=args.max_concurrent,
        score_windows=args.score_windows,
        probe_windows=args.probe_windows,
        preregister=not args.no_preregister,
        bootstrap=args.bootstrap,
        max_failures=args.max_failures,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    import ray

    try:
        report = sweep(cfg, resume=args.resume, address=args.address, num_cpus=args.num_cpus)
    finally:
        if ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS")):
            ray.shutdown()
    print(
        json.dumps(
            {
                "scaling_json": str(Path(cfg.output) / "scaling.json"),
                **report["counts"],
                "verdicts": report.get("verdicts"),
                "extrapolation": report.get("extrapolation_summary"),
            },
            indent=2,
        )
    )
    return 130 if report["interrupted"] else 0
