"""Ingest throughput: ``s2v ingest`` against a plain MNE loop and a raw pyedflib read.

Run::

    .venv/bin/python benchmarks/bench_ingest.py [--workdir DIR] [--hours 8] [--recordings 4 16]

Prints one JSON object, all figures measured in this run on the same files:

``s2v_hours_per_s_{1,2}_workers``
    recording-hours ingested per wall second by :func:`pipelines.ingest.ingest`
    (local Ray with 1 or 2 CPUs; Ray start-up is excluded and reported apart).
``mne_loop_hours_per_s``
    a plain per-file loop the way earlier sleep models preprocess:
    ``mne.io.read_raw_edf(preload=True)`` -> pick the same channels ->
    0.3-45 Hz band-pass -> resample to 128 Hz -> 30-s epochs -> ``np.save``.
``raw_read_hours_per_s``
    pyedflib reading every sample of every channel, nothing else.
``speedup_vs_mne``, ``fraction_of_raw``
    ratios of the 2-worker ingest to the two baselines (1-worker ratios too).
``peak_rss_mb_per_worker``
    peak resident memory of an ingest worker process for 4 and for 16 recordings.

Nights are synthetic full PSG (``s2v_core.synth``): one ``psg_512`` night
(512 Hz EEG/EOG/EMG/ECG, 14 channels) and one ``mesa_like`` night (256 Hz),
each copied to the requested number of recordings with one sample changed per
copy, so that the ingest does not quarantine them as duplicates.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from s2v_core.io.edf import read_layout
from s2v_core.io.site_config import load_site_config
from s2v_core.recording import choose_channels
from s2v_core.synth import write_cohort

ARCHETYPES = ("psg_512", "mesa_like")
NAMES = {  # archetype -> (signal name, hypnogram name, metadata key) of copy i
    "psg_512": ("SN{i:03d}.edf", "SN{i:03d}_sleepscoring.edf", "SN{i:03d}"),
    "mesa_like": ("mesa-sleep-{n}.edf", "mesa-sleep-{n}-nsrr.xml", "{n}"),
}


def make_base(workdir: Path, hours: float) -> dict[str, Path]:
    base = workdir / "base"
    if not base.exists():
        write_cohort(base, sites=len(ARCHETYPES), recordings_per_site=1, hours=hours, seed=0, archetypes=ARCHETYPES)
    return {name: base / name for name in ARCHETYPES}


def make_cohort(base: dict[str, Path], out: Path, recordings: int) -> list[Path]:
    """``recordings`` distinct copies of the base nights, alternating archetypes, as site directories."""
    shutil.rmtree(out, ignore_errors=True)
    signals = []
    for site, folder in base.items():
        target = out / site
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "site.toml", target / "site.toml")
    rows: dict[str, list[dict]] = {site: [] for site in base}
    for k in range(recordings):
        site = ARCHETYPES[k % len(ARCHETYPES)]
        folder, i = base[site], 101 + k
        signal_name, hyp_name, key = (t.format(i=i, n=2000 + i) for t in NAMES[site])
        source_signal = next(p for p in folder.glob("*.edf") if "sleepscoring" not in p.name)
        source_hyp = next(p for p in folder.iterdir() if p.name.endswith(("_sleepscoring.edf", "-nsrr.xml")))
        config = load_site_config(folder / "site.toml")
        shutil.copy(source_signal, out / site / signal_name)
        shutil.copy(source_hyp, out / site / hyp_name)
        header_bytes = read_layout(out / site / signal_name).header_bytes
        with open(out / site / signal_name, "r+b") as handle:  # one sample per copy: distinct content
            handle.seek(header_bytes)
            handle.write(np.int16(k).tobytes())
        table = list(csv.DictReader(io.StringIO((folder / config.metadata.file).read_text())))
        rows[site].append({**table[0], config.metadata.key_column: key})
        signals.append(out / site / signal_name)
    for site, site_rows in rows.items():
        config = load_site_config(base[site] / "site.toml")
        with open(out / site / config.metadata.file, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(site_rows[0]))
            writer.writeheader()
            writer.writerows(site_rows)
    return signals


_LOAD: dict[str, float] = {}


def _progress(message: str, stage: str | None = None) -> None:
    print(f"[bench_ingest] {message}", file=sys.stderr, flush=True)
    if stage:
        # The 1-min load average after each stage: the machine may be shared, and
        # the ratios are only as fair as the load was steady across stages.
        _LOAD[stage] = round(os.getloadavg()[0], 1)


def hours_of(signals: list[Path]) -> float:
    return sum(read_layout(p).header.duration_seconds for p in signals) / 3600


def raw_read(signals: list[Path]) -> float:
    import pyedflib

    start = time.perf_counter()
    for path in signals:
        reader = pyedflib.EdfReader(str(path))
        for index in range(reader.signals_in_file):
            reader.readSignal(index)
        reader.close()
    return time.perf_counter() - start


def mne_loop(signals: list[Path], out: Path) -> float:
    import mne

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in signals:
        site = load_site_config(path.parent / "site.toml")
        picks = [c.label for c in choose_channels(read_layout(path).header.channels, site)[0].values()]
        raw = mne.io.read_raw_edf(path, preload=True, verbose="error")
        raw.pick(picks)
        raw.filter(0.3, 45.0, picks="all", verbose="error")
        raw.resample(128, verbose="error")
        epochs = mne.make_fixed_length_epochs(raw, duration=30.0, preload=True, verbose="error")
        np.save(out / f"{path.stem}.npy", epochs.get_data().astype(np.float32))
    return time.perf_counter() - start


def s2v_run(signals: list[Path], cohort: Path, store: Path, workers: int) -> tuple[float, float, float]:
    """``(seconds, ray start-up seconds, peak worker RSS MiB)`` of one ingest on a fresh local Ray."""
    import ray

    from pipelines.ingest import ingest
    from pipelines.ingest_config import IngestConfig
    from pipelines.runtime import init_ray

    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    for attempt in range(3):  # a busy shared machine can time out Ray's node start-up
        try:
            init_ray(None, num_cpus=workers)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on start-up timeout
            ray.shutdown()
            if attempt == 2:
                raise
            _progress(f"Ray start-up failed ({exc}); retrying")
    startup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        summary = ingest(IngestConfig(inputs=[str(cohort)], output=str(store), workers=workers))
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    if summary.ok != len(signals):
        raise RuntimeError(f"expected {len(signals)} recordings ingested, got {summary}")
    return seconds, startup, summary.peak_worker_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--hours", type=float, default=8.0, help="length of each night (default 8)")
    parser.add_argument("--recordings", type=int, nargs=2, default=(4, 16), help="small and large cohort sizes")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    small, large = args.recordings
    try:
        base = make_base(workdir, args.hours)
        large_signals = make_cohort(base, workdir / f"cohort{large}", large)
        small_signals = make_cohort(base, workdir / f"cohort{small}", small)
        hours = hours_of(small_signals)
        _progress("cohorts ready", "start")
        raw_s = raw_read(small_signals)
        _progress(f"raw read: {raw_s:.1f} s for {hours:g} h", "raw_read")
        mne_s = mne_loop(small_signals, workdir / "mne_out")
        _progress(f"MNE loop: {mne_s:.1f} s", "mne_loop")
        one_s, startup_1, rss_1 = s2v_run(small_signals, workdir / f"cohort{small}", workdir / "store1", 1)
        _progress(f"s2v ingest, 1 worker: {one_s:.1f} s", "s2v_1_worker")
        two_s, startup_2, rss_small = s2v_run(small_signals, workdir / f"cohort{small}", workdir / "store2", 2)
        _progress(f"s2v ingest, 2 workers: {two_s:.1f} s", "s2v_2_workers")
        big_s, _, rss_large = s2v_run(large_signals, workdir / f"cohort{large}", workdir / "store3", 2)
        _progress(f"s2v ingest, 2 workers, {large} recordings: {big_s:.1f} s", "s2v_2_workers_large")
        result = {
            "nights": f"{small} x {args.hours:g} h synthetic PSG ({', '.join(ARCHETYPES)}; 512/256 Hz EEG)",
            "recording_hours": round(hours, 3),
            "cpu_count": os.cpu_count(),
            "s2v_hours_per_s_1_worker": round(hours / one_s, 3),
            "s2v_hours_per_s_2_workers": round(hours / two_s, 3),
            f"s2v_hours_per_s_2_workers_{large}_recordings": round(hours_of(large_signals) / big_s, 3),
            "mne_loop_hours_per_s": round(hours / mne_s, 3),
            "raw_read_hours_per_s": round(hours / raw_s, 3),
            "speedup_vs_mne": round(mne_s / two_s, 2),
            "speedup_vs_mne_1_worker": round(mne_s / one_s, 2),
            "fraction_of_raw": round(raw_s / two_s, 2),
            "fraction_of_raw_1_worker": round(raw_s / one_s, 2),
            "peak_rss_mb_per_worker": {str(small): round(rss_small, 1), str(large): round(rss_large, 1)},
            "peak_rss_mb_1_worker": round(rss_1, 1),
            "ray_startup_s_excluded": round(max(startup_1, startup_2), 2),
            "load_average_after_stage": dict(_LOAD),
            "seconds": {
                "raw_read": round(raw_s, 2),
                "mne_loop": round(mne_s, 2),
                "s2v_1_worker": round(one_s, 2),
                "s2v_2_workers": round(two_s, 2),
                f"s2v_2_workers_{large}": round(big_s, 2),
            },
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
