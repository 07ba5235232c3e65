"""``s2v finetune --night-context``: stage 2, the whole-night head over the fine-tuned model's epoch features.

It runs after the Ray Train run, in the calling process (see :mod:`s2v_core.night_context`).
A finished run resumed with ``--night-context`` keeps a head already trained on the same
stage-1 model with the same ``--night-steps`` and ``--seed`` (:func:`previous_night_head`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.finetune import FinetuneConfig, PreparedFinetune


def check_night_context(config: FinetuneConfig) -> None:
    """``--night-context`` needs an epoch-level classification task and whole labelled train nights."""
    if not config.night_context:
        return
    task = config.spec().task_definition
    if task.level != "epoch" or task.kind != "classification":
        raise ValueError(
            f"--night-context: expected an epoch-level classification task (staging, staging4, staging3), "
            f"found --task {task.name} ({task.level}-level {task.kind})"
        )
    if config.night_steps < 1:
        raise ValueError(f"--night-steps: expected an integer >= 1, found {config.night_steps}")
    if config.labelled_windows:
        raise ValueError(
            f"--night-context: the night head learns from whole labelled train nights; expected no "
            f"--labelled-windows, found {config.labelled_windows}"
        )


def night_record(prepared: PreparedFinetune, state: dict) -> dict:
    """What a kept night head must have been trained with to be reused by a resumed run."""
    return {
        "stage1_best_step": state["best_step"],
        "night_steps": prepared.config.night_steps,
        "seed": prepared.config.seed,
    }


def previous_night_head(prepared: PreparedFinetune, model_dir: Path, state: dict):
    """A night head in ``model_dir`` trained on this stage-1 model with these options (a resumed run), or None."""
    from s2v_core.finetuning import read_description
    from s2v_core.night_context import load_night_head

    if not prepared.config.night_context or not model_dir.is_dir():
        return None
    try:
        record = read_description(model_dir).get("night_head") or {}
        if record.get("trained_with") != night_record(prepared, state):
            return None
        return load_night_head(model_dir), record
    except (OSError, ValueError, KeyError):  # an unreadable leftover: train it again
        return None


def night_context_stage(
    prepared: PreparedFinetune, model, model_dir: Path, state: dict, stage1_test: dict, kept=None
) -> dict:
    """Stage 2 of ``--night-context``: train (or keep) the night head, save it in ``model_dir``, score it on test.

    Returns the report's ``night_context`` part: the test figures of both stages
    (``test``), of stage 1 alone (``stage1_alone_test``), the primary figure's
    gain, the nights per split, the training history and whether the head was reused.
    """
    import time

    from pipelines.finetune_data import read_night_features
    from s2v_core.night_context import fit_night_context, predict_nights, save_night_head

    started = time.monotonic()
    task = model.task
    config = prepared.config
    splits = {"test": prepared.test_files}
    if kept is None:
        splits = {"train": prepared.train_files, "val": prepared.val_files, **splits}
    nights = {
        split: read_night_features(model, files, prepared.filesystem, batch_size=config.batch_size)
        for split, files in splits.items()
    }
    if kept is None:
        head, record = fit_night_context(
            nights,
            task,
            heads=model.encoder.config.heads,
            steps=config.night_steps,
            patience=config.patience,
            seed=config.seed,
        )
        figures = record.pop("test")
        history = {**record, "trained_with": night_record(prepared, state)}
        reused = False
    else:
        head, history = kept[0], {k: v for k, v in kept[1].items() if k not in ("hyperparameters", "test")}
        figures = task.metrics(*predict_nights(head, nights["test"], task))
        reused = True
    save_night_head(head, model_dir, extra={**history, "test": {k: v for k, v in figures.items() if k != "confusion"}})
    metric = task.primary[0]
    return {
        "test": figures,
        "stage1_alone_test": stage1_test,
        f"{metric}_gain": round(figures[metric] - stage1_test[metric], 4),
        **history,
        "reused": reused,
        "seconds": round(time.monotonic() - started, 1),
    }
