"""``s2v evaluate``: downstream evaluation of embeddings written by ``s2v embed``.

Usage::

    s2v evaluate --embeddings EMB --task staging --report out/REPORT.json [--folds 5]
    s2v evaluate --embeddings EMB --task outcome:ahi --report out/REPORT.json
    s2v evaluate --embeddings EMB --task site --report out/REPORT.json
    # staging extras that need the store and the encoder:
    s2v evaluate --embeddings EMB --task staging --report out/REPORT.json \\
        --data STORE --checkpoint CKPT --robustness [--scenarios only:eeg,wearable] \\
        --label-efficiency --peer yasa

Tasks
    ``staging``: a linear probe and a bi-GRU temporal head over the epoch
    embeddings of a window (W/N1/N2/N3/REM; macro-F1, Cohen's kappa,
    accuracy, per-class F1, confusion matrix) against a majority-class floor.
    ``outcome:COLUMN``: a per-night target from the store's ``outcomes`` map
    (or ``age``/``sex``); 0/1 targets -> AUROC/AUPRC, others -> MAE/R².
    Any task of the task table (:mod:`s2v_core.evaluation.tasks`) that a
    frozen probe scores, by its level and kind
    (:data:`pipelines.evaluate_config.SECTIONS`): ``staging4`` / ``staging3``
    (W/light/deep/REM, W/NREM/REM) as staging; ``age``, ``sex``, ``ahi`` and
    ``ahi:COLUMN`` as per-night outcomes. Survival tasks are fine-tuned only.
    ``site``: how well the site is predicted from the night and window
    embeddings (the DASH shortcut check), next to the staging macro-F1 of the
    same embeddings; ``--compare EMB2`` scores a second encoder's embeddings
    of the same store (DASH vs plain InfoNCE) with the same folds.
Protocol (stated in every report): by default **held-out** — probes fit on
the ``train`` and ``val`` subjects of the store's split (``s2v split``) and
every figure is measured on its ``test`` subjects, whom the encoder never
saw; evaluate refuses when the encoder was pretrained on the test subjects,
or when what pretrained it is unknown. ``--transductive`` scores anyway, with
subject-grouped k-fold cross-validation over every subject (mean ± sd over
folds), and the report says the encoder saw those subjects. Unknown stages
(-1) are neither trained on nor scored.

Staging options
    ``--robustness`` embeds the store once per modality scenario (``only:<m>``,
    ``without:<m>``, ``psg``, ``home_sleep_test``, ``wearable``,
    ``eeg_headband``) into ``REPORT_DIR/robustness/<scenario>/`` (reused when
    already there for the same encoder) and scores, with the same subjects on
    each side, two linear probes per scenario: one retrained on the scenario's
    embeddings, and the probe trained on the full embeddings applied unchanged
    to the scenario's (a sensor dropping out at inference), with the share of
    the full probe's kappa that survives; ``--label-efficiency`` trains the
    probe on 1 %, 10 % and 100 % of the training nights next to an encoder of
    the same configuration trained from scratch on the same labels;
    ``--peer yasa`` scores YASA's pretrained stager on the nights with EEG
    (those two in :mod:`pipelines.evaluate_baselines`).

Output: ``REPORT.json`` (every figure and the protocol that produced it),
PNG plots beside it, and an MLflow run with both as artifacts, tagged
``s2v.pretrain_run_id`` and nested under the pretraining run when that run is
known (``MLFLOW_TRACKING_URI``, else the pretraining run's store, else
``REPORT_DIR/mlflow.db``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.embed import embed
from pipelines.embed_config import EmbedConfig
from pipelines.evaluate_baselines import label_efficiency_section, yasa_peer_section
from pipelines.evaluate_config import EvaluateConfig, config_from_args, evaluation_task
from pipelines.runtime import mlflow_experiment
from s2v_core.embeddings import INFO_FILE, Embeddings, read_embeddings
from s2v_core.evaluation import plots
from s2v_core.evaluation.folds import Fold, grouped_folds, held_out_fold
from s2v_core.evaluation.metrics import staging_metrics, summarise
from s2v_core.evaluation.probes import (
    cross_validate_outcome,
    cross_validate_site,
    cross_validate_staging,
    fit_linear_stager,
    linear_staging_probe,
    majority_staging,
    predict_stages,
    temporal_staging_probe,
)
from s2v_core.evaluation.scenarios import robustness_scenarios
from s2v_core.evaluation.tasks import Task
from s2v_core.locations import absolute, redact
from s2v_core.splits import seen_splits
from s2v_core.store import STAGE_NAMES, UNKNOWN_STAGE, outcome_values

logger = logging.getLogger(__name__)

REPORT_FORMAT = 2
MLFLOW_EXPERIMENT = "sleep2vec-evaluate"


def evaluate(config: EvaluateConfig, *, address: str | None = None) -> dict:
    """Evaluate the embeddings of ``config`` on its task and write its report (JSON) with plots beside it.

    Parameters
    ----------
    config : EvaluateConfig
        The embeddings, the task (``"staging"``, ``"outcome:<column>"`` or
        ``"site"``), the report path and every option (see
        :class:`~pipelines.evaluate_config.EvaluateConfig`), validated.
    address : str, optional
        Ray cluster address for the robustness embeddings (default
        ``RAY_ADDRESS``, else a local instance).

    Returns
    -------
    dict
        The report, as written to ``config.report``.

    Raises
    ------
    ValueError
        The embeddings do not support the task, or the protocol refuses them
        (an encoder pretrained on the test subjects, or one whose training is unknown).
    """
    section, task = evaluation_task(config.task)
    emb = read_embeddings(config.embeddings)
    report_path = Path(config.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    protocol = check_protocol(
        emb, config.embeddings, transductive=config.transductive, folds=config.folds, seed=config.seed
    )
    result: dict = {
        "report_format": REPORT_FORMAT,
        "task": config.task,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "embeddings": {"path": redact(absolute(config.embeddings)), **emb.info},
        "protocol": protocol,
        "plots": [],
    }
    result.update(SECTION_SCORERS[section](emb, task, config, report_path.parent, result["plots"], address))
    result["mlflow"] = (
        _log_mlflow(result, report_path, emb.info, config.mlflow_parent_run_id) if config.log_to_mlflow else None
    )
    report_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", report_path)
    return result


def _staging_section(
    emb: Embeddings, task: Task, config: EvaluateConfig, out_dir: Path, plot_paths: list[str], address: str | None
) -> dict:
    """``staging`` (any grouping of the stages in the task table), with its staging-only extras."""
    _check_labels(emb, config.embeddings, task.name)
    if task.stage_map != tuple(range(len(STAGE_NAMES))):
        emb = dataclasses.replace(emb, stages=task.stage_targets(emb.stages))
    seed = config.seed
    window_folds = (
        grouped_folds(emb.subject_id, folds=config.folds, seed=seed)
        if config.transductive
        else [held_out_fold(emb.split)]
    )
    found = {"staging": _staging(emb, window_folds, config.heads, seed, out_dir, plot_paths, task.classes)}
    if config.label_efficiency_curve:
        found["label_efficiency"] = label_efficiency_section(
            emb, window_folds, config.data, config.checkpoint, seed, out_dir, plot_paths
        )
    if config.robustness:
        found["robustness"] = _robustness(
            emb, window_folds, config.data, config.checkpoint, config.scenarios, seed, out_dir, plot_paths, address
        )
    if config.peer:
        found["peer"] = {"yasa": yasa_peer_section(emb, window_folds, config.data, seed)}
    return found


def _outcome_section(
    emb: Embeddings, task: Task, config: EvaluateConfig, out_dir: Path, plot_paths: list[str], address: str | None
) -> dict:
    """``outcome``: a per-night target of the task table (0/1 -> AUROC/AUPRC, numeric -> MAE/R², from its values)."""
    column = task.columns[0]
    night_splits = None if config.transductive else np.asarray(emb.nights.column("split").to_pylist())
    return {
        "outcome": {
            "column": column,
            **cross_validate_outcome(
                emb.night,
                _night_target(emb, column, config.task),
                np.asarray(emb.nights.column("subject_id").to_pylist()),
                folds=config.folds,
                seed=config.seed,
                splits=night_splits,
            ),
        }
    }


def _site_section(
    emb: Embeddings, task: None, config: EvaluateConfig, out_dir: Path, plot_paths: list[str], address: str | None
) -> dict:
    """``site``: how well the site is predicted (the DASH shortcut check), optionally beside a second encoder's."""
    folds, seed, transductive = config.folds, config.seed, config.transductive
    found = {"site": _site(emb, folds, seed, transductive=transductive)}
    if config.compare:
        # Same folds and probes on a second encoder's embeddings of the same store
        # (e.g. plain InfoNCE next to DASH): the shortcut comparison on one line.
        other = read_embeddings(config.compare)
        check_protocol(other, config.compare, transductive=transductive, folds=folds, seed=seed)
        found["site_compare"] = {
            "embeddings": absolute(config.compare),
            "encoder_source": other.info.get("encoder_source"),
            **_site(other, folds, seed, transductive=transductive),
        }
    return found


