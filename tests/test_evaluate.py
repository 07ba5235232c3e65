"""s2v evaluate: held-out protocol, report structure, MLflow logging and clear errors."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.embed import embed_local
from pipelines.evaluate import evaluate
from pipelines.evaluate_config import EvaluateConfig
from s2v_core.embeddings import read_embeddings
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.run_layout import TRAINING_RECORD_FILE
from s2v_core.splits import split_record
from s2v_core.toystore import write_toy_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    # Per site: 2 train, 1 val, 1 test subject (one night each).
    store = write_toy_store(
        root / "store",
        sites=2,
        recordings_per_site=4,
        windows_per_recording=4,
        epochs_per_window=4,
        seed=2,
        val_per_site=1,
        test_per_site=1,
    )
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny"))
    checkpoint = save_encoder(encoder, root / "encoder")
    # What `s2v pretrain` writes beside its encoders: pretrained on the train subjects.
    record = {**split_record(str(store), ["train"]), "store": str(store)}
    (checkpoint / TRAINING_RECORD_FILE).write_text(json.dumps(record))
    embed_local(encoder, str(store), str(root / "emb"), source=str(checkpoint), training=record)
    return {"root": root, "store": store, "checkpoint": checkpoint, "emb": root / "emb"}


def _with_training(setup, tmp_path, record):
    """A copy of the embeddings whose encoder was pretrained as ``record`` says."""
    emb = tmp_path / "emb-copy"
    shutil.copytree(setup["emb"], emb)
    info = json.loads((emb / "embed.json").read_text())
    (emb / "embed.json").write_text(json.dumps({**info, "encoder_training": record}))
    return str(emb)


@pytest.fixture(autouse=True)
def no_external_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_staging_report_beats_majority_and_is_logged_under_the_pretraining_run(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    # A stand-in for the pretraining run in the tracking store that embed recorded.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # Artifacts beside the store, as every command's experiments keep them (not ./mlruns).
    experiment = client.create_experiment("pretrain", artifact_location=(tmp_path / "mlartifacts").as_uri())
    pretrain = client.create_run(experiment).info.run_id
    emb = tmp_path / "emb"
    shutil.copytree(setup["emb"], emb)
    info = json.loads((emb / "embed.json").read_text())
    (emb / "embed.json").write_text(json.dumps({**info, "pretrain_run_id": pretrain, "pretrain_tracking_uri": uri}))

    report = evaluate(EvaluateConfig(embeddings=str(emb), task="staging", report=str(tmp_path / "out" / "REPORT.json")))
    # Logging must not point the rest of the process at this store (MLflow 3's
    # set_tracking_uri exports MLFLOW_TRACKING_URI; a later pretraining run would follow it).
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert json.loads((tmp_path / "out" / "REPORT.json").read_text()) == report
    staging = report["staging"]
    assert staging["n_subjects"] == 8 and staging["n_epochs_scored"] == 128
    # Held out: probes fit on the 6 train/val subjects, figures come from the 2 test subjects only.
    protocol = report["protocol"]
    assert protocol["mode"] == "held-out" and protocol["subjects"] == {"train": 4, "val": 2, "test": 2}
    assert protocol["encoder_pretrained_on"] == "the train subjects of this store"
    majority = staging["majority"]["summary"]["macro_f1"]["mean"]
    for head in ("linear", "temporal"):
        assert len(staging[head]["per_fold"]) == 1
        assert sum(map(sum, staging[head]["pooled"]["confusion"])) == 2 * 4 * 4  # 2 test nights x 4 windows x 4
        assert set(staging[head]["summary"]) >= {"macro_f1", "kappa", "accuracy"}
        assert set(staging[head]["pooled"]["per_class_f1"]) == {"W", "N1", "N2", "N3", "REM"}
        assert np.array(staging[head]["pooled"]["confusion"]).shape == (5, 5)
    # Even an untrained encoder keeps the toy stage signal (carrier frequency) partly separable.
    assert staging["linear"]["summary"]["macro_f1"]["mean"] > majority + 0.1
    assert {p.split("/")[-1] for p in report["plots"]} == {
        "confusion_linear.png",
        "confusion_temporal.png",
        "hypnogram.png",
    }
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.tags["s2v.pretrain_run_id"] == pretrain
    assert run.data.tags["mlflow.parentRunId"] == pretrain
    assert run.data.metrics["staging.linear.summary.macro_f1"] == pytest.approx(
        staging["linear"]["summary"]["macro_f1"]["mean"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "REPORT.json" in artifacts and "plots" in artifacts


def test_scoring_subjects_the_encoder_saw_is_refused_unless_transductive(setup, tmp_path):
    seen = _with_training(
        setup, tmp_path, {**split_record(str(setup["store"]), ["train", "val", "test"]), "store": str(setup["store"])}
    )
    with pytest.raises(ValueError, match=r"pretrained on the train/val/test subjects .* --transductive"):
        evaluate(EvaluateConfig(embeddings=seen, task="staging", report=str(tmp_path / "r.json"), log_to_mlflow=False))
    unknown = _with_training(setup, tmp_path / "u", None)
    with pytest.raises(ValueError, match=r"what pretrained the encoder is unknown .* --transductive"):
        evaluate(
            EvaluateConfig(embeddings=unknown, task="outcome:ahi", report=str(tmp_path / "r.json"), log_to_mlflow=False)
        )
    report = evaluate(
        EvaluateConfig(
            embeddings=seen,
            task="staging",
            report=str(tmp_path / "r.json"),
            folds=3,
            heads=("linear",),
            log_to_mlflow=False,
            transductive=True,
        )
    )
    assert report["protocol"]["mode"] == "transductive" and "caveat" in report["protocol"]
    assert len(report["staging"]["linear"]["per_fold"]) == 3
    # An encoder pretrained on another store has seen none of these subjects.
    other = write_toy_store(tmp_path / "other", sites=1, recordings_per_site=2, windows_per_recording=1)
    elsewhere = _with_training(
        setup, tmp_path / "e", {**split_record(str(other), ["train", "val", "test"]), "store": str(other)}
    )
    report = evaluate(
        EvaluateConfig(
            embeddings=elsewhere,
            task="staging",
            report=str(tmp_path / "r.json"),
            heads=("linear",),
            log_to_mlflow=False,
        )
    )
    assert report["protocol"]["encoder_pretrained_on"] == "another store"


def test_outcome_and_site_tasks(setup, tmp_path):
    ahi = evaluate(
        EvaluateConfig(
            embeddings=str(setup["emb"]), task="outcome:ahi", report=str(tmp_path / "ahi.json"), log_to_mlflow=False
        )
    )
    assert ahi["outcome"]["kind"] == "regression" and set(ahi["outcome"]["summary"]) >= {"mae", "r2"}
    hypertension = evaluate(
        EvaluateConfig(
            embeddings=str(setup["emb"]),
            task="outcome:hypertension",
            report=str(tmp_path / "ht.json"),
            log_to_mlflow=False,
            transductive=True,
            folds=3,
        )
    )
    assert hypertension["outcome"]["kind"] == "classification"
    assert "auprc" in hypertension["outcome"]["per_fold"][0]
    age = evaluate(
        EvaluateConfig(
            embeddings=str(setup["emb"]), task="outcome:age", report=str(tmp_path / "age.json"), log_to_mlflow=False
        )
    )
    assert age["outcome"]["n_nights"] == 8 and len(age["outcome"]["per_fold"]) == 1
    site = evaluate(
        EvaluateConfig(
            embeddings=str(setup["emb"]),
            task="site",
            report=str(tmp_path / "site.json"),
            log_to_mlflow=False,
            compare=str(setup["emb"]),
        )
    )
    assert site["site"]["night"]["sites"] == ["site0", "site1"]
    assert site["site"]["window"]["chance_balanced"] == 0.5
    assert "macro_f1" in site["site"]["staging_linear"]
    # The same embeddings compared with themselves give the same figures (same folds, same probes).
    assert site["site_compare"]["night"]["summary"] == site["site"]["night"]["summary"]


def test_tasks_of_the_task_table_are_scored_by_their_level_and_kind(setup, tmp_path):
    emb = str(setup["emb"])
    grouped = evaluate(
        EvaluateConfig(
            embeddings=emb, task="staging4", report=str(tmp_path / "s4.json"), heads=("linear",), log_to_mlflow=False
        )
    )
    staging = grouped["staging"]
    assert grouped["task"] == "staging4" and list(staging["class_counts"]) == ["W", "light", "deep", "REM"]
    assert list(staging["linear"]["pooled"]["per_class_f1"]) == ["W", "light", "deep", "REM"]
    assert len(staging["linear"]["pooled"]["confusion"]) == 4
    five = evaluate(
        EvaluateConfig(
            embeddings=emb, task="staging", report=str(tmp_path / "s5.json"), heads=("linear",), log_to_mlflow=False
        )
    )["staging"]["class_counts"]
    assert staging["class_counts"]["light"] == five["N1"] + five["N2"] and staging["class_counts"]["deep"] == five["N3"]
    age = evaluate(EvaluateConfig(embeddings=emb, task="age", report=str(tmp_path / "age.json"), log_to_mlflow=False))
    assert age["outcome"]["column"] == "age" and age["outcome"]["n_nights"] == 8
    with pytest.raises(ValueError, match=r"--task survival:ahi,age: .* no frozen-embedding probe .*s2v finetune"):
        EvaluateConfig(embeddings=emb, task="survival:ahi,age", report=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=r"known: staging, staging4, staging3, age, sex, ahi, site, outcome:COLUMN"):
        EvaluateConfig(embeddings=emb, task="sleepiness", report=str(tmp_path / "r.json"))


def test_bad_inputs_give_one_clear_message(setup, tmp_path, capsys):
    emb = str(setup["emb"])
    with pytest.raises(
        ValueError, match=r"no night has outcome 'bmi'; available: age, sex, ahi, cvd_days, cvd_event, hypertension"
    ):
        evaluate(
            EvaluateConfig(
                embeddings=emb, task="outcome:bmi", report=str(tmp_path / "r.json"), folds=3, log_to_mlflow=False
            )
        )
    with pytest.raises(ValueError, match="expected staging, outcome:COLUMN or site"):
        evaluate(
            EvaluateConfig(embeddings=emb, task="sleepiness", report=str(tmp_path / "r.json"), log_to_mlflow=False)
        )
    with pytest.raises(ValueError, match="need --data STORE and --checkpoint"):
        evaluate(
            EvaluateConfig(
                embeddings=emb, task="staging", report=str(tmp_path / "r.json"), robustness=True, log_to_mlflow=False
            )
        )
    with pytest.raises(ValueError, match="needs at least 9 subjects, found 8"):
        evaluate(
            EvaluateConfig(
                embeddings=emb,
                task="staging",
                report=str(tmp_path / "r.json"),
                folds=9,
                log_to_mlflow=False,
                transductive=True,
            )
        )
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(setup["emb"], unlabelled)
    part = next((unlabelled / "windows").glob("*.parquet"))
    table = pq.read_table(part)
    stages = pa.array([[-1] * 4] * table.num_rows, pa.list_(pa.int8()))
    pq.write_table(table.set_column(table.schema.get_field_index("stages"), "stages", stages), part)
    from pipelines.cli import main

    code = main(
        [
            "evaluate",
            "--embeddings",
            str(unlabelled),
            "--task",
            "staging",
            "--report",
            str(tmp_path / "r.json"),
            "--no-mlflow",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("s2v evaluate: error: --task staging:") and "no sleep stage labels" in err[0]


@pytest.mark.integration
def test_label_efficiency_robustness_and_yasa_peer(setup, tmp_path, ray_local):
    report = evaluate(
        EvaluateConfig(
            embeddings=str(setup["emb"]),
            task="staging",
            report=str(tmp_path / "REPORT.json"),
            heads=("linear",),
            data=str(setup["store"]),
            checkpoint=str(setup["checkpoint"]),
            label_efficiency_curve=True,
            robustness=True,
            scenarios=["only:eeg", "wearable"],
            peer="yasa",
            log_to_mlflow=False,
        )
    )
    curves = report["label_efficiency"]["curves"]
    assert set(curves) == {"linear_probe_pretrained", "supervised_from_scratch"}
    assert set(curves["supervised_from_scratch"]) == {"0.01", "0.1", "1.0"}
    # Label fractions draw from the 4 train nights only: the 2 val nights stay whole for early stopping.
    assert curves["linear_probe_pretrained"]["0.01"]["train_nights"] == [1]
    assert curves["linear_probe_pretrained"]["1.0"]["train_nights"] == [4]
    matrix = report["robustness"]["matrix"]
    assert set(matrix) == {"only:eeg", "wearable"}
    # The full-PSG probe applied unchanged to each subset, next to the retrained one.
    unchanged = report["robustness"]["matrix_full_probe"]
    assert set(unchanged) == {"only:eeg", "wearable"} and all(-1 <= unchanged[s]["kappa"] <= 1 for s in unchanged)
    assert report["robustness"]["scenarios"]["wearable"] == ["hr", "spo2", "thorax"]
    assert all(0 <= matrix[s]["macro_f1"] <= 1 for s in matrix)
    scenario = read_embeddings(tmp_path / "robustness" / "only_eeg")
    assert scenario.info["modalities"] == ["eeg"] and scenario.epoch.shape[1:] == (4, 32)
    peer = report["peer"]["yasa"]
    assert peer["available"] and "macro_f1" in peer["yasa"] and "macro_f1" in peer["linear_probe_same_windows"]
    names = {p.split("/")[-1] for p in report["plots"]}
    assert {"robustness.png", "label_efficiency.png"} <= names
