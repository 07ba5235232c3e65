"""What the pretraining framework costs: windows/s of a bare torch loop vs ``s2v pretrain``.

Run::

    .venv/bin/python benchmarks/bench_pretrain.py [--models tiny,small] [--steps 60] [--global-batch 16]

For each model size, the same model, modalities and global batch are trained
(a) by a bare single-process torch loop (``table_to_batch`` →
``SleepEncoder`` → ``dash_infonce`` → AdamW, the store already in memory),
(b) by ``s2v pretrain`` with 1 worker (Ray Data streaming from the Parquet
store, DeepSpeed at its CPU default ZeRO-0, MLflow metrics every step, a
final checkpoint), (c) with 2 workers, and (d) with 1 worker at ZeRO-2; and
(a') the bare loop again while another process reads the store's Parquet
files on one thread (what the framework's reader does beside training). Rates are windows over seconds summed over every step
after ``--warmup`` (stalls included, not a median that would hide them); the
framework's per-step seconds come from the ``windows_per_s`` it logs to
MLflow every step. Prints one JSON object: the rates, (b)/(a) (target >= 0.9),
(b)/(a'), (c)/(b) and (d)/(a) per model, and the share of the 2-worker step
spent in the forward cross-worker all-gathers.

The data path: (e) the windows/s and GB/s of the step's signal columns that
one Ray Train worker's shard sustains (the pretrain dataset, iterated with no
model), next to (f) a bare one-thread ``pyarrow.parquet`` read of the same
files and columns, and how many such readers a ``base`` GPU worker needs at
~2 GB/s (``--data-path-only`` skips the training runs).

The store has realistic windows (10 epochs = 5 min) and nights (48 windows
each); on a 2-core machine (c) cannot beat (b): two single-threaded workers
share the cores with Ray Data's readers and the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODALITIES = ("eeg", "ecg", "hr", "spo2")
EPOCHS_PER_WINDOW = 10


def bare_loop(store: Path, *, model: str, global_batch: int, steps: int, warmup: int, seed: int) -> dict:
    """(a): a plain single-process torch loop on the same model and batch."""
    from pipelines.train_config import PretrainConfig
    from s2v_core.losses import DashConfig, dash_infonce
    from s2v_core.model import SleepEncoder, batch_to_tensors
    from s2v_core.store import open_store, table_to_batch

    table = open_store(store).to_table()
    # Windows in a random order, as the framework's readers mix nights.
    table = table.take(torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(seed)).numpy())
    torch.manual_seed(seed)
    config = PretrainConfig(model=model).model_config(epochs_per_window=EPOCHS_PER_WINDOW)
    encoder = SleepEncoder(config, MODALITIES)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-4)
    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        offset = (step * global_batch) % (table.num_rows - global_batch)
        batch = batch_to_tensors(
            table_to_batch(
                table.slice(offset, global_batch), modalities=MODALITIES, epochs_per_window=EPOCHS_PER_WINDOW
            )
        )
        out = encoder.encode(batch)
        meta = {k: batch[k] for k in ("age", "sex", "site_id", "night_id", "history")}
        loss = dash_infonce(
            out.per_modality, out.present, meta, logit_scale=encoder.logit_scale, config=DashConfig()
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return _rates([global_batch / s for s in seconds[warmup:]])


def concurrent_reader(store: Path):
    """A process re-reading the store's Parquet files on one thread, as the framework's reader does.

    On a 2-core machine the training loop shares the memory system (and
    perhaps a physical core) with whatever runs beside it; the bare loop
    measured beside this reader shows how much of the framework's gap is
    the cost of reading Parquet at all.
    """
    import subprocess
    import sys

    code = (
        "import sys, pyarrow.parquet as pq\n"
        "files = sys.argv[1:]\n"
        "while True:\n"
        "    for f in files: pq.read_table(f, use_threads=False)\n"
    )
    from s2v_core.store import open_store

    return subprocess.Popen([sys.executable, "-c", code, *map(str, open_store(store).files)])


def framework(
    store: Path,
    run_dir: Path,
    *,
    workers: int,
    model: str,
    global_batch: int,
    steps: int,
    warmup: int,
    seed: int,
    zero_stage: int | None = None,
) -> dict:
    """(b)/(c): ``s2v pretrain``'s rates (read back from its MLflow run) and gather share."""
    from mlflow.tracking import MlflowClient

    from pipelines.pretrain import pretrain
    from pipelines.train_config import PretrainConfig

    config = PretrainConfig(
        data=str(store),
        output=str(run_dir),
        workers=workers,
        model=model,
        steps=steps,
        global_batch=global_batch,
        checkpoint_every=steps,
        seed=seed,
        modalities=MODALITIES,
        log_every=1,
        progress_seconds=0,
        zero_stage=zero_stage,
    )
    started = time.perf_counter()
    result = pretrain(config)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")

    def after_warmup(key: str) -> list[float]:
        history = sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)
        return [m.value for m in history if m.step > warmup]

    rates = _rates(after_warmup("windows_per_s"))
    return {
        **rates,
        "gather_share": round(statistics.mean(after_warmup("gather_share")), 4),
        "wall_seconds_whole_command": round(wall, 1),
    }


