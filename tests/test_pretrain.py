"""Fast checks of s2v pretrain: bad input stops in the driver (no Ray), checkpoints, encoder lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import cli
from pipelines.checkpoints import (
    DataPosition,
    checkpoint_dir_name,
    data_position,
    latest_checkpoint,
    list_checkpoints,
    read_state,
)
from pipelines.model_io import load_trained_encoder
from pipelines.pretrain import setup
from pipelines.train_config import PretrainConfig
from pipelines.train_data import inspect_store, keep_windows_with
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.run_layout import DS_CONFIG_FILE, ENCODER_DIR, PRETRAIN_CONFIG_FILE
from s2v_core.store import SCHEMA_VERSION_KEY
from s2v_core.toystore import write_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=("eeg", "ecg", "hr"),
    )


def config_for(store, tmp_path, **kwargs):
    return PretrainConfig(data=str(store), output=str(tmp_path / "run"), workers=2, global_batch=8, **kwargs)


def test_setup_resolves_modalities_and_writes_the_run_configs(store, tmp_path):
    prepared = setup(config_for(store, tmp_path))
    assert prepared.config.modalities == ("eeg", "ecg", "hr")
    assert prepared.store.epochs_per_window == 4 and prepared.store.usable_windows == 24
    saved = json.loads((Path(prepared.run_dir) / PRETRAIN_CONFIG_FILE).read_text())
    assert saved["modalities"] == ["eeg", "ecg", "hr"]
    ds = json.loads((Path(prepared.run_dir) / DS_CONFIG_FILE).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["bf16"]["enabled"] is False
    assert prepared.resume_from is None


def test_store_without_parquet_names_data(tmp_path):
    (tmp_path / "empty" / "site=a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--data: expected Parquet files .* found none"):
        setup(PretrainConfig(data=str(tmp_path / "empty"), output=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="--data: .*found no directory"):
        setup(PretrainConfig(data=str(tmp_path / "missing"), output=str(tmp_path / "run")))


def test_other_schema_version_names_data(store, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(store, copy)
    victim = sorted(copy.rglob("*.parquet"))[0]
    table = pq.read_table(victim)
    metadata = dict(table.schema.metadata)
    metadata[SCHEMA_VERSION_KEY] = b"99"
    pq.write_table(table.replace_schema_metadata(metadata), victim)
    with pytest.raises(ValueError, match=r"--data: .*expected store schema version 1, found 99"):
        setup(config_for(copy, tmp_path))


def test_modality_absent_from_store_names_modalities(store, tmp_path):
    with pytest.raises(ValueError, match=r"--modalities: .*spo2 absent .*eeg, ecg, hr"):
        setup(config_for(store, tmp_path, modalities=("eeg", "spo2")))


def test_unknown_modality_names_modalities(store, tmp_path):
    with pytest.raises(ValueError, match="--modalities: unknown modality 'eeeg'"):
        setup(config_for(store, tmp_path, modalities=("eeeg",)))


def test_batch_larger_than_the_data_names_global_batch(store, tmp_path):
    with pytest.raises(ValueError, match=r"--global-batch: expected at most 24 windows .* found 64"):
        setup(PretrainConfig(data=str(store), output=str(tmp_path / "run"), workers=2, global_batch=64))


def _fake_checkpoint(run_dir, config, step):
    from tests.test_checkpoints import complete_checkpoint

    return complete_checkpoint(Path(run_dir) / "checkpoints" / checkpoint_dir_name(step), config, step=step)


def test_resume_with_a_different_config_names_resume(store, tmp_path):
    first = setup(config_for(store, tmp_path))
    _fake_checkpoint(first.run_dir, first.config, 5)
    with pytest.raises(ValueError, match=r"--resume: .*lr: checkpoint has 0.0003, this run has 0.01"):
        setup(config_for(store, tmp_path, lr=0.01), resume=True)
    with pytest.raises(ValueError, match="--output: expected a new run directory"):
        setup(config_for(store, tmp_path))
    resumed = setup(config_for(store, tmp_path, max_failures=3), resume=True)
    assert resumed.resume_from == str(Path(first.run_dir) / "checkpoints" / checkpoint_dir_name(5))


def test_cli_prints_one_clean_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli.main(["pretrain", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("s2v pretrain: error: --data:")


def test_checkpoint_state_round_trip_and_latest(tmp_path):
    config = PretrainConfig(data="S", output=str(tmp_path))
    for step in (3, 12, 6):
        _fake_checkpoint(tmp_path, config, step)
    (tmp_path / "checkpoints" / "step_00000099").mkdir()  # incomplete (no state.json): ignored
    (tmp_path / "checkpoints" / "step_00000098" / ENCODER_DIR).mkdir(parents=True)  # state + empty encoder/
    (tmp_path / "checkpoints" / "step_00000098" / "state.json").write_text(
        (tmp_path / "checkpoints" / "step_00000003" / "state.json").read_text()
    )
    assert [Path(p).name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000006", "step_00000012"]
    latest = Path(latest_checkpoint(tmp_path))
    state = read_state(latest)
    assert state["step"] == 12 and state["config"]["data"] == "S"
    assert data_position(state) == DataPosition(epoch=1, batches_in_epoch=2)
    (latest / "state.json").write_text(json.dumps({**state, "format": 0}))
    with pytest.raises(ValueError, match="checkpoint format"):
        read_state(latest)


def test_inspect_store_counts_usable_windows(store):
    summary = inspect_store(store, ("hr",))
    # Every third night of a site lacks the last modality (hr) in the toy store.
    assert summary.windows == 24 and summary.usable_windows == 16
    table = pq.read_table(sorted(store.rglob("*.parquet"))[2])
    assert keep_windows_with(table, ["hr"]).num_rows == 0
    assert keep_windows_with(table, ["hr", "eeg"]).num_rows == table.num_rows


def test_load_trained_encoder_resolves_paths(tmp_path):
    encoder = SleepEncoder(model_config("tiny"), ("eeg", "ecg"))
    config = PretrainConfig(data="S", output=str(tmp_path))
    checkpoint = _fake_checkpoint(tmp_path, config, 4)
    save_encoder(encoder, checkpoint / ENCODER_DIR)
    for spec in (checkpoint / ENCODER_DIR, checkpoint, tmp_path):  # encoder dir, checkpoint, run dir
        loaded = load_trained_encoder(spec)
        assert loaded.modalities == ("eeg", "ecg")
        assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))
    with pytest.raises(ValueError, match="not-a-run"):
        load_trained_encoder(str(tmp_path / "not-a-run"))
    with pytest.raises(ValueError, match="holds no encoder"):
        (tmp_path / "blank").mkdir()
        load_trained_encoder(tmp_path / "blank")


def test_mlflow_spec_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        load_trained_encoder("0123456789abcdef0123456789abcdef")


@pytest.mark.integration
def test_mlflow_logging_leaves_the_tracking_uri_of_the_process_alone(store, tmp_path, monkeypatch):
    """Two runs in one process (a sweep, the benchmark) each log into their own store."""
    import os

    from pipelines.pretrain import cleanup
    from pipelines.pretrain_mlflow import start_mlflow_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_ids = []
    for name in ("first", "second"):
        prepared = start_mlflow_run(
            setup(PretrainConfig(data=str(store), output=str(tmp_path / name), workers=2, global_batch=8))
        )
        checkpoint = _fake_checkpoint(prepared.run_dir, prepared.config, 1)
        save_encoder(SleepEncoder(model_config("tiny"), ("eeg", "ecg", "hr")), checkpoint / ENCODER_DIR)
        cleanup(prepared, checkpoint)
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert prepared.mlflow_tracking_uri.endswith(f"{name}/mlflow.db")
        run_ids.append(prepared.mlflow_run_id)
    assert load_trained_encoder(run_ids[1], tracking_uri=f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}")


def test_gpu_workers_rewrite_the_deepspeed_config_without_reading_the_store_again(tmp_path, monkeypatch):
    import json

    import pipelines.pretrain as pretrain_module
    from pipelines.pretrain import setup, with_gpu_workers
    from pipelines.train_config import PretrainConfig
    from s2v_core.run_layout import DS_CONFIG_FILE
    from s2v_core.toystore import write_toy_store

    store = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=2,
        windows_per_recording=6,
        epochs_per_window=4,
        modalities=("eeg", "ecg"),
        seed=0,
    )
    config = PretrainConfig(
        data=str(store),
        output=str(tmp_path / "run"),
        model="tiny",
        workers=1,
        global_batch=4,
        steps=2,
        train_splits=("train", "val", "test"),
    )
    prepared = setup(config)
    assert not prepared.on_gpu
    monkeypatch.setattr(pretrain_module, "inspect_store", lambda *a, **k: pytest.fail("store read again"))
    gpu = with_gpu_workers(prepared)
    written = json.loads((tmp_path / "run" / DS_CONFIG_FILE).read_text())
    assert gpu.on_gpu and gpu.ds_config == written and written.get("bf16", {}).get("enabled") is True
    assert gpu.store == prepared.store and gpu.model_config == prepared.model_config


def test_history_columns_reach_the_config_from_the_command_line():
    from pipelines.cli import build_parser
    from pipelines.pretrain_cli import config_from_args

    argv = ["pretrain", "--data", "store", "--output", "run", "--history-columns", "ahi,diabetes"]
    config = config_from_args(build_parser("pretrain").parse_args(argv))
    assert config.history_columns == ("ahi", "diabetes")
    assert config.loss_objective.history_columns == ("ahi", "diabetes")  # what the loss reads
