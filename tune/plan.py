"""What a scaling sweep runs: :class:`SweepConfig` and :func:`plan_trials`.

A trial is one point of the grid and one seed, named ``w{width}-d{depth}-m{M}-k{subset}-s{seed}``
(e.g. ``w64-d4-m5-k1-s2``: width 64, depth 4, the second random subset of 5
modalities, seed 2). The design is chosen so that the axes the law is fitted
over are the only things that change between trials:

* **Size N** is the encoder's non-embedding parameter count, varied by
  width *and* depth together: ``depth = round(width / width_per_block)``
  unless ``--depths`` pairs a depth with each width, so the shape (width per
  block) stays fixed while N grows.
* **Modality count M**: several random subsets per count (not one nested
  chain), each drawn from the store's modalities and always holding the
  *scoring pairs*, which are fixed for the whole sweep. Every trial is scored
  on those pairs, so a larger M can help only by what the extra modalities
  taught the encoder.
* **Objective**: the ``paper`` preset by default (one random modality pair
  per step, so supervision does not grow as M(M-1) with M), with modality
  dropout off (the preset's ``modality_dropout = 0``; at M = 2 dropout would
  remove the only pair).
* **EMA off** by default (``--ema`` turns it on): the preset's momentum
  averages over ~250 steps, longer than a short trial.
* **Compute**: every trial takes the same optimiser steps at the same global
  batch, i.e. the same stated number of tokens (``steps x global_batch x
  epochs_per_window x 2`` epoch tokens: one pair per step).
* **Learning rate per width**: muP-style scaling for Adam, ``lr = lr_base *
  lr_base_width / width``, times each of ``--lr-multipliers``; with more than
  one multiplier the trial trains each and keeps the one with the lowest
  validation loss (the grid then costs that many trainings).
* **Seeds**: ``--seeds`` repeats of every point (model init, data order, pair draws).

Subjects come from the store's own ``splits.json``: trials train on
``train``, choose the learning rate on ``val`` and report on ``test``.

Pure planning: no Ray (tests call it directly).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np

from s2v_core.locations import is_uri
from s2v_core.modalities import MODALITY_KEYS, parse_modalities

logger = logging.getLogger(__name__)

#: Below these, a sweep still runs but its law is weakly determined (the report says so).
RECOMMENDED = {"sizes": 5, "seeds": 3, "modality_counts": 4}
#: Phases of a sweep: the held-out points run only after their forecast is written.
PHASES = ("main", "held_out")


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep needs; ``s2v sweep`` options map one to one."""

    data: str  # the Parquet store with its splits.json (``s2v ingest`` output): a path or a URI
    output: str  # SWEEP_DIR: Tune experiments, predictions.json, scaling.json/png, mlflow.db; a local path
    widths: tuple[int, ...]  # encoder widths d; with the depths they set N (>= 5 sizes for a law)
    modality_counts: tuple[int, ...]  # numbers of pretraining modalities M (each >= the scoring modalities)
    depths: tuple[int, ...] = ()  # one depth per width; empty = round(width / width_per_block)
    width_per_block: int = 16  # shape kept across sizes when depths are derived: width / depth
    subsets_per_count: int = 3  # random modality subsets per M (fewer when fewer exist)
    scoring_pairs: tuple[tuple[str, str], ...] = ()  # pairs every trial is scored on; () = one seeded pair
    seeds: int = 3  # repeats of every point (seed, seed + 1, ...)
    objective: str = "paper"  # objective preset: paper = one random pair per step, no modality dropout
    # EMA weights (the paper preset's) are off by default: at momentum 0.996 the average
    # spans ~250 steps, so a short trial's saved encoder would be mostly its initialisation.
    ema: bool = False
    model: str = "tiny"  # named model size the widths/depths override
    steps: int = 30  # optimiser steps per trial: with global_batch the fixed compute of every trial
    global_batch: int = 8  # windows per step over all workers of a trial
    lr: float = 1e-3  # peak learning rate at lr_base_width (scaled as lr_base_width / width)
    lr_base_width: int = 32  # width at which `lr` applies
    lr_multipliers: tuple[float, ...] = (1.0,)  # grid tried per trial (best on val kept)
    workers_per_trial: int = 1  # Ray Train workers per trial (1 CPU or 1 GPU each)
    device: str = "auto"  # trial workers: auto (GPUs when the cluster has one per worker) | cpu | gpu
    cpus_per_trial: float = 1.0  # CPUs of the trial process itself (launch + scoring)
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster fits
    score_windows: int = 256  # held-out windows scored per split (val and test)
    validation_batch: int = 32  # windows per scoring batch (the negatives of the held-out loss)
    probe_windows: int = 512  # train-split windows the staging probe is fitted on
    preregister: bool = True  # hold out the largest width and count until their forecast is written
    seed: int = 0  # base seed: subsets, scoring pair, first trial seed, bootstrap
    max_failures: int = 1  # retries of a failed trial before it is recorded as failed
    bootstrap: int = 200  # cluster-bootstrap refits for the intervals

    def __post_init__(self) -> None:
        if is_uri(self.output):
            raise ValueError(
                f"--output: expected a local directory or a path on storage every node mounts (Tune's state, "
                f"the trial log and the MLflow store live there), found the URI {self.output}; "
                "the store (--data) may be a URI"
            )
        for option, values in (
            ("--widths", self.widths),
            ("--modality-counts", self.modality_counts),
            ("--depths", self.depths),
        ):
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad:
                raise ValueError(f"{option}: expected positive integers, found {bad}")
            if option != "--depths" and len(set(values)) != len(values):
                raise ValueError(f"{option}: value listed twice in {list(values)}")
        if not self.widths or not self.modality_counts:
            raise ValueError("--widths and --modality-counts need at least one value each")
        if self.depths and len(self.depths) != len(self.widths):
            raise ValueError(
                f"--depths: expected one depth per width ({len(self.widths)}), "
                f"found {len(self.depths)} in {list(self.depths)}"
            )
        if min(self.modality_counts) < 2:
            raise ValueError(
                f"--modality-counts: found {min(self.modality_counts)}; the contrastive objective "
                "aligns pairs of modalities, so a trial needs at least 2"
            )
        for option, value in (
            ("--width-per-block", self.width_per_block),
            ("--subsets-per-count", self.subsets_per_count),
            ("--seeds", self.seeds),
            ("--steps", self.steps),
            ("--global-batch", self.global_batch),
            ("--lr-base-width", self.lr_base_width),
            ("--workers-per-trial", self.workers_per_trial),
            ("--score-windows", self.score_windows),
            ("--validation-batch", self.validation_batch),
            ("--probe-windows", self.probe_windows),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option}: expected an integer >= 1, found {value!r}")
        if self.global_batch % self.workers_per_trial:
            raise ValueError(
                f"--global-batch {self.global_batch} is not divisible by --workers-per-trial {self.workers_per_trial}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr: expected a learning rate > 0, found {self.lr!r}")
        if not self.lr_multipliers or any(not (v > 0 and math.isfinite(v)) for v in self.lr_multipliers):
            raise ValueError(f"--lr-multipliers: expected numbers > 0, found {list(self.lr_multipliers)}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"--device: expected auto, cpu or gpu, found {self.device!r}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"--cpus-per-trial: expected > 0, found {self.cpus_per_trial}")
        if self.max_concurrent < 0:
            raise ValueError(f"--max-concurrent: expected >= 0, found {self.max_concurrent}")
        for a, b in self.scoring_pairs:
            parse_modalities([a, b], option="--scoring-pairs")  # unknown or repeated names
        if len(set(map(tuple, map(sorted, self.scoring_pairs)))) != len(self.scoring_pairs):
            raise ValueError(f"--scoring-pairs: pair listed twice in {self.scoring_pairs}")

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """``(width, depth)`` of every size, in the order of ``widths``."""
        depths = self.depths or tuple(max(1, round(w / self.width_per_block)) for w in self.widths)
        return tuple(zip(self.widths, depths))

    def learning_rate(self, width: int) -> float:
        """The muP-style base learning rate of ``width`` (before ``lr_multipliers``)."""
        return self.lr * self.lr_base_width / width

    def trial_seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + i for i in range(self.seeds))


