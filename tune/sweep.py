"""``s2v sweep``: a Ray Tune sweep over model size x modality count, with a pre-registered forecast.

    s2v sweep --data STORE --widths 16,24,32,48,64 --modality-counts 2,3,4,5 --output SWEEP_DIR \\
              [--depths 1,2,2,3,4] [--subsets-per-count 3] [--seeds 3] [--scoring-pairs eeg-ecg] \\
              [--objective paper] [--steps 30] [--lr 1e-3] [--lr-multipliers 0.5,1,2] [--resume]

setup
    Validate the options against the store (its modalities and its
    ``splits.json``), plan one trial per size x count x subset x seed
    (:mod:`tune.plan`: what is held fixed and what varies), and open the
    parent MLflow run under which every trial and seed is a nested run named
    after it (``w64-d4-m5-k1-s2``).
run
    Phase ``main``: every trial except those at the largest width or the
    largest count (each axis is held out when at least 3 smaller values
    remain; ``--no-preregister`` runs everything in one phase). Then the law
    is selected and fitted on the main phase only (so the forecast of the
    largest N is also fitted without the largest M, and vice versa; the
    corner cell is forecast along both axes, and has no no-scaling
    forecast), and its forecast for the held-out points is written to
    ``SWEEP_DIR/predictions.json`` (with the time it was written) *before*
    phase ``held_out`` runs them. Each phase is its own Tune experiment
    (``SWEEP_DIR/tune-main``, ``tune-held_out``); failed trials are retried
    once, then recorded with their error; ``--resume`` restores the
    experiments, keeps finished trials and seeds, and never rewrites an
    existing forecast.
cleanup
    ``scaling.json`` and ``scaling.png`` (:mod:`tune.scaling`): every
    candidate law with AIC/BIC/CV, the selected one with bootstrap
    intervals, the verdict per law in words, and the forecast scored against
    the held-out trials next to the no-scaling forecast; logged to the parent run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipelines.runtime import mlflow_experiment
from s2v_core.locations import redact
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.run_layout import PREDICTIONS_FILE, SWEEP_STATE_FILE
from s2v_core.store import open_store
from tune.plan import PHASES, SweepConfig, held_out_axes, plan_trials
from tune.scaling import finite, json_default, write_report

logger = logging.getLogger(__name__)

#: MLflow experiment of the sweep runs.
EXPERIMENT = "s2v-sweep"
#: The figure the law is fitted and forecast on (held-out contrastive loss at the scoring pairs, test subjects).
LOSS_KEY = "test_loss"


def tune_name(phase: str) -> str:
    """Sub-directory of SWEEP_DIR holding the Tune experiment of ``phase``."""
    return f"tune-{phase}"


def store_modalities(store: str | Path) -> tuple[str, ...]:
    """Modalities present in at least one window of ``store`` (registry order)."""
    dataset = open_store(store)
    seen = np.zeros(len(MODALITY_KEYS), dtype=bool)
    for batch in dataset.to_batches(columns=["present"]):
        flags = batch.column("present").flatten().to_numpy(zero_copy_only=False)
        seen |= flags.reshape(-1, len(MODALITY_KEYS)).any(axis=0)
    return tuple(k for k, s in zip(MODALITY_KEYS, seen) if s)


def check_store(cfg: SweepConfig) -> tuple[tuple[str, ...], int]:
    """The store's modalities and epochs per window; its splits must hold train, val and test subjects."""
    from s2v_core.store import schema_info, split_files

    for split in ("train", "val", "test"):
        files, _ = split_files(cfg.data, [split])  # MissingSplitsError names `s2v split`
        if not files:
            raise ValueError(
                f"--data: the store {cfg.data} has no {split!r} subject in its splits.json; a sweep "
                "trains on train, chooses on val and reports on test (s2v split --data STORE)"
            )
    return store_modalities(cfg.data), schema_info(open_store(cfg.data).schema)[1]


# -- the pre-registered forecast -----------------------------------------------------------------------


