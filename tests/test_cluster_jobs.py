"""A real two-node Ray cluster on this machine, used only through the job API.

`ray start --head` plus `ray start --address` (each node with its own CPU and
a custom resource), token authentication on, then the pipelines submitted with
`s2v submit` exactly as on a remote cluster: synth → ingest → a 2-worker
pretrain whose workers must land on different nodes. Outputs and MLflow runs
are checked, a submission without (or with a wrong) token must be refused, and
the cluster is stopped even when a check fails.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
#: object store per node: the machine is shared, and the jobs here are small
OBJECT_STORE_BYTES = 400 * 1024**2
#: tries per node: a raylet that misses Ray's fixed registration deadline on a busy machine is restarted
START_ATTEMPTS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """Two `ray start --block` processes; stopping them by pid stops their nodes.

    `ray stop` is not used: it kills every Ray process of the machine,
    including other test sessions' instances.
    """

    temp_dir: Path
    token: str
    gcs_address: str = ""
    dashboard_url: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def node_env(self) -> dict[str, str]:
        """Environment of the node processes (inherited by job drivers and workers)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            # A busy 2-core machine starts Python agents and workers slowly;
            # Ray's defaults (15 s for the agents' ports, 60 s for a worker to
            # register) then abort a healthy node.
            RAY_agent_register_timeout_ms="180000",
            RAY_worker_register_timeout_seconds="180",
            # no idle Python workers started ahead of need while a node boots
            RAY_enable_worker_prestart="0",
            RAY_prestart_worker_first_driver="0",
            # `s2v` of this venv is what the job entrypoints run
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def client_env(self, *, token: str | None) -> dict[str, str]:
        """Environment of a submitting shell: with a token, or without any."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        # An empty HOME keeps a developer's ~/.ray/auth_token out of the test.
        env["HOME"] = str(self.temp_dir / "home")
        if token is None:
            env["RAY_AUTH_MODE"] = "disabled"
        else:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def start(self) -> None:
        (self.temp_dir / "home").mkdir(parents=True, exist_ok=True)
        common = [
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]
        for _ in range(START_ATTEMPTS):
            gcs_port, dashboard_port = free_port(), free_port()
            self.gcs_address = f"127.0.0.1:{gcs_port}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
            head = [
                "--head",
                f"--port={gcs_port}",
                f"--dashboard-port={dashboard_port}",  # binds 127.0.0.1 (Ray's default)
                f"--ray-client-server-port={free_port()}",
                '--resources={"node_a": 1}',
                f"--temp-dir={self.temp_dir / 'a'}",
            ]
            if self._start_node("head", [*common, *head], ready=lambda: len(self.alive_nodes()) == 1):
                break
        else:
            raise RuntimeError(f"the head node did not start:\n{self.log('head')}")
        for _ in range(START_ATTEMPTS):
            # Its own temp dir, as on a real machine: nodes sharing one would
            # share the unpacked job working_dir, and the worker's runtime-env
            # agent deletes it under the running driver once its tasks end.
            worker = [
                f"--address={self.gcs_address}",
                '--resources={"node_b": 1}',
                f"--temp-dir={self.temp_dir / 'b'}",
            ]
            if self._start_node("worker", [*common, *worker], ready=lambda: len(self.alive_nodes()) == 2):
                break
        else:
            raise RuntimeError(f"the worker node did not join:\n{self.log('worker')}")

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, then the head
            self._terminate(process)

    def api(self, path: str, *, token: str | None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.dashboard_url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def alive_nodes(self) -> list[dict]:
        try:
            status, body = self.api("/api/v0/nodes?limit=100&detail=true", token=self.token)
        except OSError:  # the dashboard is still starting
            return []
        if status != 200:
            return []
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def log(self, name: str) -> str:
        path = self.temp_dir / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def _start_node(self, name: str, options: list[str], *, ready, timeout: float = 180) -> bool:
        """Start one node and wait until ``ready()``; on failure stop it and return False.

        Ray gives a new raylet a fixed 30 s to register with the GCS; on a
        loaded machine that can pass, so callers retry.
        """
        log = open(self.temp_dir / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
        argv = [str(RAY), "start", *options, *self._node_ports()]
        process = subprocess.Popen(
            argv, env=self.node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        start = time.monotonic()
        while time.monotonic() < start + timeout and process.poll() is None:
            if ready():
                print(f"{name} node ready after {time.monotonic() - start:.0f} s")
                return True
            time.sleep(1)
        self._terminate(process)
        self.processes.remove(process)
        return False

    @staticmethod
    def _terminate(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # the process group was created for this node only (start_new_session)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    @staticmethod
    def _node_ports() -> list[str]:
        # Every port explicit and free, so that this cluster never collides
        # with another Ray instance on the machine (fixed defaults otherwise).
        return [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths live under the temp dir and must stay below the Unix
    # limit of 107 bytes; pytest's tmp_path is too deep for that.
    temp_dir = Path(tempfile.mkdtemp(prefix="s2v-ray-"))
    local = LocalCluster(temp_dir=temp_dir, token=secrets.token_hex(32))
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def s2v_submit(cluster: LocalCluster, workdir: Path, job: list[str], *, submission_id: str, timeout: float):
    """`s2v submit` of one job, as a user would run it from the repository root."""
    env = cluster.client_env(token=cluster.token)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    argv = [str(BIN / "s2v"), "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id]
    return subprocess.run(
        [*argv, "--", *job], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def raw_submit(cluster: LocalCluster, *, token: str | None, entrypoint: list[str]):
    """Plain `ray job submit`, the documented command, without the wrapper."""
    argv = [str(RAY), "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint]
    env = cluster.client_env(token=token)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)


# -- the cluster and its security ----------------------------------------------


def test_two_nodes_joined_with_their_own_resources(cluster):
    nodes = cluster.alive_nodes()
    custom = sorted(key for node in nodes for key in node["resources_total"] if key.startswith("node_"))
    assert custom == ["node_a", "node_b"]
    assert sum(node["resources_total"]["CPU"] for node in nodes) == 2


def test_ray_job_submit_with_the_token_runs_on_the_cluster(cluster):
    probe = "import ray; ray.init(); print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))"
    result = raw_submit(cluster, token=cluster.token, entrypoint=["python", "-c", probe])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "alive nodes: 2" in result.stdout


def test_submission_without_the_token_is_refused(cluster):
    result = raw_submit(cluster, token=None, entrypoint=["echo", "should never run"])
    assert result.returncode != 0
    assert "Unauthorized" in result.stderr + result.stdout
    assert cluster.api("/api/jobs/", token=None)[0] == 401


def test_submission_with_a_wrong_token_is_refused(cluster):
    result = raw_submit(cluster, token=secrets.token_hex(32), entrypoint=["echo", "should never run"])
    assert result.returncode != 0
    assert "Forbidden" in result.stderr + result.stdout
    assert cluster.api("/api/jobs/", token="wrong")[0] == 403
    submitted = json.loads(cluster.api("/api/jobs/", token=cluster.token)[1])
    assert not any("should never run" in job["entrypoint"] for job in submitted)


# -- the pipelines as jobs -------------------------------------------------------


def mlflow_runs(jobs_dir: Path, experiment_name: str) -> list:
    """Runs of one experiment in the SQLite store the jobs were given."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{jobs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r} in {jobs_dir / 'mlflow.db'}"
    return client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory):
    """Shared outputs of the chained jobs (synth → ingest → pretrain) and their MLflow store."""
    return tmp_path_factory.mktemp("jobs")


