"""The pretraining run config and the DeepSpeed config generated from it.

``PretrainConfig`` is the one source of truth of a pretraining run: the CLI
and ``--config FILE`` (TOML/YAML/JSON) map onto it, the driver resolves it
against the store (modalities, window length), and everything else is derived
from the resolved config — the model config, the DeepSpeed config (saved as
``RUN_DIR/ds_config.json`` and logged to MLflow), the Ray Train worker count
and the checkpoint description.

Launch::

    s2v pretrain --data STORE --output RUN_DIR --workers 2 --model tiny --steps 30
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipelines.deepspeed_engine import engine_config, resolve_zero_stage
from s2v_core.architecture import ModelConfig, resolve_model_config
from s2v_core.config import from_mapping, load_mapping, to_mapping
from s2v_core.objective import Objective, ObjectivePreset, load_objective

#: Fields that describe where/how a run executes, not what it computes: they
#: may differ between a run and its ``--resume`` (e.g. more failures allowed).
RUNTIME_FIELDS = frozenset(
    {
        "data",
        "output",
        "max_failures",
        "fail_at_step",
        "mlflow_experiment",
        "log_every",
        "report_every",
        "progress_seconds",
        "readers_per_worker",
        "validate_every",
        "validation_epochs",
    }
)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on (see ``s2v pretrain --help``)."""

    data: str = ""  # the Parquet store (``s2v ingest --output``); required
    output: str = ""  # the run dir: checkpoints/, ds_config.json, mlflow.db, final encoder; required
    workers: int = 2  # Ray Train workers (one process each, 1 CPU or 1 GPU)
    model: str = "tiny"  # named size from s2v_core/configs/model/<name>.toml
    # Objective preset (s2v_core/configs/objective/<name>.toml) or a preset file: the
    # loss, pairing, masking and architecture choices; its [training] table gives the
    # defaults of the optimiser fields below, which a --config file or flags override.
    objective: str = "project"
    width: int | None = None  # override of the model width d (None keeps the named size's)
    depth: int | None = None  # override of the backbone depth (None keeps the named size's)
    modalities: tuple[str, ...] = ()  # modalities to train on; () = every modality the store holds
    # Subject splits (STORE/splits.json) whose nights pretraining learns on. The
    # default keeps val and test subjects unseen; "train,val,test" makes a
    # deployment model from every night, and then nothing is held out.
    train_splits: tuple[str, ...] = ("train",)
    validate_every: int = 100  # optimiser steps between held-out validations (0 = at the end only)
    # Held-out sample size in 30-s epochs (512 windows of 10 epochs): read once, held in
    # memory by the validating worker, scored at every validation.
    validation_epochs: int = 5120
    steps: int = 100  # optimiser steps of the whole run (a resumed run ends at the same count)
    global_batch: int = 16  # windows per micro-step whose negatives are shared by all workers
    grad_accum: int = 1  # micro-steps per optimiser step (each is its own contrastive batch)
    lr: float = 3e-4  # peak AdamW learning rate after warm-up
    weight_decay: float = 0.05  # AdamW decoupled weight decay (CLIP/ViT-style)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (beta1, beta2); the authors use (0.9, 0.95)
    warmup_steps: int = 10  # linear warm-up length in optimiser steps (clamped to steps)
    warmup_fraction: float = 0.0  # > 0: warm-up of this fraction of the run's steps instead (authors: 0.03)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr (and warm-up start)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    # Exponential moving average of the weights (s2v_core.ema), cosine momentum
    # start -> end over the run; validation and the saved encoder use it.
    ema: bool = False
    ema_momentum_start: float = 0.996
    ema_momentum_end: float = 1.0
    # torch.compile of the tokenizers, backbone and head (SleepEncoder.compile_blocks):
    # auto = on GPU workers only (on CPU the compile time outweighs a short run's gain).
    compile: str = "auto"
    # DeepSpeed ZeRO stage 0-3; None = 2 on GPU workers, 0 on CPU workers, where
    # ZeRO-2's gradient bucketing cost ~20 % of a step (bench_pretrain) and the
    # memory it saves is not what limits a CPU run.
    zero_stage: int | None = None
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto (GPU workers if the cluster has GPUs) | cpu | gpu
    seed: int = 0  # model init, data shuffling, modality dropout
    dash: bool = True  # DASH metadata weighting; False = plain InfoNCE (same-night masking stays)
    history_columns: tuple[str, ...] = ()  # outcome columns used as DASH history flags
    # Store files (nights) each read task mixes into one shuffled block, so that a
    # batch holds windows of many nights (a night's windows are masked as negatives).
    nights_per_block: int = 16
    shuffle_buffer: int = 0  # windows in an extra per-worker shuffle buffer, reseeded per pass; 0 = none
    # Concurrent store-reading tasks per training worker. They ask for no CPU (the
    # workers hold the cores); raise it on nodes whose spare cores can read ahead.
    readers_per_worker: int = 1
    checkpoint_every: int = 50  # optimiser steps between checkpoints (a final one is always written)
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN_DIR/checkpoints
    log_every: int = 1  # optimiser steps between metric rows rank 0 sends to MLflow (buffered, cheap)
    # Optimiser steps between metric-only ray.train.report calls; 0 = report with
    # checkpoints only. Ray Train V2 hands each report to its controller, which
    # polls workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a report
    # blocks a step for up to 2 s: per-step reports made a `tiny` run 100x slower.
    report_every: int = 0
    progress_seconds: float = 30.0  # seconds between rank 0's progress log lines (0 = none)
    max_failures: int = 1  # worker-group restarts from the latest checkpoint (Ray FailureConfig)
    mlflow_experiment: str = "sleep2vec-pretrain"  # MLflow experiment name
    fail_at_step: int | None = None  # TESTING AID: rank 1 (or 0) raises once at this step

    def __post_init__(self) -> None:
        positive = (
            "workers",
            "steps",
            "global_batch",
            "grad_accum",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "nights_per_block",
            "readers_per_worker",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{_flag(name)}: expected an integer >= 1, found {value!r}")
        for name in ("width", "depth"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name}: expected an integer >= 1, found {value!r}")
        for name in ("validate_every", "validation_epochs", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"--{_flag(name)}: expected an integer >= 0, found {value!r}")
        from s2v_core.splits import select_splits

        select_splits(self.train_splits, option="--train-splits")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"--zero-stage: expected 0, 1, 2 or 3, found {self.zero_stage!r}")
        if self.global_batch % self.workers:
            raise ValueError(
                f"--global-batch: expected a multiple of --workers ({self.workers}) so every worker "
                f"holds the same number of windows, found {self.global_batch}"
            )
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"--compile: expected auto, on or off, found {self.compile!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: expected a value in [0, 1), found {self.warmup_fraction!r}")
        if not 0.0 <= self.ema_momentum_start <= self.ema_momentum_end <= 1.0:
            raise ValueError(
                f"ema_momentum_start/end: expected 0 <= start <= end <= 1, found "
                f"{self.ema_momentum_start!r}, {self.ema_momentum_end!r}"
            )
        if self.ema and self.zero_stage == 3:
            raise ValueError(
                "--zero-stage 3 with EMA (the objective preset's [training] ema = true, or ema in "
                "--config): the average of partitioned weights is not supported yet; use ZeRO 0-2 "
                "or set ema = false"
            )
        _ = self.objective_preset  # unknown presets and invalid preset files fail here, naming the file
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision: expected auto, bf16 or fp32, found {self.precision!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"--device: expected auto, cpu or gpu, found {self.device!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr: expected a learning rate > 0, found {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], found {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"weight_decay and grad_clip must be >= 0, found {self.weight_decay!r} and {self.grad_clip!r}"
            )
        if not isinstance(self.shuffle_buffer, int) or isinstance(self.shuffle_buffer, bool) or self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: expected an integer >= 0 (0 = none), found {self.shuffle_buffer!r}")
        if not isinstance(self.report_every, int) or isinstance(self.report_every, bool) or self.report_every < 0:
            raise ValueError(
                f"report_every: expected an integer >= 0 (0 = with checkpoints only), found {self.report_every!r}"
            )
        if not self.progress_seconds >= 0:
            raise ValueError(f"progress_seconds: expected a number >= 0, found {self.progress_seconds!r}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures: expected an integer >= 0, found {self.max_failures!r}")

    @property
    def per_worker_batch(self) -> int:
        """Windows each worker holds per micro-step."""
        return self.global_batch // self.workers

    @property
    def objective_preset(self) -> ObjectivePreset:
        """The loaded objective preset (``objective``: a shipped name or a file)."""
        return load_objective(self.objective)

    @property
    def loss_objective(self) -> Objective:
        """The preset's objective with this run's DASH switch and history columns applied."""
        objective = self.objective_preset.objective
        return dataclasses.replace(
            objective, dash=objective.dash if self.dash else "off", history_columns=tuple(self.history_columns)
        )

    @property
    def warmup(self) -> int:
        """Warm-up length in optimiser steps (``warmup_fraction`` of the run when set), at most ``steps``."""
        steps = math.ceil(self.warmup_fraction * self.steps) if self.warmup_fraction > 0 else self.warmup_steps
        return min(steps, self.steps)

    def model_config(self, *, epochs_per_window: int | None = None) -> ModelConfig:
        """The encoder architecture (:func:`s2v_core.architecture.resolve_model_config`)."""
        return resolve_model_config(
            self.model,
            width=self.width,
            depth=self.depth,
            epochs_per_window=epochs_per_window,
            overrides=self.objective_preset.model_overrides(),
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def load_pretrain_config(path: str | None = None, **overrides: Any) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from an optional file plus explicit overrides.

    Parameters
    ----------
    path : str, optional
        TOML/YAML/JSON file whose keys are ``PretrainConfig`` fields (strict:
        unknown keys and wrong types are errors naming the file).
    **overrides
        Field values that take precedence over the file (the CLI flags);
        ``None`` values are ignored so unset flags keep the file's value.
    """
    data: dict[str, Any] = dict(load_mapping(path)) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("modalities", "history_columns", "train_splits"):
        if isinstance(data.get(key), str):
            data[key] = [s.strip() for s in data[key].split(",") if s.strip()]
    # The preset's [training] table sits between the dataclass defaults and the file and flags.
    training = load_objective(str(data.get("objective", PretrainConfig.objective))).training
    defaults = {f.name: getattr(training, f.name) for f in dataclasses.fields(training) if f.name != "per_worker_batch"}
    if training.per_worker_batch and "global_batch" not in data:
        data["global_batch"] = training.per_worker_batch * int(data.get("workers", PretrainConfig.workers))
    return from_mapping(PretrainConfig, {**defaults, **data}, source=path or "s2v pretrain")


def config_to_dict(config: PretrainConfig) -> dict[str, Any]:
    """JSON-serialisable form (what the Ray Train loop receives and checkpoints record)."""
    return to_mapping(config)


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> PretrainConfig:
    """Inverse of :func:`config_to_dict` (strict)."""
    return from_mapping(PretrainConfig, data, source=source)


def config_differences(old: PretrainConfig, new: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields (outside :data:`RUNTIME_FIELDS`) whose values differ: ``{name: (old, new)}``."""
    return {
        f.name: (getattr(old, f.name), getattr(new, f.name))
        for f in dataclasses.fields(PretrainConfig)
        if f.name not in RUNTIME_FIELDS and getattr(old, f.name) != getattr(new, f.name)
    }


def use_bf16(config: PretrainConfig, *, on_gpu: bool) -> bool:
    """bf16 on GPU workers (``precision=auto``), fp32 on CPU workers (gloo has no bf16 gain)."""
    if config.precision == "bf16":
        return True
    if config.precision == "fp32":
        return False
    return on_gpu


def zero_stage(config: PretrainConfig, *, on_gpu: bool) -> int:
    """The ZeRO stage a run uses: ``config.zero_stage``, or 2 on GPU workers and 0 on CPU ones."""
    return resolve_zero_stage(config.zero_stage, on_gpu=on_gpu)


def deepspeed_config(config: PretrainConfig, *, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run, derived from ``config`` only.

    The optimiser (``torch.optim.AdamW``) is passed to ``deepspeed.initialize``
    by the loop so that CPU workers never compile DeepSpeed's fused/CPU Adam
    ops; its learning rate schedule (linear warm-up then cosine to
    ``min_lr_ratio * lr``) is DeepSpeed's ``WarmupCosineLR``, stepped once per
    optimiser step and saved in the engine checkpoint.

    Loss scaling across workers: each worker's DASH-InfoNCE loss is
    ``world_size * (its anchors' summed loss) / (global anchors)`` and the
    embeddings are gathered with gradient, so DeepSpeed's mean of the
    per-worker gradients equals the gradient of the single-process loss on
    the concatenated global batch.
    """
    return {
        **engine_config(
            micro_batch=config.per_worker_batch,
            grad_accum=config.grad_accum,
            zero_stage=zero_stage(config, on_gpu=on_gpu),
            on_gpu=on_gpu,
            bf16=use_bf16(config, on_gpu=on_gpu),
            grad_clip=config.grad_clip,
            workers=config.workers,
        ),
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": config.steps,
                "warmup_num_steps": config.warmup,
                "warmup_min_ratio": config.min_lr_ratio,
                "cos_min_ratio": config.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
    }
