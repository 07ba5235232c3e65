"""s2v sweep: option validation, the fair design (subsets, sizes, seeds, phases), and a real pre-registered sweep."""

import json
import os
from pathlib import Path

import pytest

from pipelines.cli import main
from s2v_core.toystore import write_toy_store
from tune.plan import (
    SweepConfig,
    modality_subsets,
    parse_pairs,
    plan_trials,
    scoring_pairs,
)
from tune.sweep import check_store, store_modalities

STORE_MODALITIES = ("eeg", "eog", "ecg", "hr", "spo2")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_toy_store(
        tmp_path_factory.mktemp("sweep") / "store",
        sites=2,
        recordings_per_site=4,
        windows_per_recording=4,
        epochs_per_window=4,
        modalities=STORE_MODALITIES,
        seed=0,
        val_per_site=1,
        test_per_site=1,
    )


def config(store, output, **overrides) -> SweepConfig:
    values = {
        "data": str(store),
        "output": str(output),
        "widths": (16, 32),
        "modality_counts": (2, 3),
        "steps": 2,
        "global_batch": 4,
        "bootstrap": 10,
        "seeds": 1,
        "subsets_per_count": 1,
        "scoring_pairs": (("eeg", "ecg"),),
        "score_windows": 8,
        "probe_windows": 16,
        "validation_batch": 4,
    }
    values.update(overrides)
    return SweepConfig(**values)


# -- validation before Tune starts -------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"widths": (32, 0)}, "--widths: expected positive integers"),
        ({"modality_counts": (1, 3)}, "--modality-counts: found 1"),
        ({"depths": (1, 2, 3)}, "--depths: expected one depth per width \\(2\\), found 3"),
        ({"global_batch": 5, "workers_per_trial": 2}, "not divisible"),
        ({"seeds": 0}, "--seeds: expected an integer >= 1, found 0"),
        ({"lr_multipliers": (1.0, -2.0)}, "--lr-multipliers: expected numbers > 0"),
        ({"scoring_pairs": (("eeg", "eyes"),)}, "--scoring-pairs: unknown modality"),
    ],
)
def test_invalid_options_name_the_option(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path / "store", tmp_path / "out", **overrides)


def test_pairs_parse_in_registry_order_and_reject_bad_text():
    assert parse_pairs("ecg-eeg, eeg-eog") == (("eeg", "ecg"), ("eeg", "eog"))
    with pytest.raises(ValueError, match="--scoring-pairs: expected pairs like eeg-ecg"):
        parse_pairs("eeg-ecg-hr")


def test_cli_rejects_bad_counts_pairs_and_stores_before_ray(store, tmp_path, capsys):
    common = ["sweep", "--data", str(store), "--output", str(tmp_path / "out"), "--widths", "16"]
    assert main(common + ["--modality-counts", "2,6"]) == 2
    assert "--modality-counts: [6] exceed the 5 modalities" in capsys.readouterr().err
    assert main(common + ["--modality-counts", "2", "--scoring-pairs", "eeg-emg"]) == 2
    assert "--scoring-pairs: emg not in the store" in capsys.readouterr().err
    assert main(common + ["--modality-counts", "2", "--scoring-pairs", "eeg-ecg,eeg-eog"]) == 2
    assert "--modality-counts: [2] are below the 3 modalities of the scoring pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--modality-counts", "2", "--widths", "a,b"])
    assert "--widths: expected comma-separated ints" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tune-main").exists()


def test_a_store_without_test_subjects_is_refused_naming_the_split(tmp_path):
    bare = write_toy_store(
        tmp_path / "bare", sites=1, recordings_per_site=3, modalities=("eeg", "ecg"), seed=0, val_per_site=1
    )
    with pytest.raises(ValueError, match="has no 'test' subject"):
        check_store(config(bare, tmp_path / "out"))


# -- the plan --------------------------------------------------------------------------------------