#: Report section (see pipelines.evaluate_config.SECTIONS) -> what scores it. A new task of the
#: task table lands in one of these by its level and kind; nothing here names a task.
SECTION_SCORERS = {"staging": _staging_section, "outcome": _outcome_section, "site": _site_section}


def check_protocol(emb: Embeddings, path: str, *, transductive: bool, folds: int, seed: int) -> dict:
    """Who trained the encoder, who fits the probes, who is scored; refuse to score seen subjects.

    Raises ``ValueError`` (unless ``transductive``) when the encoder was
    pretrained on the store's test subjects, or when what pretrained it is
    unknown (an encoder saved before training records existed).
    """
    record = emb.info.get("encoder_training")
    seen = seen_splits(record, emb.info.get("store_splits") or {})
    same_store = record is not None and record.get("store_id") == (emb.info.get("store_splits") or {}).get("store_id")
    pretrained_on = (
        "unknown"
        if seen is None
        else f"the {'/'.join(seen)} subjects of this store"
        if seen
        else "no subject of this store"
        if same_store
        else "another store"
    )
    if transductive:
        return {
            "mode": "transductive",
            "encoder_pretrained_on": pretrained_on,
            "encoder_training": record,
            "probe_fitted_on": "the other folds' subjects",
            "scored": "every subject, out of fold",
            "folds": folds,
            "seed": seed,
            "grouping": "subject_id",
            "cv": "subject-grouped k-fold (GroupKFold / StratifiedGroupKFold, shuffled)",
            "summary": "mean and sd over test folds",
            "unknown_stage": "excluded",
            "caveat": "the encoder may have been pretrained on the scored subjects",
        }
    if seen is None:
        raise ValueError(
            f"--embeddings {path!r}: what pretrained the encoder is unknown (its directory has no "
            f"training record: saved before this version, or not by `s2v pretrain`), so its "
            f"test subjects cannot be called unseen; pass --transductive to score anyway"
        )
    if "test" in seen:
        raise ValueError(
            f"--embeddings {path!r}: the encoder was pretrained on the {'/'.join(seen)} subjects "
            f"of this store, test subjects included; scoring them would not measure transfer. "
            f"Pretrain with --train-splits train, or pass --transductive to score anyway"
        )
    counts = {name: int(len(np.unique(emb.subject_id[emb.split == name]))) for name in ("train", "val", "test")}
    return {
        "mode": "held-out",
        "encoder_pretrained_on": pretrained_on,
        "encoder_training": record,
        "probe_fitted_on": f"train and val subjects ({counts['train']} + {counts['val']})",
        "early_stopping_on": "val subjects",
        "scored": f"test subjects ({counts['test']}), never seen by the encoder or the probes",
        "subjects": counts,
        "seed": seed,
        "unknown_stage": "excluded",
        "summary": "one held-out fold: mean is the test figure, sd 0",
    }


