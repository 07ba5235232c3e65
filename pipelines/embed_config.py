"""What ``s2v embed`` runs on: one frozen, validated config (see ``s2v embed --help``).

Built once from the command line (:func:`config_from_args`) or in Python, and
passed whole to :func:`pipelines.embed.embed`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from s2v_core.embeddings import FEATURES
from s2v_core.modalities import parse_modalities


@dataclass(frozen=True)
class EmbedConfig:
    """Everything one embedding run depends on.

    Raises ``ValueError`` naming the option for a bad value; whether the
    encoder has the requested modalities is checked when it is loaded.
    """

    checkpoint: str  # saved encoder dir, pretraining run dir (a path or a URI), or MLflow model URI / run id
    data: str  # the store (STORE/site=<name>/*.parquet; a path or a URI)
    output: str  # embeddings directory to (re)create (a path or a URI)
    # Subset the encoder reads ("hr,spo2,thorax" or a sequence; kept as a tuple in registry order);
    # None = every modality the encoder was built for. Only these store columns are read.
    modalities: tuple[str, ...] | None = None
    batch_size: int = 64  # windows per forward pass (one window = E 30-s epochs)
    num_actors: int | None = None  # actor pool size; None = one per CPU (or per GPU) of the cluster
    per_modality: bool = False  # also write one emb_<modality> column per requested modality
    # Accept an MLflow pytorch model (runs:/ID/model, models:/...): a pickle that runs
    # code when loaded; default: weights-only encoders only.
    allow_pickle_model: bool = False
    features: str = "hidden"  # hidden: the backbone's hidden states (probes, fine-tuning); projected: aligned space

    def __post_init__(self) -> None:
        if self.modalities is not None:
            spec = self.modalities
            parsed = parse_modalities(spec) if (spec if isinstance(spec, str) else tuple(spec)) else None
            object.__setattr__(self, "modalities", parsed)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ValueError(f"--actors: expected >= 1, found {self.num_actors}")
        if self.features not in FEATURES:
            raise ValueError(f"--features: expected {' or '.join(FEATURES)}, found {self.features!r}")


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    """Map parsed ``s2v embed`` flags onto an :class:`EmbedConfig`."""
    return EmbedConfig(
        checkpoint=args.checkpoint,
        data=args.data,
        output=args.output,
        modalities=args.modalities,
        batch_size=args.batch_size,
        num_actors=args.actors,
        per_modality=args.per_modality,
        allow_pickle_model=args.allow_pickle_model,
        features=args.features,
    )
