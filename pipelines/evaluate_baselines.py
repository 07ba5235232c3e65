"""The baselines ``s2v evaluate`` puts beside the embeddings' probe, read from the store the embeddings came from.

- :func:`label_efficiency_section`: the probe on 1 / 10 / 100 % of the labelled
  training nights next to the same encoder architecture trained from scratch on them.
- :func:`yasa_peer_section`: YASA's staging of the same test windows (EEG, with EOG
  and EMG where present), next to the probe on exactly those windows.
- :func:`store_rows`: the store rows of the embedded windows, in their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from s2v_core.embeddings import Embeddings
from s2v_core.evaluation import plots
from s2v_core.evaluation.folds import Fold
from s2v_core.evaluation.probes import label_efficiency, linear_staging_probe
from s2v_core.store import UNKNOWN_STAGE, open_store

#: Fractions of labelled training nights of the label-efficiency curve.
LABEL_FRACTIONS = (0.01, 0.1, 1.0)


def store_rows(emb: Embeddings, data: str, columns: Sequence[str]) -> pa.Table:
    """Store rows of ``columns`` in the order of the embeddings' windows (night, window index).

    Raises ``ValueError`` naming ``--data`` when the store lacks a window of the embeddings.
    """
    dataset = open_store(data)
    wanted = pa.array(np.unique(emb.recording_id).tolist())
    needed = ["recording_id", "site", "window_index", *[c for c in columns if c not in ("recording_id", "site")]]
    table = dataset.to_table(columns=needed, filter=pads.field("recording_id").isin(wanted))
    keys = [
        f"{s}\x00{r}\x00{w}"
        for s, r, w in zip(
            table.column("site").to_pylist(),
            table.column("recording_id").to_pylist(),
            table.column("window_index").to_pylist(),
        )
    ]
    position = {k: i for i, k in enumerate(keys)}
    wanted_keys = [
        f"{s}\x00{r}\x00{w}"
        for s, r, w in zip(emb.site, emb.recording_id, emb.windows.column("window_index").to_pylist())
    ]
    missing = [k for k in wanted_keys if k not in position]
    if missing:
        raise ValueError(
            f"--data {data!r} lacks {len(missing)} windows of the embeddings "
            f"(e.g. {missing[0].replace(chr(0), '/')}); pass the store they were embedded from"
        )
    return table.take(pa.array([position[k] for k in wanted_keys]))


def label_efficiency_section(
    emb: Embeddings, folds: list[Fold], data: str, checkpoint: str, seed: int, out_dir: Path, plot_paths: list[str]
) -> dict:
    from pipelines.model_io import load_encoder_spec
    from s2v_core.evaluation.scratch import scratch_staging_probe
    from s2v_core.store import table_to_batch

    encoder, _ = load_encoder_spec(checkpoint)
    modalities = tuple(emb.info["modalities"])
    # The from-scratch model reads the raw signals of exactly the embedded windows.
    table = store_rows(emb, data, [*modalities, "subject_id", "present", "stages", "age", "sex", "outcomes"])
    signals = table_to_batch(table, modalities=modalities, epochs_per_window=emb.info["epochs_per_window"])
    probes = {
        "linear_probe_pretrained": linear_staging_probe(emb.epoch, emb.stages, seed=seed),
        "supervised_from_scratch": scratch_staging_probe(
            signals, emb.stages, config=encoder.config, modalities=modalities, seed=seed
        ),
    }
    curves = label_efficiency(probes, emb.stages, emb.night_id, folds, fractions=LABEL_FRACTIONS, seed=seed)
    plot_paths.append(str(plots.plot_label_efficiency(curves, out_dir / "label_efficiency.png")))
    return {
        "fractions": list(LABEL_FRACTIONS),
        "unit": "fraction of labelled training nights per fold",
        "scratch_model": {
            "config": encoder.config.name,
            "width": encoder.config.width,
            "depth": encoder.config.depth,
            "modalities": list(modalities),
            "budget": "20 passes over its labelled windows (100-3000 steps of 16 windows), "
            "early stopping on val subjects' macro-F1 (patience 5 of 20 checks)",
            "optimiser": "AdamW lr 1e-3",
        },
        "curves": curves,
    }


def yasa_peer_section(emb: Embeddings, folds: list[Fold], data: str, seed: int) -> dict:
    from s2v_core.evaluation.metrics import staging_metrics, summarise
    from s2v_core.evaluation.peer import MIN_EPOCHS, NOMINAL_UV, yasa_stages
    from s2v_core.store import modality_array

    table = store_rows(emb, data, ["eeg", "eog", "emg", "start_epoch", "age", "sex"])
    epochs = emb.info["epochs_per_window"]
    signals = {k: modality_array(table, k, epochs) for k in ("eeg", "eog", "emg")}
    predicted = np.full(emb.stages.shape, UNKNOWN_STAGE, dtype=np.int64)
    for night in np.unique(emb.night_id):
        rows = np.flatnonzero((emb.night_id == night) & signals["eeg"][1])
        if len(rows) * epochs < MIN_EPOCHS or np.any(np.diff(emb.start_epoch[rows]) != epochs):
            continue  # YASA stages whole contiguous nights of at least 5 min
        extra = {
            k: signals[k][0][rows].reshape(-1, signals[k][0].shape[-1])
            for k in ("eog", "emg")
            if signals[k][1][rows].all()
        }
        age, sex = table.column("age")[int(rows[0])].as_py(), table.column("sex")[int(rows[0])].as_py()
        staged = yasa_stages(
            signals["eeg"][0][rows].reshape(-1, signals["eeg"][0].shape[-1]),
            **extra,
            age=age,
            male=None if sex is None else bool(sex),
        )
        predicted[rows] = staged.reshape(len(rows), epochs)
    covered = (predicted != UNKNOWN_STAGE).all(axis=1)
    if not covered.any():
        return {"available": False, "reason": "no night with >= 5 min of contiguous EEG windows"}
    per_fold_yasa, per_fold_probe = [], []
    probe = linear_staging_probe(emb.epoch, emb.stages, seed=seed)
    for fold in folds:
        test = fold.test[covered[fold.test]]
        if len(test) == 0 or not (emb.stages[test] != UNKNOWN_STAGE).any():
            continue
        per_fold_yasa.append(
            {k: v for k, v in staging_metrics(emb.stages[test], predicted[test]).items() if k != "confusion"}
        )
        per_fold_probe.append(
            {
                k: v
                for k, v in staging_metrics(emb.stages[test], probe(fold.train, test, fold.val)).items()
                if k != "confusion"
            }
        )
    return {
        "available": True,
        "n_windows": int(covered.sum()),
        "yasa": summarise(per_fold_yasa),
        "linear_probe_same_windows": summarise(per_fold_probe),
        "per_fold_yasa": per_fold_yasa,
        "caveat": f"store signals are robust-normalised; rescaled to nominal amplitudes {NOMINAL_UV} µV "
        "before YASA, whose classifier was trained on raw µV",
    }
