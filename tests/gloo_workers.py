"""For tests that start their own gloo process group under ``torch.multiprocessing``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist


def finish_worker() -> None:
    """Destroy the process group, then leave the worker without interpreter shutdown.

    Call it last, once the worker's results are written. A gloo thread frees each
    finished collective's tensors a moment after the collective has returned to
    Python, and freeing a tensor that has a Python object takes the GIL. When the
    main thread has by then reached interpreter shutdown, that thread is made to
    exit inside a destructor and the process aborts ("terminate called without an
    active exception", SIGABRT) although its work is done: 1 run in 3 on 2 cores.
    A worker that raises does not get here, so its traceback still reaches the test.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_group(rank: int, world_size: int, init_file: str, body: Callable[[], None]) -> None:
    """Join a gloo group of ``world_size`` through ``init_file``, run ``body()``, then :func:`finish_worker`.

    One intra-op thread per worker (two workers share the runner's cores). A
    ``body`` that raises destroys the group and re-raises, so its traceback
    reaches the test.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        body()
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_worker()