def _check_labels(emb: Embeddings, path: str, task: str = "staging") -> None:
    if not (emb.stages != UNKNOWN_STAGE).any():
        raise ValueError(
            f"--task {task}: the embeddings {path!r} carry no sleep stage labels "
            "(every stage is -1); the store was ingested without hypnograms"
        )


def _staging(
    emb: Embeddings,
    folds: list[Fold],
    heads: Sequence[str],
    seed: int,
    out_dir: Path,
    plot_paths: list[str],
    class_names: Sequence[str] = STAGE_NAMES,
) -> dict:
    stages = emb.stages
    scored = stages[stages != UNKNOWN_STAGE]
    section = {
        "n_windows": int(len(stages)),
        "n_epochs_scored": int(scored.size),
        "n_subjects": int(len(np.unique(emb.subject_id))),
        "n_nights": int(len(np.unique(emb.night_id))),
        "class_counts": {name: int((scored == i).sum()) for i, name in enumerate(class_names)},
        "majority": majority_staging(stages, folds, class_names=class_names),
        "heads": {
            "linear": "StandardScaler + LogisticRegression per epoch",
            "temporal": "1-layer bi-GRU (hidden 32) over the window's epochs, Adam 300 steps",
        },
    }
    probes = {
        "linear": lambda: linear_staging_probe(emb.epoch, stages, seed=seed),
        "temporal": lambda: temporal_staging_probe(emb.epoch, stages, seed=seed, n_classes=len(class_names)),
    }
    for head in heads:
        logger.info("staging: %s head on %d folds", head, len(folds))
        outcome = cross_validate_staging(probes[head](), stages, folds, class_names=class_names)
        predictions = outcome.pop("predictions")
        section[head] = outcome
        plot_paths.append(
            str(
                plots.plot_confusion(
                    outcome["pooled"]["confusion"],
                    out_dir / f"confusion_{head}.png",
                    title=f"Sleep staging, {head} head (out-of-fold)",
                    class_names=class_names,
                )
            )
        )
        if head == heads[0]:
            night = _longest_night(emb, np.concatenate([fold.test for fold in folds]))
            rows = np.flatnonzero(emb.night_id == night)
            plot_paths.append(
                str(
                    plots.plot_hypnogram(
                        stages[rows].ravel(),
                        predictions[rows].ravel(),
                        out_dir / "hypnogram.png",
                        title=f"{night}: true vs {head} head (out-of-fold)",
                        class_names=class_names,
                    )
                )
            )
    return section


