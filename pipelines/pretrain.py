"""``s2v pretrain``: DASH-InfoNCE pretraining with Ray Train + DeepSpeed over the store.

Launch::

    s2v pretrain --data STORE --output RUN_DIR --workers 2 --model tiny --steps 30
    s2v pretrain --data STORE --output RUN_DIR --resume          # continue the latest checkpoint
    ray job submit -- s2v pretrain --data s3://… --output s3://… --workers 8 --model base

The entry point reads ``main(cfg)`` → :func:`setup` (validate inputs, resolve
the config against the store, prepare the run dir and the MLflow run; no
worker has started yet) → :func:`run` (a ``TorchTrainer`` over
:func:`pipelines.train_loop.train_loop_per_worker`) → :func:`cleanup` (log the
final encoder to MLflow, shut down what we started). The options are in
:mod:`pipelines.pretrain_cli`, the MLflow side in :mod:`pipelines.pretrain_mlflow`.

DeepSpeed on CPU workers: the optimiser is ``torch.optim.AdamW`` (so DeepSpeed's
CPU/fused Adam ops are never compiled), bf16 is off and the process group is
gloo. DeepSpeed's one remaining CPU op, ``deepspeed_shm_comm`` (a shared-memory
inference all-reduce that training never calls), is marked incompatible so it
is not JIT-compiled: nothing is built on a fresh machine.
On GPUs the backend is NCCL and ``precision=auto`` selects bf16.

Run dir layout::

    RUN_DIR/pretrain_config.json   the resolved config (modalities filled in from the store)
    RUN_DIR/ds_config.json         the DeepSpeed config generated from it
    RUN_DIR/checkpoints/step_*/    Ray Train checkpoints (see pipelines.checkpoints)
    RUN_DIR/encoder/               the final encoder (s2v_core.model.save_encoder)
    RUN_DIR/mlflow_run.json        MLflow tracking URI and run id (a resumed run continues it)
    RUN_DIR/mlflow.db              the default MLflow store (unless MLFLOW_TRACKING_URI is set)
    RUN_DIR/mlartifacts/           its artifacts (pipelines.runtime.mlflow_experiment: never $CWD/mlruns)

``--data`` and ``--output`` are local paths or URIs (``s3://…``, ``gs://…``):
the store is read and the run dir written through ``pyarrow.fs``, and Ray
Train writes the checkpoints to the run dir's filesystem. A run dir at a URI
cannot hold ``mlflow.db`` (SQLite needs a local file), so it needs
``MLFLOW_TRACKING_URI``; without it the run stops before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipelines.checkpoints import data_position, incomplete_checkpoints, latest_checkpoint, read_state
from pipelines.pretrain_mlflow import log_final_model, start_mlflow_run
from pipelines.runtime import (
    check_mlflow_store,
    local_directory,
    replace_directory,
    write_text,
)
from pipelines.train_config import (
    PretrainConfig,
    config_differences,
    config_from_dict,
    config_to_dict,
    deepspeed_config,
)
from pipelines.train_data import StoreSummary, build_dataset, check_batch_fits, inspect_store, store_repeats
from s2v_core.locations import absolute, join, redact, redact_values, resolve
from s2v_core.modalities import parse_modalities
from s2v_core.model import ModelConfig
from s2v_core.run_layout import (
    CHECKPOINT_STATE_FILE,
    CHECKPOINTS_NAME,
    DS_CONFIG_FILE,
    ENCODER_DIR,
    PRETRAIN_CONFIG_FILE,
    checkpoints_location,
    final_encoder_location,
)
from s2v_core.splits import record_use, split_record
from s2v_core.store import split_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRun:
    """A validated run, ready to start workers (what :func:`setup` returns).

    ``config`` is resolved: its ``modalities`` are explicit. ``run_dir`` and
    ``resume_from`` are locations: absolute local paths, or URIs as given.
    """

    config: PretrainConfig
    store: StoreSummary
    run_dir: str
    on_gpu: bool
    ds_config: dict[str, Any]
    model_config: ModelConfig
    resume_from: str | None
    store_repeats: int = 1
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    #: Store files of the held-out ``val`` subjects scored during the run (empty: no validation).
    validation_files: tuple[str, ...] = ()
    #: Which store and subjects train the encoder (written beside every saved encoder).
    training_record: dict[str, Any] | None = None


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` returns.

    Attributes
    ----------
    run_dir : str
        The run dir: an absolute local path, or the URI ``--output`` gave.
    checkpoint : str
        The final checkpoint (``RUN_DIR/checkpoints/step_<steps>``).
    encoder_dir : str
        ``RUN_DIR/encoder``: the final encoder, loadable with
        :func:`pipelines.model_io.load_trained_encoder` (and, when local,
        ``s2v_core.model.load_encoder``).
    mlflow_run_id : str or None
    steps : int
        Optimiser steps done (equals ``config.steps``).
    final_loss : float
        DASH-InfoNCE loss of the last step, averaged over workers.
    metrics : dict
        The last reported metrics.
    """

    run_dir: str
    checkpoint: str
    encoder_dir: str
    mlflow_run_id: str | None
    steps: int
    final_loss: float
    metrics: dict[str, float]