def _modality_bytes(table, modalities) -> int:
    """Bytes of the signal columns a step uses (what a GPU worker must be fed)."""
    return sum(table.column(key).nbytes for key in modalities if key in table.column_names)


def shard_read(store: Path, *, modalities: tuple[str, ...], batch: int, passes: int, seed: int) -> dict:
    """(e): what one Ray Train worker's shard sustains: the pretrain dataset, iterated with no model.

    The same Ray Data pipeline ``s2v pretrain`` builds (``build_dataset``:
    zero-CPU readers keeping only the step's modality columns, then the
    trainer's ordered split), consumed by a one-worker ``TorchTrainer`` whose
    loop only iterates its shard in pretrain's batch size and counts bytes.
    """
    import ray.train
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.pretrain import _ordered_ingest
    from pipelines.train_data import build_dataset
    from s2v_core.store import open_store

    # One pass that visits the store `passes` times (as pretrain does for a small store): one execution.
    dataset = build_dataset(
        open_store(store).files, modalities=modalities, history_columns=(), seed=seed, repeats=passes
    )

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        windows = nbytes = 0
        started = time.perf_counter()
        first = None  # the pipeline's start-up is paid once per pass over a whole store; reported apart
        for table in shard.iter_batches(batch_size=config["batch"], batch_format="pyarrow", drop_last=True):
            if first is None:
                first = time.perf_counter()
                continue
            windows += table.num_rows
            nbytes += _modality_bytes(table, config["modalities"])
        seconds = time.perf_counter() - first
        # Ray Train v2 keeps the metrics that come with a checkpoint: send a small one.
        with tempfile.TemporaryDirectory() as directory:
            figures = {"windows": windows, "bytes": nbytes, "seconds": seconds, "first_batch_s": first - started}
            (Path(directory) / "figures.json").write_text(json.dumps(figures))
            ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(directory))

    with tempfile.TemporaryDirectory(prefix="s2v-bench-shard-") as tmp:
        result = TorchTrainer(
            loop,
            train_loop_config={"batch": batch, "modalities": list(modalities)},
            scaling_config=ScalingConfig(num_workers=1),
            datasets={"train": dataset},
            dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ordered_ingest(DataConfig)),
            run_config=RunConfig(storage_path=tmp, name="shard-read"),
        ).fit()
    m = result.metrics
    return {
        "windows_per_s": round(m["windows"] / m["seconds"], 1),
        "gb_per_s": round(m["bytes"] / m["seconds"] / 1e9, 4),
        "windows": int(m["windows"]),
        "first_batch_s": round(m["first_batch_s"], 2),
    }


def bare_parquet_read(store: Path, *, modalities: tuple[str, ...], passes: int) -> dict:
    """(f): the same files and columns read with ``pyarrow.parquet`` on one thread, nothing else."""
    import pyarrow.parquet as pq

    from s2v_core.store import open_store

    files = open_store(store).files
    windows = nbytes = 0
    started = time.perf_counter()
    for _ in range(passes):
        for path in files:
            table = pq.read_table(path, columns=list(modalities), use_threads=False)
            windows += table.num_rows
            nbytes += _modality_bytes(table, modalities)
    seconds = time.perf_counter() - started
    return {
        "windows_per_s": round(windows / seconds, 1),
        "gb_per_s": round(nbytes / seconds / 1e9, 4),
        "windows": windows,
    }