def test_subsets_are_random_distinct_and_always_hold_the_scoring_pairs(store):
    available = store_modalities(store)
    assert available == STORE_MODALITIES
    pairs = (("eeg", "ecg"),)
    subsets = modality_subsets(available, (2, 3, 4, 5), pairs=pairs, per_count=3, seed=7)
    assert subsets == modality_subsets(available, (2, 3, 4, 5), pairs=pairs, per_count=3, seed=7)
    assert subsets[2] == [("eeg", "ecg")] and subsets[5] == [STORE_MODALITIES]  # only one of each exists
    assert len(subsets[3]) == 3 and len(subsets[4]) == 3
    for count, chosen in subsets.items():
        assert len(set(chosen)) == len(chosen)
        assert all(len(s) == count and {"eeg", "ecg"} <= set(s) for s in chosen)
    # not one nested chain: some 4-subset does not contain some 3-subset
    assert any(not set(a) <= set(b) for a in subsets[3] for b in subsets[4])
    seeded = {scoring_pairs(available, seed=s)[0] for s in range(6)}
    assert len(seeded) > 1 and all(set(p) <= set(available) for p in seeded)


def test_plan_varies_width_and_depth_together_with_seeds_lr_and_phases(store, tmp_path):
    cfg = config(
        store,
        tmp_path,
        widths=(16, 24, 32, 48, 64),
        modality_counts=(2, 3, 4, 5),
        seeds=3,
        subsets_per_count=2,
        width_per_block=16,
    )
    trials, summary = plan_trials(cfg, available=STORE_MODALITIES)
    sizes = [(s["width"], s["depth"]) for s in summary["sizes"]]
    assert sizes == [(16, 1), (24, 2), (32, 2), (48, 3), (64, 4)]
    n = [s["n_params"] for s in summary["sizes"]]
    assert n == sorted(n) and len(set(n)) == 5
    # 5 sizes x (1 + 2 + 2 + 1 subsets) x 3 seeds
    assert len(trials) == 5 * 6 * 3 and len({t["key"] for t in trials}) == len(trials)
    assert {t["key"] for t in trials} >= {"w64-d4-m5-k0-s2", "w24-d2-m3-k1-s0"}
    by_key = {t["key"]: t for t in trials}
    assert by_key["w32-d2-m2-k0-s0"]["n_params"] == by_key["w32-d2-m5-k0-s0"]["n_params"]  # N ignores tokenizers
    assert by_key["w16-d1-m2-k0-s0"]["lr"] == pytest.approx(2 * by_key["w32-d2-m2-k0-s0"]["lr"])  # muP-style
    assert all(t["scoring_pairs"] == [["eeg", "ecg"]] and {"eeg", "ecg"} <= set(t["modalities"]) for t in trials)
    held = {t["key"] for t in trials if t["phase"] == "held_out"}
    assert held == {t["key"] for t in trials if t["width"] == 64 or t["modality_count"] == 5}
    assert summary["held_out"] == {"n_params": n[-1], "modality_count": 5}
    unregistered, _ = plan_trials(
        config(store, tmp_path, widths=(16, 24, 32, 48), preregister=False), available=STORE_MODALITIES
    )
    assert {t["phase"] for t in unregistered} == {"main"}


def test_plan_uses_the_objective_presets_architecture(store, tmp_path):
    paper, _ = plan_trials(config(store, tmp_path, objective="paper"), available=STORE_MODALITIES)
    project, _ = plan_trials(config(store, tmp_path, objective="project"), available=STORE_MODALITIES)
    # The paper's SimCLR head into 128-d adds parameters the project's linear head does not have.
    assert paper[0]["n_params"] > project[0]["n_params"]


