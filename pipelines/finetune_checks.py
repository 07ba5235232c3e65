"""What ``s2v finetune`` checks before it trains: the protocol (no scoring on subjects the encoder saw) and ``--resume``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from s2v_core.config import to_mapping
from s2v_core.run_layout import CHECKPOINTS_NAME
from s2v_core.run_layout import FINETUNED_MODEL_DIR as MODEL_DIR

if TYPE_CHECKING:
    from pipelines.finetune import FinetuneConfig


def check_protocol(record: dict | None, store_record: dict, *, transductive: bool, checkpoint: str) -> dict:
    """Refuse to report on test subjects the encoder was pretrained on (or may have been), unless transductive."""
    from s2v_core.splits import seen_splits

    seen = seen_splits(record, store_record)
    if not transductive:
        if seen is None:
            raise ValueError(
                f"--checkpoint {checkpoint!r}: what pretrained the encoder is unknown (no training "
                "record beside it), so the test subjects cannot be called unseen; pass "
                "--transductive to fine-tune and score anyway"
            )
        if "test" in seen:
            raise ValueError(
                f"--checkpoint {checkpoint!r}: the encoder was pretrained on the {'/'.join(seen)} "
                "subjects of this store, test included; pass --transductive to score anyway"
            )
    return {
        "mode": "transductive" if transductive else "held-out",
        "encoder_pretrained_on": "unknown" if seen is None else ("/".join(seen) or "no subject of this store"),
        "trained_on": "train subjects",
        "early_stopping_on": "val subjects",
        "scored": "test subjects",
    }


#: Options a resumed run may change: how long and how it runs, not what it trains.
#: The night head (stage 2) may be added or retrained on a finished run: stage 1 stays as it is.
RESUMABLE_CHANGES = (
    "steps",
    "patience",
    "eval_every",
    "checkpoint_every",
    "workers",
    "device",
    "output",
    "night_context",
    "night_steps",
)


def check_same_run(path: Path, config: FinetuneConfig) -> None:
    """``--resume`` must continue the same training: only :data:`RESUMABLE_CHANGES` may differ."""
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    current = json.loads(json.dumps(to_mapping(config)))  # tuples as lists, like the file
    changed = {
        k: (previous.get(k), v) for k, v in current.items() if k not in RESUMABLE_CHANGES and previous.get(k) != v
    }
    if changed:
        listed = "; ".join(f"{k}: the run has {old!r}, this call {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(
            f"--resume: expected the options of the run in {path.parent}, found different values: {listed}"
        )


def check_resume(run_dir: Path, *, resume: bool) -> str | None:
    from pipelines.finetune_loop import checkpoint_problems

    checkpoints = sorted((run_dir / CHECKPOINTS_NAME).glob("step_*")) if run_dir.is_dir() else []
    complete = [c for c in checkpoints if not checkpoint_problems(c)]
    if not resume:
        if checkpoints or (run_dir / MODEL_DIR).exists():
            raise ValueError(
                f"--output: expected a new run directory, found a fine-tuning run in {run_dir}; "
                "pass --resume to continue it or choose another --output"
            )
        return None
    return str(complete[-1]) if complete else None
