import pytest

from s2v_core.io.site_config import SiteConfig, default_site_config, load_site_config


def write(tmp_path, text):
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_full_site_config_loads(tmp_path):
    cfg = load_site_config(
        write(
            tmp_path,
            """
name = "shhs_like"
key_regex = "^(?P<key>shhs1-\\\\d+)"
ignore_channels = ["POSITION"]
[channels]
"EEG(sec)" = "eeg"
[hypnogram]
format = "nsrr_xml"
pattern = "{key}-nsrr.xml"
[metadata]
file = "shhs1.csv"
key_column = "nsrrid"
sex_values = { "1" = 1, "2" = 0 }
[metadata.outcomes]
ahi = "ahi_a0h3"
""",
        )
    )
    assert cfg.channels == {"EEG(sec)": "eeg"}
    assert cfg.hypnogram.format == "nsrr_xml"
    assert cfg.metadata.outcomes == {"ahi": "ahi_a0h3"}
    assert cfg.recording_key("shhs1-200001.edf") == "shhs1-200001"
    assert cfg.recording_key("other.edf") is None


@pytest.mark.parametrize(
    "text,message",
    [
        ('name = "s"\nchanel = 1\n', "unknown key"),
        ('name = "s"\n[channels]\n"X" = "eegg"\n', "unknown modality"),
        ('name = "s"\n[hypnogram]\nformat = "edf"\n', "format: expected one of"),
        ('name = "s"\nkey_regex = "(.+)"\n', "(?P<key>"),
        ('name = "bad name"\n', "site name"),
        ('signals = ["*.edf"]\n', "missing required key 'name'"),
    ],
)
def test_invalid_site_configs_name_the_problem(tmp_path, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_site_config(write(tmp_path, text))


def test_default_site_config_is_named_after_the_directory(tmp_path):
    site_dir = tmp_path / "my site"
    site_dir.mkdir()
    assert default_site_config(site_dir) == SiteConfig(name="my_site")
