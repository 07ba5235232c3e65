"""`s2v submit`: the `ray job submit` command it builds, checked without a cluster."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.submit import client_environment, job_entrypoint, job_runtime_env, submit_command

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"


def test_submit_is_an_s2v_sub_command():
    assert cli.COMMANDS["submit"][0] == "pipelines.submit"


def test_entrypoint_is_the_s2v_command_line():
    command = ["embed", "--checkpoint", "s3://b/ckpt", "--data", "s3://b/store", "--output", "s3://b/emb"]
    assert job_entrypoint(["--", *command]) == ["s2v", *command]


def test_entrypoint_rejects_unknown_and_recursive_commands():
    with pytest.raises(ValueError, match="cannot submit 'train'"):
        job_entrypoint(["train", "--data", "x"])
    with pytest.raises(ValueError, match="cannot submit 'submit'"):
        job_entrypoint(["submit", "--", "synth", "out"])
    with pytest.raises(ValueError, match="no sub-command"):
        job_entrypoint(["--"])


def test_runtime_env_passes_mlflow_through_and_merges_env(tmp_path):
    built = job_runtime_env(
        RUNTIME_ENV,
        working_dir=str(tmp_path),
        env={"S2V_NOTE": "a"},
        environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "HOME": "/x"},
    )
    assert built["working_dir"] == str(tmp_path)
    assert built["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert built["env_vars"]["S2V_NOTE"] == "a"
    assert "HOME" not in built["env_vars"]  # only the listed variables travel
    assert ".venv" in built["excludes"]


@pytest.mark.parametrize(
    "env",
    [
        {"RAY_AUTH_TOKEN": "abc"},
        {"AWS_SECRET_ACCESS_KEY": "abc"},
        {"AWS_ACCESS_KEY_ID": "AKIA"},
        {"HF_TOKEN": "abc"},
        {"DB_PASSWORD": "abc"},
        {"MLFLOW_TRACKING_URI": "https://user:pw@mlflow.example.org"},
    ],
)
def test_runtime_env_refuses_credentials(env):
    with pytest.raises(ValueError, match="looks like a credential"):
        job_runtime_env(None, env=env, environ={})


def test_runtime_env_allows_look_alike_names():
    built = job_runtime_env(None, env={"TOKENIZERS_PARALLELISM": "false", "S2V_SORT_KEY": "site"}, environ={})
    assert built["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_runtime_env_file_must_be_a_mapping(tmp_path):
    bad = tmp_path / "env.yaml"
    bad.write_text("- working_dir: .\n")
    with pytest.raises(ValueError, match="env.yaml: expected a YAML mapping"):
        job_runtime_env(bad, environ={})


def test_submit_command_line():
    argv = submit_command(
        ["s2v", "synth", "/data/raw"],
        {"working_dir": ".", "env_vars": {"A": "1"}},
        address="http://127.0.0.1:8265",
        submission_id="s2v-synth",
        entrypoint_num_cpus=1,
        no_wait=True,
    )
    assert Path(argv[0]).name == "ray" and argv[1:3] == ["job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert argv[argv.index("--submission-id") + 1] == "s2v-synth"
    assert "--no-wait" in argv
    assert json.loads(argv[argv.index("--runtime-env-json") + 1]) == {"working_dir": ".", "env_vars": {"A": "1"}}
    assert argv[argv.index("--") + 1 :] == ["s2v", "synth", "/data/raw"]


def test_token_auth_is_on_by_default(tmp_path):
    env = client_environment({"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "t"})
    assert env["RAY_AUTH_MODE"] == "token"
    token_file = tmp_path / "token"
    token_file.write_text("t")
    env = client_environment({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert env["RAY_AUTH_MODE"] == "token"


def test_missing_token_is_an_error_before_anything_is_sent(tmp_path):
    with pytest.raises(ValueError, match="no Ray auth token"):
        client_environment({"HOME": str(tmp_path)})
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert client_environment({"HOME": str(tmp_path)})["RAY_AUTH_MODE"] == "token"


def test_an_explicit_opt_out_is_respected(tmp_path):
    env = client_environment({"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"})
    assert env["RAY_AUTH_MODE"] == "disabled"


def test_dry_run_prints_the_command(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    job = ["embed", "--checkpoint", "/shared/ckpt", "--data", "/shared/store", "--output", "/shared/emb"]
    code = cli.main(["submit", "--dry-run", "--address", "http://127.0.0.1:8265", "--", *job])
    assert code == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[argv.index("--") + 1 :] == ["s2v", *job]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == "."  # cluster/runtime_env.yaml, found from the repo root
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow.db"


def test_submitting_submit_is_a_clean_user_error(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["submit", "--dry-run", "--", "submit", "--", "embed"]) == 2
    assert "s2v submit: error: cannot submit 'submit'" in capsys.readouterr().err


def test_bad_options_of_the_sub_command_fail_before_submission(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = cli.main(["submit", "--dry-run", "--", "embed", "--no-such-option"])
    err = capsys.readouterr().err
    assert code == 2
    assert "rejected by the local parser" in err and "nothing was submitted" in err
    assert shlex.quote("--no-such-option") in err


@pytest.mark.parametrize(
    "argument",
    [
        "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/store",
        "--data=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/store",
        "gs://bucket/store?access_token=ya29.secret",
        "https://blob.example/x?sv=2022&sig=abcdef",
    ],
)
def test_entrypoint_arguments_with_credentials_are_refused(argument, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    job = ["ingest", "--input", "s3://bucket/raw", "--output", "s3://bucket/store"]
    job = [*job, argument] if argument.startswith("--") else [*job[:3], argument, *job[4:]]
    with pytest.raises(ValueError, match="carries a credential in a URI") as caught:
        job_entrypoint(job)
    assert "wJalrXUtnFEMI" not in str(caught.value) and "ya29" not in str(caught.value)
    code = cli.main(["submit", "--dry-run", "--", *job])
    printed = capsys.readouterr()
    assert code == 2 and "nothing was submitted" in printed.err
    assert "wJalrXUtnFEMI" not in printed.out + printed.err and "abcdef" not in printed.out + printed.err


def test_the_pseudonym_key_never_travels_in_a_runtime_env():
    with pytest.raises(ValueError, match="looks like a credential"):
        job_runtime_env(None, env={"S2V_PSEUDONYM_KEY": "a project secret of enough length"}, environ={})
