"""Does pretraining help, on whom, by how much? Test subjects only, baselines measured in the same run.

    .venv/bin/python benchmarks/bench_learning.py                       # synthetic cohort, ~2 h on 2 cores
    .venv/bin/python benchmarks/bench_learning.py --data STORE --objectives project,paper
    .venv/bin/python benchmarks/bench_learning.py --quick               # a smoke run: minutes, no figures to trust

Without ``--data`` it writes a synthetic cohort (``s2v synth``: 6 site
archetypes x ``--nights-per-site`` nights of ``--hours`` h), ingests it and
assigns its subjects 60/20/20 to train/val/test (enough test windows for the
retrieval figures; a ``--data`` store keeps its own ``splits.json``). Then,
per pretraining objective, it pretrains ``--model`` with ``s2v pretrain`` on
the train subjects (Ray Train, ``--workers`` workers, ``--steps`` steps at
``--global-batch``) and embeds the store. Everything reported is measured on
the **test** subjects:

1. ``alignment``: held-out contrastive loss / chance and window retrieval
   top-1 / top-5 against chance (k/N, N windows holding both modalities) for
   eeg-eog, ecg-hr, airflow-thorax, spo2-airflow, eeg-ecg — for each
   pretrained encoder and for the same architecture at random initialisation;
2. ``staging``: 5-class macro-F1 and kappa of one linear probe (fitted on
   train + val subjects) on the pretrained embeddings, the random-init
   embeddings and hand-crafted features (:mod:`s2v_core.evaluation.features`),
   with YASA's pretrained stager on the nights that have EEG as a peer;
3. ``sensor_dropout``: the probe trained on full-PSG embeddings scored on the
   embeddings of a sensor subset of the same test nights (wearable, EEG only,
   ECG only, home sleep test) without retraining, next to a probe retrained
   per subset (``s2v evaluate --robustness``);
4. ``label_efficiency``: 1 %, 10 %, 100 % of the training nights: the frozen
   pretrained encoder + probe vs the same encoder trained from scratch end to
   end with a budget that grows with its labels and early stopping on val
   subjects, the random-init probe and the hand-crafted features.

``targets`` lists each of the issue's thresholds with the measured value and
whether it is met. Prints one JSON object (stdout); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCENARIOS = ("wearable", "only:eeg", "only:ecg", "home_sleep_test")
FRACTIONS = (0.01, 0.1, 1.0)
logger = logging.getLogger("bench_learning")


def make_store(workdir: Path, args: argparse.Namespace) -> tuple[str, dict]:
    """A synthetic cohort, ingested, with a 60/20/20 subject split; returns the store and timings."""
    from pipelines.ingest import ingest
    from pipelines.ingest_config import IngestConfig
    from pipelines.split import assign
    from s2v_core.synth import write_cohort

    store = workdir / "store"
    timings = {}
    if not (store / "splits.json").is_file():
        started = time.monotonic()
        cohort = write_cohort(
            workdir / "cohort", sites=6, recordings_per_site=args.nights_per_site, hours=args.hours, seed=args.seed
        )
        timings["synth_s"] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):
            ingest(IngestConfig(inputs=[str(cohort.root)], output=str(store), workers=2))
        timings["ingest_s"] = round(time.monotonic() - started, 1)
    assign(str(store), seed=args.split_seed, fractions=(0.6, 0.2, 0.2), reassign=True, force=True)
    return str(store), timings


def pretrain_objective(store: str, workdir: Path, objective: str, args: argparse.Namespace) -> dict:
    from pipelines.pretrain import pretrain
    from pipelines.train_config import load_pretrain_config

    overrides = {
        "data": store,
        "output": str(workdir / "runs" / objective),
        "model": args.model,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "workers": args.workers,
        "seed": args.seed,
        "checkpoint_every": args.steps,
        "validate_every": max(1, args.steps // 5),
        "lr": args.lr,
    }
    if objective != "project":
        overrides["objective"] = objective
    config = load_pretrain_config(None, **overrides)
    started = time.monotonic()
    result = pretrain(config, mlflow=True)
    return {
        "run_dir": result.run_dir,
        "encoder": result.encoder_dir,
        "seconds": round(time.monotonic() - started, 1),
        "final_train_loss": result.final_loss,
        "final_val": {k: v for k, v in result.metrics.items() if k.startswith("val/") and k.count("/") == 1},
    }


def random_init_encoder(reference_dir: str, workdir: Path) -> str:
    """The reference encoder's architecture at random initialisation, saved with an empty training record."""
    import torch

    from s2v_core.model import SleepEncoder, load_encoder, save_encoder
    from s2v_core.run_layout import TRAINING_RECORD_FILE

    reference = load_encoder(reference_dir)
    torch.manual_seed(12345)
    directory = save_encoder(SleepEncoder(reference.config, reference.modalities), workdir / "random_init")
    record = json.loads((Path(reference_dir) / TRAINING_RECORD_FILE).read_text())
    (directory / TRAINING_RECORD_FILE).write_text(json.dumps({**record, "splits": []}))
    return str(directory)


