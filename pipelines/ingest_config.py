"""What ``s2v ingest`` runs on: one frozen, validated config (see ``s2v ingest --help``).

Built once from the command line (:func:`config_from_args`) or in Python, and
passed whole to :func:`pipelines.ingest.ingest`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pipelines.ingest_plan import IngestLimits
from s2v_core.io.identity import ID_MODES


@dataclass(frozen=True)
class IngestConfig:
    """Everything one ingest run depends on.

    Raises ``ValueError`` naming the option for a bad value or combination;
    the inputs themselves are checked when the run starts.
    """

    inputs: tuple[str, ...]  # site directories or parents of site directories (paths or pyarrow URIs)
    output: str  # the store root (a path or a URI); created if missing
    site_config: str | None = None  # site config file overriding the input's own site.toml (one input only)
    epochs_per_window: int = 10  # 30-s epochs per store row (10 = 5 min); must match an existing store
    # Most recordings decoded at the same time per memory class; None = as many as Ray's CPUs
    # and memory allow (memory per worker is reserved from the recording's header).
    workers: int | None = None
    # Store ids: keyed hashes of the sites' keys, or the keys themselves where they are
    # already pseudonymous (such as NSRR's).
    ids: str = "pseudonymous"
    pseudonym_key_file: str | None = None  # the pseudonym key (else S2V_PSEUDONYM_KEY, else a generated one)
    link_table: str | None = None  # write the files/keys -> store ids table here (local, mode 0600); on request only
    prune: bool = False  # erase recordings whose input is gone (windows deleted, manifest line 'withdrawn')
    limits: IngestLimits = IngestLimits()  # retries of dead workers, duration and size quarantine bounds

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        object.__setattr__(self, "inputs", tuple(str(i) for i in inputs))
        if not self.inputs:
            raise ValueError("--input: expected at least one input directory")
        if self.site_config is not None and len(self.inputs) != 1:
            raise ValueError(f"--site-config applies to exactly one --input, found {len(self.inputs)}")
        if self.epochs_per_window < 1:
            raise ValueError(f"--epochs-per-window: expected >= 1, found {self.epochs_per_window}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: expected >= 1, found {self.workers}")
        if self.ids not in ID_MODES:
            raise ValueError(f"--ids: expected one of {', '.join(ID_MODES)}, found {self.ids!r}")


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """Map parsed ``s2v ingest`` flags onto an :class:`IngestConfig`."""
    return IngestConfig(
        inputs=tuple(args.input),
        output=args.output,
        site_config=args.site_config,
        epochs_per_window=args.epochs_per_window,
        workers=args.workers,
        ids=args.ids,
        pseudonym_key_file=args.pseudonym_key_file,
        link_table=args.link_table,
        prune=args.prune,
        limits=IngestLimits(task_retries=args.task_retries, max_hours=args.max_hours, max_file_gib=args.max_file_gib),
    )
