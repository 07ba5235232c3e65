"""Stores, run dirs and embeddings at URIs: the pipelines against a local S3 server (moto).

Every location here is ``s3://bucket/key?endpoint_override=127.0.0.1:PORT&scheme=http``,
the form a MinIO/Ceph user passes too; credentials are fake and come from the
environment, set before this module's Ray starts so that its workers see them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipelines.checkpoints import checkpoint_dir_name, list_checkpoints, read_state
from pipelines.model_io import load_trained_encoder
from pipelines.pretrain import pretrain, setup
from pipelines.train_config import PretrainConfig
from pipelines.train_data import inspect_store, read_store_files, training_columns
from s2v_core.locations import absolute, is_uri, join
from s2v_core.model import SleepEncoder, model_config
from s2v_core.run_layout import ENCODER_DIR
from s2v_core.store import store_files
from s2v_core.toystore import write_toy_store
from tests.test_checkpoints import complete_checkpoint

BUCKET = "sleep2vec"
MODALITIES = ("eeg", "ecg", "hr")


class S3:
    """The moto server: ``uri(key)`` names an object or prefix, ``fs`` reaches it."""

    def __init__(self, endpoint: str) -> None:
        self.options = f"endpoint_override={endpoint}&scheme=http"
        self.fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}?{self.options}"

    def kind(self, key: str) -> pafs.FileType:
        return self.fs.get_file_info(f"{BUCKET}/{key}").type

    def upload(self, local: Path, key: str) -> str:
        pafs.copy_files(str(local), f"{BUCKET}/{key}", destination_filesystem=self.fs)
        return self.uri(key)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            patch.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
            yield S3(f"{host}:{port}")
        finally:
            server.stop()


@pytest.fixture(scope="module")
def ray_local(s3, ray_local):
    """This module's Ray starts after the S3 credentials are in the environment its workers inherit."""
    return ray_local


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> Path:
    return write_toy_store(
        tmp_path_factory.mktemp("store"),
        sites=2,
        recordings_per_site=3,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=2,
    )


@pytest.fixture(scope="module")
def s3_store(s3, local_store) -> str:
    return s3.upload(local_store, "store")


def test_locations_keep_uri_options():
    uri = "s3://b/runs/x?endpoint_override=h:1&scheme=http"
    assert join(uri, "checkpoints", "step_1") == "s3://b/runs/x/checkpoints/step_1?endpoint_override=h:1&scheme=http"
    assert join("/tmp/run/", "encoder") == "/tmp/run/encoder"
    assert is_uri(uri) and is_uri("gs://b/k") and not is_uri("/tmp/x") and not is_uri("file:///tmp/x")
    assert absolute(uri) == uri and absolute("run") == str(Path("run").resolve())


def test_a_store_at_a_uri_reads_like_the_same_store_on_disk(s3, s3_store, local_store):
    files, filesystem = store_files(s3_store)
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert [f.split("/store/", 1)[1] for f in files] == [
        str(p.relative_to(local_store)) for p in sorted(local_store.rglob("*.parquet"))
    ]
    remote, local = inspect_store(s3_store), inspect_store(local_store)
    assert (remote.windows, remote.usable_windows, remote.modalities) == (
        local.windows,
        local.usable_windows,
        local.modalities,
    )
    # What a Ray Data read task does with the summary's paths and filesystem.
    items = {"path": np.array(remote.files[:2]), "slot": np.arange(2)}
    table = read_store_files(
        items, columns=training_columns(MODALITIES, ()), modalities=MODALITIES, filesystem=remote.filesystem
    )
    assert table.num_rows == 8
    with pytest.raises(ValueError, match="--data: expected a store .* found no directory"):
        inspect_store(s3.uri("nothing-here"))