def write_predictions(
    output: Path, records: list[dict], trials: list[dict], *, axes: dict[str, bool], bootstrap: int, seed: int
) -> dict:
    """Fit on the finished ``main`` trials and write the forecast of every ``held_out`` cell.

    One forecast per held-out axis: ``n`` (the largest N at every count) and
    ``m`` (the largest count at every size). Written atomically with
    ``written_at`` (UNIX seconds and ISO time) before any held-out trial
    starts; a forecast the main points cannot support is recorded as
    ``{"error": ...}``.
    """
    from s2v_core.scaling import held_out_forecast

    points = [r for r in records if r.get("status") == "finished" and finite(r.get(LOSS_KEY))]
    held = [t for t in trials if t["phase"] == "held_out"]
    n_max = max((t["n_params"] for t in held), default=None)
    m_max = max((t["modality_count"] for t in held), default=None)
    forecasts = {}
    for axis, enabled in axes.items():
        cells = sorted(
            {
                (t["n_params"], t["modality_count"])
                for t in held
                if (t["n_params"] == n_max if axis == "n" else t["modality_count"] == m_max)
            }
        )
        if not enabled or not cells:
            continue
        try:
            forecasts[axis] = held_out_forecast(
                [p[LOSS_KEY] for p in points],
                n_params=[p["n_params"] for p in points],
                modality_counts=[p["modality_count"] for p in points],
                targets_n=[c[0] for c in cells],
                targets_m=[c[1] for c in cells],
                axis=axis,
                groups=np.column_stack([[p["seed"] for p in points], [p["subset"] for p in points]]),
                bootstrap=bootstrap,
                seed=seed,
            )
        except ValueError as error:
            forecasts[axis] = {"axis": axis, "error": str(error)}
    now = time.time()
    content = {
        "written_at": now,
        "written_at_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "metric": LOSS_KEY,
        "fitted_on": sorted(p["key"] for p in points),
        "held_out": sorted(t["key"] for t in held),
        "forecasts": forecasts,
    }
    path = output / PREDICTIONS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=2, default=json_default) + "\n")
    os.replace(temporary, path)
    logger.info("forecast of %d held-out trial(s) written to %s", len(held), path)
    return content


# -- run ---------------------------------------------------------------------------------------------