# -- setup ------------------------------------------------------------------------------------------
def setup(config: PretrainConfig, *, resume: bool = False, on_gpu: bool = False) -> PreparedRun:
    """Validate everything that can be checked before a worker starts; write the run's config files.

    Raises ``ValueError`` naming the option for: a store without Parquet
    (``--data``), another schema version (``--data``), a modality absent from
    the store (``--modalities``), a batch larger than the data
    (``--global-batch``), and an existing run dir whose latest checkpoint was
    written with a different config (``--resume``) or without ``--resume``
    (``--output``).
    """
    if not config.data:
        raise ValueError("--data: expected the store directory, found nothing")
    if not config.output:
        raise ValueError("--output: expected a run directory, found nothing")
    modalities = parse_modalities(list(config.modalities), option="--modalities") if config.modalities else ()
    summary = inspect_store(config.data, modalities, splits=config.train_splits)
    check_batch_fits(summary, global_batch=config.global_batch, workers=config.workers)
    validation_files: tuple[str, ...] = ()
    if "val" in config.train_splits:
        logger.warning("--train-splits includes val: no held-out validation during this run")
    else:
        validation_files = tuple(split_files(config.data, ["val"])[0])
        if not validation_files:
            logger.warning("the store %s has no val subject: no held-out validation during this run", config.data)
    resolved = dataclasses.replace(config, modalities=summary.modalities)
    model_cfg = resolved.model_config(epochs_per_window=summary.epochs_per_window)

    run_dir = absolute(config.output)
    resume_from, resume_state = _check_resume(run_dir, resolved, resume=resume)
    if resume_state is not None:
        # The recorded pass layout, so that the checkpoint's data position means the same.
        repeats = data_position(resume_state).store_repeats
    else:
        repeats = store_repeats(
            summary.usable_windows, steps=resolved.steps, windows_per_step=resolved.global_batch * resolved.grad_accum
        )
    ds_config = deepspeed_config(resolved, on_gpu=on_gpu)
    # Run files never hold credentials of a URI (--data s3://KEY:SECRET@...): data/output are not compared on resume.
    write_text(
        join(run_dir, PRETRAIN_CONFIG_FILE), json.dumps(redact_values(config_to_dict(resolved)), indent=2) + "\n"
    )
    write_text(join(run_dir, DS_CONFIG_FILE), json.dumps(ds_config, indent=2) + "\n")
    record = {**split_record(config.data, config.train_splits), "store": absolute(config.data)}
    return PreparedRun(
        config=resolved,
        store=summary,
        run_dir=run_dir,
        on_gpu=on_gpu,
        ds_config=ds_config,
        model_config=model_cfg,
        resume_from=resume_from,
        store_repeats=repeats,
        validation_files=validation_files,
        training_record=record,
    )


