"""Which checkpoints are complete, and what ``--resume`` does with one a dying worker left half-written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.checkpoints import (
    DataPosition,
    checkpoint_dir_name,
    checkpoint_problems,
    incomplete_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    write_state,
)
from pipelines.pretrain import setup
from pipelines.train_config import PretrainConfig, config_to_dict
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.run_layout import ENCODER_DIR, ENGINE_DIR, ENGINE_TAG
from s2v_core.toystore import write_toy_store


def engine_files(world_size: int, zero_stage: int) -> list[str]:
    """The files DeepSpeed writes in ``engine/state/`` for ``world_size`` ranks at ``zero_stage``."""
    if zero_stage == 3:
        names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    else:
        names = ["mp_rank_00_model_states.pt"]
    if zero_stage >= 1:
        names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return names


def complete_checkpoint(
    directory: Path,
    config: PretrainConfig,
    *,
    step: int,
    world_size: int = 2,
    zero_stage: int = 0,
    encoder: SleepEncoder | None = None,
) -> Path:
    """A checkpoint directory with everything Ray Train assembles from every rank (fake engine bytes)."""
    write_state_dir = Path(directory)
    write_state_dir.mkdir(parents=True, exist_ok=True)
    write_state(
        write_state_dir,
        config=config_to_dict(config),
        step=step,
        seed=config.seed,
        position=DataPosition(epoch=1, batches_in_epoch=2),
        metrics={"loss": 1.0},
        world_size=world_size,
    )
    save_encoder(encoder or SleepEncoder(model_config("tiny"), ("eeg", "ecg", "hr")), write_state_dir / ENCODER_DIR)
    engine = write_state_dir / ENGINE_DIR
    (engine / ENGINE_TAG).mkdir(parents=True, exist_ok=True)
    (engine / "latest").write_text(ENGINE_TAG)
    for name in engine_files(world_size, zero_stage):
        (engine / ENGINE_TAG / name).write_bytes(b"deepspeed state")
    return write_state_dir


def _files(directory: Path) -> dict[str, int]:
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_checkpoint_is_complete_only_with_every_ranks_shard(tmp_path, zero_stage):
    config = PretrainConfig(data="S", output=str(tmp_path))
    directory = complete_checkpoint(tmp_path / "ckpt", config, step=4, world_size=3, zero_stage=zero_stage)
    files = _files(directory)
    assert checkpoint_problems(files, world_size=3, zero_stage=zero_stage) == []
    assert checkpoint_problems(files, world_size=3, zero_stage=None) == []  # no ds_config.json: from the files
    shards = [name for name in files if "zero_pp_rank_2" in name]
    for name in shards + [f"{ENGINE_DIR}/latest", f"{ENCODER_DIR}/encoder.pt"]:
        partial = {k: v for k, v in files.items() if k != name}
        assert checkpoint_problems(partial, world_size=3, zero_stage=zero_stage), name
    # bf16 optimisers prefix their shards; the shard still counts
    renamed = {(k.replace("zero_pp", "bf16_zero_pp") if "optim" in k else k): v for k, v in files.items()}
    assert checkpoint_problems(renamed, world_size=3, zero_stage=zero_stage) == []


def test_state_and_an_empty_encoder_dir_are_not_a_checkpoint(tmp_path):
    directory = tmp_path / "checkpoints" / checkpoint_dir_name(7)
    (directory / ENCODER_DIR).mkdir(parents=True)
    write_state(directory, config={"seed": 0}, step=7, seed=0, position=DataPosition(), metrics={}, world_size=2)
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    [(location, problems)] = incomplete_checkpoints(tmp_path)
    assert Path(location).name == checkpoint_dir_name(7)
    assert "no encoder/encoder.pt" in problems and any("engine/latest" in p for p in problems)


def test_resume_skips_a_partial_checkpoint_and_falls_back_to_the_newest_complete_one(tmp_path, caplog):
    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "hr"),
    )
    config = PretrainConfig(data=str(store), output=str(tmp_path / "run"), workers=2, global_batch=8)
    first = setup(config)
    checkpoints = Path(first.run_dir) / "checkpoints"
    stage = json.loads((Path(first.run_dir) / "ds_config.json").read_text())["zero_optimization"]["stage"]
    complete_checkpoint(checkpoints / checkpoint_dir_name(2), first.config, step=2, zero_stage=stage)
    # step 4: a worker died while Ray assembled it (state.json, an empty encoder/, no engine)
    partial = checkpoints / checkpoint_dir_name(4)
    (partial / ENCODER_DIR).mkdir(parents=True)
    write_state(
        partial,
        config=config_to_dict(first.config),
        step=4,
        seed=0,
        position=DataPosition(),
        metrics={"loss": 1.0},
        world_size=2,
    )
    caplog.set_level(logging.WARNING)
    resumed = setup(config, resume=True)
    assert resumed.resume_from == str(checkpoints / checkpoint_dir_name(2))
    assert f"skipping {checkpoint_dir_name(4)}, an incomplete checkpoint" in caplog.text
    assert f"resuming from {checkpoint_dir_name(2)}" in caplog.text