def test_sweep_reads_the_splits_and_held_out_windows_of_a_uri_store(s3, tmp_path):
    from s2v_core.store import split_files
    from tune.plan import SweepConfig
    from tune.sweep import check_store
    from tune.trial import HeldOutScorer

    local = write_toy_store(
        tmp_path / "split-store",
        sites=2,
        recordings_per_site=4,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=3,
        val_per_site=1,
        test_per_site=1,
    )
    uri = s3.upload(local, "split-store")
    cfg = SweepConfig(data=uri, output=str(tmp_path / "sweep"), widths=(16,), modality_counts=(2,))
    available, epochs_per_window = check_store(cfg)  # splits.json read from the bucket
    assert available == MODALITIES and epochs_per_window == 4
    sides = {split: split_files(uri, [split])[0] for split in ("train", "val", "test")}
    assert [len(files) for files in sides.values()] == [4, 2, 2]
    scorer = HeldOutScorer(uri, pairs=[("eeg", "ecg")], windows=8, probe_windows=8, batch_size=4, seed=0)
    assert scorer.windows("test") == 8 and scorer.windows("val") == 8


def _fake_run_on_s3(s3, local_store, tmp_path, key: str) -> tuple[PretrainConfig, SleepEncoder]:
    """A run dir with one complete checkpoint (state.json + encoder/), uploaded to ``key``."""
    config = PretrainConfig(data=str(local_store), output=s3.uri(key), workers=2, global_batch=8)
    local = setup(PretrainConfig(data=str(local_store), output=str(tmp_path / "run"), workers=2, global_batch=8))
    directory = tmp_path / "run" / "checkpoints" / checkpoint_dir_name(3)
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny"), MODALITIES)
    complete_checkpoint(directory, local.config, step=3, encoder=encoder)
    s3.upload(tmp_path / "run", key)
    return config, encoder


def test_checkpoints_and_encoders_are_found_at_a_uri(s3, local_store, tmp_path):
    config, encoder = _fake_run_on_s3(s3, local_store, tmp_path, "runs/fake")
    (latest,) = list_checkpoints(config.output)
    assert latest == s3.uri(f"runs/fake/checkpoints/{checkpoint_dir_name(3)}")
    assert read_state(latest)["step"] == 3
    for spec in (config.output, latest, join(latest, ENCODER_DIR)):  # run dir, checkpoint, encoder dir
        loaded = load_trained_encoder(spec)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), encoder.state_dict().values()))
    with pytest.raises(ValueError, match="--output: expected a new run directory"):
        setup(config)
    # --resume finds the latest checkpoint at the URI, which the loop then opens there.
    assert setup(config, resume=True).resume_from == latest


