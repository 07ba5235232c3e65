"""s2v evaluate: report structure, grouped CV figures, MLflow logging and clear errors."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.embed import embed_local, read_embeddings
from pipelines.evaluate import evaluate
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.toystore import write_toy_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    store = write_toy_store(root / "store", sites=2, recordings_per_site=3, windows_per_recording=4,
                            epochs_per_window=4, seed=2)
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny"))
    checkpoint = save_encoder(encoder, root / "encoder")
    embed_local(encoder, str(store), str(root / "emb"), source=str(checkpoint))
    return {"root": root, "store": store, "checkpoint": checkpoint, "emb": root / "emb"}


@pytest.fixture(autouse=True)
def no_external_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_staging_report_beats_majority_and_is_logged_under_the_pretraining_run(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    # A stand-in for the pretraining run in the tracking store that embed recorded.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    pretrain = client.create_run(client.create_experiment("pretrain")).info.run_id
    emb = tmp_path / "emb"
    shutil.copytree(setup["emb"], emb)
    info = json.loads((emb / "embed.json").read_text())
    (emb / "embed.json").write_text(json.dumps({**info, "pretrain_run_id": pretrain, "pretrain_tracking_uri": uri}))

    report = evaluate(str(emb), "staging", str(tmp_path / "out" / "REPORT.json"), folds=3)
    # Logging must not point the rest of the process at this store (MLflow 3's
    # set_tracking_uri exports MLFLOW_TRACKING_URI; a later pretraining run would follow it).
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert json.loads((tmp_path / "out" / "REPORT.json").read_text()) == report
    staging = report["staging"]
    assert staging["n_subjects"] == 6 and staging["n_epochs_scored"] == 96
    majority = staging["majority"]["summary"]["macro_f1"]["mean"]
    for head in ("linear", "temporal"):
        assert len(staging[head]["per_fold"]) == 3
        assert set(staging[head]["summary"]) >= {"macro_f1", "kappa", "accuracy"}
        assert set(staging[head]["pooled"]["per_class_f1"]) == {"W", "N1", "N2", "N3", "REM"}
        assert np.array(staging[head]["pooled"]["confusion"]).shape == (5, 5)
    # Even an untrained encoder keeps the toy stage signal (carrier frequency) partly separable.
    assert staging["linear"]["summary"]["macro_f1"]["mean"] > majority + 0.1
    assert report["protocol"]["grouping"] == "subject_id"
    assert {p.split("/")[-1] for p in report["plots"]} == {"confusion_linear.png", "confusion_temporal.png",
                                                           "hypnogram.png"}
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.tags["s2v.pretrain_run_id"] == pretrain
    assert run.data.tags["mlflow.parentRunId"] == pretrain
    assert run.data.metrics["staging.linear.summary.macro_f1"] == pytest.approx(
        staging["linear"]["summary"]["macro_f1"]["mean"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "REPORT.json" in artifacts and "plots" in artifacts


def test_outcome_and_site_tasks(setup, tmp_path):
    ahi = evaluate(str(setup["emb"]), "outcome:ahi", str(tmp_path / "ahi.json"), folds=3, log_to_mlflow=False)
    assert ahi["outcome"]["kind"] == "regression" and set(ahi["outcome"]["summary"]) >= {"mae", "r2"}
    hypertension = evaluate(str(setup["emb"]), "outcome:hypertension", str(tmp_path / "ht.json"), folds=3,
                            log_to_mlflow=False)
    assert hypertension["outcome"]["kind"] == "classification"
    assert "auprc" in hypertension["outcome"]["per_fold"][0]
    age = evaluate(str(setup["emb"]), "outcome:age", str(tmp_path / "age.json"), folds=3, log_to_mlflow=False)
    assert age["outcome"]["n_nights"] == 6
    site = evaluate(str(setup["emb"]), "site", str(tmp_path / "site.json"), folds=3, log_to_mlflow=False,
                    compare=str(setup["emb"]))
    assert site["site"]["night"]["sites"] == ["site0", "site1"]
    assert site["site"]["window"]["chance_balanced"] == 0.5
    assert "macro_f1" in site["site"]["staging_linear"]
    # The same embeddings compared with themselves give the same figures (same folds, same probes).
    assert site["site_compare"]["night"]["summary"] == site["site"]["night"]["summary"]


def test_bad_inputs_give_one_clear_message(setup, tmp_path, capsys):
    emb = str(setup["emb"])
    with pytest.raises(ValueError, match=r"no night has outcome 'bmi'; available: age, sex, ahi, hypertension"):
        evaluate(emb, "outcome:bmi", str(tmp_path / "r.json"), folds=3, log_to_mlflow=False)
    with pytest.raises(ValueError, match="expected staging, outcome:COLUMN or site"):
        evaluate(emb, "sleepiness", str(tmp_path / "r.json"), log_to_mlflow=False)
    with pytest.raises(ValueError, match="need --data STORE and --checkpoint"):
        evaluate(emb, "staging", str(tmp_path / "r.json"), robustness=True, log_to_mlflow=False)
    with pytest.raises(ValueError, match="needs at least 7 subjects, found 6"):
        evaluate(emb, "staging", str(tmp_path / "r.json"), folds=7, log_to_mlflow=False)
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(setup["emb"], unlabelled)
    part = next((unlabelled / "windows").glob("*.parquet"))
    table = pq.read_table(part)
    stages = pa.array([[-1] * 4] * table.num_rows, pa.list_(pa.int8()))
    pq.write_table(table.set_column(table.schema.get_field_index("stages"), "stages", stages), part)
    from pipelines.cli import main

    code = main(["evaluate", "--embeddings", str(unlabelled), "--task", "staging",
                 "--report", str(tmp_path / "r.json"), "--no-mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("s2v evaluate: error: --task staging:") and "no sleep stage labels" in err[0]


@pytest.mark.integration
def test_label_efficiency_robustness_and_yasa_peer(setup, tmp_path, ray_local):
    report = evaluate(str(setup["emb"]), "staging", str(tmp_path / "REPORT.json"), folds=3, heads=("linear",),
                      data=str(setup["store"]), checkpoint=str(setup["checkpoint"]), label_efficiency_curve=True,
                      scratch_steps=5, robustness=True, scenarios=["only:eeg", "wearable"], peer="yasa",
                      log_to_mlflow=False)
    curves = report["label_efficiency"]["curves"]
    assert set(curves) == {"linear_probe_pretrained", "supervised_from_scratch"}
    assert set(curves["supervised_from_scratch"]) == {"0.01", "0.1", "1.0"}
    assert curves["linear_probe_pretrained"]["0.01"]["train_nights"] == [1, 1, 1]
    matrix = report["robustness"]["matrix"]
    assert set(matrix) == {"only:eeg", "wearable"}
    assert report["robustness"]["scenarios"]["wearable"] == ["hr", "spo2", "thorax"]
    assert all(0 <= matrix[s]["macro_f1"] <= 1 for s in matrix)
    scenario = read_embeddings(tmp_path / "robustness" / "only_eeg")
    assert scenario.info["modalities"] == ["eeg"] and scenario.epoch.shape[1:] == (4, 32)
    peer = report["peer"]["yasa"]
    assert peer["available"] and "macro_f1" in peer["yasa"] and "macro_f1" in peer["linear_probe_same_windows"]
    names = {p.split("/")[-1] for p in report["plots"]}
    assert {"robustness.png", "label_efficiency.png"} <= names