# -- the real thing --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_preregistered_sweep_writes_the_forecast_before_the_held_out_trials_start(
    store, tmp_path, ray_local, monkeypatch
):
    import mlflow

    from tune.sweep import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow artifacts go next to the sweep's store, not here
    output = tmp_path / "sweep"
    cfg = config(store, output, widths=(8, 12, 16, 24), depths=(1, 1, 1, 2), modality_counts=(2, 3), max_concurrent=1)
    report = sweep(cfg)

    assert report["counts"] == {"trials": 8, "finished": 8, "failed": 0}, report["trials"]
    assert not report["interrupted"]
    for trial in report["trials"]:
        assert trial["test_loss"] > 0 and trial["val_loss"] > 0
        assert 0.0 <= trial["staging_macro_f1"] <= 1.0
        assert trial["downstream_error"] == pytest.approx(1.0 - trial["staging_macro_f1"])
        assert trial["steps"] == 2
    events = [json.loads(line) for line in (output / "trial_log.jsonl").read_text().splitlines()]
    predictions = json.loads((output / "predictions.json").read_text())
    starts = {e["key"]: e["time"] for e in events if e["event"] == "start"}
    held = {t["key"] for t in report["trials"] if t["phase"] == "held_out"}
    assert held == {"w24-d2-m2-k0-s0", "w24-d2-m3-k0-s0"}
    assert set(predictions["held_out"]) == held and not held & set(predictions["fitted_on"])
    # The forecast existed, with its timestamp, before any held-out trial started.
    assert all(predictions["written_at"] < starts[key] for key in held)
    assert all(starts[key] < predictions["written_at"] for key in starts if key not in held)
    assert "n" in predictions["forecasts"] and "targets" in predictions["forecasts"]["n"]
    saved = json.loads((output / "scaling.json").read_text())
    assert saved["extrapolation"]["forecasts"]["n"]["scored"] == 2
    assert saved["verdicts"]["M"].startswith("not identified: only 2 distinct value(s)")
    assert (output / "scaling.png").stat().st_size > 1000

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    parent_id = json.loads((output / "sweep.json").read_text())["parent_run_id"]
    experiment_id = client.get_run(parent_id).info.experiment_id
    children = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.info.run_name for r in children) == sorted(t["key"] for t in report["trials"])
    assert all(r.info.status == "FINISHED" and "test_loss" in r.data.metrics for r in children)
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"scaling.json", "scaling.png", "predictions.json"}
    assert not (tmp_path / "cwd" / "mlruns").exists()
    assert os.path.isdir(output / "tune-main") and os.path.isdir(output / "tune-held_out")


def test_cli_options_map_onto_the_config_and_trials_train_the_paper_objective_on_train(store, tmp_path):
    import argparse

    from tune.sweep_cli import add_arguments, config_from_args
    from tune.trial import trial_pretrain_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(
        parser.parse_args(
            [
                "--data",
                str(store),
                "--output",
                str(tmp_path / "out"),
                "--widths",
                "16,32",
                "--modality-counts",
                "2,3",
                "--depths",
                "1,2",
                "--seeds",
                "2",
                "--scoring-pairs",
                "ecg-eeg",
                "--lr-multipliers",
                "0.5,2",
                "--steps",
                "7",
                "--no-preregister",
            ]
        )
    )
    assert cfg.sizes == ((16, 1), (32, 2)) and cfg.seeds == 2 and cfg.scoring_pairs == (("eeg", "ecg"),)
    assert cfg.lr_multipliers == (0.5, 2.0) and not cfg.preregister and cfg.objective == "paper" and not cfg.ema
    trials, _ = plan_trials(cfg, available=STORE_MODALITIES)
    trial = next(t for t in trials if t["key"] == "w32-d2-m3-k0-s1")
    settings = {
        "data": cfg.data,
        "model": cfg.model,
        "objective": cfg.objective,
        "ema": cfg.ema,
        "workers": 1,
        "steps": cfg.steps,
        "global_batch": cfg.global_batch,
        "score_windows": 8,
        "device": "cpu",
    }
    pretrain = trial_pretrain_config(trial, settings, lr=trial["lr"] * 2.0, run_dir=tmp_path / "run")
    assert pretrain.train_splits == ("train",) and pretrain.seed == 1 and pretrain.steps == 7
    assert pretrain.lr == pytest.approx(cfg.lr * 32 / 32 * 2.0) and not pretrain.ema
    assert pretrain.loss_objective.pairing == "random_pair"  # supervision does not grow with M
    model = pretrain.model_config()
    assert model.modality_dropout == 0.0 and (model.width, model.depth) == (32, 2)
