"""Site metadata tables: column mapping, sex coding, outcomes, and errors that name the file."""

from __future__ import annotations

import pytest

from s2v_core.io.metadata import parse_site_metadata, read_site_metadata
from s2v_core.io.site_config import MetadataConfig

TABLE = """nsrrid,pid,age_s1,gender,ahi_a0h3,htnderv_s1,name
shhs1-1,P1,63,1,12.5,1,Alice Secret
shhs1-2,P1,64,2,,0,Alice Secret
shhs1-3,P2,,9,3.0,no,Bob Secret
"""
CONFIG = MetadataConfig(
    file="t.csv",
    key_column="nsrrid",
    subject_column="pid",
    age_column="age_s1",
    sex_column="gender",
    sex_values={"1": 1, "2": 0},
    outcomes={"ahi": "ahi_a0h3", "hypertension": "htnderv_s1"},
)


def test_columns_are_mapped_per_site(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(TABLE)
    table = read_site_metadata(str(path), CONFIG)
    assert set(table) == {"shhs1-1", "shhs1-2", "shhs1-3"}
    first = table["shhs1-1"]
    assert (first.subject_id, first.age, first.sex, first.outcomes) == (
        "P1",
        63.0,
        1,
        {"ahi": 12.5, "hypertension": 1.0},
    )
    assert table["shhs1-2"].sex == 0 and table["shhs1-2"].outcomes == {"hypertension": 0.0}
    unknown = table["shhs1-3"]
    assert unknown.age is None and unknown.sex is None and unknown.outcomes == {"ahi": 3.0, "hypertension": 0.0}
    assert "Secret" not in repr(table)  # unconfigured columns (a name) are never kept


def test_tsv_and_defaults():
    text = "recording_id\tage\tsex\nr1\t40.5\tF\nr2\t\tmale\n"
    table = parse_site_metadata(text, MetadataConfig(), source="m.tsv")
    assert table["r1"].age == 40.5 and table["r1"].sex == 0 and table["r1"].subject_id is None
    assert table["r2"].sex == 1 and table["r2"].age is None


def test_missing_column_names_file_and_option():
    with pytest.raises(ValueError, match=r"m.csv.*age_column.*'age_s1'"):
        parse_site_metadata("nsrrid,pid,gender\nx,1,1\n", CONFIG, source="m.csv")


def test_repeated_key_is_an_error():
    with pytest.raises(ValueError, match="appears twice"):
        parse_site_metadata("recording_id,age,sex\nr1,1,F\nr1,2,M\n", MetadataConfig(), source="m.csv")


def test_errors_never_echo_a_row():
    # A table without a header: its first line is a patient's row, which no message may repeat.
    headerless = "Doe_John,1961-02-03,63,M\nRoe_Jane,1970-05-06,54,F\n"
    with pytest.raises(ValueError) as caught:
        parse_site_metadata(headerless, MetadataConfig(), source="m.csv")
    assert "m.csv" in str(caught.value) and "key_column" in str(caught.value)
    for cell in ("Doe_John", "1961-02-03", "Roe_Jane"):
        assert cell not in str(caught.value)
    with pytest.raises(ValueError, match=r"line 3 repeats .* line 2") as caught:
        parse_site_metadata("recording_id,age,sex\nDoe_John,1,F\nDoe_John,2,F\n", MetadataConfig(), source="m.csv")
    assert "Doe_John" not in str(caught.value)


def test_ages_above_89_are_top_coded():
    table = parse_site_metadata(
        "recording_id,age,sex\na,89,F\nb,89.5,F\nc,104,M\nd,,M\n", MetadataConfig(), source="m.csv"
    )
    assert [table[k].age for k in "abcd"] == [89.0, 90.0, 90.0, None]