def _rates(per_step: list[float]) -> dict:
    """Windows/s over all steps (windows / summed seconds) and the median step's."""
    seconds = [1.0 / r for r in per_step]  # per window
    return {
        "windows_per_s": round(len(seconds) / sum(seconds), 2),
        "median_step_windows_per_s": round(statistics.median(per_step), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated model sizes")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--read-passes", type=int, default=3, help="passes over the store for the data-path rates")
    parser.add_argument("--data-path-only", action="store_true", help="only the store-read rates (no training)")
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    import ray

    from s2v_core.toystore import write_toy_store

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="s2v-bench-pretrain-") as tmp:
        root = Path(tmp)
        store = write_toy_store(
            root / "store",
            sites=3,
            recordings_per_site=6,
            windows_per_recording=48,
            epochs_per_window=EPOCHS_PER_WINDOW,
            modalities=MODALITIES,
            seed=args.seed,
        )
        torch.set_num_threads(1)  # one core per Ray worker: compare like with like
        # The bare loops run before Ray starts, so that nothing else competes for the cores.
        kwargs = dict(global_batch=args.global_batch, steps=args.steps, warmup=args.warmup, seed=args.seed)
        if args.data_path_only:
            models = []
        bare = {model: bare_loop(store, model=model, **kwargs) for model in models}
        reader = concurrent_reader(store)
        try:
            time.sleep(2)  # let it start reading
            bare_beside_reader = {model: bare_loop(store, model=model, **kwargs) for model in models}
        finally:
            reader.kill()
            reader.wait()
        bare_read = bare_parquet_read(store, modalities=MODALITIES, passes=args.read_passes)
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        try:
            shard = shard_read(
                store, modalities=MODALITIES, batch=args.global_batch, passes=args.read_passes, seed=args.seed
            )
            data_path = {
                "shard_of_one_worker": shard,
                "bare_parquet_one_thread": bare_read,
                "ratio_shard_vs_bare_parquet": round(shard["gb_per_s"] / bare_read["gb_per_s"], 3),
                # A base GPU worker at the target MFU eats ~2 GB/s of float16 windows.
                "reader_cpus_for_2_gb_per_s": round(2.0 / max(shard["gb_per_s"], 1e-9), 1),
            }
            for model in models:
                one = framework(store, root / f"{model}-1", workers=1, model=model, **kwargs)
                two = framework(store, root / f"{model}-2", workers=2, model=model, **kwargs)
                zero2 = framework(store, root / f"{model}-1-zero2", workers=1, model=model, zero_stage=2, **kwargs)
                results[model] = {
                    "bare_torch": bare[model],
                    "bare_torch_beside_a_parquet_reader": bare_beside_reader[model],
                    "pretrain_1_worker": one,
                    "pretrain_2_workers": two,
                    "pretrain_1_worker_zero2": zero2,
                    "ratio_1_worker_vs_bare": round(one["windows_per_s"] / bare[model]["windows_per_s"], 3),
                    "ratio_1_worker_vs_bare_beside_reader": round(
                        one["windows_per_s"] / bare_beside_reader[model]["windows_per_s"], 3
                    ),
                    "ratio_2_workers_vs_1_worker": round(two["windows_per_s"] / one["windows_per_s"], 3),
                    "ratio_1_worker_zero2_vs_bare": round(zero2["windows_per_s"] / bare[model]["windows_per_s"], 3),
                    "gather_share_of_step_2_workers": two["gather_share"],
                }
        finally:
            ray.shutdown()
    print(
        json.dumps(
            {
                "benchmark": "pretrain",
                "global_batch": args.global_batch,
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "modalities": list(MODALITIES),
                "epochs_per_window": EPOCHS_PER_WINDOW,
                "target_ratio_1_worker_vs_bare": 0.9,
                "cpu_count": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
                "ray": ray.__version__,
                "machine": platform.machine(),
                "data_path": data_path,
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