def parse_pairs(text: str, *, option: str = "--scoring-pairs") -> tuple[tuple[str, str], ...]:
    """``"eeg-ecg,eeg-eog"`` -> ``(("eeg", "ecg"), ("eeg", "eog"))`` (each pair in registry order)."""
    pairs = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        names = [n.strip().lower() for n in item.split("-")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"{option}: expected pairs like eeg-ecg, comma-separated, found {item!r}")
        parse_modalities(names, option=option)
        pairs.append(tuple(sorted(names, key=MODALITY_KEYS.index)))
    return tuple(pairs)


def scoring_pairs(available, *, chosen=(), seed: int = 0) -> tuple[tuple[str, str], ...]:
    """The pairs every trial is scored on: ``chosen`` (checked against the store) or one seeded pair."""
    available = tuple(available)
    if chosen:
        missing = sorted({k for pair in chosen for k in pair} - set(available))
        if missing:
            raise ValueError(
                f"--scoring-pairs: {', '.join(missing)} not in the store, which holds {', '.join(available)}"
            )
        return tuple(tuple(p) for p in chosen)
    if len(available) < 2:
        raise ValueError(f"--data: the store holds {len(available)} modality; a sweep needs at least 2")
    first, second = np.random.default_rng([seed, 2]).choice(len(available), size=2, replace=False)
    return (tuple(sorted((available[first], available[second]), key=MODALITY_KEYS.index)),)


