"""Every file in cluster/ is validated: it parses, its entry points are real
``s2v`` sub-commands with options their parser accepts, resources are
requested consistently, token auth is on and no credential is written down."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.cli import COMMANDS, build_parser
from pipelines.submit import job_entrypoint, job_runtime_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))

#: vCPUs and GPUs of the EC2 instance types the launcher config may use
EC2_INSTANCE_TYPES = {
    "m6i.2xlarge": (8, 0),
    "m6i.4xlarge": (16, 0),
    "c6i.8xlarge": (32, 0),
    "c6i.16xlarge": (64, 0),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g6.2xlarge": (8, 1),
}
#: environment variable names that may only come from a secretKeyRef, never a literal
CREDENTIAL_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)|(ACCESS|API|PRIVATE)_KEY", re.I)
#: text that must never appear in cluster/: cloud keys, private keys, inline tokens
LEAKED_SECRET = re.compile(
    r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[0-9a-f]{16,}",
)


def load_documents(path: Path) -> list[dict]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents, f"{path} holds no YAML document"
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: every document must be a mapping"
    return documents


def torch_pin() -> str:
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile must define TORCH_SPEC"
    return match.group(1)


def check_entrypoint(argv: list[str], where: str) -> str:
    """Assert ``s2v COMMAND ARGS`` names a sub-command whose parser accepts ARGS."""
    assert argv[0] == "s2v", f"{where}: entrypoint must run the s2v CLI, found {argv[0]!r}"
    command = argv[1]
    assert command in COMMANDS, f"{where}: unknown s2v sub-command {command!r}"
    build_parser(command).parse_args(argv[1:])  # argparse exits (test error) on drift
    return command


# -- every file ---------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    load_documents(path)


def test_cluster_folder_has_the_expected_configs():
    names = {str(p.relative_to(CLUSTER)) for p in YAML_FILES}
    assert {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml"} <= names
    kinds = {(doc["kind"], doc["metadata"]["name"]) for p in KUBERAY_FILES for doc in load_documents(p)}
    jobs = {name for kind, name in kinds if kind == "RayJob"}
    assert {"s2v-ingest", "s2v-pretrain", "s2v-sweep"} <= jobs


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_no_credentials_in_cluster_files(path):
    text = path.read_text()
    assert not LEAKED_SECRET.search(text), f"{path}: looks like a credential"
    if path.suffix in {".yaml", ".yml"}:
        for doc in load_documents(path):
            assert doc.get("kind") != "Secret", f"{path}: Secrets are created with kubectl, not committed"


# -- runtime env --------------------------------------------------------------


def test_runtime_env_ships_the_checkout_without_heavy_or_private_files():
    runtime_env = load_documents(CLUSTER / "runtime_env.yaml")[0]
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars", "pip", "uv", "py_modules", "config"}
    assert runtime_env["working_dir"] == "."
    assert {".git", ".venv", "mlflow.db"} <= set(runtime_env["excludes"])
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    # the same loader `s2v submit` uses accepts it (and refuses credentials)
    built = job_runtime_env(CLUSTER / "runtime_env.yaml", environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert built["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_no_patient_data_or_work_folder_is_uploaded_with_a_job(tmp_path):
    """Ray's own packaging of a working dir the README's commands have filled, with the shipped excludes."""
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files

    shipped = {
        "pipelines/ingest.py",
        "s2v_core/io/edf.py",
        "cluster/runtime_env.yaml",
        "README.md",
        "pyproject.toml",
        "tune/sweep.py",
        "s2v_core/store.py",
    }
    private = {
        "night.edf",
        "NIGHT.EDF",
        "cohort/shhs/shhs1-200001.edf",
        "raw/x.bdf",
        "raw/x.rec",
        "annotations/shhs1-200001-nsrr.xml",
        "datasets/shhs1-dataset.csv",
        "subjects.tsv",
        "links.csv",
        "pseudonym.key",
        "store/manifest.jsonl",
        "store/site=a/0123456789abcdef.parquet",
        "runs/tiny/state.json",
        "emb/embed.json",
        "emb-wearable/embed.json",
        "reports/staging.json",
        "sweep/scaling.json",
        "demo-workdir/store/x.parquet",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/s2v-ingest/r/artifacts/manifest.jsonl",
    }
    for name in shipped | private:
        (tmp_path / "work" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "work" / name).write_text("x")
    excludes = load_documents(CLUSTER / "runtime_env.yaml")[0]["excludes"]
    _zip_files(str(tmp_path / "work"), excludes, str(tmp_path / "job.zip"), include_gitignore=False)
    with zipfile.ZipFile(tmp_path / "job.zip") as archive:
        uploaded = {name for name in archive.namelist() if not name.endswith("/")}
    assert uploaded == shipped
    assert launcher_excludes() == excludes  # the launcher's rsync skips the same


def launcher_excludes() -> list[str]:
    return load_documents(CLUSTER / "aws.yaml")[0]["rsync_exclude"]


# -- cluster launcher (AWS) ---------------------------------------------------


@pytest.fixture(scope="module")
def launcher():
    return load_documents(CLUSTER / "aws.yaml")[0]


def test_launcher_node_types_match_their_instances(launcher):
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    for name, node_type in types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in EC2_INSTANCE_TYPES, f"{name}: add {instance} to EC2_INSTANCE_TYPES with its vCPUs/GPUs"
        vcpus, gpus = EC2_INSTANCE_TYPES[instance]
        resources = node_type["resources"]
        assert resources["GPU"] == gpus, f"{name}: {instance} has {gpus} GPUs, resources say {resources['GPU']}"
        if name == launcher["head_node_type"]:
            assert resources["CPU"] <= vcpus
        else:
            assert resources["CPU"] == vcpus, f"{name}: {instance} has {vcpus} vCPUs, resources say {resources['CPU']}"
    workers = [t for n, t in types.items() if n != launcher["head_node_type"]]
    assert any(t["resources"]["GPU"] == 0 for t in workers), "a CPU worker type for ingest"
    assert any(t["resources"]["GPU"] >= 1 for t in workers), "a GPU worker type for training"
    assert sum(t["max_workers"] for t in workers) >= launcher["max_workers"] > 0


def test_launcher_keeps_token_auth_on_and_the_dashboard_local(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token" in commands
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    head_cpus = re.search(r"--num-cpus=(\d+)", head)
    head_type = launcher["available_node_types"][launcher["head_node_type"]]
    assert head_cpus and int(head_cpus.group(1)) == head_type["resources"]["CPU"]
    mlflow = re.search(r"mlflow server .*?--host (\S+)", head)
    assert mlflow and mlflow.group(1) == "127.0.0.1"
    # the token comes from the user's home directory, not from the repository
    sources = list(launcher["file_mounts"].values())
    assert "~/.ray/auth_token" in sources
    assert all(s == "." or s.startswith("~/") for s in sources)


def test_launcher_installs_the_pinned_torch_before_the_package(launcher):
    setup = launcher["setup_commands"]
    torch_steps = [i for i, c in enumerate(setup) if torch_pin() in c]
    package_steps = [i for i, c in enumerate(setup) if "/home/ray/sleep2vec" in c and "pip install" in c]
    assert torch_steps and package_steps and torch_steps[0] < package_steps[0]
    assert f"rayproject/ray:{ray.__version__}-" in launcher["docker"]["image"]


def test_dockerfile_pins_the_same_ray_and_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in text
    assert f"TORCH_SPEC={torch_pin()}" in text


# -- KubeRay ------------------------------------------------------------------


def kuberay_documents():
    for path in KUBERAY_FILES:
        for doc in load_documents(path):
            yield pytest.param(path, doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(spec: dict):
    yield "head", spec["headGroupSpec"], True
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group, False


def quantity(value) -> float:
    text = str(value)
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    return float(text)


@pytest.mark.parametrize("path, doc", kuberay_documents())
def test_kuberay_token_auth_and_versions(path, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in {"RayCluster", "RayJob"}
    spec = cluster_spec(doc)
    assert spec["authOptions"]["mode"] == "token", f"{path}: token authentication must stay on"
    assert spec["rayVersion"] == ray.__version__
    for name, group, _ in groups(spec):
        assert "dashboard-host" not in group.get("rayStartParams", {}), f"{path}:{name}: keep the default binding"
        for container in group["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                assert var["name"] != "RAY_AUTH_MODE" or var.get("value") == "token"
                if CREDENTIAL_NAME.search(var["name"]):
                    assert "value" not in var, f"{path}:{name}: {var['name']} must come from a Secret (valueFrom)"


@pytest.mark.parametrize("path, doc", kuberay_documents())
def test_kuberay_resources_are_consistent(path, doc):
    for name, group, is_head in groups(cluster_spec(doc)):
        params = group.get("rayStartParams", {})
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{path}:{name}: requests must equal limits (Guaranteed QoS)"
        cpus = quantity(limits["cpu"])
        gpus = quantity(limits.get("nvidia.com/gpu", 0))
        ray_cpus = quantity(params.get("num-cpus", cpus))
        assert ray_cpus <= cpus if is_head else ray_cpus == cpus, f"{path}:{name}: num-cpus vs cpu limit"
        assert quantity(params.get("num-gpus", 0)) == gpus, f"{path}:{name}: num-gpus vs nvidia.com/gpu limit"
        if gpus:
            tolerations = group["template"]["spec"].get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), f"{path}:{name}: GPU taint toleration"
        if not is_head:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_manifests_use_one_image():
    images = set()
    for path in KUBERAY_FILES:
        for doc in load_documents(path):
            spec = cluster_spec(doc)
            for _, group, _ in groups(spec):
                images |= {c["image"] for c in group["template"]["spec"]["containers"]}
            if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
                images |= {c["image"] for c in doc["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert len(images) == 1, f"build one image (cluster/Dockerfile) and use it everywhere; found {images}"


@pytest.mark.parametrize("path, doc", [p for p in kuberay_documents() if p.values[1]["kind"] == "RayJob"])
def test_rayjobs_submit_from_a_sidecar_of_the_head(path, doc):
    # SidecarMode (KubeRay >= 1.5): no submitter Job; the operator requires the head pod never to restart.
    assert doc["spec"].get("submissionMode") == "SidecarMode", f"{path}: submissionMode"
    assert "submitterPodTemplate" not in doc["spec"], f"{path}: SidecarMode takes no submitter pod template"
    head = next(group for _, group, is_head in groups(cluster_spec(doc)) if is_head)
    assert head["template"]["spec"].get("restartPolicy") == "Never", f"{path}: the head pod's restartPolicy"


@pytest.mark.parametrize("path, doc", [p for p in kuberay_documents() if p.values[1]["kind"] == "RayJob"])
def test_rayjob_entrypoints_are_real_s2v_commands(path, doc):
    argv = shlex.split(doc["spec"]["entrypoint"])
    command = check_entrypoint(argv, str(path))
    args = build_parser(command).parse_args(argv[1:])
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    job_runtime_env(None, env=runtime_env.get("env_vars", {}), environ={})  # refuses credentials
    workers = [group for _, group, is_head in groups(cluster_spec(doc)) if not is_head]
    total_gpus = sum(g["replicas"] * quantity(g.get("rayStartParams", {}).get("num-gpus", 0)) for g in workers)
    largest_cpus = max(quantity(g["rayStartParams"]["num-cpus"]) for g in workers)
    if command == "pretrain":
        assert args.device == "gpu", f"{path}: pretrain on this cluster should ask for GPU workers"
        assert args.workers <= total_gpus, f"{path}: {args.workers} training workers but {total_gpus} GPUs"
    if command == "sweep":
        assert args.cpus_per_trial <= largest_cpus, f"{path}: a trial worker must fit one worker pod"
        # SWEEP_DIR holds Tune's state and the trials' run dirs: a path every pod mounts.
        for name, group, _ in groups(cluster_spec(doc)):
            (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
            mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
            assert any(args.output.startswith(m) for m in mounts), f"{path}:{name}: --output not on a mounted volume"
    if command in {"ingest", "sweep"}:
        assert total_gpus == 0, f"{path}: {command} runs on CPU workers only"
    if command == "ingest":
        # The ingest driver runs on the head: the pseudonym key comes from a Secret mounted there.
        head = next(group for _, group, is_head in groups(cluster_spec(doc)) if is_head)["template"]["spec"]
        (container,) = [c for c in head["containers"] if c["name"].startswith("ray-")]
        mounts = {m["mountPath"].rstrip("/") + "/": m["name"] for m in container.get("volumeMounts", [])}
        assert args.pseudonym_key_file, f"{path}: ingest needs --pseudonym-key-file (the same key for every run)"
        [volume] = [mounts[m] for m in mounts if args.pseudonym_key_file.startswith(m)]
        assert "secret" in next(v for v in head["volumes"] if v["name"] == volume), f"{path}: mount it from a Secret"


# -- the documented commands --------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    """``s2v …`` commands in cluster/ docs and comments (after ``s2v submit … --`` or ``ray job submit … --``)."""
    found = []
    for path in [CLUSTER / "README.md", *YAML_FILES]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if path.suffix != ".md" and not line.lstrip().startswith("#"):
                continue  # in YAML only the usage comments; entrypoints are checked above
            line = line.lstrip("# ").strip()
            if "…" in line or not re.search(r"(^|\s)s2v \w", line):
                continue
            argv = shlex.split(line.split(" #", 1)[0])
            if "--" in argv and argv[argv.index("--") + 1 :][:1] == ["s2v"]:
                argv = argv[argv.index("--") + 1 :]  # ray job submit … -- s2v CMD …
            elif "--" in argv and "submit" in argv[: argv.index("--")]:
                argv = ["s2v", *argv[argv.index("--") + 1 :]]  # s2v submit … -- CMD …
            elif argv[0] != "s2v":
                argv = argv[argv.index("s2v") :]
            found.append((f"{path.name}: {line}", argv))
    return found


@pytest.mark.parametrize("where, argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_commands_parse(where, argv):
    check_entrypoint(argv, where)
    if argv[1] != "submit":
        job_entrypoint(argv[1:])


def test_documented_commands_were_found():
    assert len(documented_commands()) >= 3


def test_readme_shows_how_the_token_reaches_ray_job_submit():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "ray get-auth-token", "ray job submit"):
        assert needle in text
