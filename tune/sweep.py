"""``s2v sweep``: a Ray Tune grid over encoder width (x depth) x modality count (x data fraction).

    s2v sweep --data STORE --widths 32,64,128 --modality-counts 2,3,5,9 --output SWEEP_DIR \\
              [--depths 2,4] [--data-fractions 0.5,1] [--anchor eeg[,ecg]] [--steps 30] [--resume]

setup
    Validate the options against the store, split its subjects into a
    training and a held-out validation side (a seeded hash of
    ``subject_id``: no subject on both sides), choose the modality subsets
    (nested prefixes of one seeded permutation that starts with the
    ``--anchor`` modalities, so a larger M only *adds* modalities) and plan one trial per grid point,
    with its non-embedding parameter count N. The split sides are store
    subsets (:func:`s2v_core.store.write_store_subset`: lists of the store's
    files) under ``SWEEP_DIR/splits/``, so the store itself may be a URI.
    ``SWEEP_DIR`` is a local path (on a cluster, storage every node mounts):
    Tune's state, the trial log and the default MLflow store live there.
run
    One Tune trial per grid point (:mod:`tune.trial`): a ``TorchTrainer``
    pretraining run for a fixed number of steps on the training side, then
    the held-out DASH-InfoNCE loss and the staging probe's macro-F1 on the
    validation side. Following Ray Train V2's Tune integration, the Tune
    trainable is a function that launches the ``TorchTrainer`` (a Trainer is
    no longer passed to ``Tuner`` directly). Failed trials are retried once,
    then recorded with their error; ``--resume`` restores the Tune experiment
    and skips finished trials.
cleanup
    ``scaling.json`` and ``scaling.png`` (:mod:`tune.scaling`), logged with
    the fit's headline numbers to the parent MLflow run under which every
    trial is a nested run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.runtime import is_uri, mlflow_experiment, redact
from s2v_core.store import open_store
from s2v_core.modalities import MODALITY_KEYS, parse_modalities
from s2v_core.store import SUBSET_SUFFIX, stable_id, write_store_subset

logger = logging.getLogger(__name__)

#: Sub-directory of SWEEP_DIR holding the Tune experiment (what ``--resume`` restores).
TUNE_NAME = "tune"
#: Sweep bookkeeping: the resolved config and the parent MLflow run id.
STATE_FILE = "sweep.json"
#: Append-only log of trial start/finish events (one JSON object per line).
TRIAL_LOG = "trial_log.jsonl"
#: MLflow experiment of the sweep runs.
EXPERIMENT = "s2v-sweep"


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; ``s2v sweep`` options map one to one."""

    data: str  # the Parquet store (``s2v ingest`` output): a path or a URI
    output: str  # SWEEP_DIR: splits, Tune experiment, scaling.json/png, mlflow.db; a local/shared path
    widths: tuple[int, ...]  # encoder widths d (the N axis)
    modality_counts: tuple[int, ...]  # numbers of pretraining modalities (the M axis); >= 2
    depths: tuple[int, ...] = ()  # backbone depths; empty = the model size's own depth
    data_fractions: tuple[float, ...] = (1.0,)  # fractions of the training recordings (nested)
    anchor: str | None = None  # first modalities of the nested order, comma-separated ("eeg", "hr,ecg")
    model: str = "tiny"  # named model size the widths/depths override
    steps: int = 30  # optimiser steps per trial: the fixed compute budget
    global_batch: int = 8  # windows per step over all workers of a trial
    workers_per_trial: int = 1  # Ray Train workers per trial (1 CPU each, as in s2v pretrain)
    device: str = "auto"  # trial workers: auto (GPUs when the cluster has one per worker) | cpu | gpu
    cpus_per_trial: float = 1.0  # CPUs of the trial process itself (launch + validation pass)
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster fits
    validation_fraction: float = 0.25  # share of subjects held out for validation
    validation_batch: int = 32  # windows per validation-loss batch (negatives scale with it)
    seed: int = 0  # seeds subsets, the split, the data fractions, training and the bootstrap
    max_failures: int = 1  # retries of a failed trial before it is recorded as failed
    bootstrap: int = 200  # bootstrap refits for the exponents' intervals

    def __post_init__(self) -> None:
        if is_uri(self.output):
            raise ValueError(
                f"--output: expected a local directory or a path on storage every node mounts (Tune's state, "
                f"the trial log and the MLflow store live there), found the URI {self.output}; "
                "the store (--data) may be a URI"
            )
        for option, values in (("--widths", self.widths), ("--modality-counts", self.modality_counts),
                               ("--depths", self.depths)):
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad:
                raise ValueError(f"{option}: expected positive integers, found {bad}")
            if len(set(values)) != len(values):
                raise ValueError(f"{option}: value listed twice in {list(values)}")
        if not self.widths or not self.modality_counts:
            raise ValueError("--widths and --modality-counts need at least one value each")
        if min(self.modality_counts) < 2:
            raise ValueError(
                f"--modality-counts: found {min(self.modality_counts)}; the contrastive objective aligns "
                "pairs of modalities, so a trial needs at least 2 (with 1 there is nothing to align)"
            )
        bad = [f for f in self.data_fractions if not 0.0 < f <= 1.0]
        if bad or not self.data_fractions:
            raise ValueError(f"--data-fractions: expected values in (0, 1], found {list(self.data_fractions)}")
        for option, value in (("--steps", self.steps), ("--global-batch", self.global_batch),
                              ("--workers-per-trial", self.workers_per_trial),
                              ("--validation-batch", self.validation_batch)):
            if value < 1:
                raise ValueError(f"{option}: expected an integer >= 1, found {value}")
        if self.global_batch % self.workers_per_trial:
            raise ValueError(f"--global-batch {self.global_batch} is not divisible by "
                             f"--workers-per-trial {self.workers_per_trial}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"--device: expected auto, cpu or gpu, found {self.device!r}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"--cpus-per-trial: expected > 0, found {self.cpus_per_trial}")
        if self.max_concurrent < 0:
            raise ValueError(f"--max-concurrent: expected >= 0, found {self.max_concurrent}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation-fraction: expected a value in (0, 1), found {self.validation_fraction}")
        if self.anchor is not None:
            parse_modalities(self.anchor, option="--anchor")  # unknown or repeated names


