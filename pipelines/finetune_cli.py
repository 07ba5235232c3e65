"""``s2v finetune``'s options → :class:`~pipelines.finetune.FinetuneConfig` → :func:`~pipelines.finetune.finetune`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipelines.deepspeed_engine import add_zero_stage_argument
from pipelines.finetune import FinetuneConfig, finetune
from s2v_core.config import from_mapping
from s2v_core.finetuning import LORA_TARGETS
from s2v_core.modalities import MODALITY_KEYS, parse_modalities


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="pretrained run dir, checkpoint or encoder directory (the EMA weights when kept)",
    )
    parser.add_argument("--data", required=True, help="store written by `s2v ingest` (with splits.json)")
    parser.add_argument("--output", required=True, help="local run directory")
    parser.add_argument(
        "--task",
        default=defaults.task,
        help="staging, staging4, staging3, events, arousal, events:KIND[,KIND], age, sex, ahi, ahi:COL, "
        "outcome:COL, survival:EVENT,TIME",
    )
    parser.add_argument("--mode", default=defaults.mode, choices=("frozen", "lora", "full"))
    parser.add_argument("--head", default=defaults.head, choices=("linear", "mlp", "temporal"))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of the encoder's trained weights")
    parser.add_argument(
        "--head-lr",
        type=float,
        default=defaults.head_lr,
        help="learning rate of the gated fusion and the head (default: --lr); a fresh head next to a "
        "pretrained encoder in --mode full usually wants a larger one than the encoder",
    )
    parser.add_argument("--lora-r", type=int, default=defaults.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    parser.add_argument(
        "--lora-targets",
        default=",".join(defaults.lora_targets),
        help=f"comma-separated subset of {','.join(LORA_TARGETS)}",
    )
    parser.add_argument("--train-tokenizers", action="store_true", help="also train the per-modality tokenizers")
    parser.add_argument("--modality-dropout", type=float, default=defaults.modality_dropout)
    parser.add_argument("--modalities", help=f"comma-separated subset of {','.join(MODALITY_KEYS)}")
    parser.add_argument(
        "--labelled-windows",
        type=int,
        default=defaults.labelled_windows,
        help="few-shot: train on this many random store windows of the train subjects (0: all)",
    )
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "gpu"), help="worker device")
    parser.add_argument(
        "--deepspeed",
        action="store_true",
        help="train inside a DeepSpeed engine (ZeRO) instead of plain data-parallel workers; "
        "the same optimiser and the same saved model",
    )
    add_zero_stage_argument(parser, condition="with --deepspeed: ")
    parser.add_argument(
        "--night-context",
        action="store_true",
        help="staging tasks: then train a whole-night transformer over the fine-tuned model's epoch features "
        "(kept in RUN_DIR/model; `s2v stage` uses it)",
    )
    parser.add_argument(
        "--night-steps",
        type=int,
        default=defaults.night_steps,
        help="--night-context: steps at most (one train night each), early-stopped on the val nights",
    )
    parser.add_argument(
        "--transductive",
        action="store_true",
        help="allow an encoder pretrained on the test subjects (or of unknown origin)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Map parsed CLI flags onto a :class:`FinetuneConfig` (wrong values raise naming the option)."""
    values = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)}}
    values["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    values["modalities"] = tuple(parse_modalities(args.modalities, option="--modalities")) if args.modalities else ()
    config = from_mapping(FinetuneConfig, values, source="s2v finetune options")
    config.spec()  # ValueError naming --mode/--head/--lora-targets/--task before anything starts
    return config


def run(args: argparse.Namespace) -> int:
    """CLI entry: ``s2v finetune …`` → :func:`finetune`; prints the test figures as one JSON line."""
    config = config_from_args(args)
    report = finetune(config, resume=args.resume, address=args.address)
    print(
        json.dumps(
            {
                "model": report["model"],
                "task": report["task"],
                "mode": report["mode"],
                "test": {k: v for k, v in report["test"].items() if k not in ("confusion", "per_class_f1")},
                "baseline": {k: v for k, v in report["baseline"].items() if k not in ("confusion", "per_class_f1")},
                **(
                    {"ahi_from_events": {k: v for k, v in report["ahi_from_events"].items() if k != "per_night"}}
                    if "ahi_from_events" in report
                    else {}
                ),
                **(
                    {
                        "night_context": {
                            k: v
                            for k, v in report["night_context"]["test"].items()
                            if k not in ("confusion", "per_class_f1")
                        }
                    }
                    if "night_context" in report
                    else {}
                ),
            }
        )
    )
    return 0