def _check_resume(run_dir: str, config: PretrainConfig, *, resume: bool) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its state (``None, None`` for a fresh start)."""
    checkpoints = checkpoints_location(run_dir)
    filesystem, path = resolve(checkpoints)
    has_history = bool(filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    if not resume:
        if has_history:
            raise ValueError(
                f"--output: expected a new run directory, found checkpoints in {checkpoints}; "
                "pass --resume to continue that run or choose another --output"
            )
        return None, None
    latest = latest_checkpoint(run_dir)
    for skipped, problems in incomplete_checkpoints(run_dir):
        if latest is None or skipped > latest:  # step_<NNNNNNNN>: names sort by step
            logger.warning(
                "--resume: skipping %s, an incomplete checkpoint (%s); resuming from %s",
                posixpath.basename(resolve(skipped)[1]),
                "; ".join(problems),
                posixpath.basename(resolve(latest)[1]) if latest else "step 0",
            )
    if latest is None:
        logger.info("--resume: no complete checkpoint in %s yet; starting from step 0", redact(run_dir))
        return None, None
    name = posixpath.basename(resolve(latest)[1])
    state = read_state(latest)
    previous = config_from_dict(state["config"], source=join(latest, CHECKPOINT_STATE_FILE))
    differences = config_differences(previous, config)
    if differences:
        listed = "; ".join(
            f"{k}: checkpoint has {old!r}, this run has {new!r}" for k, (old, new) in sorted(differences.items())
        )
        raise ValueError(
            f"--resume: expected the config of the run in {run_dir} "
            f"(checkpoint {name}), found different values: {listed}"
        )
    logger.info("resuming %s from %s (step %d)", run_dir, name, state["step"])
    return latest, state


def with_gpu_workers(prepared: PreparedRun) -> PreparedRun:
    """The prepared run with GPU workers: its DeepSpeed config (bf16) rewritten, nothing re-read."""
    ds_config = deepspeed_config(prepared.config, on_gpu=True)
    write_text(join(prepared.run_dir, DS_CONFIG_FILE), json.dumps(ds_config, indent=2) + "\n")
    return dataclasses.replace(prepared, on_gpu=True, ds_config=ds_config)


def detect_gpu(config: PretrainConfig) -> bool:
    """Whether workers get a GPU: ``device=gpu``, or ``auto`` and the Ray cluster has enough GPUs."""
    import ray

    if config.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.device == "gpu" and gpus < config.workers:
        raise ValueError(f"--device gpu: expected {config.workers} GPUs in the Ray cluster, found {gpus:g}")
    return gpus >= config.workers


# -- run --------------------------------------------------------------------------------------------
def loop_config(prepared: PreparedRun) -> dict[str, Any]:
    """The ``train_loop_config`` of the ``TorchTrainer``: one :class:`LoopConfig` under ``"loop"``."""
    from pipelines.train_loop import LoopConfig

    mlflow = None
    if prepared.mlflow_run_id is not None:
        mlflow = {"tracking_uri": prepared.mlflow_tracking_uri, "run_id": prepared.mlflow_run_id}
    return {
        "loop": LoopConfig(
            pretrain=prepared.config,
            model=prepared.model_config,
            modalities=tuple(prepared.config.modalities),
            epochs_per_window=prepared.store.epochs_per_window,
            ds_config=prepared.ds_config,
            run_dir=prepared.run_dir,
            store_repeats=prepared.store_repeats,
            resume_from=prepared.resume_from,
            mlflow=mlflow,
            validation_files=tuple(prepared.validation_files),
            validation_filesystem=prepared.store.filesystem,
            training_record=prepared.training_record,
        )
    }


def build_trainer(
    prepared: PreparedRun,
    *,
    callbacks: Sequence[Any] = (),
    storage_path: str | None = None,
    name: str = CHECKPOINTS_NAME,
):
    """The ``TorchTrainer`` of a prepared run (Ray must be initialised).

    The sweep wraps this: pass ``callbacks`` (e.g. Tune's
    ``TuneReportCallback``) to forward the per-step metrics (``loss``,
    ``step``, ``negatives_per_anchor``, ``windows_per_s``, ``lr``, …).
    Checkpoints go to ``storage_path/name`` (default ``RUN_DIR/checkpoints``), a
    path or a URI: Ray Train gets its filesystem explicitly, so URI options
    such as ``endpoint_override`` hold for every checkpoint upload.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_loop import train_loop_per_worker

    config = prepared.config
    resources = {"CPU": 1, "GPU": 1} if prepared.on_gpu else {"CPU": 1}
    storage_filesystem, storage = resolve(storage_path or prepared.run_dir)
    dataset = build_dataset(
        prepared.store.files,
        filesystem=prepared.store.filesystem,
        modalities=config.modalities,
        history_columns=config.history_columns,
        seed=config.seed,
        repeats=prepared.store_repeats,
        nights_per_block=config.nights_per_block,
        readers=config.workers * config.readers_per_worker,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(prepared),
        torch_config=TorchConfig(backend="nccl" if prepared.on_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=prepared.on_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ordered_ingest(DataConfig)),
    )


