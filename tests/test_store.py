import numpy as np
import pytest

from s2v_core.modalities import MODALITY_KEYS
from s2v_core.store import SCHEMA_VERSION, open_store, schema_info, stable_id, store_files, table_to_batch
from s2v_core.toystore import write_toy_store


def test_toy_store_round_trips_through_the_schema(tmp_path):
    root = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=3,
        windows_per_recording=2,
        epochs_per_window=3,
        modalities=("eeg", "spo2", "thorax"),
    )
    table = open_store(str(root)).to_table()
    assert table.num_rows == 12
    assert schema_info(table.schema) == (SCHEMA_VERSION, 3)
    batch = table_to_batch(
        table, modalities=("eeg", "spo2", "thorax"), epochs_per_window=3, history_columns=("hypertension",)
    )
    assert batch["eeg"].shape == (12, 3, 3840)
    assert batch["spo2"].shape == (12, 3, 120)
    assert batch["stages"].shape == (12, 3)
    # the third night of each site lacks its last modality (thorax), and that is masked
    thorax = batch["present"][:, MODALITY_KEYS.index("thorax")]
    assert thorax.sum() == 8
    assert np.all(batch["thorax"][~thorax] == 0)
    assert not batch["present"][:, MODALITY_KEYS.index("ecg")].any()
    assert batch["history"].shape == (12, 1)
    assert set(np.unique(batch["history"])) <= {0.0, 1.0}


def test_stable_id_is_stable_and_non_negative():
    assert stable_id("site0") == stable_id("site0")
    assert stable_id("site0") != stable_id("site1")
    assert stable_id("x") >= 0


def test_schema_info_rejects_foreign_parquet():
    import pyarrow as pa

    with pytest.raises(ValueError, match="not a sleep2vec store"):
        schema_info(pa.schema([pa.field("a", pa.int32())]))


def test_same_recording_id_at_two_sites_are_different_nights(tmp_path):
    import pyarrow as pa

    from s2v_core.toystore import toy_windows

    rng = np.random.default_rng(0)
    a = toy_windows(site="a", recording_id="1001", windows=1, epochs_per_window=2, modalities=("spo2",), rng=rng)
    b = toy_windows(site="b", recording_id="1001", windows=1, epochs_per_window=2, modalities=("spo2",), rng=rng)
    batch = table_to_batch(pa.concat_tables([a, b]), modalities=("spo2",), epochs_per_window=2)
    assert batch["night_id"][0] != batch["night_id"][1]


def test_store_files_skip_the_manifest_and_hidden_temporaries(tmp_path):
    root = write_toy_store(
        tmp_path / "store",
        sites=1,
        recordings_per_site=2,
        windows_per_recording=1,
        epochs_per_window=2,
        modalities=("spo2",),
    )
    (root / "site=site0" / ".site0-r009.parquet.tmp-1").write_bytes(b"partial")
    files, _ = store_files(str(root))
    assert [f.rsplit("/", 1)[1] for f in files] == ["site0-r000.parquet", "site0-r001.parquet"]
    assert (root / "manifest.jsonl").is_file()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no Parquet files"):
        store_files(str(tmp_path / "empty"))


def test_store_files_keep_signals_plain_encoded_and_round_trip(tmp_path):
    import pyarrow.parquet as pq

    from s2v_core.store import write_store_file
    from s2v_core.toystore import toy_windows

    table = toy_windows(
        site="a",
        recording_id="n1",
        windows=3,
        epochs_per_window=2,
        modalities=("eeg", "hr"),
        rng=np.random.default_rng(0),
    )
    write_store_file(table, str(tmp_path / "n1.parquet"))
    assert pq.read_table(tmp_path / "n1.parquet").equals(table)
    row_group = pq.ParquetFile(tmp_path / "n1.parquet").metadata.row_group(0)
    encodings = {
        row_group.column(i).path_in_schema.split(".")[0]: row_group.column(i).encodings
        for i in range(row_group.num_columns)
    }
    # Dictionary pages of float16 samples decoded 4-5x slower than plain ones.
    assert all("RLE_DICTIONARY" not in encodings[k] for k in MODALITY_KEYS)
    assert "RLE_DICTIONARY" in encodings["recording_id"]


def test_a_store_subset_reads_as_the_files_it_lists(tmp_path):
    from s2v_core.store import EmptyStoreError
    from s2v_core.store_subset import write_store_subset

    root = write_toy_store(
        tmp_path / "store",
        sites=2,
        recordings_per_site=2,
        windows_per_recording=1,
        epochs_per_window=2,
        modalities=("spo2",),
    )
    files, _ = store_files(str(root))
    subset = write_store_subset(str(tmp_path / "splits" / "train.subset.json"), store=str(root), files=files[1:3])
    assert store_files(subset)[0] == files[1:3]
    assert open_store(subset).count_rows() == 2
    with pytest.raises(ValueError, match="expected a name ending in .subset.json"):
        write_store_subset(str(tmp_path / "train.json"), store=str(root), files=files)
    with pytest.raises(ValueError, match="expected files of the store"):
        write_store_subset(str(tmp_path / "x.subset.json"), store=str(root / "site=site0"), files=files)
    empty = write_store_subset(str(tmp_path / "empty.subset.json"), store=str(root), files=[])
    with pytest.raises(EmptyStoreError, match="no Parquet files"):
        store_files(empty)


def test_present_matrix_decodes_the_flags_of_chunked_and_plain_columns():
    import numpy as np
    import pyarrow as pa

    from s2v_core.store import present_matrix

    rows = [[True] + [False] * 8, [False] * 8 + [True], [False] * 9]
    chunked = pa.chunked_array([pa.array(rows[:2], pa.list_(pa.bool_())), pa.array(rows[2:], pa.list_(pa.bool_()))])
    for column in (chunked, chunked.combine_chunks()):
        np.testing.assert_array_equal(present_matrix(column), np.array(rows))
    assert present_matrix(pa.array([], pa.list_(pa.bool_()))).shape == (0, 9)