def _longest_night(emb: Embeddings, scored: np.ndarray) -> str:
    nights, counts = np.unique(emb.night_id[scored], return_counts=True)
    return str(nights[np.argmax(counts)])


def _night_target(emb: Embeddings, column: str, task: str) -> np.ndarray:
    nights = emb.nights
    if column in ("age", "sex"):
        values = nights.column(column).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64)
    values = outcome_values(nights, column)
    if np.isnan(values).all():
        available = sorted({k for entry in nights.column("outcomes").to_pylist() if entry for k, _ in entry})
        raise ValueError(
            f"--task {task}: no night has outcome {column!r}; available: {', '.join(['age', 'sex', *available])}"
        )
    return values


def _site(emb: Embeddings, folds: int, seed: int, *, transductive: bool) -> dict:
    night_subjects = np.asarray(emb.nights.column("subject_id").to_pylist())
    night_sites = np.asarray(emb.nights.column("site").to_pylist())
    night_splits = None if transductive else np.asarray(emb.nights.column("split").to_pylist())
    section = {
        "night": cross_validate_site(
            emb.night, night_sites, night_subjects, folds=folds, seed=seed, splits=night_splits
        ),
        "window": cross_validate_site(
            emb.window, emb.site, emb.subject_id, folds=folds, seed=seed, splits=None if transductive else emb.split
        ),
        "claim": "lower site predictability at equal staging quality means fewer site shortcuts",
    }
    if (emb.stages != UNKNOWN_STAGE).any():
        window_folds = (
            grouped_folds(emb.subject_id, folds=folds, seed=seed) if transductive else [held_out_fold(emb.split)]
        )
        staging = cross_validate_staging(
            linear_staging_probe(emb.epoch, emb.stages, seed=seed), emb.stages, window_folds
        )
        section["staging_linear"] = staging["summary"]
    return section


