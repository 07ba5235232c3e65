"""Self-describing pretraining checkpoints: layout, state file, discovery.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_<NNNNNNNN>/`` that
Ray Train assembles from what every worker reported at that step::

    state.json        (rank 0) format, resolved config, step, seed, data position, metrics
    encoder/          (rank 0) model_config.json + encoder.pt (s2v_core.model.save_encoder)
    engine/state/     DeepSpeed engine: module states (rank 0) and one ZeRO optimiser
                      shard per rank (zero_pp_rank_<r>_mp_rank_00_optim_states.pt)
    engine/latest     DeepSpeed's pointer to the tag ``state``

A checkpoint counts as complete only with all of these, every rank's shard
included (:func:`checkpoint_problems`); a directory a dying worker left
half-uploaded is listed by :func:`incomplete_checkpoints` and skipped by
:func:`latest_checkpoint`, so ``--resume`` falls back to the newest complete one.

``encoder/`` alone is enough to embed (``pipelines.model_io``); ``engine/``
resumes the weights, the optimiser, the LR schedule and the step exactly, and
``state.json``'s data position lets the loop skip the micro-batches of the
pass that the checkpointed steps had already consumed. The position is
exact in count (a resumed run trains on the rest of the pass, then on full
passes) but not in identity: Ray Data hands blocks to workers as they ask,
so which windows a worker skips may differ from those it saw before.

``RUN_DIR`` may be a local path or a URI (``s3://…``): :func:`read_state`,
:func:`list_checkpoints` and :func:`latest_checkpoint` read through
``pyarrow.fs`` and name checkpoints in the form ``RUN_DIR`` was given in.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipelines.runtime import file_type, read_text
from s2v_core.locations import join, redact_values, resolve
from s2v_core.run_layout import (
    CHECKPOINT_STATE_FILE,
    CHECKPOINTS_NAME,
    EMA_FILE,
    ENCODER_DIR,
    ENGINE_DIR,
    ENGINE_TAG,
    ONLINE_ENCODER_DIR,
)

logger = logging.getLogger(__name__)

#: Version of ``state.json``; bump when its keys change meaning.
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class DataPosition:
    """Where in the data stream an optimiser step ended.

    ``epoch`` counts passes of the training stream (0-based), each of which
    visits the store ``store_repeats`` times (``pipelines.train_data.store_repeats``);
    ``batches_in_epoch`` is the number of micro-batches of that pass every
    worker had consumed. A resumed run builds its stream with the recorded
    ``store_repeats``, so the position means the same thing after a resume.
    """

    epoch: int = 0
    batches_in_epoch: int = 0
    store_repeats: int = 1


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint written after optimiser step ``step``."""
    return f"step_{step:08d}"


def write_state(
    directory: str | Path,
    *,
    config: dict[str, Any],
    step: int,
    seed: int,
    position: DataPosition,
    metrics: dict[str, float],
    world_size: int,
) -> Path:
    """Write ``state.json`` (rank 0's part of a checkpoint) into ``directory``."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "seed": seed,
        "world_size": world_size,
        "data_position": {
            "epoch": position.epoch,
            "batches_in_epoch": position.batches_in_epoch,
            "store_repeats": position.store_repeats,
        },
        "metrics": {k: float(v) for k, v in metrics.items()},
        # Locations as they may be shown: no credentials of a URI (data/output are not compared on resume).
        "config": redact_values(config),
    }
    path = Path(directory) / CHECKPOINT_STATE_FILE
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read and check ``state.json`` of a checkpoint directory (a path or a URI)."""
    path = join(checkpoint, CHECKPOINT_STATE_FILE)
    if file_type(path) != pafs.FileType.File:
        raise FileNotFoundError(f"{checkpoint}: not a pretraining checkpoint ({CHECKPOINT_STATE_FILE} is missing)")
    state = json.loads(read_text(path))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: expected checkpoint format {CHECKPOINT_FORMAT}, found {state.get('format')!r}")
    return state


def data_position(state: dict[str, Any]) -> DataPosition:
    """The :class:`DataPosition` recorded in a checkpoint's state."""
    position = state["data_position"]
    # Checkpoints written before passes repeated the store have no store_repeats: 1.
    return DataPosition(
        epoch=int(position["epoch"]),
        batches_in_epoch=int(position["batches_in_epoch"]),
        store_repeats=int(position.get("store_repeats", 1)),
    )