def anchor_modalities(anchor: str | None) -> tuple[str, ...]:
    """The ``--anchor`` modalities in the order given (``"hr,ecg"`` -> ``("hr", "ecg")``)."""
    if not anchor:
        return ()
    parse_modalities(anchor, option="--anchor")
    return tuple(name.strip().lower() for name in anchor.split(",") if name.strip())


# -- setup: what the store holds, the split, the subsets, the plan ------------------------------------

def store_files(store: str | Path) -> list[tuple[str, str, str]]:
    """``(path, subject_id, recording_id)`` of each Parquet file of ``store``, sorted by path.

    ``store`` is a path or a URI; the paths are on its filesystem. Raises
    ``ValueError`` naming ``--data`` for a missing store or one without
    Parquet files.
    """
    out = []
    for fragment in open_store(store).get_fragments():
        table = fragment.head(1, columns=["subject_id", "recording_id"])
        if table.num_rows:
            out.append((fragment.path, table.column("subject_id")[0].as_py(),
                        table.column("recording_id")[0].as_py()))
    return out


def store_modalities(store: str | Path) -> tuple[str, ...]:
    """Modalities present in at least one window of ``store`` (registry order)."""
    dataset = open_store(store)
    seen = np.zeros(len(MODALITY_KEYS), dtype=bool)
    for batch in dataset.to_batches(columns=["present"]):
        flags = batch.column("present").flatten().to_numpy(zero_copy_only=False)
        seen |= flags.reshape(-1, len(MODALITY_KEYS)).any(axis=0)
    return tuple(k for k, s in zip(MODALITY_KEYS, seen) if s)


