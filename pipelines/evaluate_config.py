"""What ``s2v evaluate`` runs on: one frozen, validated config (see ``s2v evaluate --help``).

Built once from the command line (:func:`config_from_args`) or in Python, and
passed whole to :func:`pipelines.evaluate.evaluate`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

#: Staging heads a report can hold.
HEADS = ("linear", "temporal")
#: Reference peers scored next to the probes.
PEERS = ("yasa",)


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything one evaluation depends on.

    Raises ``ValueError`` naming the option when a value or a combination is
    not allowed; the embeddings themselves are checked when they are read.
    """

    embeddings: str  # embeddings directory written by `s2v embed` (a path or a URI)
    task: str  # staging | outcome:COLUMN | site
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
        kind, _, column = self.task.partition(":")
        if kind not in ("staging", "outcome", "site") or (kind == "outcome") != bool(column):
            raise ValueError(f"--task: expected staging, outcome:COLUMN or site, found {self.task!r}")
        extras = self.robustness or self.label_efficiency_curve or self.peer
        if extras and kind != "staging":
            raise ValueError("--robustness, --label-efficiency and --peer apply to --task staging only")
        if (self.robustness or self.label_efficiency_curve) and not (self.data and self.checkpoint):
            raise ValueError("--robustness and --label-efficiency need --data STORE and --checkpoint CKPT")
        if self.compare and kind != "site":
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