def sweep(cfg: SweepConfig, *, resume: bool = False, address: str | None = None, num_cpus: int | None = None) -> dict:
    """Run (or resume) the sweep described by ``cfg`` and return the scaling report.

    Parameters
    ----------
    cfg : SweepConfig
        The grid, budgets and resources (see :mod:`tune.plan`).
    resume : bool
        Restore the Tune experiments under ``cfg.output``; finished trials
        and seeds are kept, unfinished and errored ones run again.
    address : str, optional
        Ray cluster to join (else ``RAY_ADDRESS``, else a local instance).
    num_cpus : int, optional
        CPUs of a local Ray instance (default: all cores).

    Returns
    -------
    dict
        The content of ``SWEEP_DIR/scaling.json``, plus ``interrupted`` (true
        when a phase stopped before every trial ended; resume with ``resume=True``).
    """
    import mlflow

    from pipelines.runtime import init_ray, mlflow_tracking_uri

    output = Path(cfg.output).resolve()
    state_path = output / SWEEP_STATE_FILE
    if resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} does not exist; no sweep was started in {output}")
    if not resume and any((output / tune_name(p)).exists() for p in PHASES):
        raise ValueError(
            f"--output: {output} already holds a sweep; pass --resume to continue it or choose another directory"
        )
    available, epochs_per_window = check_store(cfg)
    trials, summary = plan_trials(cfg, available=available)
    summary["tokens_per_trial"] = cfg.steps * cfg.global_batch * epochs_per_window * 2
    summary["compute"] = (
        f"{cfg.steps} steps x {cfg.global_batch} windows x {epochs_per_window} epochs x 2 "
        f"modalities (one pair per step) = {summary['tokens_per_trial']} epoch tokens per "
        f"trial and learning rate; lr = {cfg.lr:g} x {cfg.lr_base_width} / width (muP-style) x "
        f"each of {list(cfg.lr_multipliers)}, best on val"
    )
    output.mkdir(parents=True, exist_ok=True)
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
        state = {"config": asdict(cfg), "parent_run_id": parent_id, "plan": summary}
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    settings = {
        "output": str(output),
        "data": cfg.data,
        "model": cfg.model,
        "objective": cfg.objective,
        "ema": cfg.ema,
        "steps": cfg.steps,
        "global_batch": cfg.global_batch,
        "workers": cfg.workers_per_trial,
        "device": cfg.device,
        "lr_multipliers": list(cfg.lr_multipliers),
        "score_windows": cfg.score_windows,
        "probe_windows": cfg.probe_windows,
        "validation_batch": cfg.validation_batch,
        "score_seed": cfg.seed,
        "mlflow": {"tracking_uri": tracking_uri, "parent_run_id": parent_id, "experiment": EXPERIMENT},
    }
    init_ray(address, num_cpus=num_cpus)
    records: list[dict] = []
    predictions = None
    interrupted = False
    for phase in PHASES:
        planned = [t for t in trials if t["phase"] == phase]
        if not planned:
            continue
        if phase == "held_out":
            path = output / PREDICTIONS_FILE
            # A forecast is written once: a resumed sweep keeps the one made before the held-out runs.
            predictions = (
                json.loads(path.read_text())
                if path.is_file()
                else write_predictions(
                    output, records, trials, axes=held_out_axes(cfg), bootstrap=cfg.bootstrap, seed=cfg.seed
                )
            )
        phase_records = run_phase(
            cfg, phase, planned, settings, resume=resume, tracking_uri=tracking_uri, parent_id=parent_id
        )
        records += phase_records
        if any(r["status"] == "unfinished" for r in phase_records):
            interrupted = True
            break  # held-out trials never start before the main phase has finished and the forecast exists
    ran = {r["key"] for r in records}
    records += [{**t, "status": "unfinished"} for t in trials if t["key"] not in ran]
    report = write_report(
        output,
        records,
        plan=summary,
        predictions=predictions,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        mlflow_run_id=parent_id,
        tracking_uri=tracking_uri,
    )
    # Trials Tune stopped mid-way (interrupt) leave their child run open; a
    # resumed trial gets a new one, so close these as KILLED.
    experiment_id = client.get_run(parent_id).info.experiment_id
    for child in client.search_runs(
        [experiment_id], filter_string=(f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")
    ):
        client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED" if interrupted else "FINISHED")
    if interrupted:
        logger.warning(
            "sweep interrupted with %d unfinished trial(s); continue with --resume",
            sum(r["status"] == "unfinished" for r in records),
        )
    return {**report, "interrupted": interrupted}


def run_phase(
    cfg: SweepConfig,
    phase: str,
    planned: list[dict],
    settings: dict,
    *,
    resume: bool,
    tracking_uri: str,
    parent_id: str,
) -> list[dict]:
    """Run (or restore and finish) the Tune experiment of one phase; one record per planned trial."""
    from ray import tune

    from tune.trial import SweepMLflowCallback, run_trial

    output = Path(settings["output"])
    experiment_path = output / tune_name(phase)
    # The trial process launches its TorchTrainer(s), waits, then scores; the
    # Train workers ask for their own CPUs (or GPUs).
    trainable = tune.with_resources(run_trial, {"cpu": cfg.cpus_per_trial})
    if resume and tune.Tuner.can_restore(str(experiment_path)):
        # The run config (callbacks, failure config) comes back from Tune's saved state.
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        callbacks = [
            SweepMLflowCallback(
                tracking_uri=tracking_uri,
                experiment_name=EXPERIMENT,
                tags={"mlflow.parentRunId": parent_id, "s2v.kind": "sweep-trial", "s2v.phase": phase},
            )
        ]
        run_config = tune.RunConfig(
            name=tune_name(phase),
            storage_path=str(output),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=1,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(planned, settings),
            run_config=run_config,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=cfg.max_concurrent or default_concurrency(cfg),
                trial_dirname_creator=lambda t: t.config["trial"]["key"],
            ),
        )
    return collect_records(tuner.fit(), planned)


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
        raise ValueError(
            f"--device gpu: a trial's {cfg.workers_per_trial} workers need as many GPUs; the cluster has {gpus:g}"
        )
    # GPU workers hold 1 CPU each too (s2v pretrain's resources_per_worker).
    per_trial = cfg.cpus_per_trial + cfg.workers_per_trial
    if per_trial > total:
        raise ValueError(
            f"--workers-per-trial {cfg.workers_per_trial} (1 CPU each) plus --cpus-per-trial "
            f"{cfg.cpus_per_trial:g} needs {per_trial:g} CPUs; the cluster has {total:g}"
        )
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
        record = dict(trial)
        result = by_key.get(trial["key"])
        metrics = (result.metrics or {}) if result is not None else {}
        if result is not None and result.error is not None:
            record.update(status="failed", error=f"{type(result.error).__name__}: {result.error}"[-2000:])
        elif LOSS_KEY in metrics:
            record["status"] = "finished"
        else:
            record["status"] = "unfinished"
        for key in (
            "val_loss",
            "test_loss",
            "staging_macro_f1",
            "downstream_error",
            "lr_chosen",
            "train_loss",
            "train_seconds",
            "steps",
            "val_windows",
            "test_windows",
            "trial_id",
        ):
            if key in metrics:
                record[key] = metrics[key]
        records.append(record)
    return records


def _flat_params(cfg: SweepConfig) -> dict[str, str]:
    return {k: (",".join(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in asdict(cfg).items()}
