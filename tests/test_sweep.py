"""s2v sweep: option validation, reproducible subsets and split, and a real 2 x 2 Tune sweep."""

import json
import os
from pathlib import Path

import pytest

from pipelines.cli import main
from s2v_core.toystore import write_toy_store
from tune.sweep import (SweepConfig, modality_subsets, plan_trials, split_subjects, store_files,
                        store_modalities)

STORE_MODALITIES = ("eeg", "eog", "ecg", "hr", "spo2")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_toy_store(tmp_path_factory.mktemp("sweep") / "store", sites=2, recordings_per_site=3,
                           windows_per_recording=4, epochs_per_window=4, modalities=STORE_MODALITIES, seed=0)


def config(store, output, **overrides) -> SweepConfig:
    values = dict(data=str(store), output=str(output), widths=(16, 32), modality_counts=(2, 3),
                  steps=3, global_batch=4, bootstrap=20)
    values.update(overrides)
    return SweepConfig(**values)


# -- validation before Tune starts -------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"widths": (32, 0)}, "--widths: expected positive integers"),
    ({"modality_counts": (1, 3)}, "--modality-counts: found 1"),
    ({"data_fractions": (0.0,)}, "--data-fractions"),
    ({"global_batch": 5, "workers_per_trial": 2}, "not divisible"),
    ({"anchor": "eyes"}, "--anchor: unknown modality"),
])
def test_invalid_options_name_the_option(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path / "store", tmp_path / "out", **overrides)


def test_cli_rejects_counts_above_the_store_and_absent_anchor_before_ray(store, tmp_path, capsys):
    common = ["sweep", "--data", str(store), "--output", str(tmp_path / "out"), "--widths", "16"]
    assert main(common + ["--modality-counts", "2,6"]) == 2
    err = capsys.readouterr().err
    assert "s2v sweep: error: --modality-counts: [6] exceed the 5 modalities" in err
    assert main(common + ["--modality-counts", "2", "--anchor", "emg"]) == 2
    assert "--anchor: 'emg' is not in the store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--modality-counts", "2", "--widths", "a,b"])
    assert "--widths: expected comma-separated integers" in capsys.readouterr().err
    assert main(["sweep", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                 "--widths", "16", "--modality-counts", "2"]) == 2
    assert "--data: expected a store" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tune").exists()


# -- the plan --------------------------------------------------------------------------------------

def test_store_modalities_and_subsets_are_nested_reproducible_and_anchored(store):
    available = store_modalities(store)
    assert available == STORE_MODALITIES
    subsets = modality_subsets(available, (2, 3, 5), anchor="ecg", seed=7)
    assert subsets == modality_subsets(available, (2, 3, 5), anchor="ecg", seed=7)
    assert all("ecg" in s for s in subsets.values())
    assert set(subsets[2]) < set(subsets[3]) < set(subsets[5])
    assert [len(s) for s in subsets.values()] == [2, 3, 5]
    with pytest.raises(ValueError, match="--modality-counts: \\[6\\] exceed"):
        modality_subsets(available, (2, 6))
    # Several anchors start the order as given: the smallest subset, every trial's score, is that pair.
    for seed in range(4):
        paired = modality_subsets(available, (2, 3, 5), anchor="hr,ecg", seed=seed)
        assert paired[2] == ("ecg", "hr") and set(paired[2]) < set(paired[3]) < set(paired[5])


def test_split_is_subject_disjoint_seeded_and_never_empty(store):
    files = store_files(store)
    train, validation = split_subjects(files, validation_fraction=0.25, seed=0)
    assert train and validation
    assert {s for _, s, _ in train}.isdisjoint({s for _, s, _ in validation})
    assert len(train) + len(validation) == len(files)
    assert split_subjects(files, validation_fraction=0.25, seed=0) == (train, validation)


