"""``s2v pretrain``'s options (over a ``--config`` file) → :class:`~pipelines.train_config.PretrainConfig` → :func:`~pipelines.pretrain.pretrain`."""

from __future__ import annotations

import argparse
import json

from pipelines.deepspeed_engine import add_zero_stage_argument
from pipelines.pretrain import pretrain
from pipelines.train_config import PretrainConfig, load_pretrain_config
from s2v_core.locations import redact_values
from s2v_core.objective import available_objectives


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``s2v pretrain`` (unset flags keep the ``--config`` file's or the default value)."""
    defaults = PretrainConfig()
    parser.add_argument("--data", help="store written by `s2v ingest` (a path or a URI, e.g. s3://bucket/store)")
    parser.add_argument(
        "--output",
        help="run directory (checkpoints, configs, final encoder, mlflow.db): "
        "a path or a URI (then MLFLOW_TRACKING_URI is required)",
    )
    parser.add_argument("--config", help="TOML/YAML/JSON file of PretrainConfig fields; flags override it")
    parser.add_argument("--workers", type=int, help=f"Ray Train workers (default {defaults.workers})")
    parser.add_argument("--model", help=f"named model size (default {defaults.model})")
    parser.add_argument(
        "--objective",
        help=f"objective preset: {', '.join(available_objectives())} or a preset .toml file "
        f"(default {defaults.objective}); its [training] table sets the optimiser defaults",
    )
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        help="torch.compile the encoder's blocks (default auto: on GPU workers only)",
    )
    parser.add_argument("--width", type=int, help="override the model width")
    parser.add_argument("--depth", type=int, help="override the backbone depth")
    parser.add_argument("--modalities", help="comma-separated subset (default: all in the store)")
    parser.add_argument(
        "--history-columns",
        help="comma-separated outcome columns used as DASH history flags: a negative whose known flags "
        "agree with the anchor's weighs more (project DASH: x1.25 all agree, x0.8 all disagree); default none",
    )
    add_zero_stage_argument(parser)
    parser.add_argument("--steps", type=int, help=f"optimiser steps (default {defaults.steps})")
    parser.add_argument(
        "--global-batch",
        type=int,
        help=f"windows sharing negatives across all workers per step (default {defaults.global_batch})",
    )
    parser.add_argument("--grad-accum", type=int, help="micro-steps per optimiser step (default 1)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--seed", type=int, help=f"random seed (default {defaults.seed})")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        help=f"optimiser steps between checkpoints (default {defaults.checkpoint_every})",
    )
    parser.add_argument("--no-dash", action="store_true", help="plain InfoNCE (no DASH weighting)")
    parser.add_argument(
        "--train-splits",
        help="subject splits to pretrain on (default train; see `s2v split`). "
        "train,val,test uses every night and leaves nothing held out",
    )
    parser.add_argument(
        "--validate-every",
        type=int,
        help=f"steps between held-out validations on val subjects, 0 = at the end only "
        f"(default {defaults.validate_every})",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), help="worker device (default auto)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Map parsed CLI flags (and ``--config``) onto a :class:`PretrainConfig`."""
    overrides = {
        "data": args.data,
        "output": args.output,
        "workers": args.workers,
        "model": args.model,
        "objective": args.objective,
        "compile": args.compile,
        "width": args.width,
        "depth": args.depth,
        "modalities": args.modalities,
        "history_columns": args.history_columns,
        "zero_stage": args.zero_stage,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "device": args.device,
        "dash": False if args.no_dash else None,
        "train_splits": args.train_splits,
        "validate_every": args.validate_every,
    }
    return load_pretrain_config(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``s2v pretrain …`` → :func:`pretrain`."""
    config = config_from_args(args)
    result = pretrain(config, resume=args.resume, address=args.address)
    print(
        json.dumps(
            redact_values(
                {
                    "run_dir": str(result.run_dir),
                    "checkpoint": str(result.checkpoint),
                    "encoder": str(result.encoder_dir),
                    "mlflow_run_id": result.mlflow_run_id,
                    "steps": result.steps,
                    "final_loss": result.final_loss,
                }
            )
        )
    )
    return 0
