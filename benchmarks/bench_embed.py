"""Throughput of ``s2v embed`` (Ray Data actor pool) against a bare forward loop.

Run: ``python benchmarks/bench_embed.py [--windows 12288] [--batch-size 64] [--cpus N]``.

The store is large enough (12288 windows) that embed's fixed costs (actor
start-up, loading the encoder, Ray Data's executor) are a small part of a call.
Prints one JSON object:

- ``bare_loop_windows_per_s``: one process, the store's rows already in
  memory, each batch of ``batch_size`` decoded (``table_to_batch``) and
  encoded under ``torch.inference_mode`` with torch's default threads: the
  same work as embed minus Ray, Parquet reading and writing;
- ``bare_forward_only_windows_per_s``: the same with the batches decoded
  beforehand (the ceiling of the model forward alone; for ``tiny`` the
  decoding costs more than the forward);
- ``embed_windows_per_s``: :func:`pipelines.embed.embed` end to end (read the
  store, decode, forward, write Parquet, pool nights) with one actor per core
  on a local Ray started beforehand, actor start-up included; the best of
  ``--repeats`` calls;
- ``bare_loop_reading_parquet_windows_per_s``: the bare loop reading each
  night's Parquet file itself (embed's whole job in one process, no Ray);
- ``ratio``: ``embed_windows_per_s / bare_loop_windows_per_s`` (target >= 0.8),
  and ``ratio_vs_bare_loop_reading_parquet`` against the loop that reads too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=12288, help="windows in the toy store")
    parser.add_argument("--epochs-per-window", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs = actors")
    parser.add_argument("--repeats", type=int, default=1, help="embed calls; the best one counts")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()

    import logging

    import ray

    from pipelines.embed import embed
    from pipelines.embed_config import EmbedConfig
    from s2v_core.embeddings import CARRIED_COLUMNS
    from s2v_core.modalities import MODALITY_KEYS
    from s2v_core.model import SleepEncoder, batch_to_tensors, model_config, save_encoder
    from s2v_core.store import open_store, table_to_batch
    from s2v_core.toystore import write_toy_store

    logging.basicConfig(level=logging.WARNING)
    recordings = 8
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        root = Path(tmp)
        store = write_toy_store(
            root / "store",
            sites=2,
            recordings_per_site=recordings // 2,
            windows_per_recording=args.windows // recordings,
            epochs_per_window=args.epochs_per_window,
            seed=0,
        )
        torch.manual_seed(0)
        encoder = SleepEncoder(model_config(args.model)).eval()
        checkpoint = save_encoder(encoder, root / "encoder")

        table = open_store(str(store)).to_table(columns=[*CARRIED_COLUMNS, *MODALITY_KEYS, "present"])

        def batches():
            for start in range(0, table.num_rows, args.batch_size):
                yield batch_to_tensors(
                    table_to_batch(table.slice(start, args.batch_size), epochs_per_window=args.epochs_per_window)
                )

        with torch.inference_mode():
            encoder.encode(next(batches()))  # warm-up (allocator, first-call dispatch)
            decoded = list(batches())
            started = time.perf_counter()
            for batch in decoded:
                encoder.encode(batch)
            forward_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for batch in batches():  # decoding each batch from the in-memory table, as embed must
                encoder.encode(batch)
            bare_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for path in open_store(str(store)).files:  # reading each night's file too
                night = pq.read_table(path, columns=[*CARRIED_COLUMNS, *MODALITY_KEYS, "present"])
                for start in range(0, night.num_rows, args.batch_size):
                    encoder.encode(
                        batch_to_tensors(
                            table_to_batch(
                                night.slice(start, args.batch_size), epochs_per_window=args.epochs_per_window
                            )
                        )
                    )
            reading_seconds = time.perf_counter() - started
        del decoded

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            runs = []
            for repeat in range(args.repeats):
                summary = embed(
                    EmbedConfig(
                        checkpoint=str(checkpoint),
                        data=str(store),
                        output=str(root / f"emb{repeat}"),
                        batch_size=args.batch_size,
                        num_actors=args.cpus,
                    )
                )
                runs.append(summary.windows_per_second)
        finally:
            ray.shutdown()

    bare = table.num_rows / bare_seconds
    forward_only = table.num_rows / forward_seconds
    with_reading = table.num_rows / reading_seconds
    print(
        json.dumps(
            {
                "benchmark": "embed",
                "model": args.model,
                "windows": table.num_rows,
                "epochs_per_window": args.epochs_per_window,
                "modalities": len(MODALITY_KEYS),
                "batch_size": args.batch_size,
                "actors": args.cpus,
                "torch_threads_bare_loop": torch.get_num_threads(),
                "bare_loop_windows_per_s": round(bare, 2),
                "bare_forward_only_windows_per_s": round(forward_only, 2),
                "bare_loop_reading_parquet_windows_per_s": round(with_reading, 2),
                "embed_windows_per_s_each_call": [round(r, 2) for r in runs],
                "embed_windows_per_s": round(max(runs), 2),
                "ratio": round(max(runs) / bare, 3),
                "ratio_vs_bare_loop_reading_parquet": round(max(runs) / with_reading, 3),
                "target_ratio": 0.8,
                "cpu_count": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "platform": platform.platform(),
                "torch": torch.__version__,
                "ray": ray.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
