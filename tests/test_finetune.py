"""``s2v finetune``: protocol checks (fast) and a tiny end-to-end run on Ray Train (integration)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipelines.finetune import FinetuneConfig, finetune, setup
from pipelines.finetune_checks import check_protocol
from pipelines.finetune_deepspeed import deepspeed_config, with_deepspeed
from s2v_core.finetuning import load_finetuned
from s2v_core.model import SleepEncoder, model_config, save_encoder
from s2v_core.splits import TRAINING_RECORD_FILE, split_record
from s2v_core.toystore import write_toy_store

MODALITIES = ("hr", "spo2", "airflow")


def _pretrain_run_dir(root, store, *, splits=("train",)):
    """A run dir as `s2v pretrain` leaves it: encoder/ with its training record, mlflow_run.json."""
    torch.manual_seed(0)
    encoder = SleepEncoder(model_config("tiny", width=16, depth=1, heads=2, epochs_per_window=4), MODALITIES)
    encoder_dir = save_encoder(encoder, root / "pretrain" / "encoder")
    record = {**split_record(str(store), list(splits)), "store": str(store)}
    (encoder_dir / TRAINING_RECORD_FILE).write_text(json.dumps(record))
    return root / "pretrain"


def toy_store(root):
    """Per site: 3 train, 1 val, 1 test subject (one night each), windows of 4 epochs."""
    return write_toy_store(
        root / "store",
        sites=2,
        recordings_per_site=5,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=3,
        val_per_site=1,
        test_per_site=1,
    )


@pytest.fixture
def store(tmp_path):
    return toy_store(tmp_path)


def test_protocol_refuses_encoders_that_saw_the_test_subjects(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store, splits=("train", "val", "test"))
    config = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4)
    with pytest.raises(ValueError, match="pretrained on the train/val/test subjects"):
        setup(config)
    with pytest.raises(ValueError, match="what pretrained the encoder is unknown"):
        check_protocol(None, split_record(str(store), ["train"]), transductive=False, checkpoint="x")
    assert check_protocol(None, {}, transductive=True, checkpoint="x")["mode"] == "transductive"


def test_setup_names_bad_options(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    base = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4)
    with pytest.raises(ValueError, match="--batch-size: expected at most 24"):
        setup(dataclasses.replace(base, batch_size=25))
    with pytest.raises(ValueError, match="--mode: expected one of frozen, lora, full"):
        setup(dataclasses.replace(base, mode="adapters"))
    with pytest.raises(ValueError, match="--task: expected one of staging"):
        setup(dataclasses.replace(base, task="stages"))
    with pytest.raises(ValueError, match="--head-lr: expected a learning rate > 0, found 0.0"):
        setup(dataclasses.replace(base, head_lr=0.0))
    with pytest.raises(ValueError, match=r"--modalities: expected modalities of both .* found eeg"):
        setup(dataclasses.replace(base, modalities=("eeg", "hr")))
    assert setup(dataclasses.replace(base, modalities=("spo2",))).spec.modalities == ("spo2",)
    prepared = setup(base)
    assert prepared.spec.modalities == MODALITIES and prepared.epochs_per_window == 4
    assert len(prepared.test_files) == 2 and len(prepared.val_files) == 2


@pytest.mark.integration
def test_finetune_lora_end_to_end_nested_under_pretraining_and_resumable(ray_local, tmp_path, store, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.runtime import mlflow_experiment, mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = _pretrain_run_dir(tmp_path, store)
    uri = mlflow_tracking_uri(run_dir)
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(mlflow_experiment(client, uri, "pretrain")).info.run_id
    (run_dir / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": parent}))

    output = tmp_path / "ft"
    config = FinetuneConfig(
        checkpoint=str(run_dir),
        data=str(store),
        output=str(output),
        task="staging",
        mode="lora",
        head="temporal",
        steps=4,
        batch_size=4,
        eval_every=2,
        checkpoint_every=2,
        lr=3e-3,
    )
    report = finetune(config)
    assert report["steps"] == 4 and report["best_step"] in (2, 4)
    assert report["test"]["n_epochs"] == 2 * 4 * 4  # 2 test nights x 4 windows x 4 epochs
    assert set(report["test"]) >= {"macro_f1", "kappa", "accuracy", "per_class_f1", "confusion"}
    assert "kappa" in report["baseline"]
    model = load_finetuned(output / "model")
    assert model.spec.mode == "lora" and model.spec.modalities == MODALITIES
    assert (output / "model" / "adapter.pt").is_file()
    described = json.loads((output / "model" / "finetuned.json").read_text())
    assert described["task"] == "staging" and described["classes"] == ["W", "N1", "N2", "N3", "REM"]
    assert "kappa" in described["test"]
    # The base weights the run started from are untouched in the saved model (LoRA keeps them).
    start = torch.load(output / "pretrained_encoder" / "encoder.pt", weights_only=True)
    saved = torch.load(output / "model" / "encoder" / "encoder.pt", weights_only=True)
    assert all(torch.equal(start[k], saved[k]) for k in start)

    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert "test/kappa" in run.data.metrics and "val/kappa" in run.data.metrics
    assert not (tmp_path / "mlruns").exists()

    with pytest.raises(ValueError, match="--output: expected a new run directory"):
        setup(config)
    resumed = finetune(dataclasses.replace(config, steps=6), resume=True)
    assert resumed["steps"] == 6
    assert resumed["mlflow"]["run_id"] == report["mlflow"]["run_id"]
    # Resumed at step 4, not restarted: each validation step was logged once.
    history = client.get_metric_history(report["mlflow"]["run_id"], "loss")
    assert sorted(m.step for m in history) == [2, 4, 6]
    again = finetune(dataclasses.replace(config, steps=6), resume=True)  # finished: scored again, not trained
    assert again["steps"] == 6 and again["test"] == resumed["test"]


def test_night_context_only_for_epoch_level_classification(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    base = FinetuneConfig(
        checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4, night_context=True
    )
    for task, found in (("age", "night-level regression"), ("events", "epoch-level binary")):
        with pytest.raises(ValueError, match=f"--night-context: expected an epoch-level classification .*{found}"):
            setup(dataclasses.replace(base, task=task))
    with pytest.raises(ValueError, match="--night-steps: expected an integer >= 1, found 0"):
        setup(dataclasses.replace(base, night_steps=0))
    with pytest.raises(ValueError, match="--night-context: .*expected no --labelled-windows, found 8"):
        setup(dataclasses.replace(base, labelled_windows=8))
    for task in ("staging", "staging4", "staging3"):
        assert setup(dataclasses.replace(base, task=task, output=str(tmp_path / task))).config.night_context


def test_cli_flags_map_onto_the_config():
    from pipelines.cli import build_parser
    from pipelines.finetune_cli import config_from_args

    args = build_parser("finetune").parse_args(
        [
            "finetune",
            "--checkpoint",
            "runs/tiny",
            "--data",
            "store",
            "--output",
            "runs/ft",
            "--mode",
            "lora",
            "--head",
            "temporal",
            "--lora-r",
            "4",
            "--lora-targets",
            "q_proj,v_proj",
            "--modalities",
            "ecg,eeg",
            "--task",
            "staging4",
            "--steps",
            "7",
            "--train-tokenizers",
            "--lr",
            "1e-4",
            "--head-lr",
            "2e-3",
            "--night-context",
            "--night-steps",
            "40",
            "--deepspeed",
            "--zero-stage",
            "3",
        ]
    )
    config = config_from_args(args)
    assert config.night_context and config.night_steps == 40
    assert config.deepspeed and config.zero_stage == 3
    assert (config.lr, config.head_lr) == (1e-4, 2e-3)
    assert (config.mode, config.head, config.lora_r, config.steps, config.task) == (
        "lora",
        "temporal",
        4,
        7,
        "staging4",
    )
    assert config.lora_targets == ("q_proj", "v_proj") and config.modalities == ("eeg", "ecg")
    assert config.train_tokenizers and config.lora_alpha == 16 and config.lora_dropout == 0.05
    bad = build_parser("finetune").parse_args(
        ["finetune", "--checkpoint", "c", "--data", "d", "--output", "o", "--lora-targets", "q_proj,qkv"]
    )
    with pytest.raises(ValueError, match="--lora-targets"):
        config_from_args(bad)
    plain = config_from_args(
        build_parser("finetune").parse_args(["finetune", "--checkpoint", "c", "--data", "d", "--output", "o"])
    )
    assert not plain.deepspeed and plain.zero_stage is None
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser("finetune").parse_args(
            ["finetune", "--checkpoint", "c", "--data", "d", "--output", "o", "--zero-stage", "4"]
        )


def test_zero_stage_comes_only_with_deepspeed(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    base = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4)
    with pytest.raises(ValueError, match="--zero-stage: .*expected --deepspeed with it, found --zero-stage 2 without"):
        setup(dataclasses.replace(base, zero_stage=2))
    with pytest.raises(ValueError, match="--zero-stage: expected 0, 1, 2 or 3, found 4"):
        setup(dataclasses.replace(base, deepspeed=True, zero_stage=4))
    assert setup(dataclasses.replace(base, deepspeed=True, zero_stage=3)).config.zero_stage == 3


def test_deepspeed_config_follows_the_device_and_trains_as_the_data_parallel_path():
    config = FinetuneConfig(workers=2, batch_size=8, deepspeed=True)
    cpu, gpu = deepspeed_config(config, on_gpu=False), deepspeed_config(config, on_gpu=True)
    assert cpu["zero_optimization"]["stage"] == 0 and gpu["zero_optimization"]["stage"] == 2  # as s2v pretrain
    assert deepspeed_config(dataclasses.replace(config, zero_stage=3), on_gpu=True)["zero_optimization"]["stage"] == 3
    for ds in (cpu, gpu):
        # DeepSpeed checks train_batch_size == micro batch * accumulation * workers.
        assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
        assert ds["train_batch_size"] == 8
        # As the data-parallel path: float32 (frozen weights are never rounded), no clipping, constant LR.
        assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
        assert ds["gradient_clipping"] == 0.0
        assert "scheduler" not in ds and "optimizer" not in ds  # the loop hands its AdamW over
        json.dumps(ds)  # saved in the run dir and logged to MLflow


def test_a_resumed_deepspeed_run_keeps_its_zero_stage_and_workers(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    config = FinetuneConfig(
        checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4, workers=2, deepspeed=True
    )
    prepared = with_deepspeed(setup(config))
    assert prepared.ds_config["zero_optimization"]["stage"] == 0  # CPU workers
    assert json.loads((tmp_path / "ft" / "ds_config.json").read_text()) == prepared.ds_config
    assert with_deepspeed(setup(dataclasses.replace(config, deepspeed=False), resume=True)).ds_config is None

    checkpoint = tmp_path / "ft" / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "engine": {"zero_stage": 2, "world_size": 2}}))
    resumed = dataclasses.replace(prepared, resume_from=str(checkpoint))
    with pytest.raises(
        ValueError, match=r"--resume: expected the ZeRO stage of checkpoint step_00000002 \(2\), found 0"
    ):
        with_deepspeed(resumed)
    assert with_deepspeed(dataclasses.replace(resumed, on_gpu=True)).ds_config["zero_optimization"]["stage"] == 2
    fewer = dataclasses.replace(resumed, on_gpu=True, config=dataclasses.replace(config, workers=1))
    with pytest.raises(ValueError, match="--workers: expected 2, the workers that wrote checkpoint step_00000002"):
        with_deepspeed(fewer)


@pytest.mark.integration
def test_finetune_night_level_task_through_ray(ray_local, tmp_path, store):
    """AHI and a time-to-event outcome (of the store's `outcomes` map): window-level training, per-night scoring."""
    run_dir = _pretrain_run_dir(tmp_path, store)
    config = FinetuneConfig(
        checkpoint=str(run_dir),
        data=str(store),
        output=str(tmp_path / "ahi"),
        task="ahi",
        mode="frozen",
        head="mlp",
        steps=2,
        batch_size=4,
        eval_every=1,
        checkpoint_every=2,
    )
    report = finetune(config, mlflow=False)
    assert report["test"]["n"] == 2  # two test nights, one prediction each
    assert {"mae", "pearson_r", "icc", "severity_kappa"} <= set(report["test"])
    assert report["baseline"]["unit"] == "events/h"
    assert list(report["val"]) == ["mae"] and report["val"]["mae"] > 0  # early stopping watched the val MAE
    # A time-to-event outcome (event and time columns of the store's outcomes): Cox loss, C-index.
    survival = finetune(
        dataclasses.replace(config, output=str(tmp_path / "cvd"), task="survival:cvd_event,cvd_days"), mlflow=False
    )
    assert list(survival["val"]) == ["c_index"] and 0.0 <= survival["val"]["c_index"] <= 1.0
    assert survival["baseline"]["c_index"] == pytest.approx(0.5)  # a constant risk orders no pair
    assert 0.0 <= survival["test"]["c_index"] <= 1.0 and load_finetuned(survival["model"]).task.kind == "survival"


def test_resume_refuses_other_training_options(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    base = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4)
    setup(base)
    checkpoint = tmp_path / "ft" / "checkpoints" / "step_00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "training.pt").write_bytes(b"")
    assert setup(dataclasses.replace(base, steps=400), resume=True).resume_from == str(checkpoint)
    with pytest.raises(ValueError, match=r"--resume: .*mode: the run has 'frozen', this call 'lora'"):
        setup(dataclasses.replace(base, mode="lora"), resume=True)


@pytest.fixture
def event_store(tmp_path):
    """Three sites, the first two with scored events; per site 3 train, 1 val, 1 test night."""
    return write_toy_store(
        tmp_path / "event-store",
        sites=3,
        recordings_per_site=5,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=MODALITIES,
        seed=4,
        val_per_site=1,
        test_per_site=1,
        scored_event_sites=2,
    )


def test_event_task_learns_and_scores_only_nights_with_scored_events(tmp_path, event_store):
    run_dir = _pretrain_run_dir(tmp_path, event_store)
    config = FinetuneConfig(
        checkpoint=str(run_dir), data=str(event_store), output=str(tmp_path / "ev"), task="events", batch_size=4
    )
    prepared = setup(config)
    assert all("site=site2" not in f for f in (*prepared.train_files, *prepared.val_files, *prepared.test_files))
    assert (len(prepared.train_files), len(prepared.val_files), len(prepared.test_files)) == (6, 2, 2)
    assert prepared.train_windows == 24
    with pytest.raises(ValueError, match=r"--batch-size: expected at most 24 \(the train subjects' labelled windows"):
        setup(dataclasses.replace(config, output=str(tmp_path / "ev2"), batch_size=25))


def test_event_task_names_stores_without_labels(tmp_path, store):
    import pyarrow.parquet as pq

    run_dir = _pretrain_run_dir(tmp_path, store)
    config = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ev"), task="arousal")
    with pytest.raises(ValueError, match="--task arousal: expected train nights with scored events"):
        setup(dataclasses.replace(config, batch_size=4))
    old = sorted(store.glob("site=site0/*.parquet"))[0]  # written before the column existed
    pq.write_table(pq.read_table(old).drop_columns(["events"]), old)
    with pytest.raises(ValueError, match=r"--task arousal: .*has no per-epoch event labels \(column 'events'\)"):
        setup(dataclasses.replace(config, batch_size=4))


def test_labelled_windows_draw_a_seeded_subset_of_train_windows(tmp_path, store):
    run_dir = _pretrain_run_dir(tmp_path, store)
    base = FinetuneConfig(checkpoint=str(run_dir), data=str(store), output=str(tmp_path / "ft"), batch_size=4)
    first = setup(dataclasses.replace(base, labelled_windows=6))
    again = setup(dataclasses.replace(base, labelled_windows=6, output=str(tmp_path / "ft2")))
    other = setup(dataclasses.replace(base, labelled_windows=6, seed=1, output=str(tmp_path / "ft3")))
    assert first.train_windows == 6 and len(set(first.train_window_keys)) == 6
    assert first.train_window_keys == again.train_window_keys != other.train_window_keys
    train_nights = {f.rsplit("/", 1)[1].removesuffix(".parquet") for f in first.train_files}
    assert {key.split("/")[1] for key in first.train_window_keys} <= train_nights
    assert setup(dataclasses.replace(base, output=str(tmp_path / "ft4"))).train_window_keys is None
    with pytest.raises(ValueError, match=r"--labelled-windows: expected at most 24 .* found 25"):
        setup(dataclasses.replace(base, labelled_windows=25, output=str(tmp_path / "ft5")))
    with pytest.raises(ValueError, match="--labelled-windows: expected an integer >= 0"):
        setup(dataclasses.replace(base, labelled_windows=-1, output=str(tmp_path / "ft6")))


@pytest.mark.integration
def test_finetune_event_detector_and_ahi_from_events_through_ray(ray_local, tmp_path, event_store):
    """Respiratory-event detection per epoch on the labelled nights; AHI from detected events per test night."""
    run_dir = _pretrain_run_dir(tmp_path, event_store)
    config = FinetuneConfig(
        checkpoint=str(run_dir),
        data=str(event_store),
        output=str(tmp_path / "events"),
        task="events",
        mode="frozen",
        steps=3,
        batch_size=4,
        eval_every=1,
        checkpoint_every=3,
        labelled_windows=12,
    )
    report = finetune(config, mlflow=False)
    assert report["train_windows"] == 12
    assert report["test"]["n"] == 2 * 4 * 4  # two labelled test nights of 4 windows x 4 epochs
    assert report["baseline"]["auroc"] == pytest.approx(0.5)
    ahi = report["ahi_from_events"]
    assert ahi["reference"] == "ahi_scored" and ahi["nights"] == 2 and len(ahi["per_night"]) == 2
    assert ahi["threshold_from"].startswith("val nights") and 0.0 < ahi["threshold"] < 1.0
    assert {"pearson_r", "icc", "severity_kappa", "mae"} <= set(ahi["detected"])
    # Events per positive epoch fitted on the val nights, for the detector and for the scored labels.
    assert 0.0 <= ahi["events_per_epoch"] <= 1.5 and 0.0 <= ahi["label_events_per_epoch"] <= 1.5
    # The val-fitted counting travels with the model: `s2v stage --events-model` applies it.
    from s2v_core.staging import load_event_detector

    detector = load_event_detector(report["model"])
    assert (detector.threshold, detector.threshold_from) == (ahi["threshold"], ahi["threshold_from"])
    assert detector.events_per_epoch == ahi["events_per_epoch"]


@pytest.mark.integration
def test_finetune_night_context_adds_a_night_head_that_stage_uses(ray_local, real_data, tmp_path, store, monkeypatch):
    """Stage 1 on Ray, then --night-context on the finished run: the head is trained, kept, reused, staged with."""
    from mlflow.tracking import MlflowClient

    from s2v_core.night_context import load_night_head
    from s2v_core.staging import stage_recording
    from tests.test_staging import DREAMS_SITE, IDENTITIES

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "ft"
    config = FinetuneConfig(
        checkpoint=str(_pretrain_run_dir(tmp_path, store)),
        data=str(store),
        output=str(output),
        task="staging",
        steps=4,
        batch_size=4,
        eval_every=2,
        checkpoint_every=2,
        lr=3e-3,
    )
    stage1 = finetune(config)
    assert "night_context" not in stage1 and load_night_head(output / "model") is None
    night_config = dataclasses.replace(config, night_context=True, night_steps=6)
    report = finetune(night_config, resume=True)  # finished: stage 1 is not trained again, stage 2 is added
    assert report["steps"] == 4 and report["test"] == stage1["test"]
    night = report["night_context"]
    assert night["reused"] is False and night["nights"] == {"train": 6, "val": 2, "test": 2}
    assert night["test"]["n_epochs"] == report["test"]["n_epochs"] == 2 * 4 * 4
    assert night["stage1_alone_test"] == report["test"] and "kappa_gain" in night
    assert 1 <= night["steps"] <= 6 and night["trained_with"]["night_steps"] == 6
    assert (output / "model" / "night_head.pt").is_file()
    described = json.loads((output / "model" / "finetuned.json").read_text())
    assert described["night_head"]["hyperparameters"]["width"] == 16 and "kappa" in described["night_head"]["test"]
    metrics = MlflowClient(tracking_uri=report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["run_id"]).data
    assert "night_context/test/kappa" in metrics.metrics and "test/kappa" in metrics.metrics
    again = finetune(night_config, resume=True)  # nothing missing: the head is kept and scored again
    assert again["night_context"]["reused"] is True and again["night_context"]["test"] == night["test"]
    with pytest.raises(ValueError, match="--resume: the run in .* has a whole-night head .* pass --night-context"):
        finetune(config, resume=True)  # would rebuild the model directory without it
    assert (output / "model" / "night_head.pt").is_file()
    assert not (tmp_path / "mlruns").exists()

    site = tmp_path / "dreams.toml"
    site.write_text(DREAMS_SITE)
    result = stage_recording(
        real_data / "DREAMS_Spindles" / "excerpt3.edf", model=output / "model", identities=IDENTITIES, site_config=site
    )
    assert result.summary["night_context"] is True and len(result.stages) == 60
    assert set(result.summary["modalities"]) <= set(MODALITIES) and result.summary["staged_epochs"] > 0


def _deepspeed_lora(root, store, **options) -> FinetuneConfig:
    """A staging LoRA run on two workers inside a DeepSpeed engine, output in ``root/ft``."""
    return FinetuneConfig(
        checkpoint=str(_pretrain_run_dir(root, store)),
        data=str(store),
        output=str(root / "ft"),
        task="staging",
        mode="lora",
        batch_size=4,
        workers=2,
        checkpoint_every=2,
        lr=3e-3,
        deepspeed=True,
        **options,
    )


def _check_trained_model(output, report):
    """A finished LoRA run: test figures, RUN_DIR/model loads, and the pretrained base weights are untouched."""
    assert report["test"]["n_epochs"] == 2 * 4 * 4 and "kappa" in report["test"] and "kappa" in report["baseline"]
    model = load_finetuned(output / "model")
    assert model.spec.mode == "lora" and (output / "model" / "adapter.pt").is_file()
    adapters = torch.load(output / "model" / "adapter.pt", weights_only=True)
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero: it trained
    start = torch.load(output / "pretrained_encoder" / "encoder.pt", weights_only=True)
    saved = torch.load(output / "model" / "encoder" / "encoder.pt", weights_only=True)
    assert all(torch.equal(start[k], saved[k]) for k in start)


@pytest.mark.integration
def test_finetune_deepspeed_zero2_lora_on_two_workers_and_resume(ray_local, tmp_path, store, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "ft"
    config = _deepspeed_lora(tmp_path, store, zero_stage=2, head="temporal", steps=4, eval_every=2)
    report = finetune(config)
    assert report["steps"] == 4 and report["best_step"] in (2, 4)
    _check_trained_model(output, report)
    assert json.loads((output / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    checkpoint = output / "checkpoints" / "step_00000004"
    assert json.loads((checkpoint / "state.json").read_text())["engine"] == {"zero_stage": 2, "world_size": 2}
    engine_files = {p.name for p in (checkpoint / "engine" / "state").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= engine_files  # every rank's shard
    assert not (checkpoint / "training.pt").exists()
    client = MlflowClient(tracking_uri=report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.params["deepspeed"] == "True" and run.data.params["zero_stage"] == "2"
    assert "ds_config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}

    resumed = finetune(dataclasses.replace(config, steps=6), resume=True)
    assert resumed["steps"] == 6
    # Resumed at step 4 from the engine state, not restarted: each validation step was logged once.
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [2, 4, 6]
    _check_trained_model(output, resumed)


@pytest.mark.integration
def test_finetune_deepspeed_zero3_gathers_partitioned_weights_to_score_and_save(ray_local, tmp_path, store):
    output = tmp_path / "ft"
    report = finetune(_deepspeed_lora(tmp_path, store, zero_stage=3, steps=2, eval_every=1), mlflow=False)
    assert report["steps"] == 2 and report["best_step"] in (1, 2) and report["val"]["kappa"] is not None
    _check_trained_model(output, report)
    engine_files = {p.name for p in (output / "checkpoints" / "step_00000002" / "engine" / "state").iterdir()}
    # ZeRO-3 writes each rank's parameter partition along with its optimiser shard.
    assert {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)} <= engine_files
