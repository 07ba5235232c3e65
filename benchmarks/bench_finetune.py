"""Fine-tuning a pretrained encoder vs training from scratch: staging κ on test subjects only.

    .venv/bin/python benchmarks/bench_finetune.py                 # synthetic cohort, ~1 h on 2 cores
    .venv/bin/python benchmarks/bench_finetune.py --data STORE    # an existing store (keeps its splits.json)
    .venv/bin/python benchmarks/bench_finetune.py --quick         # a smoke run: minutes, no figures to trust

A rerun with the same ``--workdir`` reuses its store, its pretraining run and
every finished arm (resumed, then scored again).

Without ``--data`` it writes a synthetic cohort (``s2v synth``: 6 site
archetypes x ``--nights-per-site`` nights of ``--hours`` h), ingests it and
assigns its subjects 60/20/20 to train/val/test. It pretrains ``--model`` on
the train subjects (``s2v pretrain``), then runs ``s2v finetune --task
staging`` four times with the same head, steps and early stopping on val:

- ``frozen``: the pretrained encoder fixed, gated fusion + head trained;
- ``lora``: peft LoRA adapters (r=8, alpha=16) on the backbone's projections;
- ``full``: every backbone weight trained (tokenizers frozen);
- ``scratch``: the same architecture at random initialisation, everything trained
  (tokenizers included): the baseline that pretraining has to beat.

Every figure is measured on the **test** subjects, each next to the
majority-class baseline of the same run. Prints one JSON object (stdout) with
κ, macro-F1 and accuracy per arm and each arm's κ minus scratch's; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("frozen", "lora", "full", "scratch")
logger = logging.getLogger("bench_finetune")


def make_store(workdir: Path, args: argparse.Namespace) -> str:
    """A synthetic cohort, ingested, with a 60/20/20 subject split."""
    from pipelines.ingest import ingest
    from pipelines.ingest_config import IngestConfig
    from pipelines.split import assign
    from s2v_core.synth import write_cohort

    store = workdir / "store"
    if not (store / "splits.json").is_file():
        cohort = write_cohort(
            workdir / "cohort", sites=6, recordings_per_site=args.nights_per_site, hours=args.hours, seed=args.seed
        )
        with contextlib.redirect_stdout(sys.stderr):
            ingest(IngestConfig(inputs=[str(cohort.root)], output=str(store), workers=2))
    assign(str(store), seed=args.seed, fractions=(0.6, 0.2, 0.2), reassign=True, force=True)
    return str(store)


def pretrained_encoder(store: str, workdir: Path, args: argparse.Namespace) -> str:
    from pipelines.pretrain import pretrain
    from pipelines.train_config import load_pretrain_config

    config = load_pretrain_config(
        None,
        data=store,
        output=str(workdir / "pretrain"),
        model=args.model,
        steps=args.pretrain_steps,
        global_batch=args.global_batch,
        workers=args.workers,
        seed=args.seed,
        checkpoint_every=args.pretrain_steps,
    )
    with contextlib.redirect_stdout(sys.stderr):
        # resume: a rerun in the same --workdir reuses the finished pretraining run.
        return pretrain(config, resume=True, mlflow=True).run_dir


def scratch_encoder(pretrained_run: str, workdir: Path) -> str:
    """The pretrained architecture at random initialisation; its training record says it saw no subject."""
    import torch

    from s2v_core.model import SleepEncoder, load_encoder, save_encoder
    from s2v_core.splits import TRAINING_RECORD_FILE

    reference_dir = Path(pretrained_run) / "encoder"
    reference = load_encoder(reference_dir)
    torch.manual_seed(12345)
    directory = save_encoder(SleepEncoder(reference.config, reference.modalities), workdir / "scratch_encoder")
    record = json.loads((reference_dir / TRAINING_RECORD_FILE).read_text())
    (directory / TRAINING_RECORD_FILE).write_text(json.dumps({**record, "splits": []}))
    return str(directory)


def run_arm(arm: str, encoder: str, store: str, workdir: Path, args: argparse.Namespace) -> dict:
    from pipelines.finetune import FinetuneConfig, finetune

    mode = "full" if arm == "scratch" else arm
    config = FinetuneConfig(
        checkpoint=encoder,
        data=store,
        output=str(workdir / "finetune" / arm),
        task="staging",
        mode=mode,
        head=args.head,
        steps=args.steps,
        batch_size=args.batch_size,
        workers=args.workers,
        lr=args.lr_full if mode == "full" else args.lr,
        eval_every=args.eval_every,
        checkpoint_every=args.steps,
        patience=args.patience,
        train_tokenizers=arm == "scratch",
        seed=args.seed,
    )
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        report = finetune(config, resume=True, mlflow=False)  # a finished arm is scored again, not retrained
    keep = ("kappa", "macro_f1", "accuracy", "n_epochs")
    return {
        "mode": mode,
        "test": {k: report["test"][k] for k in keep},
        "majority_baseline": {k: report["baseline"][k] for k in keep},
        "steps": report["steps"],
        "best_step": report["best_step"],
        "stopped_early": report["stopped_early"],
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the cohort, store and runs go (default: temp)")
    parser.add_argument("--data", default=None, help="an existing store (keeps its splits.json)")
    parser.add_argument("--nights-per-site", type=int, default=12, help="synthetic nights per site (6 sites)")
    parser.add_argument("--hours", type=float, default=6.0, help="length of each synthetic night")
    parser.add_argument("--model", default="small")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--global-batch", type=int, default=32, help="pretraining windows per step")
    parser.add_argument("--head", default="temporal", choices=("linear", "mlp", "temporal"))
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps at most per arm")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning windows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="frozen and LoRA learning rate")
    parser.add_argument("--lr-full", type=float, default=2e-4, help="full and scratch learning rate")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 6 x 2 nights of 0.5 h, tiny, 10 + 6 steps (checks the program, not models)",
    )
    args = parser.parse_args()
    if args.quick:
        args.nights_per_site, args.hours, args.model = 2, 0.5, "tiny"
        args.pretrain_steps, args.global_batch, args.steps, args.batch_size, args.eval_every = 10, 8, 6, 8, 3
        args.workers = 1
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import torch

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s2v-bench-finetune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.data or make_store(workdir, args)
    import ray

    from pipelines.runtime import init_ray

    # One Ray instance for the pretraining and the four arms (each would otherwise start its own).
    init_ray(None, num_cpus=max(os.cpu_count() or 1, args.workers))
    try:
        pretrained = pretrained_encoder(store, workdir, args)
        encoders = {
            "frozen": pretrained,
            "lora": pretrained,
            "full": pretrained,
            "scratch": scratch_encoder(pretrained, workdir),
        }
        arms = {}
        for arm in ARMS:
            logger.info("fine-tuning arm %s", arm)
            arms[arm] = run_arm(arm, encoders[arm], store, workdir, args)
    finally:
        ray.shutdown()
    scratch_kappa = arms["scratch"]["test"]["kappa"]
    result = {
        "benchmark": "finetune",
        "task": "staging",
        "scored_on": "test subjects",
        "store": store,
        "quick": args.quick,
        "model": args.model,
        "pretrain_steps": args.pretrain_steps,
        "head": args.head,
        "finetune_steps": args.steps,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "arms": arms,
        "kappa_minus_scratch": {arm: arms[arm]["test"]["kappa"] - scratch_kappa for arm in ARMS},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