def test_synth_job(cluster, jobs_dir):
    job = ["synth", str(jobs_dir / "raw"), "--sites", "2", "--recordings-per-site", "2", "--hours", "0.25"]
    result = s2v_submit(cluster, jobs_dir, job, submission_id="s2v-synth", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert len([p for p in (jobs_dir / "raw").iterdir() if p.is_dir()]) == 2


def test_ingest_job(cluster, jobs_dir, pseudonym_key_file):
    sites = sorted(p for p in (jobs_dir / "raw").iterdir() if p.is_dir())
    store = jobs_dir / "store"
    # A fixed key: the same ids, hence the same train split (and windows for the pretrain job), every run.
    job = [
        "ingest",
        *[arg for site in sites for arg in ("--input", str(site))],
        "--output",
        str(store),
        "--pseudonym-key-file",
        str(pseudonym_key_file),
    ]
    result = s2v_submit(cluster, jobs_dir, job, submission_id="s2v-ingest", timeout=420)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    manifest = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4 and all(entry["status"] == "ok" for entry in manifest), manifest
    assert sorted(p.name for p in store.glob("site=*")) == sorted(f"site={site.name}" for site in sites)
    assert len(list(store.glob("site=*/*.parquet"))) == 4
    (run,) = mlflow_runs(jobs_dir, "s2v-ingest")
    assert run.info.status == "FINISHED" and run.data.metrics["ok"] == 4


def test_pretrain_job_with_workers_on_two_nodes(cluster, jobs_dir):
    run_dir = jobs_dir / "pretrain"
    job = [
        "pretrain", "--data", str(jobs_dir / "store"), "--output", str(run_dir),
        "--workers", "2", "--model", "tiny", "--steps", "3", "--global-batch", "8",
        "--checkpoint-every", "3", "--device", "cpu",
    ]  # fmt: skip
    result = s2v_submit(cluster, jobs_dir, job, submission_id="s2v-pretrain", timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert (run_dir / "encoder").is_dir()
    assert list((run_dir / "checkpoints").glob("*step*"))
    # Each node offers one CPU and each worker takes one: the two Ray Train
    # workers must have run on different nodes. Ask the cluster where they ran.
    status, body = cluster.api(
        "/api/v0/actors?limit=1000&detail=true&filter_keys=class_name&filter_predicates=%3D"
        "&filter_values=RayTrainWorker",
        token=cluster.token,
    )
    assert status == 200, body[:500]
    workers = json.loads(body)["data"]["result"]["result"]
    node_ids = {actor["node_id"] for actor in workers}
    head_and_worker = {node["node_id"] for node in cluster.alive_nodes()}
    assert len(workers) == 2 and node_ids == head_and_worker, workers
    # MLflow: the run went to the store passed through MLFLOW_TRACKING_URI,
    # with the metrics rank 0 logged from whichever node it ran on.
    (run,) = mlflow_runs(jobs_dir, "sleep2vec-pretrain")
    assert run.info.status == "FINISHED"
    assert math.isfinite(run.data.metrics["loss"])
    assert not (run_dir / "mlflow.db").exists()  # nothing fell back to a local store
