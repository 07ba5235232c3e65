"""The loop's DeepSpeed step on two real gloo processes: every ZeRO stage trains the same model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipelines.train_config import PretrainConfig, deepspeed_config
from pipelines.train_loop import _save_encoder, build_engine, forward_backward, make_gather
from s2v_core.model import batch_to_tensors, load_encoder, model_config
from s2v_core.store import open_store, table_to_batch
from s2v_core.toystore import write_toy_store
from tests.gloo_workers import finish_worker

MODALITIES = ("eeg", "ecg", "hr")
WORLD_SIZE = 2
STEPS = 3
STAGES = (0, 2, 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, store: str, out_dir: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    table = open_store(store).to_table()
    # Dropout off so that every stage sees the same computation; 4 windows per rank and step.
    model_cfg = model_config("tiny", modality_dropout=0.0, dropout=0.0, epochs_per_window=4)
    for stage in STAGES:
        cfg = PretrainConfig(workers=WORLD_SIZE, global_batch=8, zero_stage=stage, steps=STEPS, warmup_steps=1, lr=1e-2)
        engine, _ = build_engine(
            model_cfg, MODALITIES, cfg=cfg, ds_config=deepspeed_config(cfg, on_gpu=False), on_cpu=True
        )
        for step in range(STEPS):
            rows = table.slice((step * WORLD_SIZE + rank) * 4, 4)
            tensors = batch_to_tensors(table_to_batch(rows, modalities=MODALITIES, epochs_per_window=4))
            forward_backward(
                engine,
                tensors,
                objective=cfg.loss_objective,
                rank=rank,
                world_size=WORLD_SIZE,
                gather=make_gather(WORLD_SIZE),
            )
            if step == 0:
                # The full (all-reduced) gradient, whichever stage holds it in partitions.
                grads = {name: safe_get_full_grad(p) for name, p in engine.module.encoder.named_parameters()}
                if rank == 0:
                    torch.save(
                        {k: v.detach().clone().reshape(-1) for k, v in grads.items() if v is not None},
                        Path(out_dir) / f"grads{stage}.pt",
                    )
            engine.step()
        _save_encoder(engine, Path(out_dir) / f"stage{stage}", rank=rank, zero_stage=stage)
        torch.distributed.barrier()
    finish_worker()


@pytest.mark.integration
def test_zero_stages_0_2_and_3_train_the_same_encoder_on_two_cpu_workers(tmp_path):
    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=2,
    )
    mp.start_processes(_worker, args=(_free_port(), str(store), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn")
    grads = {stage: torch.load(tmp_path / f"grads{stage}.pt") for stage in STAGES}
    assert grads[0].keys() == build_reference_weights().keys()  # every parameter, the temperature too
    for stage in (2, 3):
        assert grads[stage].keys() == grads[0].keys()
        for name, grad in grads[stage].items():
            torch.testing.assert_close(
                grad,
                grads[0][name],
                rtol=1e-4,
                atol=1e-7,
                msg=lambda m, n=name, s=stage: f"ZeRO-{s} gradient of {n}: {m}",
            )
    encoders = {stage: load_encoder(tmp_path / f"stage{stage}") for stage in STAGES}
    initial = build_reference_weights()
    reference = encoders[0].state_dict()
    assert max(float((reference[k] - initial[k]).abs().max()) for k in reference) > 1e-3, "weights must move"
    for stage in (2, 3):
        for name, value in encoders[stage].state_dict().items():
            # Adam turns float-rounding noise in near-zero gradients (attention key
            # biases get none in exact arithmetic) into steps of up to lr: compare at
            # a tenth of one step, which a wrong update (sign, missing parameter) exceeds.
            torch.testing.assert_close(
                value, reference[name], rtol=0, atol=1e-3, msg=lambda m, n=name, s=stage: f"ZeRO-{s} weights {n}: {m}"
            )


def build_reference_weights() -> dict[str, torch.Tensor]:
    """The encoder every stage started from (build_engine seeds with PretrainConfig().seed)."""
    from s2v_core.model import SleepEncoder

    torch.manual_seed(PretrainConfig().seed)
    model_cfg = model_config("tiny", modality_dropout=0.0, dropout=0.0, epochs_per_window=4)
    return SleepEncoder(model_cfg, MODALITIES).state_dict()
