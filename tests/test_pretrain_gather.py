"""Cross-worker negatives: 2 gloo processes with make_gather give the single-process gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipelines.train_loop import make_gather
from s2v_core.losses import dash_infonce
from s2v_core.model import SleepEncoder, batch_to_tensors, model_config
from s2v_core.store import open_store, table_to_batch
from s2v_core.toystore import write_toy_store
from tests.gloo_workers import finish_worker

MODALITIES = ("eeg", "ecg", "hr")


def _loss_and_grads(batch, rank, world_size, gather):
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", modality_dropout=0.0), MODALITIES)
    out = encoder.encode(batch)
    meta = {k: batch[k] for k in ("age", "sex", "site_id", "night_id", "history")}
    result = dash_infonce(
        out.per_modality,
        out.present,
        meta,
        logit_scale=encoder.logit_scale,
        rank=rank,
        world_size=world_size,
        gather=gather,
    )
    result.loss.backward()
    return result, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}


def _worker(rank, world_size, init_file, batch, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    rows = len(batch["present"]) // world_size
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    result, grads = _loss_and_grads(local, rank, world_size, make_gather(world_size))
    for grad in grads.values():  # what DeepSpeed/DDP do: average gradients over ranks
        torch.distributed.all_reduce(grad)
        grad /= world_size
    loss = torch.tensor([float(result.loss.detach())])
    torch.distributed.all_reduce(loss)
    if rank == 0:
        results.put(
            (
                float(loss) / world_size,
                result.to_floats()["negatives_per_anchor"],
                {k: v.numpy() for k, v in grads.items()},
            )
        )
    finish_worker()


@pytest.mark.integration
def test_two_process_gradient_equals_single_process_gradient(tmp_path):
    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=4,
        windows_per_recording=2,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=3,
    )
    table = open_store(str(store)).to_table().slice(0, 8)
    batch = batch_to_tensors(table_to_batch(table, modalities=MODALITIES, epochs_per_window=4))
    single, single_grads = _loss_and_grads(batch, 0, 1, None)

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = mp.start_processes(
        _worker, args=(2, str(tmp_path / "pg"), batch, results), nprocs=2, start_method="spawn", join=False
    )
    loss, negatives, grads = results.get()  # read before joining: a full pipe blocks the writer
    while not processes.join():
        pass
    assert loss == pytest.approx(float(single.loss.detach()), rel=1e-5)
    # Each rank scored its 4 anchors against all 8 windows, not only its own 4.
    assert negatives > 3
    assert set(grads) == set(single_grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, single_grads[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
