"""The embeddings format: its directory guard, its list columns and its reader's errors (no encoder, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from s2v_core.embeddings import INFO_FILE, WINDOWS_DIR, float_list_column, fresh_output, read_embeddings


def test_list_columns_are_row_major_with_nulls_where_masked():
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    column = float_list_column(values, mask=np.array([False, True, False]))
    assert column.to_pylist() == [[0.0, 1.0], None, [4.0, 5.0]]


def test_a_fresh_output_replaces_embeddings_but_nothing_else(tmp_path):
    emb = tmp_path / "emb"
    (emb / WINDOWS_DIR).mkdir(parents=True)
    (emb / INFO_FILE).write_text("{}")
    fresh_output(str(emb))
    assert emb.is_dir() and not any(emb.iterdir())
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an embeddings directory"):
        fresh_output(str(other))
    assert (other / "notes.txt").read_text() == "keep me"


def test_reading_what_is_not_embeddings_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--embeddings .*no embed.json"):
        read_embeddings(tmp_path)
    (tmp_path / INFO_FILE).write_text('{"format": 1}')
    with pytest.raises(ValueError, match="expected embeddings format 2, found 1"):
        read_embeddings(tmp_path)
