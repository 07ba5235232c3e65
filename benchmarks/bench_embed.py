"""Throughput of ``s2v embed`` (Ray Data actor pool) against a bare forward loop.

Run: ``python benchmarks/bench_embed.py [--windows 384] [--batch-size 32] [--cpus N]``.
Prints one JSON object:

- ``bare_loop_windows_per_s``: one process, the store's windows decoded into
  tensors beforehand, then only ``encoder.encode`` over batches of
  ``batch_size`` under ``torch.inference_mode`` with torch's default threads —
  the ceiling of the same model forward over the same windows;
- ``embed_windows_per_s``: :func:`pipelines.embed.embed` end to end (read the
  store, decode, forward, write Parquet, pool nights) with one actor per core
  on a local Ray started beforehand; the best of ``--repeats`` calls, since
  the first also pays for worker start-up;
- ``ratio``: ``embed_windows_per_s / bare_loop_windows_per_s`` (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=384, help="windows in the toy store")
    parser.add_argument("--epochs-per-window", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs = actors")
    parser.add_argument("--repeats", type=int, default=2, help="embed calls; the best one counts")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()

    import logging

    import ray

    from pipelines.embed import CARRIED_COLUMNS, embed
    from s2v_core.model import SleepEncoder, batch_to_tensors, model_config, save_encoder
    from s2v_core.modalities import MODALITY_KEYS
    from s2v_core.store import open_store, table_to_batch
    from s2v_core.toystore import write_toy_store

    logging.basicConfig(level=logging.WARNING)
    recordings = 8
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        root = Path(tmp)
        store = write_toy_store(root / "store", sites=2, recordings_per_site=recordings // 2,
                                windows_per_recording=args.windows // recordings,
                                epochs_per_window=args.epochs_per_window, seed=0)
        torch.manual_seed(0)
        encoder = SleepEncoder(model_config(args.model)).eval()
        checkpoint = save_encoder(encoder, root / "encoder")

        table = open_store(str(store)).to_table(columns=[*CARRIED_COLUMNS, *MODALITY_KEYS, "present"])
        batches = [batch_to_tensors(table_to_batch(table.slice(start, args.batch_size),
                                                   epochs_per_window=args.epochs_per_window))
                   for start in range(0, table.num_rows, args.batch_size)]
        with torch.inference_mode():
            encoder.encode(batches[0])  # warm-up (allocator, first-call dispatch)
            started = time.perf_counter()
            for batch in batches:
                encoder.encode(batch)
            bare_seconds = time.perf_counter() - started

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            runs = []
            for repeat in range(args.repeats):
                summary = embed(str(checkpoint), str(store), str(root / f"emb{repeat}"),
                                batch_size=args.batch_size, num_actors=args.cpus)
                runs.append(summary.windows_per_second)
        finally:
            ray.shutdown()

    bare = table.num_rows / bare_seconds
    print(json.dumps({
        "benchmark": "embed",
        "model": args.model,
        "windows": table.num_rows,
        "epochs_per_window": args.epochs_per_window,
        "modalities": len(MODALITY_KEYS),
        "batch_size": args.batch_size,
        "actors": args.cpus,
        "torch_threads_bare_loop": torch.get_num_threads(),
        "bare_loop_windows_per_s": round(bare, 2),
        "embed_windows_per_s_each_call": [round(r, 2) for r in runs],
        "embed_windows_per_s": round(max(runs), 2),
        "ratio": round(max(runs) / bare, 3),
        "target_ratio": 0.8,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }))


if __name__ == "__main__":
    main()