def modality_subsets(available, counts, *, anchor: str | None = None, seed: int = 0) -> dict[int, tuple[str, ...]]:
    """One modality subset per count: nested prefixes of a seeded permutation of ``available``.

    The order starts with the ``anchor`` modalities as given (``"hr,ecg"``),
    the rest follow in a seeded permutation; so every subset of at least that
    many modalities holds them, and the smallest subset, on which every trial
    is scored, is the anchor pair when the smallest count is 2. Nesting makes
    the M axis add modalities instead of swapping them, which is what the
    ``B * M**-beta`` term assumes. Subsets are returned in registry order.
    """
    available = tuple(available)
    anchors = anchor_modalities(anchor)
    for name in anchors:
        if name not in available:
            raise ValueError(f"--anchor: {name!r} is not in the store, which holds {', '.join(available)}")
    too_many = [c for c in counts if c > len(available)]
    if too_many:
        raise ValueError(f"--modality-counts: {too_many} exceed the {len(available)} modalities present "
                         f"in the store ({', '.join(available)})")
    rest = [k for k in available if k not in anchors]
    order = [*anchors, *(rest[i] for i in np.random.default_rng(seed).permutation(len(rest)))]
    return {c: tuple(k for k in MODALITY_KEYS if k in order[:c]) for c in counts}


def split_subjects(files, *, validation_fraction: float, seed: int = 0):
    """Subject-disjoint ``(train_files, validation_files)`` by a seeded hash of ``subject_id``.

    A subject is held out when ``stable_id(f"{seed}/{subject_id}")`` falls in
    the lowest ``validation_fraction`` of the hash range. Both sides keep at
    least one subject (the lowest/highest hash is moved if needed), so tiny
    stores still give a split.
    """
    subjects = sorted({subject for _, subject, _ in files})
    if len(subjects) < 2:
        raise ValueError(f"--data: a subject-disjoint validation split needs >= 2 subjects, found {len(subjects)}")
    score = {s: (stable_id(f"{seed}/{s}") % 1_000_003) / 1_000_003 for s in subjects}
    held = {s for s in subjects if score[s] < validation_fraction}
    ranked = sorted(subjects, key=score.get)
    if not held:
        held = {ranked[0]}
    if len(held) == len(subjects):
        held.discard(ranked[-1])
    train = [f for f in files if f[1] not in held]
    validation = [f for f in files if f[1] in held]
    return train, validation


def fraction_files(train_files, fraction: float, *, seed: int = 0):
    """The first ``ceil(fraction * n)`` training recordings in a seeded hash order (nested in fraction)."""
    ranked = sorted(train_files, key=lambda f: stable_id(f"{seed}/fraction/{f[2]}"))
    return sorted(ranked[:max(1, math.ceil(fraction * len(ranked)))])


def plan_trials(cfg: SweepConfig) -> tuple[list[dict], dict]:
    """Validate ``cfg`` against its store, write the split stores, return ``(trials, split_summary)``."""
    import torch

    from s2v_core.model import SleepEncoder, count_parameters, model_config

    splits = Path(cfg.output).resolve() / "splits"
    files = store_files(cfg.data)
    subsets = modality_subsets(store_modalities(cfg.data), cfg.modality_counts, anchor=cfg.anchor, seed=cfg.seed)
    reference = list(subsets[min(cfg.modality_counts)])  # every trial's subset holds the smallest
    train, validation = split_subjects(files, validation_fraction=cfg.validation_fraction, seed=cfg.seed)

    def side(name: str, chosen) -> str:
        return write_store_subset(str(splits / f"{name}{SUBSET_SUFFIX}"), store=cfg.data,
                                  files=[path for path, _, _ in chosen])

    validation_store = side("validation", validation)
    fraction_stores = {f: side(f"train-f{f:g}", fraction_files(train, f, seed=cfg.seed)) for f in cfg.data_fractions}
    depths = cfg.depths or (model_config(cfg.model).depth,)
    trials = []
    for fraction in cfg.data_fractions:
        for width in cfg.widths:
            for depth in depths:
                config = model_config(cfg.model, width=width, depth=depth)  # ValueError names the field
                for count in cfg.modality_counts:
                    torch.manual_seed(0)
                    n_params = count_parameters(SleepEncoder(config, subsets[count]), non_embedding=True)
                    key = f"w{width}-d{depth}-m{count}-f{fraction:g}"
                    trials.append({
                        "key": key, "width": width, "depth": depth, "modality_count": count,
                        "modalities": list(subsets[count]), "data_fraction": fraction, "n_params": n_params,
                        "reference_modalities": reference,
                        "train_store": str(fraction_stores[fraction]), "validation_store": str(validation_store),
                    })
    summary = {
        "train_subjects": len({s for _, s, _ in train}), "validation_subjects": len({s for _, s, _ in validation}),
        "train_recordings": len(train), "validation_recordings": len(validation),
        "modality_subsets": {str(c): list(m) for c, m in subsets.items()},
        "reference_modalities": reference,
    }
    return trials, summary