def _scenario_folds(emb: Embeddings, scenario: Embeddings, folds: list[Fold]) -> list[Fold]:
    """The folds of ``emb`` carried over to another embedding of the same windows, subject by subject."""
    side = np.full(len(emb.subject_id), "", dtype=object)
    result = []
    for fold in folds:
        side[:] = ""
        side[fold.train] = "train"
        side[fold.test] = "test"
        of_subject = dict(zip(emb.subject_id, side))
        if set(scenario.subject_id) - set(of_subject):
            raise ValueError("scenario embeddings hold subjects absent from --embeddings; embed the same store")
        assigned = np.array([of_subject[s] for s in scenario.subject_id])
        rows = np.arange(len(assigned))
        val = None
        if fold.val is not None:
            val_subjects = set(emb.subject_id[fold.val])
            val = rows[np.isin(scenario.subject_id, list(val_subjects))]
        result.append(Fold(train=rows[assigned == "train"], test=rows[assigned == "test"], val=val))
    return result


def _full_probe_on_subset(
    emb: Embeddings, scenario: Embeddings, folds: list[Fold], scenario_folds: list[Fold], seed: int
) -> dict:
    """The probe trained on the full embeddings, applied unchanged to the scenario's test windows."""
    per_fold = []
    for fold, scenario_fold in zip(folds, scenario_folds):
        model = fit_linear_stager(emb.epoch, emb.stages, fold.train, seed=seed)
        rows = scenario_fold.test
        if len(rows) == 0 or not (scenario.stages[rows] != UNKNOWN_STAGE).any():
            continue
        metrics = staging_metrics(scenario.stages[rows], predict_stages(model, scenario.epoch[rows]))
        metrics.pop("confusion")
        per_fold.append(metrics)
    return summarise(per_fold) if per_fold else {}