def modality_subsets(available, counts, *, pairs, per_count: int, seed: int = 0) -> dict[int, list[tuple[str, ...]]]:
    """Up to ``per_count`` distinct random subsets of ``available`` per count, each holding the ``pairs``' modalities.

    The extra modalities of each subset are a seeded draw without
    replacement among all combinations of the rest, independently per count
    (so subsets of different counts are not nested). Fewer subsets are
    returned when fewer combinations exist (one at M = the scoring
    modalities or M = everything). Subsets are in registry order.
    """
    available = tuple(available)
    base = {k for pair in pairs for k in pair}
    rest = [k for k in available if k not in base]
    too_small = [c for c in counts if c < len(base)]
    if too_small:
        raise ValueError(
            f"--modality-counts: {too_small} are below the {len(base)} modalities of the scoring "
            f"pairs ({', '.join(sorted(base))}), which every subset holds"
        )
    too_many = [c for c in counts if c > len(available)]
    if too_many:
        raise ValueError(
            f"--modality-counts: {too_many} exceed the {len(available)} modalities present "
            f"in the store ({', '.join(available)})"
        )
    out = {}
    for count in counts:
        combos = list(itertools.combinations(rest, count - len(base)))
        chosen = np.random.default_rng([seed, 1, count]).choice(
            len(combos), size=min(per_count, len(combos)), replace=False
        )
        out[count] = [tuple(k for k in MODALITY_KEYS if k in base | set(combos[i])) for i in sorted(chosen)]
    return out


def trial_key(width: int, depth: int, count: int, subset: int, seed: int) -> str:
    return f"w{width}-d{depth}-m{count}-k{subset}-s{seed}"


def held_out_axes(cfg: SweepConfig) -> dict[str, bool]:
    """Which axes get a pre-registered forecast: the largest value is held out when >= 3 smaller ones remain."""
    return {"n": cfg.preregister and len(cfg.widths) >= 4, "m": cfg.preregister and len(cfg.modality_counts) >= 4}


def plan_trials(cfg: SweepConfig, *, available) -> tuple[list[dict], dict]:
    """One trial per (size, count, subset, seed), with N, the learning rate and the phase; plus a summary.

    ``available`` are the store's modalities. A trial is in phase
    ``held_out`` when its width is the largest (and the N forecast is on) or
    its count the largest (and the M forecast is on): those run after the
    forecasts fitted on the ``main`` phase are written.
    """
    import torch

    from s2v_core.architecture import resolve_model_config
    from s2v_core.model import SleepEncoder, count_parameters
    from s2v_core.objective import load_objective

    for what, have in (("sizes", len(cfg.widths)), ("seeds", cfg.seeds), ("modality_counts", len(cfg.modality_counts))):
        if have < RECOMMENDED[what]:
            logger.warning(
                "%d %s (at least %d recommended): the fit and its intervals will be weak or absent",
                have,
                what.replace("_", " "),
                RECOMMENDED[what],
            )
    pairs = scoring_pairs(available, chosen=cfg.scoring_pairs, seed=cfg.seed)
    subsets = modality_subsets(
        available, cfg.modality_counts, pairs=pairs, per_count=cfg.subsets_per_count, seed=cfg.seed
    )
    overrides = load_objective(cfg.objective).model_overrides()
    axes = held_out_axes(cfg)
    widest, most = max(cfg.widths), max(cfg.modality_counts)
    n_params = {}
    for width, depth in cfg.sizes:
        # The one place options become an architecture; N excludes tokenizers and
        # embeddings, so it does not depend on the subset (any subset gives the same N).
        config = resolve_model_config(cfg.model, width=width, depth=depth, overrides=overrides)
        torch.manual_seed(0)
        n_params[width] = count_parameters(SleepEncoder(config, tuple(pairs[0])), non_embedding=True)
    if len(set(n_params.values())) != len(n_params):
        raise ValueError(
            f"--widths/--depths: two sizes have the same parameter count ({n_params}); each size must differ in N"
        )
    trials = []
    for (width, depth), count, seed in itertools.product(cfg.sizes, cfg.modality_counts, cfg.trial_seeds()):
        for index, subset in enumerate(subsets[count]):
            held = (axes["n"] and width == widest) or (axes["m"] and count == most)
            trials.append(
                {
                    "key": trial_key(width, depth, count, index, seed),
                    "width": width,
                    "depth": depth,
                    "modality_count": count,
                    "subset": index,
                    "modalities": list(subset),
                    "seed": seed,
                    "n_params": n_params[width],
                    "lr": cfg.learning_rate(width),
                    "scoring_pairs": [list(p) for p in pairs],
                    "phase": "held_out" if held else "main",
                }
            )
    summary = {
        "scoring_pairs": [list(p) for p in pairs],
        "modality_subsets": {str(c): [list(s) for s in v] for c, v in subsets.items()},
        "sizes": [{"width": w, "depth": d, "n_params": n_params[w]} for w, d in cfg.sizes],
        "held_out": {
            "n_params": n_params[widest] if axes["n"] else None,
            "modality_count": most if axes["m"] else None,
        },
    }
    return trials, summary
