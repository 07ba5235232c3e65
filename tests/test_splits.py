"""Subject-level splits: deterministic, stable when the store grows, stored with the store."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import split as split_command
from s2v_core.splits import (
    SPLIT_NAMES,
    MissingSplitsError,
    SplitConfig,
    assign_splits,
    read_assignments,
    read_split_file,
    read_splits,
    record_use,
    seen_splits,
    split_record,
    subject_split,
    write_splits,
)
from s2v_core.store import row_splits, split_files, store_files, write_store_file
from s2v_core.toystore import toy_windows, write_toy_store


def test_assignment_is_deterministic_and_depends_on_the_seed():
    sites = ["a"] * 200 + ["b"] * 200
    subjects = [f"s{i}" for i in range(400)]
    first = assign_splits(sites, subjects, SplitConfig(seed=3))
    assert (first == assign_splits(sites, subjects, SplitConfig(seed=3))).all()
    assert (first != assign_splits(sites, subjects, SplitConfig(seed=4))).mean() > 0.1
    # All nights of a subject share its split.
    assert len(set(assign_splits(["a"] * 5, ["s7"] * 5, SplitConfig(seed=3)))) == 1


def test_fractions_hold_in_expectation():
    subjects = [f"subject-{i}" for i in range(20_000)]
    splits = assign_splits(["site"] * len(subjects), subjects, SplitConfig(train=0.7, val=0.1, test=0.2))
    counts = {s: float((splits == s).mean()) for s in SPLIT_NAMES}
    assert counts["train"] == pytest.approx(0.7, abs=0.015)
    assert counts["val"] == pytest.approx(0.1, abs=0.015)
    assert counts["test"] == pytest.approx(0.2, abs=0.015)


def test_explicit_assignments_take_precedence():
    config = SplitConfig(seed=0, assigned=(("a", "s1", "test"), ("a", "s2", "val")))
    assert subject_split("a", "s1", config) == "test"
    assert subject_split("a", "s2", config) == "val"
    assert subject_split("b", "s1", config) == subject_split("b", "s1", SplitConfig(seed=0))


@pytest.mark.parametrize(
    "bad",
    [
        dict(train=0.5, val=0.1, test=0.1),
        dict(train=1.2, val=-0.1, test=-0.1),
        dict(train=0.0, val=0.5, test=0.5),
        dict(seed=-1),
    ],
)
def test_invalid_configs_are_errors(bad):
    with pytest.raises(ValueError, match="splits:"):
        SplitConfig(**bad)


def test_adding_a_site_and_nights_never_moves_a_subject(tmp_path):
    store = write_toy_store(tmp_path / "store", sites=2, recordings_per_site=6, windows_per_recording=2)
    write_splits(str(store), SplitConfig(seed=5))  # the hash, no explicit assignment
    table = (
        __import__("s2v_core.store", fromlist=["open_store"])
        .open_store(str(store))
        .to_table(columns=["site", "subject_id"])
    )
    before = dict(
        zip(
            zip(table.column("site").to_pylist(), table.column("subject_id").to_pylist()), row_splits(table, str(store))
        )
    )
    rng = np.random.default_rng(1)
    (store / "site=site9").mkdir()
    for r in range(4):  # a new site, and a second night of an existing subject
        write_store_file(
            toy_windows(site="site9", recording_id=f"site9-r{r:03d}", windows=2, epochs_per_window=4, rng=rng),
            store / "site=site9" / f"site9-r{r:03d}.parquet",
        )
    write_store_file(
        toy_windows(site="site0", recording_id="site0-r000-night2", windows=2, epochs_per_window=4, rng=rng),
        store / "site=site0" / "site0-r000-night2.parquet",
    )
    table = (
        __import__("s2v_core.store", fromlist=["open_store"])
        .open_store(str(store))
        .to_table(columns=["site", "subject_id"])
    )
    after = dict(
        zip(
            zip(table.column("site").to_pylist(), table.column("subject_id").to_pylist()), row_splits(table, str(store))
        )
    )
    assert {k: after[k] for k in before} == before


def test_split_files_select_nights_by_subject(tmp_path):
    store = write_toy_store(
        tmp_path / "store", sites=2, recordings_per_site=4, windows_per_recording=2, val_per_site=1, test_per_site=1
    )
    train, _ = split_files(str(store), ["train"])
    test, _ = split_files(str(store), ["test"])
    everything, _ = store_files(str(store))
    assert len(train) == 4 and len(test) == 2
    assert sorted(train + test + split_files(str(store), ["val"])[0]) == everything
    assert all(f.endswith(("r003.parquet",)) for f in test)


def test_a_store_without_splits_names_the_command_that_adds_them(tmp_path):
    store = write_toy_store(tmp_path / "store", sites=1, recordings_per_site=2, windows_per_recording=1)
    (store / "splits.json").unlink()
    with pytest.raises(MissingSplitsError, match=r"s2v split --data"):
        split_files(str(store), ["test"])


def test_store_id_survives_rewrites_and_records_say_what_was_seen(tmp_path):
    store = str(write_toy_store(tmp_path / "store", sites=1, recordings_per_site=3, windows_per_recording=1))
    first = read_split_file(store)["store_id"]
    record_use(store, "runs/a")
    assert read_split_file(store)["store_id"] == first
    assert read_split_file(store)["used_by"] == ["runs/a"]
    trained = split_record(store, ["train"])
    assert seen_splits(trained, split_record(store, ["test"])) == ("train",)
    assert seen_splits(None, split_record(store, ["test"])) is None
    other = str(write_toy_store(tmp_path / "other", sites=1, recordings_per_site=3, windows_per_recording=1))
    assert seen_splits(trained, split_record(other, ["test"])) == ()
    write_splits(store, SplitConfig(seed=9))  # a new assignment: nothing can be called unseen
    assert seen_splits(trained, split_record(store, ["test"])) == SPLIT_NAMES


def test_s2v_split_reassign_refuses_an_assignment_a_run_used(tmp_path, capsys):
    store = str(write_toy_store(tmp_path / "store", sites=2, recordings_per_site=3, windows_per_recording=1))
    (tmp_path / "store" / "splits.json").unlink()
    config = split_command.assign(store)  # an old store gets the default
    assert config == SplitConfig()
    record_use(store, "runs/a")
    with pytest.raises(ValueError, match="--force"):
        split_command.assign(store, seed=2, reassign=True)
    with pytest.raises(ValueError, match="--reassign"):
        split_command.assign(store, seed=2)
    assert split_command.assign(store, seed=2, fractions=(0.6, 0.2, 0.2), reassign=True, force=True).seed == 2
    assert read_splits(store).train == 0.6
    counts = split_command.split_counts(store)
    assert sum(counts["total"][s]["nights"] for s in SPLIT_NAMES) == 6


def test_assignment_csv_parsing_names_the_line_without_echoing_other_cells():
    rows = read_assignments("site,subject_id,split\na,s1,test\n", source="a.csv")
    assert rows == (("a", "s1", "test"),)
    with pytest.raises(ValueError, match=r"a.csv, line 3: .*'holdout'") as error:
        read_assignments("site,subject_id,split\na,s1,test\na,Doe_John,holdout\n", source="a.csv")
    assert "Doe_John" not in str(error.value)
