"""Benchmark of ``s2v synth``: write rate, and realism measured by an established sleep stager.

    .venv/bin/python benchmarks/bench_synth.py [--hours 8] [--yasa-nights 3] [--seed 0] [--skip-write|--skip-yasa]

Prints one JSON object:

* ``write``: recording-hours written per wall-clock second (and per CPU second,
  which other load on a shared machine does not distort) for one 8-h night of
  every archetype (each archetype timed on its own), against the baseline of
  writing the same, already generated, signals to EDF/BDF (pure file I/O);
* ``yasa``: Cohen's kappa between the generator's own hypnogram and YASA's
  pretrained stager (``yasa.SleepStaging``, trained on thousands of real PSG
  nights) applied to full synthetic nights read back from the EDF with MNE
  (EEG C4-M1 + EOG E1-M2 + chin EMG of the ``psg_512`` archetype), median over
  nights, against a chance-level scorer that draws stages from the true stage
  distribution (kappa ~ 0). Realistic stage-specific spectra are what lets a
  stager trained on real nights score synthetic ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from s2v_core.modalities import EPOCH_SECONDS
from s2v_core.synth import ARCHETYPES, DEFAULT_CYCLE, write_cohort
from s2v_core.synth.cohort import fake_identity, render_channels
from s2v_core.synth.night import draw_subject, simulate_night
from s2v_core.synth.writers import write_signals

#: psg_512 channels YASA reads (central EEG, left EOG, chin EMG, as in its training data).
YASA_CHANNELS = {"eeg_name": "EEG C4-M1", "eog_name": "EOG E1-M2", "emg_name": "EMG chin"}
_AASM = {"Sleep stage W": 0, "Sleep stage N1": 1, "Sleep stage N2": 2, "Sleep stage N3": 3, "Sleep stage R": 4}


def bench_write(root: Path, *, hours: float, seed: int) -> dict:
    """Time one night per archetype, and the file-writing share of it."""
    per_archetype, total_hours, total_seconds, total_cpu = {}, 0.0, 0.0, 0.0
    for key in DEFAULT_CYCLE:
        cpu = time.process_time()
        summary = write_cohort(root / key, sites=1, recordings_per_site=1, hours=hours, seed=seed, archetypes=(key,))
        total_cpu += time.process_time() - cpu
        per_archetype[key] = round(summary.hours_per_second, 3)
        total_hours += summary.hours_written
        total_seconds += summary.seconds
    # Baseline: writing already generated signals of the heaviest archetype (file I/O only).
    archetype = ARCHETYPES["psg_512"]
    rng = np.random.default_rng(seed)
    night = simulate_night(
        draw_subject(age=45, sex=0, ahi=5, rng=rng), epochs=int(hours * 3600 / EPOCH_SECONDS), rng=rng
    )
    started = time.perf_counter()
    data = render_channels(archetype, night, rng)
    generate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    write_signals(
        root / "io_only.edf",
        archetype.channels,
        data,
        file_format="edf",
        identity=fake_identity(seed=seed, site=0, recording=0),
        equipment="bench",
    )
    io_seconds = time.perf_counter() - started
    return {
        "night_hours": hours,
        "archetypes": list(DEFAULT_CYCLE),
        "hours_per_second": round(total_hours / total_seconds, 3),
        "realtime_factor": round(total_hours * 3600 / total_seconds, 1),
        # CPU time (all threads) is robust to other load on a shared machine.
        "cpu_seconds": round(total_cpu, 1),
        "hours_per_cpu_second": round(total_hours / total_cpu, 3),
        "hours_per_second_by_archetype": per_archetype,
        "psg_512_generate_seconds": round(generate_seconds, 2),
        "psg_512_write_only_seconds": round(io_seconds, 2),
        "psg_512_write_only_hours_per_second": round(hours / io_seconds, 3),
        "psg_512_ratio_to_write_only": round((hours / (generate_seconds + io_seconds)) / (hours / io_seconds), 3),
    }


def _scored_epochs(path: Path, epochs: int) -> np.ndarray:
    import mne

    stages = np.full(epochs, -1)
    annotations = mne.read_annotations(path)
    for onset, text in zip(annotations.onset, annotations.description):
        index = int(round(onset / EPOCH_SECONDS))
        if text in _AASM and index < epochs:
            stages[index] = _AASM[text]
    return stages


def bench_yasa(root: Path, *, nights: int, hours: float, seed: int) -> dict:
    """Kappa of YASA against the generator's hypnogram on full nights read back from EDF."""
    import mne
    import yasa
    from sklearn.metrics import cohen_kappa_score

    mne.set_log_level("error")
    site = write_cohort(
        root / "yasa", sites=1, recordings_per_site=nights, hours=hours, seed=seed, archetypes=("psg_512",)
    ).sites[0]
    with site.metadata_path.open() as handle:
        meta = {row["patient"]: row for row in csv.DictReader(handle)}
    rng = np.random.default_rng(seed)
    kappas, chance, accuracy = [], [], []
    confusion = np.zeros((5, 5), dtype=int)
    for recording in site.recordings:
        raw = mne.io.read_raw_edf(recording.signal_path, include=list(YASA_CHANNELS.values()), preload=True)
        row = meta[recording.key]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predicted = (
                yasa.SleepStaging(
                    raw, **YASA_CHANNELS, metadata={"age": int(float(row["Age"])), "male": row["Sex"] == "male"}
                )
                .predict()
                .as_int()
                .to_numpy()
            )
        truth = _scored_epochs(recording.hypnogram_path, predicted.size)
        scored = truth >= 0
        kappas.append(cohen_kappa_score(truth[scored], predicted[scored]))
        accuracy.append(float(np.mean(truth[scored] == predicted[scored])))
        # Chance-level scorer: stages drawn independently from this night's true distribution.
        guess = rng.choice(truth[scored], size=scored.sum(), replace=True)
        chance.append(cohen_kappa_score(truth[scored], guess))
        np.add.at(confusion, (truth[scored], predicted[scored]), 1)
    return {
        "archetype": "psg_512",
        "channels": YASA_CHANNELS,
        "nights": nights,
        "night_hours": hours,
        "kappa_median": round(float(np.median(kappas)), 3),
        "kappa_per_night": [round(float(k), 3) for k in kappas],
        "accuracy_median": round(float(np.median(accuracy)), 3),
        "chance_kappa_median": round(float(np.median(chance)), 3),
        "kappa_gain_over_chance": round(float(np.median(kappas) - np.median(chance)), 3),
        "confusion_rows_true_W_N1_N2_N3_REM": confusion.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=8.0, help="night length in hours (default 8)")
    parser.add_argument("--yasa-nights", type=int, default=3, help="nights scored by YASA (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-write", action="store_true", help="only the YASA check")
    parser.add_argument("--skip-yasa", action="store_true", help="only the write rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        root = Path(tmp)
        result = {"benchmark": "synth", "seed": args.seed}
        if not args.skip_write:
            result["write"] = bench_write(root, hours=args.hours, seed=args.seed)
        if not args.skip_yasa:
            result["yasa"] = bench_yasa(root, nights=args.yasa_nights, hours=args.hours, seed=args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
