"""What the pretraining framework costs: windows/s of a bare torch loop vs ``s2v pretrain``.

Run::

    .venv/bin/python benchmarks/bench_pretrain.py [--steps 40] [--model tiny] [--global-batch 16]

Prints one JSON object: windows/s (median over steps after warm-up) for the
same model and global batch in (a) a bare single-process torch loop
(``table_to_batch`` → ``SleepEncoder`` → ``dash_infonce`` → AdamW, data
already in memory), (b) ``s2v pretrain`` with 1 worker (Ray Data streaming,
DeepSpeed ZeRO-2, checkpoints, MLflow) and (c) with 2 workers; the ratio
(b)/(a) (target >= 0.9) and the share of the 2-worker step time spent in the
forward cross-worker all-gathers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import torch

MODALITIES = ("eeg", "ecg", "hr", "spo2")


def bare_loop(store: Path, *, model: str, global_batch: int, steps: int, warmup: int, seed: int) -> float:
    """(a): windows/s of a plain single-process torch loop on the same model and batch."""
    from pipelines.train_config import PretrainConfig
    from pipelines.train_data import store_files
    from s2v_core.losses import DashConfig, dash_infonce
    from s2v_core.model import SleepEncoder, batch_to_tensors
    from s2v_core.store import table_to_batch

    # The files carry their own `site` column: no hive partition column on top.
    table = pads.dataset([str(f) for f in store_files(store)], format="parquet").to_table()
    epochs = 4
    torch.manual_seed(seed)
    encoder = SleepEncoder(PretrainConfig(model=model).model_config(epochs_per_window=epochs), MODALITIES)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-4)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        offset = (step * global_batch) % (table.num_rows - global_batch)
        batch = batch_to_tensors(table_to_batch(table.slice(offset, global_batch), modalities=MODALITIES,
                                                epochs_per_window=epochs))
        out = encoder.encode(batch)
        meta = {k: batch[k] for k in ("age", "sex", "site_id", "night_id", "history")}
        loss = dash_infonce(out.per_modality, out.present, meta, logit_scale=encoder.logit_scale,
                            config=DashConfig()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return global_batch / statistics.median(times[warmup:])


def framework(store: Path, run_dir: Path, *, workers: int, model: str, global_batch: int, steps: int,
              warmup: int, seed: int) -> tuple[float, float]:
    """(b)/(c): median windows/s and gather share of ``s2v pretrain`` (read back from MLflow)."""
    from mlflow.tracking import MlflowClient

    from pipelines.pretrain import pretrain
    from pipelines.train_config import PretrainConfig

    config = PretrainConfig(data=str(store), output=str(run_dir), workers=workers, model=model,
                            steps=steps, global_batch=global_batch, checkpoint_every=steps, seed=seed,
                            modalities=MODALITIES)
    result = pretrain(config)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")

    def median_after_warmup(key: str) -> float:
        history = sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)
        return statistics.median(m.value for m in history if m.step > warmup)

    return median_after_warmup("windows_per_s"), median_after_warmup("gather_share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import logging

    logging.disable(logging.WARNING)
    import ray

    from s2v_core.toystore import write_toy_store

    with tempfile.TemporaryDirectory(prefix="s2v-bench-pretrain-") as tmp:
        root = Path(tmp)
        store = write_toy_store(root / "store", sites=3, recordings_per_site=6, windows_per_recording=12,
                                epochs_per_window=4, modalities=MODALITIES, seed=args.seed)
        kwargs = dict(model=args.model, global_batch=args.global_batch, steps=args.steps,
                      warmup=args.warmup, seed=args.seed)
        torch.set_num_threads(1)  # one core per Ray worker: compare like with like
        bare = bare_loop(store, **kwargs)
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False)
        try:
            one, _ = framework(store, root / "run1", workers=1, **kwargs)
            two, gather_share = framework(store, root / "run2", workers=2, **kwargs)
        finally:
            ray.shutdown()
    print(json.dumps({
        "model": args.model, "global_batch": args.global_batch, "steps": args.steps,
        "modalities": list(MODALITIES), "cpu_count": os.cpu_count(),
        "bare_torch_windows_per_s": round(bare, 2),
        "pretrain_1_worker_windows_per_s": round(one, 2),
        "pretrain_2_workers_windows_per_s": round(two, 2),
        "ratio_1_worker_vs_bare": round(one / bare, 3),
        "ratio_2_workers_vs_1_worker": round(two / one, 3),
        "gather_share_of_step_2_workers": round(gather_share, 4),
    }))


if __name__ == "__main__":
    main()