def test_plan_has_one_trial_per_grid_point_with_growing_parameter_counts(store, tmp_path):
    trials, summary = plan_trials(config(store, tmp_path, depths=(1, 2), data_fractions=(0.5, 1.0)))
    assert len(trials) == 2 * 2 * 2 * 2
    assert len({t["key"] for t in trials}) == len(trials)
    by = {(t["width"], t["depth"], t["modality_count"], t["data_fraction"]): t for t in trials}
    assert by[(16, 1, 2, 1.0)]["n_params"] < by[(32, 1, 2, 1.0)]["n_params"] < by[(32, 2, 2, 1.0)]["n_params"]
    # N counts no tokenizer, so it does not change with the modality count.
    assert by[(32, 2, 2, 1.0)]["n_params"] == by[(32, 2, 3, 1.0)]["n_params"]
    half = [Path(path) for path, _, _ in store_files(by[(16, 1, 2, 0.5)]["train_store"])]
    full = [Path(path) for path, _, _ in store_files(by[(16, 1, 2, 1.0)]["train_store"])]
    assert 0 < len(half) < len(full)
    assert set(half) <= set(full) and all(p.parent.parent == store for p in full)  # the store's own files
    # Every trial is scored on the smallest subset, which every (nested) subset holds.
    smallest = summary["modality_subsets"]["2"]
    assert summary["reference_modalities"] == smallest
    assert all(t["reference_modalities"] == smallest and set(smallest) <= set(t["modalities"]) for t in trials)
    assert summary["train_subjects"] + summary["validation_subjects"] == 6


# -- the real thing --------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_two_by_two_sweep_logs_nested_runs_and_writes_the_report(store, tmp_path, ray_local, monkeypatch):
    import mlflow

    from tune.sweep import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow artifacts go next to the sweep's store, not here
    output = tmp_path / "sweep"
    report = sweep(config(store, output))

    assert report["counts"] == {"trials": 4, "finished": 4, "failed": 0}
    assert not report["interrupted"]
    for trial in report["trials"]:
        assert trial["status"] == "finished"
        assert trial["val_loss"] > 0 and 0.0 <= trial["staging_macro_f1"] <= 1.0
        assert trial["val_loss_own"] > 0 and 0.0 <= trial["staging_macro_f1_own"] <= 1.0
        if trial["modality_count"] == 2:  # own modalities = the reference ones: the same numbers
            assert trial["val_loss_own"] == pytest.approx(trial["val_loss"])
        assert trial["steps"] == 3
    saved = json.loads((output / "scaling.json").read_text())
    assert {"trials", "fit", "fits_by_modality_count", "fits_by_width", "extrapolation"} <= set(saved)
    # Two widths and two counts cannot identify a power law with an offset: said, not crashed.
    assert "only 4 points" in saved["fit"]["error"]
    # Per modality count only two widths: too few points (or distinct values) for L(N).
    assert saved["fits_by_modality_count"]
    assert all("only 2 points" in f["error"] or "distinct value" in f["error"]
               for f in saved["fits_by_modality_count"].values())
    assert (output / "scaling.png").stat().st_size > 1000

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    parent_id = json.loads((output / "sweep.json").read_text())["parent_run_id"]
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4
    assert all(r.info.status == "FINISHED" and "val_loss" in r.data.metrics for r in children)
    for child in children:  # rank 0 logged every training step into the trial's own run
        steps = {m.step for m in client.get_metric_history(child.info.run_id, "lr")}
        assert {1, 2, 3} <= steps, child.data.tags.get("trial_name")
    assert {r.data.params["trial/width"] for r in children} == {"16", "32"}
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"scaling.json", "scaling.png"}
    assert list((output / "mlartifacts").rglob("scaling.json")) and not (tmp_path / "cwd" / "mlruns").exists()
    starts = [json.loads(line) for line in (output / "trial_log.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in starts if e["event"] == "start") == sorted(t["key"] for t in saved["trials"])
    assert os.path.isdir(output / "tune")
