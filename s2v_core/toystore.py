"""A small store of synthetic windows written straight from the schema.

For tests and benchmarks of the model side (pretrain, embed, evaluate,
sweeps) that must not depend on EDF decoding. The signals are not physiology
(``s2v synth`` makes realistic nights); they are built so that the task is
learnable: every modality of a window shares one per-window latent envelope
(so modalities of the same window can be aligned) and its carrier frequency
depends on the epoch's stage (so stages can be probed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from s2v_core.modalities import EPOCH_SECONDS, MODALITY_KEYS, get_modality
from s2v_core.splits import SplitConfig, write_splits
from s2v_core.store import store_schema, write_store_file


def toy_windows(
    *,
    site: str,
    recording_id: str,
    windows: int,
    epochs_per_window: int,
    modalities: tuple[str, ...] = MODALITY_KEYS,
    age: float | None = 50.0,
    sex: int | None = 0,
    outcomes: dict[str, float] | None = None,
    scored_events: bool = False,
    rng: np.random.Generator,
) -> pa.Table:
    """One night of ``windows`` toy windows as a store table.

    With ``scored_events`` the night has per-epoch event labels: a hypopnoea
    (bit 2) in every N2 epoch (so that the signals, which follow the stages,
    carry them), and the outcome ``ahi_scored`` counts those epochs per hour
    of sleep; without, ``events`` is null (no scored events).
    """
    schema = store_schema(epochs_per_window)
    stages = rng.integers(0, 5, size=(windows, epochs_per_window)).astype(np.int8)
    # One latent envelope per window and epoch, shared by every modality of that window.
    envelopes = rng.normal(size=(windows, epochs_per_window))
    columns: dict[str, list] = {
        "recording_id": [recording_id] * windows,
        "subject_id": [recording_id.split("-night")[0]] * windows,
        "site": [site] * windows,
        "window_index": list(range(windows)),
        "start_epoch": [w * epochs_per_window for w in range(windows)],
    }
    for key in MODALITY_KEYS:
        if key not in modalities:
            columns[key] = [None] * windows
            continue
        modality = get_modality(key)
        samples = modality.samples_per_epoch
        t = np.arange(samples) / modality.store_rate_hz
        rows = []
        for w in range(windows):
            envelope = envelopes[w]
            signal = np.empty((epochs_per_window, samples), dtype=np.float32)
            for e in range(epochs_per_window):
                freq = (0.5 + stages[w, e]) * min(modality.store_rate_hz / 16.0, 2.0)
                signal[e] = envelope[e] * np.sin(2 * np.pi * freq * t / EPOCH_SECONDS * 10)
            signal += 0.3 * rng.normal(size=signal.shape).astype(np.float32)
            rows.append(signal.astype(np.float16).ravel())
        columns[key] = rows
    columns["present"] = [[k in modalities for k in MODALITY_KEYS]] * windows
    columns["stages"] = [list(s) for s in stages]
    columns["age"] = [age] * windows
    columns["sex"] = [sex] * windows
    outcomes = dict(outcomes or {})
    if scored_events:
        events = np.where(stages == 2, 2, 0).astype(np.int8)
        sleep_hours = np.count_nonzero(stages >= 1) * EPOCH_SECONDS / 3600.0
        outcomes["ahi_scored"] = float(np.count_nonzero(events) / sleep_hours) if sleep_hours else 0.0
        columns["events"] = [list(e) for e in events]
    else:
        columns["events"] = [None] * windows
    columns["outcomes"] = [list(outcomes.items())] * windows
    return pa.Table.from_pydict(columns, schema=schema)


def _cvd_outcome(ahi: float, seed: int, site: int, recording: int) -> dict[str, float]:
    """A censored time to a first cardiovascular event whose hazard rises with the AHI.

    Exponential with a daily hazard of ``1e-4 * exp(0.05 * AHI)`` (as in SHHS,
    where CVD incidence rises with the AHI), censored at 10 years of follow-up:
    ``cvd_event`` 1.0 if the event came first, ``cvd_days`` the time to it or
    to censoring. Drawn from a generator of its own so the other outcomes of a
    seed are unchanged.
    """
    rng = np.random.default_rng([seed, site, recording, 1])
    follow_up = 3650.0
    time = float(rng.exponential(1.0 / (1e-4 * np.exp(0.05 * ahi))))
    return {"cvd_event": float(time < follow_up), "cvd_days": min(time, follow_up)}


def write_toy_store(
    root: str | Path,
    *,
    sites: int = 2,
    recordings_per_site: int = 3,
    windows_per_recording: int = 4,
    epochs_per_window: int = 4,
    modalities: tuple[str, ...] = MODALITY_KEYS,
    seed: int = 0,
    val_per_site: int = 0,
    test_per_site: int = 0,
    scored_event_sites: int = 0,
) -> Path:
    """Write a toy store under ``root`` (``site=<name>/<recording>.parquet``) and return it.

    Like a store written by ``s2v ingest``, the root also holds
    ``manifest.jsonl`` (one ``ok`` line per recording), so readers of the
    store are tested against a root that is not only Parquet files.

    Ages, sexes and outcomes (``ahi``, ``hypertension``, and a time-to-event
    pair ``cvd_event`` / ``cvd_days``, see :func:`_cvd_outcome`) vary per night;
    every third night of a site lacks the last selected modality, so the
    ``present`` mask is exercised. Every night is its own subject; the store's
    ``splits.json`` assigns them explicitly: the last ``test_per_site`` nights
    of each site to ``test``, the ``val_per_site`` before them to ``val``, the
    rest to ``train``. The nights of the first ``scored_event_sites`` sites
    carry per-epoch event labels (see :func:`toy_windows`).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    manifest = []
    assigned = []
    for s in range(sites):
        site = f"site{s}"
        (root / f"site={site}").mkdir(parents=True, exist_ok=True)
        for r in range(recordings_per_site):
            recording_id = f"{site}-r{r:03d}"
            night_modalities = modalities if r % 3 != 2 or len(modalities) == 1 else modalities[:-1]
            ahi = float(rng.gamma(2.0, 8.0))
            table = toy_windows(
                site=site,
                recording_id=recording_id,
                windows=windows_per_recording,
                epochs_per_window=epochs_per_window,
                modalities=night_modalities,
                age=float(rng.uniform(20, 80)),
                sex=int(rng.integers(0, 2)),
                outcomes={"ahi": ahi, "hypertension": float(ahi > 15), **_cvd_outcome(ahi, seed, s, r)},
                scored_events=s < scored_event_sites,
                rng=rng,
            )
            write_store_file(table, root / f"site={site}" / f"{recording_id}.parquet")
            from_end = recordings_per_site - r
            split = (
                "test" if from_end <= test_per_site else "val" if from_end <= test_per_site + val_per_site else "train"
            )
            assigned.append((site, table.column("subject_id")[0].as_py(), split))
            manifest.append(
                {
                    "recording_id": recording_id,
                    "site": site,
                    "source": f"toy/{recording_id}",
                    "status": "ok",
                    "reason": None,
                    "windows": windows_per_recording,
                    "modalities": list(night_modalities),
                }
            )
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in manifest)
    write_splits(str(root), SplitConfig(assigned=tuple(assigned)))
    return root