def _robustness(
    emb: Embeddings,
    folds: list[Fold],
    data: str,
    checkpoint: str,
    names: Sequence[str] | None,
    seed: int,
    out_dir: Path,
    plot_paths: list[str],
    address: str | None,
) -> dict:
    import ray

    from pipelines.runtime import init_ray

    chosen = robustness_scenarios(emb.info["modalities"], names=names)
    started_ray = not ray.is_initialized()
    matrix, full_probe, windows = {}, {}, {}
    full_kappa = cross_validate_staging(linear_staging_probe(emb.epoch, emb.stages, seed=seed), emb.stages, folds)[
        "summary"
    ]["kappa"]["mean"]
    try:
        for name, subset in chosen.items():
            path = out_dir / "robustness" / name.replace(":", "_")
            if not _reusable(path, subset, checkpoint, emb.info.get("features", "hidden")):
                init_ray(address)
                try:
                    embed(
                        EmbedConfig(
                            checkpoint=checkpoint,
                            data=data,
                            output=str(path),
                            modalities=list(subset),
                            features=emb.info.get("features", "hidden"),
                        ),
                        address=address,
                    )
                except ValueError as exc:  # no window holds this subset: a gap in the matrix, not a crash
                    logger.warning("robustness scenario %s skipped: %s", name, exc)
                    continue
            scenario = read_embeddings(path)
            scenario_folds = _scenario_folds(emb, scenario, folds)
            if any(len(f.test) == 0 or len(f.train) == 0 for f in scenario_folds):
                logger.warning("robustness scenario %s skipped: a fold has no windows", name)
                continue
            logger.info("robustness: scoring %s (%s)", name, ",".join(subset))
            outcome = cross_validate_staging(
                linear_staging_probe(scenario.epoch, scenario.stages, seed=seed), scenario.stages, scenario_folds
            )
            matrix[name] = {metric: outcome["summary"][metric]["mean"] for metric in ("macro_f1", "kappa", "accuracy")}
            matrix[name].update({f"{metric}_sd": outcome["summary"][metric]["sd"] for metric in ("macro_f1", "kappa")})
            unchanged = _full_probe_on_subset(emb, scenario, folds, scenario_folds, seed)
            if unchanged:
                kappa = unchanged["kappa"]["mean"]
                full_probe[name] = {
                    "macro_f1": unchanged["macro_f1"]["mean"],
                    "kappa": kappa,
                    "accuracy": unchanged["accuracy"]["mean"],
                    # kappa's chance level is 0: the share of the full probe's margin kept.
                    "kappa_margin_kept": kappa / full_kappa if full_kappa > 0 else float("nan"),
                }
            windows[name] = int(len(scenario.stages))
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    if matrix:
        plot_paths.append(str(plots.plot_robustness(matrix, out_dir / "robustness.png")))
    return {
        "head": "linear",
        "scenarios": {n: list(s) for n, s in chosen.items()},
        "matrix": matrix,
        "full_probe_kappa": full_kappa,
        "matrix_full_probe": full_probe,
        "matrix_note": "matrix: a probe retrained on each scenario's embeddings; matrix_full_probe: the probe "
        "trained on the full embeddings applied unchanged (a sensor lost at inference)",
        "n_windows": windows,
        "embeddings_dir": str(out_dir / "robustness"),
    }


def _reusable(path: Path, subset: Sequence[str], checkpoint: str, features: str) -> bool:
    info_path = path / INFO_FILE
    if not info_path.is_file():
        return False
    info = json.loads(info_path.read_text(encoding="utf-8"))
    source = str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else checkpoint
    return (
        info.get("modalities") == list(subset)
        and info.get("encoder_source") == redact(source)
        and info.get("features") == features
    )


def _log_mlflow(result: dict, report_path: Path, info: dict, parent_run_id: str | None) -> dict:
    import os

    from mlflow.tracking import MlflowClient

    from pipelines.runtime import mlflow_tracking_uri

    uri = (
        os.environ.get("MLFLOW_TRACKING_URI")
        or info.get("pretrain_tracking_uri")
        or mlflow_tracking_uri(report_path.parent)
    )
    client = MlflowClient(tracking_uri=uri)
    pretrain_run_id = info.get("pretrain_run_id")
    link = parent_run_id or pretrain_run_id
    experiment_id = None
    if link:
        try:
            experiment_id = client.get_run(link).info.experiment_id
        except Exception as exc:  # MlflowException: the run is not in this tracking store
            if parent_run_id:
                raise ValueError(f"--mlflow-parent-run-id {parent_run_id!r}: no such run at {uri}") from exc
            logger.warning("pretraining run %s not found at %s; logging an unlinked run", link, uri)
            link = None
    if experiment_id is None:
        experiment_id = mlflow_experiment(client, uri, MLFLOW_EXPERIMENT)
    tags = {"s2v.task": result["task"], "s2v.embeddings": result["embeddings"]["path"]}
    if pretrain_run_id:
        tags["s2v.pretrain_run_id"] = pretrain_run_id
    if link:
        tags["mlflow.parentRunId"] = link
    run = client.create_run(experiment_id, tags=tags, run_name=f"evaluate-{result['task'].replace(':', '-')}")
    run_id = run.info.run_id
    client.log_param(run_id, "protocol", result["protocol"]["mode"])
    client.log_param(run_id, "folds", result["protocol"].get("folds", 1))
    client.log_param(run_id, "seed", result["protocol"]["seed"])
    for name, value in _flat_metrics(result):
        client.log_metric(run_id, name, value)
    logged = {"tracking_uri": redact(uri), "run_id": run_id, "parent_run_id": link, "pretrain_run_id": pretrain_run_id}
    report_path.write_text(json.dumps({**result, "mlflow": logged}, indent=2) + "\n", encoding="utf-8")
    client.log_artifact(run_id, str(report_path))
    for path in result["plots"]:
        client.log_artifact(run_id, path, artifact_path="plots")
    client.set_terminated(run_id, "FINISHED")
    # No mlflow.set_tracking_uri here: MLflow 3 exports it as MLFLOW_TRACKING_URI,
    # and every later run in this process (a pretraining run, another test)
    # would silently log into this store instead of its own.
    return logged