# -- run ---------------------------------------------------------------------------------------------

def sweep(cfg: SweepConfig, *, resume: bool = False, address: str | None = None,
          num_cpus: int | None = None) -> dict:
    """Run (or resume) the sweep described by ``cfg`` and return the scaling report.

    Parameters
    ----------
    cfg : SweepConfig
        The grid, budgets and resources (see the dataclass for units).
    resume : bool
        Restore the Tune experiment under ``cfg.output`` instead of starting
        it; finished trials are kept, unfinished and errored ones run again.
    address : str, optional
        Ray cluster to join (else ``RAY_ADDRESS``, else a local instance).
    num_cpus : int, optional
        CPUs of a local Ray instance (default: all cores).

    Returns
    -------
    dict
        The content of ``SWEEP_DIR/scaling.json``, plus ``interrupted`` (true
        when Tune stopped before every trial ended; resume with ``resume=True``).
    """
    import mlflow
    from ray import tune

    from pipelines.runtime import init_ray, mlflow_tracking_uri
    from tune.scaling import write_report
    from tune.trial import SweepMLflowCallback, run_trial

    output = Path(cfg.output).resolve()
    state_path = output / STATE_FILE
    experiment_path = output / TUNE_NAME
    if resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist; no sweep was started in {output}")
    if not resume and experiment_path.exists():
        raise ValueError(f"--output: {output} already holds a sweep; pass --resume to continue it "
                         "or choose another directory")
    trials, split = plan_trials(cfg)
    tracking_uri = mlflow_tracking_uri(output)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if resume:
        state = json.loads(state_path.read_text())
        saved = json.loads(json.dumps(state["config"]))
        current = json.loads(json.dumps(asdict(cfg)))
        changed = sorted(k for k in current if k != "max_concurrent" and saved.get(k) != current[k])
        if changed:
            raise ValueError(
                f"--resume: options differ from the sweep in {output}: "
                + "; ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
                + " (resume with the original options, or start a new --output)"
            )
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        experiment_id = mlflow_experiment(client, tracking_uri, EXPERIMENT)
        parent = client.create_run(experiment_id, run_name=f"sweep-{output.name}", tags={"s2v.kind": "sweep"})
        parent_id = parent.info.run_id
        for key, value in _flat_params(cfg).items():
            client.log_param(parent_id, key, redact(value))
        state = {"config": asdict(cfg), "parent_run_id": parent_id, "split": split}
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    settings = {"output": str(output), "model": cfg.model, "steps": cfg.steps,
                "global_batch": cfg.global_batch, "workers": cfg.workers_per_trial, "device": cfg.device,
                "validation_batch": cfg.validation_batch, "seed": cfg.seed,
                "mlflow": {"tracking_uri": tracking_uri, "parent_run_id": parent_id, "experiment": EXPERIMENT}}
    init_ray(address, num_cpus=num_cpus)
    concurrent = cfg.max_concurrent or default_concurrency(cfg)
    # The trial process launches its TorchTrainer, waits, then runs the
    # validation pass; the Train workers ask for their own CPUs.
    trainable = tune.with_resources(run_trial, {"cpu": cfg.cpus_per_trial})
    callbacks = [SweepMLflowCallback(tracking_uri=tracking_uri, experiment_name=EXPERIMENT,
                                     tags={"mlflow.parentRunId": parent_id, "s2v.kind": "sweep-trial"})]
    run_config = tune.RunConfig(
        name=TUNE_NAME, storage_path=str(output), callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=1,
    )
    if resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise FileNotFoundError(f"--resume: no Tune experiment to restore at {experiment_path}")
        # The run config (callbacks, failure config) comes back from Tune's
        # saved tuner state; only the trainable is given again.
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=_param_space(trials, settings), run_config=run_config,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent,
                                        trial_dirname_creator=lambda t: t.config["trial"]["key"]),
        )
    grid = tuner.fit()
    records = collect_records(grid, trials)
    interrupted = any(r["status"] == "unfinished" for r in records)
    report = write_report(output, records, bootstrap=cfg.bootstrap, seed=cfg.seed,
                          mlflow_run_id=parent_id, tracking_uri=tracking_uri)
    # Trials Tune stopped mid-way (interrupt) leave their child run open; a
    # resumed trial gets a new one, so close these as KILLED.
    experiment_id = client.get_run(parent_id).info.experiment_id
    for child in client.search_runs([experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")):
        client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED" if interrupted else "FINISHED")
    if interrupted:
        logger.warning("sweep interrupted with %d unfinished trial(s); continue with --resume",
                       sum(r["status"] == "unfinished" for r in records))
    return {**report, "interrupted": interrupted}


def default_concurrency(cfg: SweepConfig) -> int:
    """Trials that fit the cluster at once: each holds its own CPUs plus 1 CPU (or 1 GPU) per worker.

    Tune starts a trial as soon as its own (driver) resources are free, but
    the ``TorchTrainer`` inside asks for its workers later; without a cap,
    trials could take every CPU and wait forever for their workers.
    """
    import ray

    resources = ray.cluster_resources()
    total, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    on_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpus >= cfg.workers_per_trial)
    if cfg.device == "gpu" and gpus < cfg.workers_per_trial:
        raise ValueError(f"--device gpu: a trial's {cfg.workers_per_trial} workers need as many GPUs; "
                         f"the cluster has {gpus:g}")
    # GPU workers hold 1 CPU each too (s2v pretrain's resources_per_worker).
    per_trial = cfg.cpus_per_trial + cfg.workers_per_trial
    if per_trial > total:
        raise ValueError(f"--workers-per-trial {cfg.workers_per_trial} (1 CPU each) plus --cpus-per-trial "
                         f"{cfg.cpus_per_trial:g} needs {per_trial:g} CPUs; the cluster has {total:g}")
    fit = int(total // per_trial)
    if on_gpu:
        fit = min(fit, int(gpus // cfg.workers_per_trial))
    return max(1, fit)


def _param_space(trials: list[dict], settings: dict) -> dict:
    from ray import tune

    # One grid axis over explicit trial dicts: the subsets and N are computed
    # up front, and the grid need not be a full Cartesian product.
    return {"trial": tune.grid_search(trials), "settings": settings}


def collect_records(grid, trials: list[dict]) -> list[dict]:
    """One flat record per planned trial from a Tune ``ResultGrid``.

    Results are matched to the plan by trial directory (named after the
    trial key); a planned trial without a result, or whose result has
    neither metrics nor an error (Tune was interrupted), is ``unfinished``.
    """
    by_key = {Path(result.path).name: result for result in grid if result.path}
    records = []
    for trial in trials:
        record = {k: v for k, v in trial.items() if k not in ("train_store", "validation_store")}
        result = by_key.get(trial["key"])
        metrics = (result.metrics or {}) if result is not None else {}
        if result is not None and result.error is not None:
            record.update(status="failed", error=f"{type(result.error).__name__}: {result.error}"[-2000:])
        elif "val_loss" in metrics:
            record["status"] = "finished"
        else:
            record["status"] = "unfinished"
        for key in ("val_loss", "val_loss_own", "val_negatives_per_anchor", "staging_macro_f1",
                    "staging_macro_f1_own", "train_loss",
                    "train_seconds", "steps", "validation_windows", "trial_id"):
            if key in metrics:
                record[key] = metrics[key]
        records.append(record)
    return records


def _flat_params(cfg: SweepConfig) -> dict[str, str]:
    return {k: (",".join(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in asdict(cfg).items()}


# -- CLI -------------------------------------------------------------------------------------------

def _ints(option: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: expected comma-separated integers, found {text!r}") from None
    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--data-fractions: expected comma-separated numbers, found {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SweepConfig(data="", output="", widths=(1,), modality_counts=(2,))
    parser.add_argument("--data", required=True, help="the Parquet store (s2v ingest output; a path or a URI)")
    parser.add_argument("--output", required=True,
                        help="SWEEP_DIR for splits, Tune state, scaling.json/png: a local or shared-mount path")
    parser.add_argument("--widths", required=True, type=_ints("--widths"), help="encoder widths, e.g. 32,64,128")
    parser.add_argument("--modality-counts", required=True, type=_ints("--modality-counts"),
                        help="numbers of pretraining modalities, e.g. 2,3,5,9 (>= 2)")
    parser.add_argument("--depths", type=_ints("--depths"), default=(), help="backbone depths (default: the model's)")
    parser.add_argument("--data-fractions", type=_floats, default=defaults.data_fractions,
                        help="fractions of the training recordings, e.g. 0.25,1")
    parser.add_argument("--anchor", default=None,
                        help="modalities that start the nested order, e.g. eeg, or hr,ecg to score every trial "
                             "on that pair (default: a seeded order)")
    parser.add_argument("--model", default=defaults.model, help="named model size the widths override")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps per trial")
    parser.add_argument("--global-batch", type=int, default=defaults.global_batch, help="windows per step")
    parser.add_argument("--workers-per-trial", type=int, default=defaults.workers_per_trial,
                        help="Ray Train workers per trial (1 CPU each)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default=defaults.device,
                        help="trial workers' device (auto: GPUs when the cluster has one per worker)")
    parser.add_argument("--cpus-per-trial", type=float, default=defaults.cpus_per_trial,
                        help="CPUs of each trial's own process (launch + validation), besides its workers")
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                        help="trials at once (0: as many as fit)")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction,
                        help="share of subjects held out")
    parser.add_argument("--max-failures", type=int, default=defaults.max_failures, help="retries per trial")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --output")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")


def run(args: argparse.Namespace) -> int:
    cfg = SweepConfig(
        data=args.data, output=args.output, widths=args.widths, modality_counts=args.modality_counts,
        depths=args.depths, data_fractions=args.data_fractions,
        anchor=",".join(anchor_modalities(args.anchor)) or None,
        model=args.model, steps=args.steps, global_batch=args.global_batch,
        workers_per_trial=args.workers_per_trial, device=args.device, cpus_per_trial=args.cpus_per_trial,
        max_concurrent=args.max_concurrent, validation_fraction=args.validation_fraction,
        max_failures=args.max_failures, seed=args.seed,
    )
    import ray

    try:
        report = sweep(cfg, resume=args.resume, address=args.address, num_cpus=args.num_cpus)
    finally:
        if ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS")):
            ray.shutdown()
    fit = report.get("fit", {})
    summary = {"scaling_json": str(Path(cfg.output) / "scaling.json"), **report["counts"],
               "alpha": fit.get("params", {}).get("alpha"), "beta": fit.get("params", {}).get("beta"),
               "extrapolation_relative_error": report.get("extrapolation", {}).get("relative_error"),
               "fit_error": fit.get("error")}
    print(json.dumps(summary, indent=2))
    return 130 if report["interrupted"] else 0
