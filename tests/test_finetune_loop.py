"""The fine-tuning loop's two trainers: DeepSpeed (every ZeRO stage) trains what plain data parallelism trains.

The integration test runs :class:`DeepSpeedTrainer` on two real gloo processes
(no Ray) at ZeRO 0, 2 and 3 and compares it with a single-process reference:
AdamW on the mean of the two workers' losses, which is what DDP computes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipelines.finetune import FinetuneConfig
from pipelines.finetune_deepspeed import deepspeed_config
from pipelines.finetune_loop import DeepSpeedTrainer, _model_from, checkpoint_problems
from s2v_core.config import to_mapping
from s2v_core.finetuning import FinetuneSpec, batch_targets
from s2v_core.model import SleepEncoder, batch_to_tensors, model_config, save_encoder
from s2v_core.run_layout import ENGINE_DIR, ENGINE_TAG
from s2v_core.store import open_store, table_to_batch
from tests.gloo_workers import finish_worker
from tests.test_checkpoints import engine_files
from tests.test_finetune import MODALITIES, toy_store

WORLD_SIZE = 2
WINDOWS_PER_WORKER = 4
STEPS = 3  # then one more, after a resume
STAGES = (0, 2, 3)
#: Dropout off everywhere: the workers and the reference must compute the same thing.
SPEC = FinetuneSpec(
    task="staging",
    mode="lora",
    head="temporal",
    head_dropout=0.0,
    lora_dropout=0.0,
    modalities=MODALITIES,
    epochs_per_window=4,
)
OPTIONS = FinetuneConfig(workers=WORLD_SIZE, batch_size=WORLD_SIZE * WINDOWS_PER_WORKER, lr=3e-3, head_lr=1e-2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(table, step: int, rank: int) -> tuple[dict, torch.Tensor]:
    rows = table.slice((step * WORLD_SIZE + rank) * WINDOWS_PER_WORKER, WINDOWS_PER_WORKER)
    np_batch = table_to_batch(rows, modalities=MODALITIES, epochs_per_window=4)
    return batch_to_tensors(np_batch), torch.from_numpy(batch_targets(SPEC.task_definition, np_batch))


def _trainer(config: dict, stage: int, rank: int) -> DeepSpeedTrainer:
    torch.manual_seed(0)  # the reference's initial head
    ds_config = deepspeed_config(FinetuneConfig(**{**to_mapping(OPTIONS), "zero_stage": stage}), on_gpu=False)
    trainer = DeepSpeedTrainer(
        _model_from(config), OPTIONS, ds_config, config, device=torch.device("cpu"), rank=rank, world_size=WORLD_SIZE
    )
    trainer.train()
    return trainer


def _worker(rank: int, port: int, store: str, config: dict, out_dir: str) -> None:
    from pipelines.deepspeed_engine import load_engine, save_engine

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    table = open_store(store).to_table()
    task = SPEC.task_definition
    out = Path(out_dir)
    for stage in STAGES:
        trainer = _trainer(config, stage, rank)
        for step in range(STEPS):
            trainer.train_step(task, *_batch(table, step, rank))
        save_engine(trainer.engine, out / f"engine{stage}")
        trained = trainer.scoring_model()  # every rank: ZeRO-3 gathers
        if rank == 0:
            torch.save(trained.state_dict(), out / f"stage{stage}.pt")
        # A resume: a fresh engine loads the state and takes the same next step as the one that went on.
        resumed = _trainer(config, stage, rank)
        load_engine(resumed.engine, out / f"engine{stage}")
        for each in (trainer, resumed):
            each.train_step(task, *_batch(table, STEPS, rank))
        went_on, came_back = trainer.scoring_model(), resumed.scoring_model()
        if rank == 0:
            torch.save({"went_on": went_on.state_dict(), "resumed": came_back.state_dict()}, out / f"next{stage}.pt")
        torch.distributed.barrier()
    finish_worker()


def _reference(config: dict, table, steps: int) -> dict[str, torch.Tensor]:
    """What DDP trains: AdamW on the mean of the workers' losses, in one process."""
    torch.manual_seed(0)
    model = _model_from(config)
    optimizer = torch.optim.AdamW(
        model.parameter_groups(lr=OPTIONS.lr, head_lr=OPTIONS.head_lr), lr=OPTIONS.lr, weight_decay=OPTIONS.weight_decay
    )
    model.train()
    for step in range(steps):
        loss = sum(
            SPEC.task_definition.loss(model(batch), target)
            for batch, target in (_batch(table, step, r) for r in range(WORLD_SIZE))
        )
        optimizer.zero_grad()
        (loss / WORLD_SIZE).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(found: dict, expected: dict, what: str) -> None:
    assert found.keys() == expected.keys()
    for name, value in found.items():
        # Adam turns float-rounding noise in near-zero gradients into steps of up to lr: compare
        # at a tenth of the smaller learning rate, which a wrong update (sign, scale, missing
        # parameter) exceeds.
        torch.testing.assert_close(
            value, expected[name], rtol=0, atol=OPTIONS.lr / 10, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.mark.integration
def test_every_zero_stage_trains_what_data_parallel_trains_and_resumes_exactly(tmp_path):
    store = toy_store(tmp_path)
    torch.manual_seed(0)
    # Dropout off in the encoder too (LoRA trains it in train mode).
    encoder = SleepEncoder(
        model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=4, dropout=0.0), MODALITIES
    )
    config = {"spec": to_mapping(SPEC), "encoder_dir": str(save_encoder(encoder, tmp_path / "encoder"))}
    mp.start_processes(
        _worker, args=(_free_port(), str(store), config, str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn"
    )
    table = open_store(str(store)).to_table()
    initial = _reference(config, table, 0)
    trained, next_step = _reference(config, table, STEPS), _reference(config, table, STEPS + 1)
    lora = [k for k in trained if "lora_" in k]
    assert lora and max(float((trained[k] - initial[k]).abs().max()) for k in lora) > 1e-3, "adapters must move"
    for stage in STAGES:
        found = torch.load(tmp_path / f"stage{stage}.pt", weights_only=True)
        _assert_same(found, trained, f"ZeRO-{stage} after {STEPS} steps:")
        # The frozen pretrained weights (LoRA's base layers, tokenizers, the rest) stay as they were, exactly.
        frozen = [k for k in found if k.startswith("encoder.") and "lora_" not in k]
        assert frozen and all(torch.equal(found[k], initial[k]) for k in frozen)
        after = torch.load(tmp_path / f"next{stage}.pt", weights_only=True)
        _assert_same(after["went_on"], next_step, f"ZeRO-{stage} at step {STEPS + 1}:")
        # The optimiser state came back with the weights: the same next step, to the bit.
        assert all(torch.equal(after["resumed"][k], after["went_on"][k]) for k in after["went_on"])


def _deepspeed_checkpoint(directory: Path, *, step: int, zero_stage: int, world_size: int = 2) -> Path:
    """A --deepspeed checkpoint as Ray Train assembles it from every rank (fake engine bytes)."""
    (directory / ENGINE_DIR / ENGINE_TAG).mkdir(parents=True)
    (directory / ENGINE_DIR / "latest").write_text(ENGINE_TAG)
    for name in engine_files(world_size, zero_stage):
        (directory / ENGINE_DIR / ENGINE_TAG / name).write_bytes(b"deepspeed state")
    (directory / "best").mkdir()
    (directory / "best" / "finetuned.json").write_text("{}")
    state = {"step": step, "best_step": None, "engine": {"zero_stage": zero_stage, "world_size": world_size}}
    (directory / "state.json").write_text(json.dumps(state))
    return directory


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_a_deepspeed_checkpoint_is_complete_only_with_every_ranks_state(tmp_path, zero_stage):
    from pipelines.finetune_checks import check_resume

    checkpoints = tmp_path / "checkpoints"
    complete = _deepspeed_checkpoint(checkpoints / "step_00000002", step=2, zero_stage=zero_stage)
    assert checkpoint_problems(complete) == []
    # step 4: a worker died while Ray assembled it.
    partial = _deepspeed_checkpoint(checkpoints / "step_00000004", step=4, zero_stage=zero_stage)
    last_shard = sorted((partial / ENGINE_DIR / ENGINE_TAG).iterdir())[-1]
    last_shard.unlink()
    assert checkpoint_problems(partial), last_shard.name
    assert check_resume(tmp_path, resume=True) == str(complete)
    (complete / "best" / "finetuned.json").unlink()
    assert checkpoint_problems(complete) == ["no best/finetuned.json"]


def test_a_data_parallel_checkpoint_needs_state_and_training_files(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    assert "no training.pt" in checkpoint_problems(tmp_path)[0]
    (tmp_path / "training.pt").write_bytes(b"")
    assert checkpoint_problems(tmp_path) == []
    (tmp_path / "state.json").unlink()
    assert checkpoint_problems(tmp_path) == ["no state.json"]
