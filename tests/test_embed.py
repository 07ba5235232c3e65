"""s2v embed: documented shapes, determinism, modality subsets and clear errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from pipelines.embed import embed, embed_local, embed_table
from pipelines.embed_config import EmbedConfig
from pipelines.model_io import load_encoder_spec
from s2v_core.embeddings import read_embeddings
from s2v_core.modalities import MODALITY_KEYS
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.splits import SplitConfig
from s2v_core.toystore import write_toy_store

EPOCHS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=3,
        epochs_per_window=EPOCHS,
        seed=1,
    )


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_encoder(SleepEncoder(model_config("tiny")), tmp_path_factory.mktemp("encoder"))


def _store_table(store):
    files = sorted(str(p) for p in store.rglob("*.parquet"))
    return (
        pads.dataset(files, format="parquet")
        .to_table()
        .sort_by([("recording_id", "ascending"), ("window_index", "ascending")])
    )


def test_embedding_rows_have_documented_shapes_and_are_deterministic(store, encoder_dir):
    encoder, _ = load_encoder_spec(str(encoder_dir))
    table = _store_table(store)
    out = embed_table(
        encoder, table, modalities=MODALITY_KEYS, epochs_per_window=EPOCHS, splits=SplitConfig(), per_modality=True
    )
    dim = encoder.config.projection_dim
    assert out.num_rows == table.num_rows
    epoch = np.array(out.column("epoch_embedding").to_pylist(), dtype=np.float32)
    assert epoch.shape == (table.num_rows, EPOCHS * dim)
    assert np.array(out.column("window_embedding").to_pylist()).shape == (table.num_rows, dim)
    assert out.column("stages").to_pylist() == table.column("stages").to_pylist()
    # Toy nights r002 lack their last modality: its per-modality column is null there.
    assert out.column("emb_abdomen").null_count == table.column("abdomen").null_count > 0
    again = embed_table(encoder, table, modalities=MODALITY_KEYS, epochs_per_window=EPOCHS, splits=SplitConfig())
    assert again.column("epoch_embedding").equals(out.column("epoch_embedding"))
    # The same window embedded inside a different batch gives the same embedding.
    alone = embed_table(
        encoder, table.slice(5, 1), modalities=MODALITY_KEYS, epochs_per_window=EPOCHS, splits=SplitConfig()
    )
    np.testing.assert_allclose(alone.column("epoch_embedding")[0].as_py(), epoch[5], atol=1e-5)


def test_modality_subset_changes_inputs_not_output_shape(store, encoder_dir):
    encoder, _ = load_encoder_spec(str(encoder_dir))
    table = _store_table(store)
    eeg = embed_table(encoder, table, modalities=("eeg",), epochs_per_window=EPOCHS, splits=SplitConfig())
    wearable = embed_table(
        encoder, table, modalities=("hr", "spo2", "thorax"), epochs_per_window=EPOCHS, splits=SplitConfig()
    )
    full = embed_table(encoder, table, modalities=MODALITY_KEYS, epochs_per_window=EPOCHS, splits=SplitConfig())
    for out in (eeg, wearable):
        assert out.schema.field("epoch_embedding").type == full.schema.field("epoch_embedding").type
        assert len(out.column("epoch_embedding")[0].as_py()) == len(full.column("epoch_embedding")[0].as_py())
    assert not np.allclose(eeg.column("window_embedding").to_pylist(), full.column("window_embedding").to_pylist())
    assert [row[:1] + [any(row[1:])] for row in eeg.column("present").to_pylist()] == [[True, False]] * table.num_rows
    # Garbage in a column that was not requested does not move the EEG-only embedding.
    noisy = table.set_column(
        table.schema.get_field_index("ecg"),
        "ecg",
        pa.array(
            [[np.float16(1e3)] * len(r) if r else None for r in table.column("ecg").to_pylist()], pa.list_(pa.float16())
        ),
    )
    assert (
        embed_table(encoder, noisy, modalities=("eeg",), epochs_per_window=EPOCHS, splits=SplitConfig())
        .column("epoch_embedding")
        .equals(eeg.column("epoch_embedding"))
    )


def test_embed_local_writes_the_documented_layout(store, encoder_dir, tmp_path):
    encoder, _ = load_encoder_spec(str(encoder_dir))
    summary = embed_local(encoder, str(store), str(tmp_path / "emb"), modalities="ecg,spo2", batch_size=5)
    emb = read_embeddings(tmp_path / "emb")
    assert (summary.windows, summary.nights) == (18, 6)
    assert emb.epoch.shape == (18, EPOCHS, 32) and emb.window.shape == (18, 32) and emb.night.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(emb.night, axis=1), 1.0, rtol=1e-5)
    info = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert info["modalities"] == ["ecg", "spo2"] and info["epochs_per_window"] == EPOCHS
    assert set(emb.nights.column_names) >= {"recording_id", "subject_id", "site", "split", "age", "sex", "outcomes"}
    # Every window carries its subject's split; the store's assignment is recorded with the embeddings.
    assert set(emb.split) == {"train"} and info["store_splits"]["store_id"]
    assert info["encoder_training"] is None  # an in-process encoder of unknown provenance


def test_bad_inputs_give_one_clear_message(store, encoder_dir, tmp_path, monkeypatch, capsys):
    only_eeg = write_toy_store(
        tmp_path / "eeg_store",
        sites=1,
        recordings_per_site=1,
        windows_per_recording=2,
        epochs_per_window=EPOCHS,
        modalities=("eeg",),
    )
    with pytest.raises(ValueError, match="no window holds any of the requested modalities ecg"):
        embed(
            EmbedConfig(checkpoint=str(encoder_dir), data=str(only_eeg), output=str(tmp_path / "out"), modalities="ecg")
        )
    with pytest.raises(ValueError, match="unknown modality 'ekg'"):
        embed(EmbedConfig(checkpoint=str(encoder_dir), data=str(store), output=str(tmp_path / "out"), modalities="ekg"))
    with pytest.raises(FileNotFoundError, match="not an embeddings directory"):
        read_embeddings(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from pipelines.cli import main

    code = main(
        [
            "embed",
            "--checkpoint",
            "runs:/0123456789abcdef0123456789abcdef/encoder",
            "--data",
            str(store),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(errors) == 1  # MLflow's own INFO lines aside, one line, no traceback
    assert errors[0].startswith("s2v embed: error: ") and "no MLflow run '0123456789abcdef" in errors[0]


@pytest.mark.integration
def test_ray_embed_matches_in_process_embedding(ray_local, store, encoder_dir, tmp_path):
    summary = embed(
        EmbedConfig(
            checkpoint=str(encoder_dir),
            data=str(store),
            output=str(tmp_path / "emb"),
            modalities="eeg,ecg,abdomen",
            batch_size=4,
            per_modality=True,
        )
    )
    encoder, _ = load_encoder_spec(str(encoder_dir))
    embed_local(encoder, str(store), str(tmp_path / "local"), modalities="eeg,ecg,abdomen")
    ray_emb = read_embeddings(tmp_path / "emb", per_modality=True)
    local = read_embeddings(tmp_path / "local")
    assert summary.windows == 18 and summary.modalities == ("eeg", "ecg", "abdomen")
    assert list(ray_emb.recording_id) == list(local.recording_id)
    np.testing.assert_allclose(ray_emb.epoch, local.epoch, atol=1e-5)
    np.testing.assert_allclose(ray_emb.night, local.night, atol=1e-5)
    assert set(ray_emb.per_modality) == {"eeg", "ecg", "abdomen"}
    assert np.isnan(ray_emb.per_modality["abdomen"]).all(axis=(1, 2)).sum() == 6  # nights r002 lack it
