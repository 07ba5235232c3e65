"""``s2v submit``: run an ``s2v`` sub-command on a Ray cluster through the job API.

    s2v submit [--address URL] [--runtime-env FILE] [--env KEY=VALUE] … -- COMMAND [ARGS …]

is ``ray job submit --runtime-env-json … -- s2v COMMAND ARGS …`` with the
common cases built in:

- ``COMMAND ARGS`` are checked against the local ``s2v`` parser first, so a
  typo fails here and not after the upload and a cluster start;
- the runtime environment is ``cluster/runtime_env.yaml`` (when present in the
  current directory) with ``MLFLOW_TRACKING_URI`` from your shell passed
  through to the job, plus any ``--env``;
- token authentication stays on: ``RAY_AUTH_MODE=token`` for the submission
  unless you set the variable yourself, and a missing token is an error here
  rather than a 401 from the cluster. The token itself is never put into the
  runtime environment (anyone who can list jobs could read it there);
- for the same reason no credential travels in the job: an argument holding a
  URI with a password or a secret-looking query parameter
  (``s3://KEY:SECRET@bucket``, ``?token=``), and environment variables that
  look like credentials (the pseudonym key included), are refused here.

Paths in ``ARGS`` are resolved on the cluster, inside the job's working
directory: give stores and outputs as absolute paths on shared storage or as
URIs (``s3://…``, ``gs://…``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from s2v_core.locations import redact

logger = logging.getLogger(__name__)

#: runtime env used when ``--runtime-env`` is not given and this file exists
DEFAULT_RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"
#: variables of the submitting shell that are forwarded into the job
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
#: name parts / endings that mark a credential; such variables must not travel in a runtime env
_SECRET_PARTS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"})
_SECRET_ENDINGS = ("ACCESS_KEY", "API_KEY", "PRIVATE_KEY", "ACCESS_KEY_ID", "PSEUDONYM_KEY")
#: sub-commands that make no sense as a cluster job
_NOT_SUBMITTABLE = ("submit",)


def job_entrypoint(command: Sequence[str]) -> list[str]:
    """Check ``COMMAND ARGS`` against the local ``s2v`` parser and return the job's argv.

    Parameters
    ----------
    command
        The sub-command and its options, e.g. ``["ingest", "--input", "s3://b/raw",
        "--output", "s3://b/store"]``.

    Returns
    -------
    list of str
        ``["s2v", *command]``, the entrypoint the cluster runs.

    Raises
    ------
    ValueError
        Unknown sub-command, ``submit`` itself, an argument carrying a
        credential in a URI, or options that ``s2v COMMAND`` rejects
        (argparse prints the detail above the error).
    """
    from pipelines.cli import COMMANDS, build_parser

    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError(f"no sub-command to submit; expected one of {sorted(set(COMMANDS) - set(_NOT_SUBMITTABLE))}")
    name = command[0]
    if name not in COMMANDS or name in _NOT_SUBMITTABLE:
        raise ValueError(
            f"cannot submit {name!r}: expected an s2v sub-command, one of "
            f"{sorted(set(COMMANDS) - set(_NOT_SUBMITTABLE))}"
        )
    for position, argument in enumerate(command[1:], start=1):
        if redact(argument) != argument:
            # Entrypoints are stored with the job and shown by `ray job list` and the dashboard.
            raise ValueError(
                f"argument {position} of `s2v {name}` ({redact(argument)}) carries a credential in a URI; "
                "a job's entrypoint is visible to anyone who can list the cluster's jobs. Give the nodes "
                "credentials through their IAM role / service account (or a Kubernetes Secret) instead; "
                "nothing was submitted"
            )
    try:
        build_parser(name).parse_args(command)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise  # `--help` of the sub-command: shown, nothing to submit
        raise ValueError(
            f"`s2v {redact(shlex.join(command))}` is rejected by the local parser (see the message above); "
            "nothing was submitted"
        ) from None
    return ["s2v", *command]


def job_runtime_env(
    runtime_env_file: str | Path | None,
    *,
    working_dir: str | None = None,
    env: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict:
    """Build the job's runtime environment.

    Parameters
    ----------
    runtime_env_file
        YAML runtime env (``working_dir``, ``excludes``, ``env_vars``, ``pip`` …);
        ``None`` starts from an empty one.
    working_dir
        Overrides the file's ``working_dir`` (a local directory to upload or a URI).
    env
        Extra ``env_vars`` for the job; they win over the file and the shell.
    environ
        The submitting shell's environment (default ``os.environ``); the
        variables in ``PASSTHROUGH_ENV`` found there are forwarded.

    Raises
    ------
    ValueError
        The file is not a mapping, or an env var looks like a credential
        (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*`` …, or a URI with a password).
    """
    environ = os.environ if environ is None else environ
    runtime_env: dict = {}
    if runtime_env_file is not None:
        path = Path(runtime_env_file)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a YAML mapping of runtime env fields, found {type(loaded).__name__}")
        runtime_env = loaded
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update({name: environ[name] for name in PASSTHROUGH_ENV if environ.get(name)})
    env_vars.update(env or {})
    for name, value in env_vars.items():
        _refuse_credential(name, str(value), source=str(runtime_env_file or "--env"))
    if env_vars:
        runtime_env["env_vars"] = {name: str(value) for name, value in env_vars.items()}
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    return runtime_env


def client_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the ``ray job submit`` process, with token auth on.

    ``RAY_AUTH_MODE`` defaults to ``token``; the token is read by Ray from
    ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``, and sent as ``Authorization: Bearer …``.

    Raises
    ------
    ValueError
        Token mode without any token source.
    """
    child = dict(os.environ if environ is None else environ)
    mode = child.setdefault("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        logger.warning("RAY_AUTH_MODE=%s: submitting without a Ray token", mode)
        return child
    token_path = child.get("RAY_AUTH_TOKEN_PATH")
    default_path = Path(child.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if not (child.get("RAY_AUTH_TOKEN") or (token_path and Path(token_path).is_file()) or default_path.is_file()):
        raise ValueError(
            "no Ray auth token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it), "
            f"or put it in {default_path}; for a KubeRay cluster read it from the cluster's Secret "
            "(see cluster/README.md)"
        )
    return child


def submit_command(
    entrypoint: Sequence[str],
    runtime_env: Mapping,
    *,
    address: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    no_wait: bool = False,
) -> list[str]:
    """The ``ray job submit`` command line for ``entrypoint`` (nothing is run)."""
    command = [_ray_executable(), "job", "submit"]
    if address:
        command += ["--address", address]
    if submission_id:
        command += ["--submission-id", submission_id]
    if entrypoint_num_cpus is not None:
        command += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
    if no_wait:
        command.append("--no-wait")
    command += ["--runtime-env-json", json.dumps(dict(runtime_env), sort_keys=True), "--", *entrypoint]
    return command


def submit(
    command: Sequence[str],
    *,
    address: str | None = None,
    runtime_env_file: str | Path | None = None,
    working_dir: str | None = None,
    env: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    no_wait: bool = False,
    dry_run: bool = False,
) -> int:
    """Submit ``s2v COMMAND ARGS`` as a Ray job and (unless ``no_wait``) follow it to the end.

    Returns
    -------
    int
        ``ray job submit``'s exit status: 0 when the job succeeded (or was
        accepted, with ``no_wait``), 1 otherwise; 0 for ``dry_run``.
    """
    entrypoint = job_entrypoint(command)
    if runtime_env_file is None and DEFAULT_RUNTIME_ENV.is_file():
        runtime_env_file = DEFAULT_RUNTIME_ENV
    runtime_env = job_runtime_env(runtime_env_file, working_dir=working_dir, env=env)
    argv = submit_command(
        entrypoint,
        runtime_env,
        address=address,
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        no_wait=no_wait,
    )
    if dry_run:
        print(shlex.join(argv))
        return 0
    child_env = client_environment()
    logger.info("submitting %s (runtime env from %s)", shlex.join(entrypoint), runtime_env_file or "--env only")
    return subprocess.run(argv, env=child_env, check=False).returncode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "s2v submit [options] -- COMMAND [ARGS ...]"
    parser.add_argument(
        "--address",
        help="job API of the cluster, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS, as for `ray job submit`)",
    )
    parser.add_argument(
        "--runtime-env",
        dest="runtime_env_file",
        help=f"runtime env YAML (default: {DEFAULT_RUNTIME_ENV} when it exists)",
    )
    parser.add_argument("--working-dir", help="directory (or URI) shipped with the job; overrides the runtime env's")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the job (repeatable); never credentials",
    )
    parser.add_argument("--submission-id", help="job id to use instead of a generated one")
    parser.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver process")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    parser.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command and exit")
    parser.add_argument("job", nargs=argparse.REMAINDER, metavar="COMMAND ...", help="s2v sub-command and options")


def run(args: argparse.Namespace) -> int:
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        env[name] = value
    return submit(
        args.job,
        address=args.address,
        runtime_env_file=args.runtime_env_file,
        working_dir=args.working_dir,
        env=env,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        no_wait=args.no_wait,
        dry_run=args.dry_run,
    )


def _refuse_credential(name: str, value: str, *, source: str) -> None:
    # Runtime env vars are stored with the job and shown by the dashboard and
    # `ray job list`; nodes get credentials from IAM roles / workload identity.
    parts = set(name.upper().split("_"))
    if parts & _SECRET_PARTS or name.upper().endswith(_SECRET_ENDINGS) or redact(value) != value:
        raise ValueError(
            f"{source}: env var {name!r} looks like a credential; runtime env vars are visible to anyone "
            "who can list the cluster's jobs. Give the nodes credentials through their IAM role / "
            "service account (or a Kubernetes Secret) instead"
        )


def _ray_executable() -> str:
    # The `ray` next to this interpreter, so the client and the package agree
    # on Ray's version; else whatever is on PATH.
    sibling = Path(sys.executable).with_name("ray")
    if sibling.is_file():
        return str(sibling)
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError(f"`ray` not found next to {sys.executable} nor on PATH; install ray[default]")
    return found
