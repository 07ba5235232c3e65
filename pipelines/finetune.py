"""``s2v finetune``: a pretrained encoder → a task model, trained on train, stopped on val, scored on test.

Launch::

    s2v finetune --checkpoint PRETRAIN_RUN_DIR --data STORE --output RUN_DIR --task staging --mode lora
    s2v finetune --checkpoint ENCODER_DIR --data STORE --output RUN_DIR --task ahi --mode frozen --head mlp
    s2v finetune … --task events                  # epoch-level respiratory-event detector (+ AHI from events)
    s2v finetune … --labelled-windows 128         # few-shot: 128 random train windows carry labels
    s2v finetune … --resume                       # continue the latest checkpoint in RUN_DIR
    s2v finetune … --workers 2 --deepspeed --zero-stage 2   # inside a DeepSpeed engine (ZeRO), as s2v pretrain
    s2v finetune … --task staging --night-context # + a whole-night transformer over stage 1's epoch features

``--night-context`` (epoch-level classification tasks: staging, staging4,
staging3) adds a second stage after the Ray Train run, in this process: the
best model's epoch features of every train/val/test night
(:func:`pipelines.finetune_data.read_night_features`), a
:class:`s2v_core.night_context.NightContextHead` trained on the train nights
(``--night-steps``, one night a step) and early-stopped on the val nights,
kept in ``RUN_DIR/model/night_head.pt`` (``s2v stage`` uses it). The report
gives the test figures of stage 1 alone (``test``) and of both stages
(``night_context.test``). A finished run resumed with ``--night-context``
trains only what is missing: stage 1 is not retrained, and a night head
already trained on the same stage-1 model with the same ``--night-steps``
and ``--seed`` is kept (only scored again).

``main`` → :func:`setup` (validate the options, load the encoder, check the
protocol: the encoder must not have been pretrained on the store's test
subjects unless ``--transductive``; write the config) → :func:`run` (a Ray
Train ``TorchTrainer`` over :func:`pipelines.finetune_loop.finetune_loop_per_worker`)
→ :func:`cleanup` (copy the best checkpoint's model to ``RUN_DIR/model``,
score it on the test subjects next to a baseline fitted on train, log to MLflow).
Beside it: :mod:`pipelines.finetune_cli` (the options), :mod:`pipelines.finetune_checks`
(protocol, ``--resume``), :mod:`pipelines.finetune_deepspeed`, :mod:`pipelines.finetune_night`
(stage 2), :mod:`pipelines.finetune_data` (windows, baseline, AHI from events) and
:mod:`pipelines.finetune_loop` (the workers).

The encoder comes from a pretraining run dir, a checkpoint, an encoder
directory or an MLflow run (see :mod:`pipelines.model_io`); a run dir's
``encoder/`` already holds the EMA weights when the run kept an EMA.

Run dir layout (a local directory)::

    RUN_DIR/finetune_config.json   the resolved config
    RUN_DIR/pretrained_encoder/    the encoder fine-tuning started from (what the workers load)
    RUN_DIR/checkpoints/step_*/    state.json, training.pt (model + optimiser), best/ (best model so far);
                                   with --deepspeed engine/ (every rank's DeepSpeed state) instead of training.pt
    RUN_DIR/ds_config.json         with --deepspeed: the DeepSpeed config the workers used
    RUN_DIR/model/                 the fine-tuned model (s2v_core.finetuning.load_finetuned; `s2v stage --model`)
    RUN_DIR/report.json            test figures, baseline, protocol
    RUN_DIR/mlflow_run.json        the MLflow run (nested under the pretraining run when it is found)

By default the workers are plain data-parallel (DDP) processes: the trainable
part of a task model is small (a head, LoRA adapters), and full fine-tuning
of the encoder sizes this project trains fits them. ``--deepspeed`` trains
inside a DeepSpeed engine instead, as ``s2v pretrain`` does (shared code in
:mod:`pipelines.deepspeed_engine`; gloo on CPU workers, nothing compiled),
for an encoder whose optimiser state or weights want ZeRO partitioning:
``--zero-stage`` 0-3, by default 2 on GPU workers and 0 on CPU ones. It is
the same AdamW at the same constant learning rates, in float32 and without
clipping, so both ways train the same model; frozen weights stay out of the
optimiser and unchanged. Checkpoints hold every rank's engine state, and
``RUN_DIR/model`` is written the same way whichever trained it, so ``s2v
stage``, ``--night-context`` and the report read it unchanged. A resumed
``--deepspeed`` run keeps its ZeRO stage (and its ``--workers`` at stages 1-3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.deepspeed_engine import zero_stage_of
from pipelines.finetune_checks import check_protocol, check_resume, check_same_run
from pipelines.finetune_deepspeed import check_deepspeed, with_deepspeed
from pipelines.finetune_night import check_night_context, night_context_stage, previous_night_head
from pipelines.runtime import mlflow_experiment, mlflow_tracking_uri
from s2v_core.config import to_mapping
from s2v_core.finetuning import (
    EVENT_THRESHOLD_FROM_KEY,
    EVENT_THRESHOLD_KEY,
    EVENTS_PER_EPOCH_KEY,
    LORA_TARGETS,
    FinetuneSpec,
    load_finetuned,
    save_finetuned,
)
from s2v_core.locations import redact
from s2v_core.modalities import parse_modalities
from s2v_core.run_layout import (
    CHECKPOINTS_NAME,
    DS_CONFIG_FILE,
    FINETUNE_STATE_FILE,
    MLFLOW_RUN_FILE,
    NIGHT_HEAD_FILE,
    PRETRAINED_ENCODER_DIR,
)
from s2v_core.run_layout import FINETUNE_CONFIG_FILE as CONFIG_FILE
from s2v_core.run_layout import FINETUNE_REPORT_FILE as REPORT_FILE
from s2v_core.run_layout import FINETUNED_MODEL_DIR as MODEL_DIR

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "sleep2vec-finetune"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``s2v finetune`` needs (the task model's own fields mirror :class:`FinetuneSpec`)."""

    checkpoint: str = ""  # pretrained run dir, checkpoint, encoder dir or MLflow run (pipelines.model_io)
    data: str = ""  # store written by `s2v ingest`, with splits.json
    output: str = ""  # local run directory
    task: str = "staging"  # s2v_core.evaluation.tasks name
    mode: str = "frozen"  # frozen | lora | full
    head: str = "linear"  # linear | mlp | temporal
    head_hidden: int = 64  # mlp hidden width / temporal feed-forward width
    head_depth: int = 1  # temporal head blocks
    head_dropout: float = 0.1  # dropout in the mlp / temporal head
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (updates scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_targets: tuple[str, ...] = LORA_TARGETS  # backbone projections that get adapters
    train_tokenizers: bool = False  # tokenizers frozen by default
    modality_dropout: float = 0.0  # P(drop a present modality) per window in training, never all
    modalities: tuple[str, ...] = ()  # empty: the encoder's modalities that the store holds
    # Few-shot protocol: train on this many store windows drawn (by seed) from the train subjects'
    # usable windows; 0: all of them. Validation and test stay whole.
    labelled_windows: int = 0
    steps: int = 200  # optimiser steps at most (early stopping may end sooner)
    batch_size: int = 32  # windows per optimiser step over all workers
    workers: int = 1  # Ray Train workers (data parallel)
    lr: float = 1e-3  # AdamW learning rate of what trains in the encoder (adapters; every weight in full mode, which may want 1e-4)
    head_lr: float | None = None  # AdamW learning rate of the gated fusion and the head; None: lr
    weight_decay: float = 0.01  # AdamW weight decay
    eval_every: int = 50  # steps between validations on the val subjects
    patience: int = 5  # validations without a gain before stopping
    checkpoint_every: int = 50  # steps between checkpoints (and always at the end)
    seed: int = 0  # weights of the head, data order, modality dropout
    transductive: bool = False  # allow an encoder pretrained on the test subjects (or of unknown origin)
    device: str = "auto"  # auto (a GPU per worker when the Ray cluster has them) | cpu | gpu
    # Train inside a DeepSpeed engine (ZeRO) instead of plain data-parallel workers; the same
    # AdamW, learning rates and saved model either way.
    deepspeed: bool = False
    # With --deepspeed: ZeRO stage 0-3; None = 2 on GPU workers, 0 on CPU ones (as s2v pretrain).
    zero_stage: int | None = None
    # Stage 2 (epoch-level classification tasks): a transformer over each whole night's stage-1 epoch features.
    night_context: bool = False
    night_steps: int = 300  # stage-2 steps at most (one train night each; early stopping on val nights)

    def spec(self) -> FinetuneSpec:
        names = {f.name for f in dataclasses.fields(FinetuneSpec)}
        return FinetuneSpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass(frozen=True)
class PreparedFinetune:
    config: FinetuneConfig
    spec: FinetuneSpec
    run_dir: Path
    encoder_dir: str
    epochs_per_window: int
    train_files: tuple[str, ...]
    train_windows: int
    val_files: tuple[str, ...]
    test_files: tuple[str, ...]
    filesystem: Any
    protocol: dict
    pretrain_run: dict | None
    resume_from: str | None
    mlflow: dict | None = None
    on_gpu: bool = False
    train_window_keys: tuple[str, ...] | None = None  # --labelled-windows: the windows training sees
    ds_config: dict | None = None  # --deepspeed: the DeepSpeed config for the workers' device


# -- setup ------------------------------------------------------------------------------------------
def setup(config: FinetuneConfig, *, resume: bool = False) -> PreparedFinetune:
    """Validate options, store, encoder and protocol before any worker starts; write the config.

    Raises ``ValueError`` naming the option for a missing ``--data``/``--output``/``--checkpoint``,
    a store without train or test subjects, an encoder without the store's modalities, windows
    longer than the encoder reads, an encoder pretrained on the test subjects (without
    ``--transductive``) and an existing run dir without ``--resume``.
    """
    from pipelines.finetune_data import choose_windows, labelled_nights, usable_windows
    from pipelines.model_io import load_encoder_spec, training_record
    from pipelines.train_data import inspect_store
    from s2v_core.locations import is_uri
    from s2v_core.model import save_encoder
    from s2v_core.splits import split_record
    from s2v_core.store import split_files

    for option, value in (("--checkpoint", config.checkpoint), ("--data", config.data), ("--output", config.output)):
        if not value:
            raise ValueError(f"{option}: expected a value, found nothing")
    if is_uri(config.output):
        raise ValueError(
            f"--output {redact(config.output)}: s2v finetune writes a local run directory; "
            "copy it to object storage afterwards"
        )
    for name in ("steps", "batch_size", "workers", "eval_every", "patience", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, found {getattr(config, name)}")
    for name in ("lr", "head_lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a learning rate > 0, found {value}")
    check_night_context(config)
    check_deepspeed(config)
    if config.labelled_windows < 0:
        raise ValueError(f"--labelled-windows: expected an integer >= 0 (0: all), found {config.labelled_windows}")
    if config.device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"--device: expected auto, cpu or gpu, found {config.device!r}")
    if config.batch_size % config.workers:
        raise ValueError(f"--batch-size: expected a multiple of --workers {config.workers}, found {config.batch_size}")
    encoder, pretrain_run = load_encoder_spec(config.checkpoint)
    summary = inspect_store(config.data, (), splits=("train",))
    wanted = config.modalities or tuple(k for k in encoder.modalities if k in summary.modalities)
    if not wanted:
        raise ValueError(
            f"--modalities: the encoder reads {', '.join(encoder.modalities)} and the store's train "
            f"subjects have {', '.join(summary.modalities)}: nothing in common"
        )
    missing = [m for m in wanted if m not in encoder.modalities or m not in summary.modalities]
    if missing:
        raise ValueError(
            f"--modalities: expected modalities of both the encoder ({', '.join(encoder.modalities)}) "
            f"and the store's train subjects ({', '.join(summary.modalities)}), found "
            f"{', '.join(missing)}"
        )
    summary = inspect_store(config.data, wanted, splits=("train",))  # usable windows: those with these modalities
    spec = dataclasses.replace(
        config.spec(),
        modalities=tuple(parse_modalities(list(wanted), option="--modalities")),
        epochs_per_window=summary.epochs_per_window,
    )
    # Store windows longer than the encoder's are encoded in chunks (FineTunedModel.features).
    task = spec.task_definition
    train_files = labelled_nights(summary.files, summary.filesystem, task)  # event tasks: nights with events
    if not train_files:
        raise ValueError(
            f"--task {task.name}: expected train nights with scored events (NSRR XML hypnograms), "
            f"found none among {len(summary.files)}"
        )
    train_windows, window_keys = summary.usable_windows, None
    if task.event_bits or config.labelled_windows:
        keys = usable_windows(train_files, summary.filesystem, spec.modalities)
        if config.labelled_windows:
            keys = window_keys = tuple(choose_windows(keys, config.labelled_windows, seed=config.seed))
        train_windows = len(keys)
    if train_windows < config.batch_size:
        raise ValueError(
            f"--batch-size: expected at most {train_windows} (the train subjects' labelled windows), "
            f"found {config.batch_size}"
        )
    test_files, filesystem = split_files(config.data, ["test"])
    val_files, _ = split_files(config.data, ["val"])
    test_files = labelled_nights(test_files, filesystem, task)
    val_files = labelled_nights(val_files, filesystem, task)
    if not test_files:
        raise ValueError(
            f"--data: the store {config.data} has no test subject to report on"
            f"{' with scored events' if task.event_bits else ''}; see `s2v split`"
        )
    if not val_files:
        logger.warning("the store %s has no val subject: no early stopping, the last step is kept", config.data)
    protocol = check_protocol(
        training_record(config.checkpoint),
        split_record(config.data, ["train"]),
        transductive=config.transductive,
        checkpoint=config.checkpoint,
    )
    run_dir = Path(config.output).resolve()
    resume_from = check_resume(run_dir, resume=resume)
    resolved = dataclasses.replace(config, modalities=spec.modalities)
    if resume_from is not None:
        check_same_run(run_dir / CONFIG_FILE, resolved)
    kept_head = run_dir / MODEL_DIR / NIGHT_HEAD_FILE
    if resume and not config.night_context and kept_head.is_file():
        # Resuming rebuilds RUN_DIR/model; without --night-context the trained night head would be dropped.
        raise ValueError(
            f"--resume: the run in {run_dir} has a whole-night head ({kept_head}); pass --night-context to keep "
            "it (it is reused while stage 1 is unchanged) or remove the file to go back to stage 1 alone"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # The workers read the pretrained weights from the run dir, whatever form --checkpoint had (an MLflow run …).
    encoder_dir = str(save_encoder(encoder, run_dir / PRETRAINED_ENCODER_DIR))
    (run_dir / CONFIG_FILE).write_text(json.dumps(to_mapping(resolved), indent=2) + "\n", encoding="utf-8")
    return PreparedFinetune(
        config=resolved,
        spec=spec,
        run_dir=run_dir,
        encoder_dir=encoder_dir,
        epochs_per_window=summary.epochs_per_window,
        train_files=tuple(train_files),
        train_windows=train_windows,
        val_files=tuple(val_files),
        test_files=tuple(test_files),
        filesystem=filesystem,
        protocol=protocol,
        pretrain_run=pretrain_run,
        resume_from=resume_from,
        train_window_keys=window_keys,
    )


# -- MLflow -----------------------------------------------------------------------------------------
def start_mlflow_run(prepared: PreparedFinetune) -> PreparedFinetune:
    """Create (or continue) the run, nested under the pretraining run when its store is this one."""
    from mlflow.tracking import MlflowClient

    record = prepared.run_dir / MLFLOW_RUN_FILE
    if record.is_file():
        logged = json.loads(record.read_text(encoding="utf-8"))
        return dataclasses.replace(
            prepared, mlflow={"tracking_uri": logged["tracking_uri_local"], "run_id": logged["run_id"]}
        )
    pretrain = prepared.pretrain_run or {}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or pretrain.get("tracking_uri") or mlflow_tracking_uri(prepared.run_dir)
    client = MlflowClient(tracking_uri=uri)
    parent = pretrain.get("run_id")
    experiment_id = None
    if parent:
        try:
            experiment_id = client.get_run(parent).info.experiment_id
        except Exception:  # MlflowException: the pretraining run lives in another store
            logger.warning("pretraining run %s not found at %s; logging an unlinked run", parent, redact(uri))
            parent = None
    if experiment_id is None:
        experiment_id = mlflow_experiment(client, uri, MLFLOW_EXPERIMENT)
    tags = {"s2v.command": "finetune", "s2v.task": prepared.spec.task, "s2v.mode": prepared.spec.mode}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=f"finetune-{prepared.spec.task}-{prepared.spec.mode}", tags=tags)
    params = to_mapping(prepared.config)
    if prepared.ds_config is not None:
        params["zero_stage"] = zero_stage_of(prepared.ds_config)  # the stage used (the default resolved)
        client.log_dict(run.info.run_id, prepared.ds_config, DS_CONFIG_FILE)
    for key, value in params.items():
        client.log_param(
            run.info.run_id,
            key,
            redact(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))[:6000],
        )
    record.write_text(
        json.dumps(
            {
                "tracking_uri": redact(uri),
                "tracking_uri_local": uri,
                "run_id": run.info.run_id,
                "parent_run_id": parent,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return dataclasses.replace(prepared, mlflow={"tracking_uri": uri, "run_id": run.info.run_id})


# -- run --------------------------------------------------------------------------------------------
def loop_config(prepared: PreparedFinetune) -> dict[str, Any]:
    """The ``train_loop_config``: everything the worker loop reads."""
    return {
        "finetune": to_mapping(prepared.config),
        "spec": to_mapping(prepared.spec),
        "encoder_dir": prepared.encoder_dir,
        "epochs_per_window": prepared.epochs_per_window,
        "run_dir": str(prepared.run_dir),
        "resume_from": prepared.resume_from,
        "mlflow": prepared.mlflow,
        "validation": {"files": list(prepared.val_files), "filesystem": prepared.filesystem},
        "ds_config": prepared.ds_config,
    }


def build_trainer(prepared: PreparedFinetune):
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.finetune_loop import finetune_loop_per_worker
    from pipelines.train_data import build_dataset, store_repeats

    config, spec = prepared.config, prepared.spec
    dataset = build_dataset(
        prepared.train_files,
        filesystem=prepared.filesystem,
        modalities=spec.modalities,
        history_columns=spec.task_definition.outcome_columns,
        seed=config.seed,
        repeats=store_repeats(prepared.train_windows, windows_per_step=config.batch_size, steps=config.steps),
        readers=config.workers,
        extra_columns=spec.task_definition.store_columns,
        windows=prepared.train_window_keys,
    )
    return TorchTrainer(
        finetune_loop_per_worker,
        train_loop_config=loop_config(prepared),
        torch_config=TorchConfig(backend="nccl" if prepared.on_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=prepared.on_gpu,
            resources_per_worker={"CPU": 1, "GPU": 1} if prepared.on_gpu else {"CPU": 1},
        ),
        run_config=RunConfig(
            name=CHECKPOINTS_NAME, storage_path=str(prepared.run_dir), checkpoint_config=CheckpointConfig(num_to_keep=2)
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def finetune(config: FinetuneConfig, *, resume: bool = False, address: str | None = None, mlflow: bool = True) -> dict:
    """Fine-tune, then score on the test subjects; the Python API behind ``s2v finetune``.

    Returns the report (also written to ``RUN_DIR/report.json``): test figures of
    the model and of a baseline fitted on the train subjects, the protocol, steps,
    early stopping and the model directory.
    """
    import ray

    from pipelines.runtime import init_ray

    prepared = setup(config, resume=resume)
    if prepared.resume_from is not None:
        done = json.loads((Path(prepared.resume_from) / "state.json").read_text(encoding="utf-8"))
        if done["step"] >= config.steps or done["stopped_early"]:
            logger.info(
                "%s already finished (step %d%s); nothing to train",
                prepared.run_dir,
                done["step"],
                ", stopped early" if done["stopped_early"] else "",
            )
            return cleanup(start_mlflow_run(prepared) if mlflow else prepared, Path(prepared.resume_from))
    started_ray = not ray.is_initialized()
    init_ray(address, num_cpus=max(os.cpu_count() or 1, config.workers + 1))
    try:
        prepared = with_deepspeed(dataclasses.replace(prepared, on_gpu=detect_gpu(config)))
        if mlflow:
            prepared = start_mlflow_run(prepared)
        result = build_trainer(prepared).fit()
        if result.error is not None:
            raise result.error
        return cleanup(prepared, Path(result.checkpoint.path))
    finally:
        if started_ray:
            ray.shutdown()


def detect_gpu(config: FinetuneConfig) -> bool:
    """Whether workers get a GPU: ``--device gpu``, or ``auto`` and the Ray cluster has one per worker."""
    import ray

    if config.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.device == "gpu" and gpus < config.workers:
        raise ValueError(f"--device gpu: expected {config.workers} GPUs in the Ray cluster, found {gpus:g}")
    return gpus >= config.workers


# -- cleanup ----------------------------------------------------------------------------------------
def cleanup(prepared: PreparedFinetune, checkpoint: Path) -> dict:
    """Copy the best model to ``RUN_DIR/model``, score it on test next to the baseline, log to MLflow."""
    from pipelines.finetune_data import baseline_predictions, event_ahi_report
    from pipelines.finetune_loop import BEST_DIR, read_store_batches
    from s2v_core.finetuning import predict

    state = json.loads((checkpoint / FINETUNE_STATE_FILE).read_text(encoding="utf-8"))
    model_dir = prepared.run_dir / MODEL_DIR
    kept_head = previous_night_head(prepared, model_dir, state)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(checkpoint / BEST_DIR, model_dir)
    model = load_finetuned(model_dir)
    task = model.task
    batches = read_store_batches(
        list(prepared.test_files),
        prepared.filesystem,
        spec=prepared.spec,
        epochs_per_window=prepared.epochs_per_window,
        batch_size=prepared.config.batch_size,
    )
    target, output = predict(model, batches)
    test = task.metrics(target, output)
    baseline = task.metrics(target, baseline_predictions(prepared, target))
    event_ahi = event_ahi_report(
        model,
        prepared.test_files,
        prepared.filesystem,
        spec=prepared.spec,
        epochs_per_window=prepared.epochs_per_window,
        val_files=prepared.val_files,
    )
    report = {
        "task": task.name,
        "mode": prepared.spec.mode,
        "head": prepared.spec.head,
        "modalities": list(prepared.spec.modalities),
        "protocol": prepared.protocol,
        "steps": state["step"],
        "best_step": state["best_step"],
        "stopped_early": state["stopped_early"],
        "val": {task.primary[0]: state["best_score"]},
        "train_windows": prepared.train_windows,
        "test": test,
        "baseline": baseline,
        "model": str(model_dir),
    }
    if event_ahi is not None:
        report["ahi_from_events"] = event_ahi
    # The model directory describes itself: its test figures (and an event detector's threshold,
    # which `s2v stage --events-model` applies) travel with it.
    extra = {"test": {k: v for k, v in test.items() if k != "confusion"}, "trained_steps": state["step"]}
    if event_ahi is not None:
        extra[EVENT_THRESHOLD_KEY] = event_ahi["threshold"]
        extra[EVENT_THRESHOLD_FROM_KEY] = event_ahi["threshold_from"]
        extra[EVENTS_PER_EPOCH_KEY] = event_ahi["events_per_epoch"]
    save_finetuned(model, model_dir, extra=extra)
    night = None
    if prepared.config.night_context:
        night = night_context_stage(prepared, model, model_dir, state, test, kept_head)
        report["night_context"] = night
    if prepared.mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=prepared.mlflow["tracking_uri"])
        run_id = prepared.mlflow["run_id"]
        detected = (event_ahi or {}).get("detected") or {}
        night_test = (night or {}).get("test") or {}
        for prefix, figures in (
            ("test", test),
            ("baseline", baseline),
            ("test/ahi_from_events", detected),
            ("night_context/test", night_test),
        ):
            for key, value in figures.items():
                if isinstance(value, (int, float)) and value is not None and np.isfinite(value):
                    client.log_metric(run_id, f"{prefix}/{key}", float(value))
        client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_DIR)
        report["mlflow"] = {
            "tracking_uri": redact(prepared.mlflow["tracking_uri"]),
            "run_id": run_id,
            "parent_run_id": (prepared.pretrain_run or {}).get("run_id"),
        }
    (prepared.run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if prepared.mlflow:
        client.log_artifact(run_id, str(prepared.run_dir / REPORT_FILE))
        client.set_terminated(run_id, "FINISHED")
    return report