def test_alignment(encoder_dir: str, store: str, args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from pipelines.validation import HeldOutValidator
    from s2v_core.evaluation.alignment import NAMED_PAIRS
    from s2v_core.model import load_encoder
    from s2v_core.store import schema_info, split_files

    encoder = load_encoder(encoder_dir)
    files, filesystem = split_files(store, ["test"])
    epochs = schema_info(pq.read_schema(files[0], filesystem=filesystem))[1]
    validator = HeldOutValidator(
        files,
        filesystem,
        modalities=encoder.modalities,
        epochs_per_window=epochs,
        max_epochs=None,
        batch_size=args.global_batch,
        seed=0,
        pairs=NAMED_PAIRS,
    )
    figures = validator.figures(encoder)
    return {pair: {k: round(v, 5) for k, v in values.items()} for pair, values in figures.items()}


def load_signals(emb, store: str) -> dict[str, np.ndarray]:
    """The raw store signals of the embedded windows, float16, one modality column at a time."""
    from pipelines.evaluate_baselines import store_rows
    from s2v_core.modalities import MODALITY_KEYS
    from s2v_core.store import modality_array

    epochs = emb.info["epochs_per_window"]
    batch = {"present": np.zeros((len(emb.stages), len(MODALITY_KEYS)), dtype=bool)}
    for index, key in enumerate(MODALITY_KEYS):
        if key not in emb.info["modalities"]:
            continue
        values, present = modality_array(store_rows(emb, store, [key]), key, epochs, dtype=np.float16)
        batch[key], batch["present"][:, index] = values, present
    return batch


def staging_figures(probe, stages: np.ndarray, fold) -> dict:
    from s2v_core.evaluation.probes import cross_validate_staging

    result = cross_validate_staging(probe, stages, [fold])
    pooled = result["pooled"]
    return {
        "kappa": round(pooled["kappa"], 4),
        "macro_f1": round(pooled["macro_f1"], 4),
        "accuracy": round(pooled["accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where the cohort, store, runs and reports go (default: temp)")
    parser.add_argument("--data", default=None, help="an existing store (keeps its splits.json)")
    parser.add_argument("--objectives", default="project", help="comma-separated pretraining objectives")
    parser.add_argument("--nights-per-site", type=int, default=24, help="synthetic nights per site (6 sites)")
    parser.add_argument("--hours", type=float, default=8.0, help="length of each synthetic night")
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=1500, help="pretraining optimiser steps")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--no-label-efficiency", action="store_true", help="skip the from-scratch curve")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 6 x 2 nights of 1 h, tiny, 30 steps (checks the program, not the model)",
    )
    args = parser.parse_args()
    if args.quick:
        args.nights_per_site, args.hours, args.model, args.steps, args.global_batch = 2, 1.0, "tiny", 30, 8
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from pipelines.embed import embed
    from pipelines.embed_config import EmbedConfig
    from pipelines.evaluate import evaluate
    from pipelines.evaluate_config import EvaluateConfig
    from s2v_core.embeddings import read_embeddings
    from s2v_core.evaluation.features import epoch_features
    from s2v_core.evaluation.folds import held_out_fold
    from s2v_core.evaluation.probes import label_efficiency, linear_staging_probe
    from s2v_core.evaluation.scratch import scratch_staging_probe
    from s2v_core.model import load_encoder

    started = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s2v-bench-learning-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store, timings = (args.data, {}) if args.data else make_store(workdir, args)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    result: dict = {
        "benchmark": "learning",
        "store": store,
        "model": args.model,
        "steps": args.steps,
        "global_batch": args.global_batch,
        "workers": args.workers,
        "objectives": objectives,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "timings": timings,
    }

    encoders: dict[str, str] = {}
    pretraining = {}
    for objective in objectives:
        logger.info("pretraining objective %s", objective)
        pretraining[objective] = pretrain_objective(store, workdir, objective, args)
        encoders[f"pretrained_{objective}"] = pretraining[objective]["encoder"]
    result["pretraining"] = pretraining
    encoders["random_init"] = random_init_encoder(encoders[f"pretrained_{objectives[0]}"], workdir)

    # 1. Held-out alignment, test subjects.
    result["alignment"] = {name: test_alignment(path, store, args) for name, path in encoders.items()}

    # Embeddings of the whole store (splits recorded per window), one directory per encoder.
    embeddings = {}
    for name, path in encoders.items():
        logger.info("embedding the store with %s", name)
        with contextlib.redirect_stdout(sys.stderr):
            embed(EmbedConfig(checkpoint=path, data=store, output=str(workdir / "emb" / name), num_actors=2))
        embeddings[name] = read_embeddings(workdir / "emb" / name)
    reference = embeddings["random_init"]
    fold = held_out_fold(reference.split)
    result["protocol"] = {
        "probe_fitted_on": "train + val subjects",
        "scored": "test subjects",
        "subjects": {
            s: int(len(np.unique(reference.subject_id[reference.split == s]))) for s in ("train", "val", "test")
        },
        "test_windows": int(len(fold.test)),
        "test_nights": int(len(np.unique(reference.night_id[fold.test]))),
    }

    # 2. Staging on test subjects: one linear probe over each representation.
    logger.info("hand-crafted features of %d windows", len(reference.stages))
    signals = load_signals(reference, store)
    features = epoch_features(signals)
    staging = {
        name: staging_figures(linear_staging_probe(emb.epoch, emb.stages, seed=args.seed), emb.stages, fold)
        for name, emb in embeddings.items()
    }
    staging["handcrafted_features"] = staging_figures(
        linear_staging_probe(features, reference.stages, seed=args.seed, impute=True), reference.stages, fold
    )
    result["staging"] = staging

    # 2b + 3. YASA peer and sensor dropout at inference, through `s2v evaluate` (test subjects).
    result["sensor_dropout"], result["yasa"] = {}, None
    for objective in objectives:
        name = f"pretrained_{objective}"
        report = evaluate(
            EvaluateConfig(
                embeddings=str(workdir / "emb" / name),
                task="staging",
                report=str(workdir / "reports" / name / "staging.json"),
                heads=("linear",),
                data=store,
                checkpoint=encoders[name],
                robustness=True,
                scenarios=list(SCENARIOS),
                peer="yasa" if result["yasa"] is None else None,
                log_to_mlflow=False,
                seed=args.seed,
            )
        )
        robustness = report["robustness"]
        result["sensor_dropout"][name] = {
            "full_probe_kappa": round(robustness["full_probe_kappa"], 4),
            "full_probe_unchanged": {
                s: {k: round(v, 4) for k, v in m.items()} for s, m in robustness["matrix_full_probe"].items()
            },
            "probe_retrained": {
                s: {k: round(m[k], 4) for k in ("kappa", "macro_f1")} for s, m in robustness["matrix"].items()
            },
            "windows": robustness["n_windows"],
        }
        if result["yasa"] is None and report.get("peer", {}).get("yasa", {}).get("available"):
            peer = report["peer"]["yasa"]
            result["yasa"] = {
                "kappa": round(peer["yasa"]["kappa"]["mean"], 4),
                "macro_f1": round(peer["yasa"]["macro_f1"]["mean"], 4),
                "linear_probe_same_windows_kappa": round(peer["linear_probe_same_windows"]["kappa"]["mean"], 4),
                "windows": peer["n_windows"],
            }

    # 4. Label efficiency: the same nights drawn for every representation.
    if not args.no_label_efficiency:
        first = load_encoder(encoders[f"pretrained_{objectives[0]}"])
        probes = {name: linear_staging_probe(emb.epoch, emb.stages, seed=args.seed) for name, emb in embeddings.items()}
        probes["handcrafted_features"] = linear_staging_probe(features, reference.stages, seed=args.seed, impute=True)
        probes["scratch_end_to_end"] = scratch_staging_probe(
            signals, reference.stages, config=first.config, modalities=first.modalities, seed=args.seed
        )
        curves = label_efficiency(
            probes, reference.stages, reference.night_id, [fold], fractions=FRACTIONS, seed=args.seed
        )
        result["label_efficiency"] = {
            name: {
                fraction: {
                    "kappa": round(v["summary"]["kappa"]["mean"], 4),
                    "macro_f1": round(v["summary"]["macro_f1"]["mean"], 4),
                    "train_nights": v["train_nights"][0],
                }
                for fraction, v in by_fraction.items()
            }
            for name, by_fraction in curves.items()
        }
    result["targets"] = targets(result, objectives)
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


def targets(result: dict, objectives: list[str]) -> dict:
    """The issue's thresholds, each with its measured value and whether it is met."""
    out: dict = {}
    retrieval = {"ecg-hr": 50.0, "eeg-eog": 25.0, "eeg-ecg": 5.0, "spo2-airflow": 5.0}
    for objective in objectives:
        name = f"pretrained_{objective}"
        alignment = result["alignment"][name]
        checks = {}
        for pair, figures in alignment.items():
            checks[f"{pair} loss/chance <= 0.7"] = {"value": figures["loss_ratio"], "met": figures["loss_ratio"] <= 0.7}
        for pair, needed in retrieval.items():
            figures = alignment.get(pair)
            if figures:
                checks[f"{pair} top-1 >= {needed:g}x chance (N >= 500)"] = {
                    "value": figures["top1_over_chance"],
                    "n": figures["n"],
                    "met": figures["top1_over_chance"] >= needed and figures["n"] >= 500,
                }
        kappa = result["staging"][name]["kappa"]
        random_kappa = result["staging"]["random_init"]["kappa"]
        features_kappa = result["staging"]["handcrafted_features"]["kappa"]
        checks["probe kappa >= random init + 0.10"] = {
            "value": kappa,
            "baseline": random_kappa,
            "met": kappa >= random_kappa + 0.10,
        }
        checks["probe kappa >= hand-crafted features"] = {
            "value": kappa,
            "baseline": features_kappa,
            "met": kappa >= features_kappa,
        }
        dropout = result["sensor_dropout"].get(name, {}).get("full_probe_unchanged", {}).get("wearable")
        if dropout:
            checks["wearable keeps >= half the full probe's kappa margin"] = {
                "value": dropout["kappa_margin_kept"],
                "met": dropout["kappa_margin_kept"] >= 0.5,
            }
        curves = result.get("label_efficiency")
        if curves:
            pretrained, scratch = curves[name]["0.01"]["kappa"], curves["scratch_end_to_end"]["0.01"]["kappa"]
            checks["1 % labels: pretrained >= scratch + 0.10 kappa"] = {
                "value": pretrained,
                "baseline": scratch,
                "met": pretrained >= scratch + 0.10,
            }
        checks = {
            k: {kk: (round(vv, 4) if isinstance(vv, float) and math.isfinite(vv) else vv) for kk, vv in v.items()}
            for k, v in checks.items()
        }
        out[name] = {"checks": checks, "met": sum(c["met"] for c in checks.values()), "of": len(checks)}
    return out


if __name__ == "__main__":
    main()