def test_uri_outputs_that_cannot_work_stop_before_ray(s3, s3_store, tmp_path, monkeypatch, capsys):
    import ray

    from pipelines.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = PretrainConfig(data=s3_store, output=s3.uri("runs/no-mlflow"), workers=2, global_batch=8, steps=2)
    with pytest.raises(ValueError, match=r"--output s3://.*set MLFLOW_TRACKING_URI"):
        pretrain(config)
    assert s3.kind("runs/no-mlflow") == pafs.FileType.NotFound and not ray.is_initialized()
    code = main(
        ["sweep", "--data", s3_store, "--output", s3.uri("sweeps/grid"), "--widths", "16", "--modality-counts", "2"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "s2v sweep: error: --output: expected a local directory or a path on storage" in err


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_pretrain_and_embed_read_and_write_s3(s3, s3_store, ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.embed import embed
    from pipelines.embed_config import EmbedConfig
    from s2v_core.embeddings import read_embeddings

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    # The last worker fails once before step 3: the group restarts from the step-2 checkpoint on s3.
    config = PretrainConfig(
        data=s3_store,
        output=s3.uri("runs/tiny"),
        workers=2,
        model="tiny",
        steps=4,
        global_batch=8,
        checkpoint_every=2,
        fail_at_step=3,
    )
    # Artifacts next to the SQLite store, not in the current directory's mlruns/.
    client.create_experiment(config.mlflow_experiment, artifact_location=(tmp_path / "artifacts").as_uri())

    result = pretrain(config)
    assert result.steps == 4 and result.checkpoint == s3.uri(f"runs/tiny/checkpoints/{checkpoint_dir_name(4)}")
    assert list_checkpoints(config.output) == [
        s3.uri(f"runs/tiny/checkpoints/{checkpoint_dir_name(s)}") for s in (2, 4)
    ]
    for key in (
        "pretrain_config.json",
        "ds_config.json",
        "mlflow_run.json",
        "encoder/model_config.json",
        ".failed_at_step_3",
        f"checkpoints/{checkpoint_dir_name(4)}/engine/latest",
    ):
        assert s3.kind(f"runs/tiny/{key}") == pafs.FileType.File, key
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["s2v.run_dir"] == config.output
    assert [m.step for m in client.get_metric_history(result.mlflow_run_id, "loss")] == [1, 2, 3, 4]
    assert {"ds_config.json", "pretrain_config.json", "encoder"} <= {
        a.path for a in client.list_artifacts(result.mlflow_run_id)
    }
    # --resume finds the latest checkpoint at the URI (already at 4 steps: nothing to train).
    assert pretrain(config, resume=True).checkpoint == result.checkpoint

    output = s3.uri("embeddings/tiny")
    summary = embed(EmbedConfig(checkpoint=result.run_dir, data=s3_store, output=output, batch_size=8))
    emb = read_embeddings(output)
    assert summary.windows == emb.window.shape[0] == inspect_store(s3_store).usable_windows
    assert emb.info["pretrain_run_id"] == result.mlflow_run_id and emb.info["store"] == s3_store
    np.testing.assert_allclose(np.linalg.norm(emb.night, axis=1), 1.0, rtol=1e-5)


@pytest.mark.integration
def test_ingest_reads_sites_from_s3_and_writes_the_store_there(s3, ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.ingest import ingest
    from pipelines.ingest_config import IngestConfig
    from s2v_core.synth import write_cohort

    cohort = write_cohort(tmp_path / "cohort", sites=2, recordings_per_site=1, hours=0.5, seed=4)
    inputs = [s3.upload(tmp_path / "cohort", "cohort")]  # a parent of site directories, options and all
    # Credentials in the URI (moto accepts any): used to connect, shown nowhere.
    output = s3.uri("stores/ingested").replace("s3://", "s3://testing:testing@")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = ingest(IngestConfig(inputs=inputs, output=output, epochs_per_window=5), mlflow_tracking_uri=tracking_uri)
    assert (summary.ok, summary.quarantined, summary.windows) == (2, 0, 24)
    assert summary.manifest == s3.uri("stores/ingested/manifest.jsonl").replace("s3://", "s3://***@")
    lines = [
        json.loads(line)
        for line in s3.fs.open_input_stream(f"{BUCKET}/stores/ingested/manifest.jsonl").read().decode().splitlines()
    ]
    assert sorted(line["site"] for line in lines) == sorted(site.name for site in cohort.sites)
    assert {line["status"] for line in lines} == {"ok"}
    # Written as one part per run and merged once, not rewritten per line; no part is left.
    assert s3.kind("stores/ingested/_manifest") == pafs.FileType.NotFound
    assert inspect_store(output).windows == 24
    client = MlflowClient(tracking_uri=tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("s2v-ingest").experiment_id])
    assert run.data.params["output"] == summary.store == s3.uri("stores/ingested").replace("s3://", "s3://***@")
    assert "manifest.jsonl" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert b"testing:testing" not in (tmp_path / "mlflow.db").read_bytes()
    # A second run finds the finished recordings in the manifest on s3 and decodes nothing.
    again = ingest(IngestConfig(inputs=inputs, output=output, epochs_per_window=5))
    assert (again.ok, again.skipped) == (0, 2)