def _flat_metrics(node, prefix: str = ""):
    """``(name, value)`` for every fold mean/sd in the report (MLflow metric names)."""
    if isinstance(node, dict):
        if "mean" in node and isinstance(node["mean"], (int, float)):
            yield prefix, float(node["mean"])
            yield f"{prefix}.sd", float(node.get("sd", 0.0))
            return
        for key, value in node.items():
            if key in ("per_fold", "embeddings", "protocol", "plots"):
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            if key == "matrix" and isinstance(value, dict):
                for scenario, metrics in value.items():
                    for metric, number in metrics.items():
                        yield f"{name}.{scenario.replace(':', '_')}.{metric}", float(number)
                continue
            yield from _flat_metrics(value, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", required=True, help="embeddings directory written by `s2v embed` (a path or a URI)"
    )
    parser.add_argument(
        "--task",
        required=True,
        help="staging | outcome:COLUMN (e.g. outcome:ahi) | site, or another task of the table: "
        "staging4, staging3, age, sex, ahi, ahi:COLUMN",
    )
    parser.add_argument("--report", required=True, help="REPORT.json to write; plots go beside it")
    parser.add_argument(
        "--folds", type=int, default=5, help="subject-grouped CV folds of --transductive scoring (default 5)"
    )
    parser.add_argument(
        "--transductive",
        action="store_true",
        help="score every subject by k-fold CV, including subjects the encoder was pretrained "
        "on (the report says so); default: fit on train/val subjects, score test subjects",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and probes (default 0)")
    parser.add_argument("--heads", default="linear,temporal", help="staging heads (default linear,temporal)")
    parser.add_argument(
        "--data", default=None, help="store, a path or a URI (for --robustness, --label-efficiency, --peer)"
    )
    parser.add_argument("--checkpoint", default=None, help="encoder (for --robustness, --label-efficiency)")
    parser.add_argument("--robustness", action="store_true", help="add the any-subset robustness matrix")
    parser.add_argument(
        "--scenarios",
        default=None,
        help="comma-separated robustness scenarios, e.g. only:eeg,without:ecg,wearable "
        "(default: every single modality, all-but-one and device scenario)",
    )
    parser.add_argument(
        "--label-efficiency",
        action="store_true",
        help="add the 1/10/100%% label-efficiency curve against a from-scratch encoder",
    )
    parser.add_argument("--peer", default=None, choices=["yasa"], help="add a reference peer (YASA staging)")
    parser.add_argument(
        "--compare", default=None, help="site task: a second embeddings dir of the same store to score side by side"
    )
    parser.add_argument("--mlflow-parent-run-id", default=None, help="MLflow run to nest under")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--address", default=None, help="Ray cluster address for --robustness embeddings")


def run(args: argparse.Namespace) -> int:
    result = evaluate(config_from_args(args), address=args.address)
    print(json.dumps({"report": args.report, "task": result["task"], "mlflow": result["mlflow"]}))
    return 0