def _ordered_ingest(data_config: type) -> Any:
    """Ray Train's ingest options with ``preserve_order``: every pass is the same stream.

    The split hands each worker blocks in a fixed order (without it, blocks
    arrive as reads finish and the splitter follows locality hints), so a
    resumed run that skips the batches it already trained on skips exactly
    those, and resuming gives the uninterrupted run's weights.
    """
    options = data_config.default_ingest_options()
    options.preserve_order = True
    return options


def pretrain(
    config: PretrainConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    mlflow: bool = True,
    callbacks: Sequence[Any] = (),
) -> PretrainResult:
    """Pretrain the encoder; the Python API behind ``s2v pretrain``.

    Parameters
    ----------
    config : PretrainConfig
    resume : bool
        Continue from the latest checkpoint in ``config.output`` (its config
        must match); without it an existing run dir with checkpoints is an error.
    address : str, optional
        Ray cluster to use (else ``RAY_ADDRESS``, else a local instance).
    mlflow : bool
        Log to MLflow (params, per-step metrics from rank 0, configs, final model).
    callbacks : sequence
        Ray Train callbacks, e.g. Tune's ``TuneReportCallback()`` when a sweep
        trial calls this function (Ray is then already initialised and stays up).
    """
    import ray

    from pipelines.runtime import init_ray

    if mlflow:  # a run dir at a URI needs MLFLOW_TRACKING_URI: say so before anything is written
        check_mlflow_store(config.output, option="--output")
    prepared = setup(config, resume=resume)  # input errors surface before Ray starts
    if prepared.resume_from is not None and read_state(prepared.resume_from)["step"] >= config.steps:
        logger.info("%s already reached %d steps; nothing to train", prepared.run_dir, config.steps)
        return cleanup(prepared, prepared.resume_from, log_model=False)
    started_ray = not ray.is_initialized()
    cpus = os.cpu_count() or 1
    if started_ray and not (address or os.environ.get("RAY_ADDRESS")) and config.workers > cpus:
        # A local instance with fewer CPUs than workers would wait forever for
        # the worker group; oversubscribe the cores instead, and say so.
        logger.warning("--workers %d on a %d-core machine: workers will share cores", config.workers, cpus)
        cpus = config.workers
    init_ray(address, num_cpus=cpus)
    try:
        if detect_gpu(config):
            prepared = with_gpu_workers(prepared)  # bf16 DeepSpeed config; the store is not read again
        if mlflow:
            prepared = start_mlflow_run(prepared)
        _record_split_use(prepared)
        result = build_trainer(prepared, callbacks=callbacks).fit()
        if result.error is not None:
            raise result.error
        # Ray names the checkpoint by its path on the run dir's filesystem (no URI scheme).
        return cleanup(prepared, join(prepared.run_dir, CHECKPOINTS_NAME, posixpath.basename(result.checkpoint.path)))
    finally:
        if started_ray:
            ray.shutdown()


def _record_split_use(prepared: PreparedRun) -> None:
    """Add the run to the store's ``used_by`` (so ``s2v split --reassign`` can refuse); best effort."""
    try:
        record_use(prepared.config.data, prepared.run_dir)
    except OSError as exc:  # a read-only shared store: the run still knows its splits
        logger.warning(
            "could not record this run in %s's splits.json (%s); `s2v split --reassign` "
            "will not know that this run used the current assignment",
            prepared.config.data,
            exc,
        )


# -- cleanup ----------------------------------------------------------------------------------------
def cleanup(prepared: PreparedRun, checkpoint: str | os.PathLike, *, log_model: bool = True) -> PretrainResult:
    """Copy the final checkpoint's encoder to ``RUN_DIR/encoder``, log it to MLflow, summarise the run.

    ``checkpoint`` is a location (a path or a URI) in the run dir.
    """
    checkpoint = str(checkpoint)
    state = read_state(checkpoint)
    encoder_dir = final_encoder_location(prepared.run_dir)
    replace_directory(join(checkpoint, ENCODER_DIR), encoder_dir)
    metrics = {k: float(v) for k, v in state["metrics"].items()}
    if prepared.mlflow_run_id is not None and log_model:
        with local_directory(encoder_dir) as local_encoder:
            log_final_model(prepared, local_encoder, metrics)
    return PretrainResult(
        run_dir=prepared.run_dir,
        checkpoint=checkpoint,
        encoder_dir=encoder_dir,
        mlflow_run_id=prepared.mlflow_run_id,
        steps=int(state["step"]),
        final_loss=metrics.get("loss", math.nan),
        metrics=metrics,
    )
