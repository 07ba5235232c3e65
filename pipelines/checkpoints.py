"""Self-describing pretraining checkpoints: layout, state file, discovery.

A checkpoint is one directory ``RUN_DIR/checkpoints/step_<NNNNNNNN>/`` that
Ray Train assembles from what every worker reported at that step::

    state.json        (rank 0) format, resolved config, step, seed, data position, metrics
    encoder/          (rank 0) model_config.json + encoder.pt (s2v_core.model.save_encoder)
    engine/state/     DeepSpeed engine: module states (rank 0) and one ZeRO optimiser
                      shard per rank (zero_pp_rank_<r>_mp_rank_00_optim_states.pt)
    engine/latest     DeepSpeed's pointer to the tag ``state``

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

from pipelines.runtime import file_type, join, read_text
from s2v_core.io.discovery import resolve

logger = logging.getLogger(__name__)

#: Version of ``state.json``; bump when its keys change meaning.
CHECKPOINT_FORMAT = 1
STATE_FILE = "state.json"
ENCODER_DIR = "encoder"
ENGINE_DIR = "engine"
#: DeepSpeed checkpoint tag (one tag per directory: the directory is the step).
ENGINE_TAG = "state"
#: Ray Train experiment name: checkpoints live under RUN_DIR/checkpoints/.
CHECKPOINTS_NAME = "checkpoints"


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


def write_state(directory: str | Path, *, config: dict[str, Any], step: int, seed: int,
                position: DataPosition, metrics: dict[str, float], world_size: int) -> Path:
    """Write ``state.json`` (rank 0's part of a checkpoint) into ``directory``."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "seed": seed,
        "world_size": world_size,
        "data_position": {"epoch": position.epoch, "batches_in_epoch": position.batches_in_epoch,
                          "store_repeats": position.store_repeats},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": config,
    }
    path = Path(directory) / STATE_FILE
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """Read and check ``state.json`` of a checkpoint directory (a path or a URI)."""
    path = join(checkpoint, STATE_FILE)
    if file_type(path) != pafs.FileType.File:
        raise FileNotFoundError(f"{checkpoint}: not a pretraining checkpoint ({STATE_FILE} is missing)")
    state = json.loads(read_text(path))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: expected checkpoint format {CHECKPOINT_FORMAT}, "
                         f"found {state.get('format')!r}")
    return state


def data_position(state: dict[str, Any]) -> DataPosition:
    """The :class:`DataPosition` recorded in a checkpoint's state."""
    position = state["data_position"]
    # Checkpoints written before passes repeated the store have no store_repeats: 1.
    return DataPosition(epoch=int(position["epoch"]), batches_in_epoch=int(position["batches_in_epoch"]),
                        store_repeats=int(position.get("store_repeats", 1)))


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoints of a run (those with ``state.json`` and ``encoder/``), oldest first.

    Each is ``RUN_DIR/checkpoints/step_<NNNNNNNN>`` in the form ``run_dir`` has
    (a path, or a URI with its options).
    """
    filesystem, root = resolve(str(run_dir))
    root = f"{root}/{CHECKPOINTS_NAME}"
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    kinds = {info.path: info.type for info in infos}
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory
                   and info.base_name.startswith("step_") and posixpath.dirname(info.path) == root)
    complete = [name for name in names
                if kinds.get(f"{root}/{name}/{STATE_FILE}") == pafs.FileType.File
                and kinds.get(f"{root}/{name}/{ENCODER_DIR}") == pafs.FileType.Directory]
    return [join(run_dir, CHECKPOINTS_NAME, name) for name in complete]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint with the highest step in ``run_dir``, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
