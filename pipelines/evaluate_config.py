"""What ``s2v evaluate`` runs on: one frozen, validated config (see ``s2v evaluate --help``).

Built once from the command line (:func:`config_from_args`) or in Python, and
passed whole to :func:`pipelines.evaluate.evaluate`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from s2v_core.evaluation.tasks import TASK_FAMILIES, TASKS, Task, get_task

#: Staging heads a report can hold.
HEADS = ("linear", "temporal")
#: Reference peers scored next to the probes.
PEERS = ("yasa",)

#: How frozen-embedding probes score a task of the task table (s2v_core.evaluation.tasks), by its
#: (level, kind): the report section that holds it. Epoch classification is staging (any grouping
#: of the stages); a night-level 0/1 or numeric target is the per-night outcome probe. A task of the
#: table whose (level, kind) is missing here (survival) has no frozen probe: `s2v finetune` trains it.
SECTIONS = {
    ("epoch", "classification"): "staging",
    ("night", "binary"): "outcome",
    ("night", "regression"): "outcome",
}
#: Checks of the embeddings themselves rather than tasks of the table: name -> report section.
CHECKS = {"site": "site"}


def known_tasks() -> list[str]:
    """Every ``--task`` that ``s2v evaluate`` scores (families as ``prefix:COLUMN``)."""
    probed = [name for name, task in TASKS.items() if (task.level, task.kind) in SECTIONS]
    return [*probed, *CHECKS, *(f"{prefix}:COLUMN" for prefix in TASK_FAMILIES if _family_probed(prefix))]


def _family_probed(prefix: str) -> bool:
    try:
        task = TASK_FAMILIES[prefix]("COLUMN")
    except ValueError:  # a family of several columns (survival:EVENT,TIME)
        return False
    return (task.level, task.kind) in SECTIONS


def evaluation_task(name: str) -> tuple[str, Task | None]:
    """``(report section, task)`` of ``--task name``: a task of the table, or a check (task ``None``).

    Raises ``ValueError`` listing the known tasks for an unknown name, or for
    a task of the table that frozen-embedding probes do not score.
    """
    if name in CHECKS:
        return CHECKS[name], None
    known = ", ".join(known_tasks())
    try:
        task = get_task(name)
    except ValueError:
        raise ValueError(f"--task: expected staging, outcome:COLUMN or site (known: {known}), found {name!r}") from None
    section = SECTIONS.get((task.level, task.kind))
    if section is None:
        raise ValueError(
            f"--task {name}: a {task.level}-level {task.kind} task has no frozen-embedding probe in "
            f"s2v evaluate (known: {known}); `s2v finetune --task {name}` trains one"
        )
    return section, task


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything one evaluation depends on.

    Raises ``ValueError`` naming the option when a value or a combination is
    not allowed; the embeddings themselves are checked when they are read.
    """

    embeddings: str  # embeddings directory written by `s2v embed` (a path or a URI)
    task: str  # a task of the table scored by a frozen probe (staging, outcome:COLUMN, age …) or site
    report: str  # REPORT.json to write; plots go beside it
    folds: int = 5  # subject-grouped k-fold CV of --transductive scoring
    seed: int = 0  # seed of folds and probes
    heads: tuple[str, ...] = HEADS  # staging heads: linear and/or temporal
    data: str | None = None  # the store (for robustness, label efficiency and the YASA peer)
    checkpoint: str | None = None  # the encoder (for robustness and label efficiency)
    robustness: bool = False  # add the any-subset robustness matrix
    scenarios: tuple[str, ...] | None = None  # robustness scenarios (None: every default scenario)
    label_efficiency_curve: bool = False  # add the 1/10/100 % label-efficiency curve vs from scratch
    peer: str | None = None  # a reference peer: "yasa" (staging on the nights with EEG)
    compare: str | None = None  # site task: a second embeddings dir of the same store, same folds
    mlflow_parent_run_id: str | None = None  # MLflow run to nest under (default: the pretraining run)
    log_to_mlflow: bool = True  # log the report and plots as an MLflow run
    # Score every subject by k-fold CV, including subjects the encoder was pretrained on
    # (the report says so); default: fit on train/val subjects, score test subjects.
    transductive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))
        if self.scenarios is not None:
            object.__setattr__(self, "scenarios", tuple(self.scenarios))
        section, _ = evaluation_task(self.task)
        extras = self.robustness or self.label_efficiency_curve or self.peer
        if extras and self.task != "staging":  # they score the five AASM stages
            raise ValueError("--robustness, --label-efficiency and --peer apply to --task staging only")
        if (self.robustness or self.label_efficiency_curve) and not (self.data and self.checkpoint):
            raise ValueError("--robustness and --label-efficiency need --data STORE and --checkpoint CKPT")
        if self.compare and section != "site":
            raise ValueError("--compare applies to --task site only")
        if self.peer and (self.peer not in PEERS or not self.data):
            raise ValueError(f"--peer: only 'yasa' is available and it needs --data STORE; found {self.peer!r}")
        unknown_heads = set(self.heads) - set(HEADS)
        if unknown_heads or not self.heads:
            raise ValueError(f"--heads: expected linear and/or temporal, found {','.join(self.heads) or 'nothing'}")
        if self.transductive and self.folds < 2:  # held-out scoring has one fold, whatever --folds says
            raise ValueError(f"--folds: expected >= 2 with --transductive, found {self.folds}")


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    """Map parsed ``s2v evaluate`` flags onto an :class:`EvaluateConfig`."""
    return EvaluateConfig(
        embeddings=args.embeddings,
        task=args.task,
        report=args.report,
        folds=args.folds,
        seed=args.seed,
        heads=tuple(h.strip() for h in args.heads.split(",") if h.strip()),
        data=args.data,
        checkpoint=args.checkpoint,
        robustness=args.robustness,
        scenarios=tuple(s.strip() for s in args.scenarios.split(",")) if args.scenarios else None,
        label_efficiency_curve=args.label_efficiency,
        peer=args.peer,
        compare=args.compare,
        mlflow_parent_run_id=args.mlflow_parent_run_id,
        log_to_mlflow=not args.no_mlflow,
        transductive=args.transductive,
    )
