"""Pseudonymous ids: where the key comes from, that it is never shown, and what the hashes are."""

from __future__ import annotations

import logging
import stat

import pytest

from s2v_core.io.identity import PSEUDONYM_KEY_ENV, Identities, PseudonymKey, default_key_path, load_pseudonym_key


def test_a_key_is_generated_once_in_a_private_file(tmp_path, caplog):
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    caplog.set_level(logging.INFO)
    first = load_pseudonym_key(environ=environ)
    path = default_key_path(environ)
    assert path == tmp_path / "config" / "sleep2vec" / "pseudonym.key" and first.origin == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_pseudonym_key(environ=environ).secret == first.secret  # read back, not regenerated
    assert str(path) in caplog.text
    assert first.secret.decode() not in caplog.text and first.secret.decode() not in repr(first)


def test_a_key_file_wins_over_the_environment_which_wins_over_the_default(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    key_file = tmp_path / "project.key"
    key_file.write_text("a project secret from a file\n")
    key_file.chmod(0o600)
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config"), PSEUDONYM_KEY_ENV: "a project secret from the env"}
    assert load_pseudonym_key(key_file, environ=environ).secret == b"a project secret from a file"
    from_env = load_pseudonym_key(environ=environ)
    assert from_env.secret == b"a project secret from the env" and from_env.origin == PSEUDONYM_KEY_ENV
    assert not default_key_path(environ).exists()  # nothing generated when a key is given
    assert "secret from" not in caplog.text


def test_short_keys_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=f"{PSEUDONYM_KEY_ENV}: expected a pseudonym key of at least 16"):
        load_pseudonym_key(environ={PSEUDONYM_KEY_ENV: "short"})
    with pytest.raises(FileNotFoundError, match="--pseudonym-key-file"):
        load_pseudonym_key(tmp_path / "missing.key", environ={})


def test_pseudonyms_depend_on_key_and_site_and_nothing_else():
    key = PseudonymKey(b"one project secret, long enough", origin="test")
    ids = Identities(key)
    assert ids.pseudonym("shhs", "200001") == Identities(key).pseudonym("shhs", "200001")
    assert ids.pseudonym("shhs", "200001") != ids.pseudonym("mesa", "200001")  # sites may reuse keys
    other = Identities(PseudonymKey(b"another project secret, long too", origin="test"))
    assert other.pseudonym("shhs", "200001") != ids.pseudonym("shhs", "200001")
    assert len(ids.pseudonym("shhs", "200001")) == 16 and ids.pseudonym("shhs", "x").isalnum()
    assert ids.file_id("shhs", "200001") != ids.pseudonym("shhs", "200001")
    assert key.check_value() != other.key.check_value() and key.secret.hex() not in key.check_value()
    with pytest.raises(ValueError, match="--ids: expected one of pseudonymous, original"):
        Identities(key, mode="plain")
