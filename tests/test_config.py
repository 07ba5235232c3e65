from dataclasses import dataclass, field

import pytest

from s2v_core.config import from_mapping, load_mapping, to_mapping


@dataclass(frozen=True)
class Inner:
    sigma: float = 10.0


@dataclass(frozen=True)
class Outer:
    name: str
    steps: int = 5
    tags: tuple[str, ...] = ()
    inner: Inner = Inner()
    extra: dict[str, str] = field(default_factory=dict)
    maybe: int | None = None


def test_from_mapping_builds_nested_dataclasses():
    cfg = from_mapping(Outer, {"name": "x", "steps": 3, "tags": ["a"], "inner": {"sigma": 2}})
    assert cfg == Outer(name="x", steps=3, tags=("a",), inner=Inner(sigma=2.0))
    assert to_mapping(cfg)["inner"] == {"sigma": 2.0}


def test_unknown_keys_are_errors_naming_the_source():
    with pytest.raises(ValueError, match=r"run\.toml: unknown key\(s\) stepz"):
        from_mapping(Outer, {"name": "x", "stepz": 3}, source="run.toml")
    with pytest.raises(ValueError, match=r"run\.toml\.inner: unknown key\(s\) sigmaa"):
        from_mapping(Outer, {"name": "x", "inner": {"sigmaa": 1}}, source="run.toml")


@pytest.mark.parametrize(
    "data,where",
    [
        ({"name": "x", "steps": "3"}, "cfg.steps: expected an integer"),
        ({"name": "x", "steps": True}, "cfg.steps: expected an integer"),
        ({"name": 1}, "cfg.name: expected str"),
        ({"name": "x", "inner": {"sigma": "big"}}, "cfg.inner.sigma: expected a number"),
        ({"name": "x", "maybe": "no"}, "cfg.maybe"),
    ],
)
def test_wrong_types_are_errors(data, where):
    with pytest.raises(TypeError, match=where.replace(".", r"\.")):
        from_mapping(Outer, data, source="cfg")


def test_load_mapping_reads_toml_yaml_json(tmp_path):
    (tmp_path / "a.toml").write_text('name = "x"\n')
    (tmp_path / "a.yaml").write_text("name: x\n")
    (tmp_path / "a.json").write_text('{"name": "x"}')
    for suffix in ("toml", "yaml", "json"):
        assert load_mapping(tmp_path / f"a.{suffix}") == {"name": "x"}
    (tmp_path / "a.ini").write_text("")
    with pytest.raises(ValueError, match="expected .toml"):
        load_mapping(tmp_path / "a.ini")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mapping(tmp_path / "missing.toml")


@dataclass(frozen=True)
class Pair:
    betas: tuple[float, int] = (0.9, 1)


def test_fixed_length_tuples_check_each_item_against_its_type():
    assert from_mapping(Pair, {"betas": [0.5, 2]}).betas == (0.5, 2)
    with pytest.raises(TypeError, match=r"cfg\.betas\[1\]: expected an integer"):
        from_mapping(Pair, {"betas": [0.5, 2.5]}, source="cfg")
    with pytest.raises(TypeError, match="expected 2 items"):
        from_mapping(Pair, {"betas": [0.5]}, source="cfg")