#: DeepSpeed's files in ``engine/<tag>/``: the module states of rank 0 (ZeRO 0-2) or of every
#: rank (ZeRO-3), and one optimiser shard per rank (ZeRO 1-3).
_MODEL_STATES = "mp_rank_00_model_states.pt"
_RANK_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
_RANK_OPTIMISER_STATES = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def checkpoint_problems(
    files: dict[str, int], *, world_size: int | None, zero_stage: int | None, ema: bool = False
) -> list[str]:
    """What keeps a checkpoint directory from being complete (empty list: complete).

    Parameters
    ----------
    files : dict of str to int
        ``{path relative to the checkpoint: size in bytes}`` of its files.
    world_size : int or None
        Ranks that wrote it (``state.json``); None when the state is unreadable.
    zero_stage : int or None
        The run's ZeRO stage (``RUN_DIR/ds_config.json``); None: unknown, then
        optimiser shards are required of every rank as soon as one rank has one.
    ema : bool
        The run keeps an EMA of its weights: ``ema.pt`` and ``online_encoder/`` are required too.

    Ray Train assembles a checkpoint from what each worker uploads; a worker
    that died mid-upload leaves a directory with ``state.json`` and part of the
    rest, which must not count (``--resume`` would fail on it).
    """
    from s2v_core.run_layout import MODEL_CONFIG_FILE, WEIGHTS_FILE

    problems = [
        f"no {name}"
        for name in (CHECKPOINT_STATE_FILE, f"{ENCODER_DIR}/{MODEL_CONFIG_FILE}", f"{ENCODER_DIR}/{WEIGHTS_FILE}")
        if not files.get(name)
    ]
    if ema:
        problems += [f"no {name}" for name in (EMA_FILE, f"{ONLINE_ENCODER_DIR}/{WEIGHTS_FILE}") if not files.get(name)]
    return problems + engine_problems(files, world_size=world_size, zero_stage=zero_stage)


def engine_problems(files: dict[str, int], *, world_size: int | None, zero_stage: int | None) -> list[str]:
    """What keeps the DeepSpeed state of a checkpoint (``engine/``) from being complete (empty: complete).

    ``files``, ``world_size`` and ``zero_stage`` as in :func:`checkpoint_problems`;
    ``s2v finetune --deepspeed`` checks its checkpoints' engine state with it too.
    """
    problems = []
    if not files.get(f"{ENGINE_DIR}/latest"):
        problems.append(f"no {ENGINE_DIR}/latest (DeepSpeed's pointer to its state)")
    if world_size is None:
        return problems + [f"{CHECKPOINT_STATE_FILE} unreadable"]
    engine = f"{ENGINE_DIR}/{ENGINE_TAG}/"
    names = [name[len(engine) :] for name, size in files.items() if name.startswith(engine) and size]

    def has(ending: str) -> bool:
        # By ending: DeepSpeed prefixes some optimisers' shards (bf16_zero_pp_rank_...).
        return any(name.endswith(ending) for name in names)

    ranks = range(world_size)
    if zero_stage == 3 or (zero_stage is None and has(_RANK_MODEL_STATES.format(rank=0))):
        problems += [f"no module states of rank {r}" for r in ranks if not has(_RANK_MODEL_STATES.format(rank=r))]
    elif not has(_MODEL_STATES):
        problems.append("no module states")
    if (zero_stage or 0) >= 1 or any(has(_RANK_OPTIMISER_STATES.format(rank=r)) for r in ranks):
        problems += [f"no optimiser shard of rank {r}" for r in ranks if not has(_RANK_OPTIMISER_STATES.format(rank=r))]
    return problems


def _zero_stage(filesystem: pafs.FileSystem, run_root: str) -> int | None:
    path = f"{run_root}/ds_config.json"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        try:
            return int(json.loads(stream.read().decode("utf-8"))["zero_optimization"]["stage"])
        except (ValueError, KeyError, TypeError):
            return None


def _survey(run_dir: str | Path) -> list[tuple[str, list[str]]]:
    """``(checkpoint location, problems)`` of every ``step_*`` directory of a run, oldest first."""
    filesystem, run_root = resolve(str(run_dir))
    root = f"{run_root}/{CHECKPOINTS_NAME}"
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    names = sorted(
        info.base_name
        for info in infos
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith("step_")
        and posixpath.dirname(info.path) == root
    )
    zero_stage = _zero_stage(filesystem, run_root)
    surveyed = []
    for name in names:
        prefix = f"{root}/{name}/"
        files = {
            info.path[len(prefix) :]: info.size
            for info in infos
            if info.type == pafs.FileType.File and info.path.startswith(prefix)
        }
        world_size, ema = None, False
        if files.get(CHECKPOINT_STATE_FILE):
            with filesystem.open_input_stream(prefix + CHECKPOINT_STATE_FILE) as stream:
                try:
                    state = json.loads(stream.read().decode("utf-8"))
                    world_size = int(state["world_size"])
                    ema = bool((state.get("config") or {}).get("ema", False))
                except (ValueError, KeyError, TypeError, AttributeError):
                    world_size = None
        surveyed.append(
            (
                join(run_dir, CHECKPOINTS_NAME, name),
                checkpoint_problems(files, world_size=world_size, zero_stage=zero_stage, ema=ema),
            )
        )
    return surveyed


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoints of a run, oldest first (see :func:`checkpoint_problems`).

    Each is ``RUN_DIR/checkpoints/step_<NNNNNNNN>`` in the form ``run_dir`` has
    (a path, or a URI with its options).
    """
    return [location for location, problems in _survey(run_dir) if not problems]


def incomplete_checkpoints(run_dir: str | Path) -> list[tuple[str, list[str]]]:
    """``(checkpoint, what it lacks)`` of the run's incomplete checkpoints, oldest first."""
    return [(location, problems) for location, problems in _survey(run_dir) if problems]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The complete checkpoint with the highest step in ``run_dir``, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
