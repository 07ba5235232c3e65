"""Fine-tuning a pretrained encoder vs training from scratch, on test subjects only.

    .venv/bin/python benchmarks/bench_finetune.py                 # synthetic cohort, ~1 h on 2 cores
    .venv/bin/python benchmarks/bench_finetune.py --data STORE    # an existing store (keeps its splits.json)
    .venv/bin/python benchmarks/bench_finetune.py --quick         # a smoke run: minutes, no figures to trust

A rerun with the same ``--workdir`` reuses its store, its pretraining run and
every finished arm (resumed, then scored again).

Without ``--data`` it writes a synthetic cohort (``s2v synth``: ``--sites``
site archetypes in turn x ``--nights-per-site`` nights of ``--hours`` h),
ingests it and assigns its subjects 60/20/20 to train/val/test. It pretrains
``--model`` on the train subjects (``s2v pretrain``), then runs ``s2v
finetune`` (same head, early stopping on the val subjects) for:

**Staging by sensor subset.** ``--task staging`` four times, with modality
dropout so that one model serves any subset:

- ``frozen``: the pretrained encoder fixed, gated fusion + head trained;
- ``lora``: peft LoRA adapters (r=8, alpha=16) on the backbone's projections;
- ``full``: every backbone weight trained (tokenizers frozen);
- ``scratch``: the same architecture at random initialisation, everything trained
  (tokenizers included): the baseline that pretraining has to beat.

Each arm's model is scored on the test subjects' windows once per sensor
subset (``--subsets``, named as in :mod:`s2v_core.evaluation.scenarios`: the
model reads only those modalities, windows holding none of them are left out).

**Whole-night context.** The ``lora`` staging model's epoch features, grouped
by night, feed a second-stage transformer over each whole night
(:mod:`s2v_core.night_context`), trained on the train nights and early-stopped
on the val nights; its test κ stands next to the ``lora`` model's own
(window-level temporal head) κ.

**AHI.** ``--task events`` (respiratory event in a 30-s epoch, from the NSRR
XML nights' scored events), pretrained (LoRA) vs scratch: per test night the
AHI counted from detected events per hour of scored sleep, against the
night's ``ahi_scored`` (Pearson r, ICC, severity kappa), next to the same
count on the scored epoch labels; and ``--task ahi`` (night-level
regression of the site's AHI column), pretrained (frozen) vs scratch.

**Few-shot.** The paper's N = 1,280 labelled samples are read as 30-s epochs:
``ceil(1280 / epochs_per_window)`` store windows (128 of 10 epochs), drawn at
random from the train subjects (``--labelled-windows``), pretrained (LoRA) vs
scratch, both to early stopping on the whole val set; plus the 1 / 10 / 100 %
curve of the train windows (100 % is the staging arms' ``lora`` and ``scratch``).

Every figure is measured on the **test** subjects, each next to its baseline
of the same run (scratch; the majority class; the scored-label count).
Prints one JSON object (stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("frozen", "lora", "full", "scratch")
SUBSETS = ("psg", "home_sleep_test", "wearable", "only:eeg")
#: The paper's few-shot budget, read as labelled 30-s epochs.
FEW_SHOT_EPOCHS = 1280
FRACTIONS = (0.01, 0.10)
STAGING_KEYS = ("kappa", "macro_f1", "accuracy", "n_epochs")
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
            workdir / "cohort",
            sites=args.sites,
            recordings_per_site=args.nights_per_site,
            hours=args.hours,
            seed=args.seed,
            archetypes=args.archetypes,
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


def finetune_arm(
    name: str, arm: str, encoders: dict, store: str, workdir: Path, args: argparse.Namespace, **options
) -> dict:
    """One ``s2v finetune`` run: ``arm`` picks the encoder and mode (scratch: random weights, full)."""
    from pipelines.finetune import FinetuneConfig, finetune

    mode = "full" if arm == "scratch" else arm
    values = {
        "checkpoint": encoders[arm],
        "data": store,
        "output": str(workdir / "finetune" / name),
        "mode": mode,
        "head": args.head,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "lr": args.lr_full if mode == "full" else args.lr,
        # full and scratch: the encoder at --lr-full, the fresh fusion and head at --lr as in frozen/LoRA
        "head_lr": args.lr if mode == "full" else None,
        "eval_every": args.eval_every,
        "checkpoint_every": args.steps,
        "patience": args.patience,
        "train_tokenizers": arm == "scratch",
        "seed": args.seed,
        **options,
    }
    logger.info("fine-tuning %s (%s)", name, mode)
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        report = finetune(FinetuneConfig(**values), resume=True, mlflow=False)  # a finished run is scored again
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def _run_summary(report: dict) -> dict:
    return {
        "steps": report["steps"],
        "best_step": report["best_step"],
        "stopped_early": report["stopped_early"],
        "train_windows": report["train_windows"],
        "seconds": report["seconds"],
    }


def score_subsets(report: dict, subsets: dict[str, tuple[str, ...]]) -> dict:
    """Staging figures of the model of ``report`` on the test windows, reading each subset of modalities only."""
    from pipelines.finetune_loop import read_store_batches
    from s2v_core.finetuning import load_finetuned, predict
    from s2v_core.store import split_files

    model = load_finetuned(report["model"])
    config = json.loads((Path(report["model"]).parent / "finetune_config.json").read_text())
    files, filesystem = split_files(config["data"], ["test"])
    figures = {}
    for name, keys in subsets.items():
        readable = tuple(k for k in keys if k in model.spec.modalities)
        if not readable:
            figures[name] = None  # the model reads none of them
            continue
        spec = dataclasses.replace(model.spec, modalities=readable)
        batches = read_store_batches(files, filesystem, spec=spec, epochs_per_window=model.window_epochs, batch_size=64)
        target, output = predict(model, batches)
        result = model.task.metrics(target, output)
        figures[name] = {"modalities": list(readable), **{k: result[k] for k in STAGING_KEYS}}
    return figures


def staging_by_subset(encoders: dict, store: str, workdir: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    from s2v_core.evaluation.scenarios import robustness_scenarios
    from s2v_core.finetuning import read_description

    arms, reports = {}, {}
    for arm in ARMS:
        report = finetune_arm(
            f"staging-{arm}",
            arm,
            encoders,
            store,
            workdir,
            args,
            task="staging",
            modality_dropout=args.modality_dropout,
        )
        reports[arm] = report
        modalities = read_description(report["model"])["modalities"]
        subsets = robustness_scenarios(modalities, names=[s for s in args.subsets if s in _names(modalities)])
        arms[arm] = {
            "mode": report["mode"],
            "all_modalities": {k: report["test"][k] for k in STAGING_KEYS},
            "majority_baseline": {k: report["baseline"][k] for k in STAGING_KEYS},
            "by_subset": score_subsets(report, subsets),
            **_run_summary(report),
        }
    scratch = arms["scratch"]["by_subset"]
    for arm in ARMS:
        arms[arm]["kappa_minus_scratch"] = {
            name: round(figures["kappa"] - scratch[name]["kappa"], 4)
            for name, figures in arms[arm]["by_subset"].items()
            if figures and scratch.get(name)
        }
    return arms, reports


def night_context(report: dict, args: argparse.Namespace) -> dict:
    """Stage 2 over whole nights on the features of the fine-tuned model of ``report`` (all modalities)."""
    from pipelines.finetune_data import read_night_features
    from s2v_core.finetuning import load_finetuned
    from s2v_core.night_context import fit_night_context
    from s2v_core.store import split_files

    started = time.monotonic()
    model = load_finetuned(report["model"])
    data = json.loads((Path(report["model"]).parent / "finetune_config.json").read_text())["data"]
    nights = {}
    for split in ("train", "val", "test"):
        files, filesystem = split_files(data, [split])
        nights[split] = read_night_features(model, files, filesystem, batch_size=64)
    _, record = fit_night_context(
        nights,
        model.task,
        heads=model.encoder.config.heads,
        steps=args.night_steps,
        patience=args.patience,
        seed=args.seed,
    )
    figures = record.pop("test")
    record.pop("nights")
    return {
        "stage1": f"{report['mode']} staging model, {report['head']} head",
        "test": {k: figures[k] for k in STAGING_KEYS},
        "stage1_alone_test": {k: report["test"][k] for k in STAGING_KEYS},
        "kappa_gain": round(figures["kappa"] - report["test"]["kappa"], 4),
        "nights": {split: len(n) for split, n in nights.items()},
        **record,
        "seconds": round(time.monotonic() - started, 1),
    }


def _names(modalities) -> set[str]:
    from s2v_core.evaluation.scenarios import robustness_scenarios

    return set(robustness_scenarios(modalities))


def ahi_arms(encoders: dict, store: str, workdir: Path, args: argparse.Namespace) -> dict:
    """AHI from detected events (events task) and AHI regression (ahi task): pretrained vs scratch."""
    out: dict = {"events": {}, "regression": {}}
    for arm in ("lora", "scratch"):
        try:
            report = finetune_arm(f"events-{arm}", arm, encoders, store, workdir, args, task="events")
        except ValueError as exc:  # e.g. no test night with scored events in a small cohort
            out["events"][arm] = {"skipped": str(exc)}
            continue
        out["events"][arm] = {
            "mode": report["mode"],
            "epoch_detection": {k: report["test"].get(k) for k in ("auroc", "auprc", "n")},
            "epoch_detection_baseline": {k: report["baseline"].get(k) for k in ("auroc", "auprc")},
            "ahi_from_events": report.get("ahi_from_events"),
            **_run_summary(report),
        }
    for arm in ("frozen", "scratch"):
        report = finetune_arm(f"ahi-{arm}", arm, encoders, store, workdir, args, task="ahi", head="mlp")
        keep = ("pearson_r", "icc", "severity_kappa", "mae", "n")
        out["regression"][arm] = {
            "mode": report["mode"],
            "test": {k: report["test"].get(k) for k in keep},
            "mean_baseline": {k: report["baseline"].get(k) for k in keep},
            **_run_summary(report),
        }
    return out


def few_shot(encoders: dict, store: str, workdir: Path, args: argparse.Namespace, full_runs: dict) -> dict:
    """N = 1,280 labelled epochs and the 1 / 10 / 100 % curve, pretrained (LoRA) vs scratch."""
    epochs_per_window = json.loads((Path(full_runs["lora"]["model"]) / "finetuned.json").read_text(encoding="utf-8"))[
        "epochs_per_window"
    ]
    train_windows = full_runs["lora"]["train_windows"]
    budgets = {f"N={FEW_SHOT_EPOCHS}_epochs": math.ceil(FEW_SHOT_EPOCHS / epochs_per_window)}
    budgets.update({f"{fraction:.0%}": max(1, round(fraction * train_windows)) for fraction in FRACTIONS})
    out: dict = {
        "unit": f"labelled store windows of {epochs_per_window} epochs (30 s each), drawn from the train subjects",
        "train_windows_available": train_windows,
    }
    for name, windows in budgets.items():
        if windows >= train_windows:
            out[name] = {"skipped": f"{windows} windows >= the {train_windows} train windows: that is 100 %"}
            continue
        batch = max(args.workers, min(args.batch_size, windows) // args.workers * args.workers)
        entry: dict = {"labelled_windows": windows, "labelled_epochs": windows * epochs_per_window}
        for arm in ("lora", "scratch"):
            report = finetune_arm(
                f"fewshot-{name.replace('%', 'pct').replace('=', '')}-{arm}",
                arm,
                encoders,
                store,
                workdir,
                args,
                task="staging",
                labelled_windows=windows,
                batch_size=batch,
            )
            entry[arm] = {k: report["test"][k] for k in STAGING_KEYS} | _run_summary(report)
        entry["kappa_minus_scratch"] = round(entry["lora"]["kappa"] - entry["scratch"]["kappa"], 4)
        out[name] = entry
    out["100%"] = {
        arm: {k: full_runs[arm]["test"][k] for k in STAGING_KEYS} | {"train_windows": full_runs[arm]["train_windows"]}
        for arm in ("lora", "scratch")
    }
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the cohort, store and runs go (default: temp)")
    parser.add_argument("--data", default=None, help="an existing store (keeps its splits.json)")
    parser.add_argument("--sites", type=int, default=6, help="synthetic sites (archetypes in turn)")
    parser.add_argument("--nights-per-site", type=int, default=12, help="synthetic nights per site")
    parser.add_argument("--hours", type=float, default=6.0, help="length of each synthetic night")
    parser.add_argument(
        "--archetypes",
        default=None,
        help="comma-separated site archetypes to cycle through (s2v_core.synth.sites; e.g. shhs_like,mesa_like: "
        "only NSRR-XML sites, whose nights carry scored events, for an AHI study)",
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--global-batch", type=int, default=32, help="pretraining windows per step")
    parser.add_argument("--head", default="temporal", choices=("linear", "mlp", "temporal"))
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps at most per run")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning windows per step")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="frozen and LoRA learning rate; the fusion and head's in every arm"
    )
    parser.add_argument("--lr-full", type=float, default=2e-4, help="the encoder's learning rate in full and scratch")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--modality-dropout", type=float, default=0.3, help="staging arms: P(drop a modality)")
    parser.add_argument("--subsets", default=",".join(SUBSETS), help="sensor subsets the staging arms are scored on")
    parser.add_argument("--night-steps", type=int, default=300, help="whole-night head: steps (one night each)")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated parts to leave out: staging (and with it night, fewshot, which build on it), "
        "night, ahi, fewshot",
    )
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
        args.workers, args.night_steps = 1, 10
    args.subsets = [s.strip() for s in args.subsets.split(",") if s.strip()]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {"staging", "night", "ahi", "fewshot"}
    if unknown:
        parser.error(f"--skip: expected some of staging, night, ahi, fewshot, found {', '.join(sorted(unknown))}")
    if "staging" in args.skip:
        args.skip |= {"night", "fewshot"}  # both start from the staging arms' models
    args.archetypes = tuple(a.strip() for a in args.archetypes.split(",") if a.strip()) if args.archetypes else None
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import torch

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s2v-bench-finetune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.data or make_store(workdir, args)
    import ray

    from pipelines.runtime import init_ray

    # One Ray instance for the pretraining and every fine-tuning run (each would otherwise start its own).
    init_ray(None, num_cpus=max(os.cpu_count() or 1, args.workers))
    try:
        pretrained = pretrained_encoder(store, workdir, args)
        scratch = scratch_encoder(pretrained, workdir)
        encoders = {"frozen": pretrained, "lora": pretrained, "full": pretrained, "scratch": scratch}
        staging, reports = (None, {}) if "staging" in args.skip else staging_by_subset(encoders, store, workdir, args)
        night = None if "night" in args.skip else night_context(reports["lora"], args)
        ahi = None if "ahi" in args.skip else ahi_arms(encoders, store, workdir, args)
        shots = None if "fewshot" in args.skip else few_shot(encoders, store, workdir, args, reports)
    finally:
        ray.shutdown()
    result = {
        "benchmark": "finetune",
        "scored_on": "test subjects",
        "quick": args.quick,
        "cohort": None
        if args.data
        else {
            "sites": args.sites,
            "nights_per_site": args.nights_per_site,
            "hours": args.hours,
            "archetypes": list(args.archetypes) if args.archetypes else "default cycle",
        },
        "model": args.model,
        "pretrain_steps": args.pretrain_steps,
        "head": args.head,
        "finetune_steps_max": args.steps,
        "eval_every": args.eval_every,
        "patience": args.patience,
        "batch_size": args.batch_size,
        "modality_dropout": args.modality_dropout,
        "workers": args.workers,
        "staging": staging,
        "night_context": night,
        "ahi": ahi,
        "few_shot": shots,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
