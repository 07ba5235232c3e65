"""The layout of the directories a run writes: every file and folder name, in one place.

A reader of any of these directories (a resume, ``s2v embed --checkpoint``,
``s2v stage --model``, a notebook) finds the names here instead of in the
command that happened to write them. Names that several directories share
(``encoder/``, ``checkpoints/``, ``state.json``) are defined once per meaning.

Pretraining run (``s2v pretrain --output RUN_DIR``)::

    RUN_DIR/
      pretrain_config.json        PRETRAIN_CONFIG_FILE   resolved config (credentials redacted)
      ds_config.json              DS_CONFIG_FILE         the DeepSpeed config the workers used
      mlflow_run.json             MLFLOW_RUN_FILE        {"tracking_uri", "run_id"} of its MLflow run
      encoder/                    ENCODER_DIR            the final saved encoder (below)
      checkpoints/                CHECKPOINTS_NAME       Ray Train checkpoints, one step_<8 digits>/ a step:
        step_*/state.json         CHECKPOINT_STATE_FILE  step, seed, data position, metrics, config
        step_*/encoder/           ENCODER_DIR            weights to resume (the EMA's, with EMA)
        step_*/online_encoder/    ONLINE_ENCODER_DIR     with EMA: the optimiser's own weights
        step_*/ema.pt             EMA_FILE               with EMA: the average's state
        step_*/engine/state/      ENGINE_DIR, ENGINE_TAG DeepSpeed optimiser state

Saved encoder (``ENCODER_DIR``, :func:`s2v_core.model.save_encoder`)::

      model_config.json           MODEL_CONFIG_FILE
      encoder.pt                  WEIGHTS_FILE
      training.json               TRAINING_RECORD_FILE   which store and subjects pretrained it

Fine-tuning run (``s2v finetune --output RUN_DIR``)::

    RUN_DIR/
      finetune_config.json        FINETUNE_CONFIG_FILE
      report.json                 FINETUNE_REPORT_FILE
      mlflow_run.json             MLFLOW_RUN_FILE
      ds_config.json              DS_CONFIG_FILE         with --deepspeed: the DeepSpeed config the workers used
      pretrained_encoder/         PRETRAINED_ENCODER_DIR the encoder it started from
      model/                      FINETUNED_MODEL_DIR    the fine-tuned model (below)
      checkpoints/                CHECKPOINTS_NAME
        step_*/state.json         FINETUNE_STATE_FILE
        step_*/training.pt        FINETUNE_TRAINING_FILE model and optimiser state (data-parallel workers)
        step_*/engine/state/      ENGINE_DIR, ENGINE_TAG with --deepspeed instead: every rank's DeepSpeed state
        step_*/best/              BEST_DIR               the best model so far on val subjects

Fine-tuned model (``FINETUNED_MODEL_DIR``, :func:`s2v_core.finetuning.save_finetuned`)::

      finetuned.json              DESCRIPTION_FILE
      encoder/                    ENCODER_DIR
      adapter.pt                  ADAPTER_FILE
      task_model.pt               TASK_MODEL_FILE
      night_head.pt               NIGHT_HEAD_FILE        with --night-context: the whole-night stage 2

Sweep (``s2v sweep --output SWEEP_DIR``)::

    SWEEP_DIR/
      sweep.json                  SWEEP_STATE_FILE       resolved config, plan, parent MLflow run id
      predictions.json            PREDICTIONS_FILE       pre-registered forecast of held-out points
      trial_log.jsonl             TRIAL_LOG              trial start/finish events

The embeddings directory's names live with its format in :mod:`s2v_core.embeddings`.
"""

from __future__ import annotations

from s2v_core.locations import join

# -- pretraining run ---------------------------------------------------------------------------
PRETRAIN_CONFIG_FILE = "pretrain_config.json"
#: The DeepSpeed config the workers used (``s2v pretrain``; ``s2v finetune --deepspeed``).
DS_CONFIG_FILE = "ds_config.json"
#: Written by ``s2v pretrain`` and ``s2v finetune``: ``{"tracking_uri", "run_id"}`` of the run's
#: MLflow run (a resumed run continues it; embed and evaluate nest under it).
MLFLOW_RUN_FILE = "mlflow_run.json"
#: A saved encoder: the final one of a run, and the one inside each checkpoint and fine-tuned model.
ENCODER_DIR = "encoder"
#: Ray Train experiment name: checkpoints live under RUN_DIR/checkpoints/ (fine-tuning's too).
CHECKPOINTS_NAME = "checkpoints"

# -- one pretraining checkpoint ----------------------------------------------------------------
CHECKPOINT_STATE_FILE = "state.json"
#: With EMA: ``encoder/`` holds the averaged weights, this the optimiser's own, EMA_FILE the average's state.
ONLINE_ENCODER_DIR = "online_encoder"
EMA_FILE = "ema.pt"
ENGINE_DIR = "engine"
#: DeepSpeed checkpoint tag (one tag per directory: the directory is the step).
ENGINE_TAG = "state"

# -- a saved encoder ---------------------------------------------------------------------------
MODEL_CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "encoder.pt"
#: Written beside a saved encoder by ``s2v pretrain``: which store and subjects trained it.
TRAINING_RECORD_FILE = "training.json"

# -- fine-tuning run, its checkpoints and its model --------------------------------------------
FINETUNE_CONFIG_FILE = "finetune_config.json"
FINETUNE_REPORT_FILE = "report.json"
PRETRAINED_ENCODER_DIR = "pretrained_encoder"
FINETUNED_MODEL_DIR = "model"
FINETUNE_STATE_FILE = "state.json"
FINETUNE_TRAINING_FILE = "training.pt"
BEST_DIR = "best"
DESCRIPTION_FILE = "finetuned.json"
ADAPTER_FILE = "adapter.pt"
TASK_MODEL_FILE = "task_model.pt"
#: ``s2v finetune --night-context``: the whole-night head's weights (hyper-parameters in DESCRIPTION_FILE).
NIGHT_HEAD_FILE = "night_head.pt"

# -- sweep -------------------------------------------------------------------------------------
#: Sweep bookkeeping: the resolved config, the plan summary and the parent MLflow run id.
SWEEP_STATE_FILE = "sweep.json"
#: The pre-registered forecast of the held-out points.
PREDICTIONS_FILE = "predictions.json"
#: Append-only log of trial start/finish events (one JSON object per line).
TRIAL_LOG = "trial_log.jsonl"


def final_encoder_location(run_dir: str) -> str:
    """Where a pretraining run keeps its final saved encoder (``RUN_DIR/encoder``; a path or a URI)."""
    return join(run_dir, ENCODER_DIR)


def checkpoints_location(run_dir: str) -> str:
    """Where a run keeps its checkpoints (``RUN_DIR/checkpoints``; a path or a URI)."""
    return join(run_dir, CHECKPOINTS_NAME)
