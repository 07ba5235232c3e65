"""The training stream's layout (no Ray): passes that repeat small stores, readers that mix nights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.checkpoints import DataPosition, checkpoint_dir_name, data_position, write_state
from pipelines.pretrain import setup
from pipelines.train_config import PretrainConfig, config_to_dict
from pipelines.train_data import MIN_STEPS_PER_PASS, pass_order, read_store_files, store_repeats, training_columns
from s2v_core.store import open_store
from s2v_core.toystore import write_toy_store
from tests.test_checkpoints import complete_checkpoint

MODALITIES = ("eeg", "ecg", "hr")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=4,
        windows_per_recording=6,
        epochs_per_window=4,
        modalities=MODALITIES,
    )


def test_a_small_store_is_repeated_within_a_pass_but_never_beyond_the_run():
    # 48 windows, 16 per step: a pass of MIN_STEPS_PER_PASS steps would need 167 copies,
    # but 100 steps only need ceil(1600 / 48) = 34, plus one for dropped tails.
    assert store_repeats(48, windows_per_step=16, steps=100) == 35
    assert store_repeats(48, windows_per_step=16, steps=10**6) == -(-MIN_STEPS_PER_PASS * 16 // 48)
    # A real cohort's store (SHHS: ~500k windows) is one copy per pass.
    assert store_repeats(500_000, windows_per_step=256, steps=100_000) == 1
    with pytest.raises(ValueError, match="at least one usable window"):
        store_repeats(0, windows_per_step=16, steps=10)


def test_each_copy_of_a_pass_is_a_seeded_permutation_of_the_files():
    files = [f"night{i}.parquet" for i in range(10)]
    order = pass_order(files, repeats=3, seed=7)
    copies = [order[i * 10 : (i + 1) * 10] for i in range(3)]
    assert all(sorted(copy) == files for copy in copies)
    assert copies[0] != copies[1] != copies[2]
    assert pass_order(files, repeats=3, seed=7) == order
    assert pass_order(files, repeats=3, seed=8) != order


def test_a_read_task_mixes_the_windows_of_its_nights(store):
    paths = [str(p) for p in open_store(store).files][:4]
    columns = training_columns(MODALITIES, ())
    items = {"path": np.array(paths), "slot": np.arange(4)}
    plain = read_store_files(items, columns=columns, modalities=MODALITIES)
    mixed = read_store_files(items, columns=columns, modalities=MODALITIES, seed=0)
    assert read_store_files(items, columns=columns, modalities=MODALITIES, seed=0).equals(mixed)
    nights = mixed.column("recording_id").to_pylist()
    assert sorted(nights) == sorted(plain.column("recording_id").to_pylist())
    # In file order a batch of 4 holds one night; mixed, the first batches hold several.
    assert len(set(plain.column("recording_id").to_pylist()[:4])) == 1
    assert max(len(set(nights[i : i + 4])) for i in range(0, 24, 4)) >= 3

    # Rows move whole: each window keeps its own night, stages and signal.
    def rows(table):
        return sorted(
            zip(
                table.column("recording_id").to_pylist(),
                map(str, table.column("stages").to_pylist()),
                map(str, table.column("eeg").to_pylist()),
            )
        )

    assert rows(mixed) == rows(plain)


def test_a_resumed_run_keeps_the_pass_layout_it_was_checkpointed_with(store, tmp_path):
    config = PretrainConfig(data=str(store), output=str(tmp_path / "run"), workers=2, global_batch=8, steps=20)
    first = setup(config)
    assert first.store_repeats == store_repeats(48, windows_per_step=8, steps=20) == 5
    directory = Path(first.run_dir) / "checkpoints" / checkpoint_dir_name(4)
    complete_checkpoint(directory, first.config, step=4)  # a checkpoint with every rank's files
    write_state(
        directory,
        config=config_to_dict(first.config),
        step=4,
        seed=0,
        metrics={"loss": 1.0},
        position=DataPosition(epoch=0, batches_in_epoch=4, store_repeats=3),
        world_size=2,
    )
    assert setup(config, resume=True).store_repeats == 3


def test_checkpoints_from_before_repeated_passes_read_as_one_copy(tmp_path):
    state = {"data_position": {"epoch": 2, "batches_in_epoch": 5}}
    assert data_position(state) == DataPosition(epoch=2, batches_in_epoch=5, store_repeats=1)
    written = write_state(
        tmp_path,
        config={},
        step=1,
        seed=0,
        metrics={},
        world_size=1,
        position=DataPosition(epoch=1, batches_in_epoch=2, store_repeats=4),
    )
    assert data_position(json.loads(written.read_text())).store_repeats == 4
