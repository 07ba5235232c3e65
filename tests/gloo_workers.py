"""For tests that start their own gloo process group under ``torch.multiprocessing``."""

from __future__ import annotations

import os
import sys

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
