"""The ``s2v`` command line: one thin sub-command per pipeline.

Each sub-command lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only routes.
Modules are imported lazily so that ``s2v --help`` and each sub-command
load only what they need.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.synth", "write a synthetic multi-site PSG cohort (EDF/BDF + hypnograms + metadata)"),
    "ingest": ("pipelines.ingest", "stream recordings into the Parquet store of windowed epochs (Ray Data)"),
    "split": ("pipelines.split", "show or assign the subject-level train/val/test split of a store"),
    "pretrain": ("pipelines.pretrain_cli", "contrastive DASH-InfoNCE pretraining (Ray Train + DeepSpeed)"),
    "embed": ("pipelines.embed", "batch embedding extraction over a store (Ray Data)"),
    "evaluate": ("pipelines.evaluate", "downstream evaluation: staging, outcomes, any-subset robustness"),
    "finetune": (
        "pipelines.finetune_cli",
        "fine-tune a pretrained encoder on a task: frozen, LoRA or full (Ray Train)",
    ),
    "stage": ("pipelines.stage", "stage raw EDF/BDF recordings with a fine-tuned model: hypnogram CSV/PNG + summary"),
    "sweep": ("tune.sweep_cli", "Ray Tune grid over width x modality count and the scaling-law fit"),
    "demo": ("pipelines.demo", "run the whole chain, small, on the embedded defaults"),
    "submit": ("pipelines.submit", "run an s2v sub-command on a Ray cluster via `ray job submit` (token auth on)"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2v",
        description="sleep2vec: unified cross-modal alignment for heterogeneous nocturnal biosignals.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipelines.runtime import RedactingFilter
    from s2v_core.locations import redact

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no credentials of a URI in any log line
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        # User errors: one clear line, no traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"s2v {args.command}: error: {redact(str(message))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
