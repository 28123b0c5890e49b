"""cluster/: `ray up` configs (Ray's own schema), KubeRay manifests, the job client; the
`weights` and `dashboard` commands; a real two-node Ray cluster with token auth
(tests/raycluster.py) for sweeps with --address, submit/status and losing a node mid-sweep;
the dashboard of the embedded Ray of `launch.py sweep`."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from fast import FAST, FAST_SWEEP, cli
from raycluster import (
    MARKER_VAR,
    LocalCluster,
    end_marked,
    external_addresses,
    free_port,
    listening_addresses,
    local_cluster,
    marked_processes,
)

from cluster import auth, jobs
from mmr.errors import UserInputError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
# The Ray release the cluster images pin (cluster/Dockerfile): every config must pin the same
# and the installed one must be it; test_packaging checks it against pyproject.toml's bound.
RAY_VERSION = re.search(
    r"^FROM rayproject/ray:([\w.]+)-py", (CLUSTER / "Dockerfile").read_text(), re.M
)[1]
T = TypeVar("T")


def _ray_up(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(cfg: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates: the config merged with the provider's defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(cfg))


# ----------------------------------------------------------------- `ray up` cluster configs


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_passes_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(_prepared(_ray_up(name)))  # raises jsonschema.ValidationError


def test_schema_validation_rejects_broken_configs() -> None:
    """The validation above is not a formality: typical breakages are caught."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    good = _ray_up("aws.yaml")
    typo = {**copy.deepcopy(good), "setup_comands": ["true"]}
    no_node_config = copy.deepcopy(good)
    del no_node_config["available_node_types"]["gpu_4x_a10g"]["node_config"]
    yaml_mapping = copy.deepcopy(good)  # an unquoted "WARNING: ..." in a command is a mapping
    yaml_mapping["setup_commands"].append({"echo WARNING": "x"})
    for broken in (typo, no_node_config, yaml_mapping):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(_prepared(broken))
    too_small = copy.deepcopy(good)
    too_small["available_node_types"]["gpu_4x_a10g"]["min_workers"] = 99
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(_prepared(too_small))


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_keeps_auth_on_and_dashboard_private(name: str) -> None:
    cfg = _ray_up(name)
    raw = (CLUSTER / name).read_text()
    assert "0.0.0.0" not in raw
    # The token reaches every node, which starts Ray with token auth.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    starts_w = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert starts and starts_w
    for cmd in starts + starts_w:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    for cmd in starts:
        assert "--dashboard-host=127.0.0.1" in cmd
    assert any("export RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_installs_project_and_sizes_shm(name: str) -> None:
    cfg = _ray_up(name)
    assert cfg["file_mounts"]["~/mmr-sweep"] == "."
    assert any(re.search(r"pip install .*-e ~/mmr-sweep", c) for c in cfg["setup_commands"])
    docker = cfg.get("docker")
    if docker:  # cloud: the container gets an explicit /dev/shm
        assert docker["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
        assert any(o.startswith("--shm-size=") for o in docker["worker_run_options"])
        assert any(o.startswith("--shm-size=") for o in docker["head_run_options"])
        # Shared experiment storage: mounted on the host, bind-mounted into the container.
        assert "-v /mnt/runs:/mnt/runs" in docker["run_options"]
        assert any("mount" in c and "/mnt/runs" in c for c in cfg["initialization_commands"])
    else:  # bare metal: the setup resizes /dev/shm
        assert any("remount,size=" in c and "/dev/shm" in c for c in cfg["setup_commands"])
    assert "--storage" in (CLUSTER / name).read_text()  # the header says where results go


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_configs_have_gpu_workers_and_a_trial_free_head(name: str) -> None:
    cfg = _prepared(_ray_up(name))
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # trials never land on the head
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] >= 1
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_onprem_config_lists_workers_and_bounds() -> None:
    cfg = _ray_up("onprem.yaml")
    assert cfg["provider"]["type"] == "local"
    prepared = _prepared(cfg)
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert (
        node_type["min_workers"] == node_type["max_workers"] == len(cfg["provider"]["worker_ips"])
    )


# ----------------------------------------------------------------------- KubeRay manifests

# Keys a container / pod spec may have (core/v1): a typo such as `volumeMount` fails here.
_CONTAINER_KEYS = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "ports", "env",
    "envFrom", "resources", "volumeMounts", "livenessProbe", "readinessProbe", "startupProbe",
    "lifecycle", "securityContext", "terminationMessagePath", "terminationMessagePolicy",
}  # fmt: skip
_POD_KEYS = {
    "containers", "initContainers", "volumes", "tolerations", "nodeSelector", "affinity",
    "serviceAccountName", "securityContext", "imagePullSecrets", "priorityClassName",
    "restartPolicy", "schedulerName", "terminationGracePeriodSeconds",
}  # fmt: skip


def _kuberay_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pvc_name() -> str:
    return _one(_kuberay_docs("raycluster.yaml"), "PersistentVolumeClaim")["metadata"]["name"]


def _check_pod(template: dict[str, Any], *, gpu: bool) -> None:
    pod = template["spec"]
    assert set(pod) <= _POD_KEYS, set(pod) - _POD_KEYS
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = pod["containers"][0]  # KubeRay runs Ray in the first container
    assert set(container) <= _CONTAINER_KEYS, set(container) - _CONTAINER_KEYS
    assert container["name"] and container["image"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes), "a volumeMount names no volume"
    # Shared experiment storage on the PVC, the same path on every node.
    runs = volumes[mounts["/mnt/runs"]]
    assert runs["persistentVolumeClaim"]["claimName"] == _pvc_name()
    # Memory-backed /dev/shm (the container default is 64 MB).
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    for env in container.get("env", []):
        assert not (env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token")
    res = container["resources"]
    if gpu:
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        # Extended resources: requests must equal limits when both are given.
        assert (
            res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"])
            == (res["limits"]["nvidia.com/gpu"])
        )
        assert {"MMR_CACHE_DIR"} <= {e["name"] for e in container.get("env", [])}
    else:
        assert "nvidia.com/gpu" not in res.get("limits", {})


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)  # required by the CRD
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never exposed publicly
    assert head["rayStartParams"]["num-cpus"] == "0"
    _check_pod(head["template"], gpu=False)
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in group, key  # required by the CRD
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        _check_pod(group["template"], gpu=True)


def test_kuberay_raycluster_manifest() -> None:
    docs = _kuberay_docs("raycluster.yaml")
    pvc = _one(docs, "PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and workers mount it
    rc = _one(docs, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])
    assert not [d for d in docs if d["kind"] in {"Ingress", "Service"}]


def test_kuberay_rayjob_manifest() -> None:
    from launch import build_parser

    job = _one(_kuberay_docs("rayjob.yaml"), "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "launch.py", "sweep"]
    args = build_parser().parse_args(argv[2:])  # the CLI contract accepts it
    assert (args.command, args.address, args.storage) == ("sweep", "auto", "/mnt/runs")
    assert (ROOT / args.config).is_file(), args.config
    # The project is the job's working directory; the image puts it there.
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mmr-sweep"
    assert "/home/ray/mmr-sweep" in (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in (CLUSTER / "Dockerfile").read_text()


def test_pinned_ray_version_is_the_installed_one() -> None:
    import ray

    assert ray.__version__ == RAY_VERSION, "update the cluster configs' Ray version"


# -------------------------------------------------------------------- job client (no cluster)


def test_entrypoint_is_quoted_argument_by_argument() -> None:
    nasty = ["--set", "name=x; rm -rf / #", "--name", "$(whoami)", "--storage", "a b'\"c"]
    argv = jobs.sweep_entrypoint(nasty)
    command = jobs.build_entrypoint(argv)
    assert shlex.split(command) == ["python", "launch.py", "sweep", "--address", "auto", *nasty]
    with pytest.raises(jobs.JobClientError, match="--address"):
        jobs.sweep_entrypoint(["--address", "ray://elsewhere:10001"])


def test_sweep_options_make_config_paths_valid_on_the_cluster(tmp_path: Path) -> None:
    inside = ROOT / "configs" / "sweep_mvtec.yaml"
    args = jobs.sweep_options(
        project_root=ROOT, config=str(inside), overrides=["a.b=1", "c=[1, 2]"], name="n",
        storage="s3://bucket/x",
    )  # fmt: skip
    assert args == [
        "--config", "configs/sweep_mvtec.yaml", "--set", "a.b=1", "--set", "c=[1, 2]",
        "--name", "n", "--storage", "s3://bucket/x",
    ]  # fmt: skip
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(jobs.JobClientError, match="outside the project"):
        jobs.sweep_options(project_root=ROOT, config=str(outside))
    on_cluster = "/mnt/runs/configs/s.yaml"  # not here: passed unchanged
    assert jobs.sweep_options(project_root=ROOT, config=on_cluster)[1] == on_cluster


def test_dashboard_address_forms() -> None:
    assert jobs.dashboard_url("head:8265") == "http://head:8265"
    assert jobs.dashboard_url("https://head:8265/") == "https://head:8265"
    for bad in ("ray://head:10001",):
        with pytest.raises(jobs.JobClientError, match="dashboard"):
            jobs.dashboard_url(bad)


def test_no_address_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(jobs.JobClientError, match="--address http://HEAD:8265"):
        jobs.dashboard_url(None)


def test_token_sources_follow_rays_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.find_token() == (None, "none")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default\n")
    assert auth.find_token()[0] == "from-default"
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert auth.find_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.find_token() == ("from-env", "RAY_AUTH_TOKEN")
    assert auth.find_token("explicit")[0] == "explicit"
    # A token path that cannot be read is an error naming the path, never a silent fallback.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(auth.TokenError, match="missing"):
        auth.find_token()


@pytest.fixture
def restore_ray_auth_config() -> Iterator[None]:
    """enable_client_token_auth re-reads Ray's in-process config: re-read it after the test,
    once monkeypatch has restored the environment, or later in-process drivers keep token mode."""
    yield
    auth._refresh_ray_auth_config()


def test_client_token_mode_is_switched_on_only_with_a_token(
    tmp_path: Path, restore_ray_auth_config: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.enable_client_token_auth() is None
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert auth.enable_client_token_auth() == "RAY_AUTH_TOKEN"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    assert auth.enable_client_token_auth() is None
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_embedded_dashboard_message_says_where_the_token_is_never_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.ray_start import _dashboard_login

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert _dashboard_login() == "token auth off: RAY_AUTH_MODE=disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what ray.init sets when it turns auth on
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t0ken-in-home")
    home_file = tmp_path / ".ray" / "auth_token"
    assert _dashboard_login() == f"token auth on: log in with the token in {home_file}"
    own = tmp_path / "own_token"
    own.write_text("t0ken-in-file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(own))
    assert _dashboard_login() == f"token auth on: log in with the token in {own}"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken-in-env")  # wins, as in Ray
    assert _dashboard_login() == "token auth on: log in with the token in $RAY_AUTH_TOKEN"


def test_unreachable_address_names_it_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken-never-shown")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(jobs.JobClientError) as err:
        jobs.job_status(url, "raysubmit_x")
    msg = str(err.value)
    assert url in msg and "port-forward" in msg and "t0ken" not in msg


@contextlib.contextmanager
def _server(reply: bytes | None) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers every connection with ``reply`` (None: stays
    silent, holding the connection open). Yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.recv(1024)
                    conn.sendall(reply)
                    conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in held:
            conn.close()


_HTTP_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_a_dead_cluster_address_fails_at_once_with_the_address_as_typed() -> None:
    from cluster.driver import check_gcs_address

    typed = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserInputError) as err:
        check_gcs_address(typed)
    assert f"at {typed}: nothing listens there (connection refused)" in str(err.value)
    assert "HOST:6379" in str(err.value) and "launch.py submit" in str(err.value)
    with pytest.raises(UserInputError, match="ray://no-such-host.invalid:10001: host"):
        check_gcs_address("ray://no-such-host.invalid:10001")
    with pytest.raises(UserInputError, match="is a dashboard URL.*launch.py submit"):
        check_gcs_address("http://127.0.0.1:8265")
    with pytest.raises(UserInputError, match="not a cluster address"):
        check_gcs_address("head-without-port")


def test_a_port_that_is_not_a_gcs_is_named_not_waited_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cluster.driver import check_gcs_address

    with _server(_HTTP_404) as port:  # a web server, e.g. the dashboard's port
        with pytest.raises(UserInputError, match=f"127.0.0.1:{port} answers HTTP.*dashboard"):
            check_gcs_address(f"127.0.0.1:{port}")
    with _server(None) as port:  # accepts, never answers
        with pytest.raises(UserInputError, match="does not answer like a Ray GCS"):
            check_gcs_address(f"127.0.0.1:{port}", timeout=1)
    # `auto` is checked through RAY_ADDRESS (set for a job's driver), shown as typed.
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    with pytest.raises(UserInputError, match=r"at auto \(RAY_ADDRESS=127.0.0.1:\d+\)"):
        check_gcs_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    check_gcs_address("auto")  # Ray's own lookup of a local cluster fails fast


def test_sweep_with_a_dead_address_exits_2_naming_it(synthetic_root: Path, tmp_path: Path) -> None:
    typed = f"127.0.0.1:{free_port()}"
    args = _sweep_args(synthetic_root, tmp_path / "runs", "dead")
    out = _launch(["sweep", "--address", typed, *args], _clean_env(tmp_path))
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: cannot connect to the Ray cluster at {typed}: nothing listens" in out.stderr
    assert "GCS" not in out.stderr.split("error:")[0]  # no retry noise before the error
    assert not (tmp_path / "runs" / "dead").exists()


def test_a_dashboard_that_does_not_answer_or_is_no_dashboard_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken-never-shown")
    monkeypatch.setattr(jobs, "CONNECT_TIMEOUT_S", 1.0)
    with _server(None) as port:  # accepts, never answers: Ray's client would wait forever
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(jobs.JobClientError, match=f"{url} did not answer within 1 s"):
            jobs.job_status(url, "raysubmit_x")
        with pytest.raises(jobs.JobClientError, match="did not answer"):
            jobs.submit_sweep(url, ["--storage", "/mnt/runs"], working_dir=tmp_path)
    with _server(_HTTP_404) as port:
        url = f"http://127.0.0.1:{port}"
        out = _launch(["status", "--job", "raysubmit_x", "--address", url], _clean_env(tmp_path))
        assert out.returncode == 2
        assert f"{url} answers (GET /api/version: HTTP 404) but is not a Ray dashboard" in (
            out.stderr
        )


def test_a_job_driver_leaves_its_package_dir_before_ray_replaces_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cluster.driver import leave_job_working_dir

    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    assert leave_job_working_dir() == Path(tempfile.gettempdir())
    assert Path.cwd() == Path(tempfile.gettempdir())
    # Already deleted under the driver (os.getcwd() fails): it still moves out.
    monkeypatch.chdir(package)
    shutil.rmtree(package)
    assert leave_job_working_dir() == Path(tempfile.gettempdir())
    assert os.getcwd() == tempfile.gettempdir()
    # Anywhere else (a user's checkout) the driver stays where it was started.
    monkeypatch.chdir(tmp_path)
    assert leave_job_working_dir() is None and Path.cwd() == tmp_path


def test_a_missing_dependency_names_the_interpreter_and_the_fix(tmp_path: Path) -> None:
    bare = _bare_python(tmp_path)
    env = _clean_env(tmp_path)
    out = subprocess.run(
        [str(bare), "launch.py", "status", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: {bare} (Python " in out.stderr and "pip install -e ." in out.stderr
    job = subprocess.run(
        [str(bare), "launch.py", "sweep", "--address", "auto"],
        cwd=ROOT, env={**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 2 and "Traceback" not in job.stderr, job.stderr
    assert f"runs `python` from the head node's PATH, which is {bare}" in job.stderr
    from cluster.driver import missing_dependency_message

    assert missing_dependency_message(ModuleNotFoundError("x", name="not_ours")) is None


# ------------------------------------------- resources per trial on an autoscaling cluster


def _fake_autoscaler(
    monkeypatch: pytest.MonkeyPatch,
    *,
    alive: list[list[dict[str, float]]],
    node_types: dict[str, dict[str, float]] | None = None,
    report: dict[str, Any] | None = None,
) -> list[Any]:
    """Stand-ins for what check_resources reads from Ray: live nodes at each look (the last
    one repeats), the node types an autoscaler v2 publishes, a v1 status report. Returns the
    resource requests made to the autoscaler."""
    import ray.autoscaler.sdk as sdk
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    import search.resources as resources

    looks = iter(alive)
    current = [alive[0]]

    def nodes() -> list[dict[str, float]]:
        current[0] = next(looks, current[0])
        return current[0]

    config = None
    if node_types is not None:
        config = autoscaler_pb2.ClusterConfig()
        for name, res in node_types.items():
            group = config.node_group_configs.add(name=name, max_count=2)
            group.resources.update({k: int(v) for k, v in res.items()})  # uint64 counts
    requests: list[Any] = []
    monkeypatch.setattr(resources, "_alive_nodes", nodes)
    monkeypatch.setattr(resources, "_autoscaler_report", lambda: report)
    monkeypatch.setattr(state, "get_cluster_config", lambda: config)
    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None: requests.append(bundles))
    return requests


HEAD = {"CPU": 4.0}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


def test_gpu_trials_wait_for_a_node_type_the_autoscaler_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from search.config import ResourcesConfig
    from search.resources import check_resources

    # Autoscaler v2 lists a GPU type: ask for one node's worth, return once it joined.
    requests = _fake_autoscaler(
        monkeypatch, alive=[[HEAD], [HEAD], [HEAD, GPU_NODE]],
        node_types={"cpu": {"CPU": 8}, "gpu": GPU_NODE},
    )  # fmt: skip
    said: list[str] = []
    monkeypatch.delenv("MMR_NODE_WAIT_S", raising=False)
    check_resources(ResourcesConfig(cpu=4, gpu=1), write=said.append, poll_s=0)
    assert requests == [[{"CPU": 4.0, "GPU": 1.0}], []]  # the request is withdrawn after
    assert "asked the cluster's autoscaler" in said[0]
    assert "waiting up to 900 s ($MMR_NODE_WAIT_S)" in said[0]  # the README's default
    # No node type has a GPU: refused at once, naming the types; nothing requested.
    requests = _fake_autoscaler(monkeypatch, alive=[[HEAD]], node_types={"cpu": {"CPU": 8}})
    with pytest.raises(
        UserInputError, match=r"node types \(cpu: CPU=8\): this cluster has no GPU"
    ):
        check_resources(ResourcesConfig(cpu=4, gpu=1), poll_s=0)
    assert requests == []
    # A GPU type too small for the trial's CPUs is no way out either.
    with pytest.raises(UserInputError, match="fit on no node.*lower resources"):
        _fake_autoscaler(monkeypatch, alive=[[HEAD]], node_types={"gpu": GPU_NODE})
        check_resources(ResourcesConfig(cpu=16, gpu=1), poll_s=0)


def test_without_an_autoscaler_or_a_node_in_time_the_sweep_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.autoscaler._private.util import format_readonly_node_type

    from search.config import ResourcesConfig
    from search.resources import check_resources

    gpu = ResourcesConfig(cpu=1, gpu=1)
    # `ray start` by hand: only the read-only stand-in reports; refused at once.
    readonly = {"node_type_mapping": {"ab12": format_readonly_node_type("ab12")}}
    requests = _fake_autoscaler(monkeypatch, alive=[[HEAD]], report=readonly)
    with pytest.raises(UserInputError, match="this cluster has no GPU: set resources.gpu=0"):
        check_resources(gpu, poll_s=0)
    assert requests == []
    # A v1 autoscaler that launches nothing for the request: refused after launch_wait_s.
    idle = {"node_type_mapping": {"ab12": "ray.head.default"}, "pending_launches": {}}
    requests = _fake_autoscaler(monkeypatch, alive=[[HEAD]], report=idle)
    with pytest.raises(UserInputError, match="started no node for them within 0 s"):
        check_resources(gpu, launch_wait_s=0, wait_s=5, poll_s=0.01)
    assert requests == [[{"CPU": 1.0, "GPU": 1.0}], []]
    # It launches, but no node joins within wait_s.
    launching = {**idle, "pending_launches": {"gpu_worker": 1}}
    _fake_autoscaler(monkeypatch, alive=[[HEAD]], report=launching)
    with pytest.raises(UserInputError, match="joined within 0.05 s.*MMR_NODE_WAIT_S"):
        check_resources(gpu, wait_s=0.05, poll_s=0.01)
    # A live node that fits needs no autoscaler at all.
    requests = _fake_autoscaler(monkeypatch, alive=[[HEAD, GPU_NODE]])
    check_resources(gpu)
    assert requests == []


def test_trial_gpu_follows_rays_ids_when_ray_leaves_cuda_visible_devices_alone() -> None:
    from search.trainable import NOSET_CUDA_VAR, trial_cuda_index

    noset = {NOSET_CUDA_VAR: "1"}
    assert trial_cuda_index(["3"], {}) is None  # Ray narrowed CUDA_VISIBLE_DEVICES: cuda:0
    assert trial_cuda_index(["3"], {NOSET_CUDA_VAR: "0"}) is None
    assert trial_cuda_index([], noset) is None  # a CPU trial
    assert trial_cuda_index(["3"], noset) == 3
    assert trial_cuda_index([2, 3], {NOSET_CUDA_VAR: "true"}) == 2
    # The node's own CUDA_VISIBLE_DEVICES: Ray's ids are its entries, CUDA counts from 0.
    assert trial_cuda_index(["6"], {**noset, "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == 2
    uuids = "GPU-aaa,GPU-bbb"
    assert trial_cuda_index(["GPU-bbb"], {**noset, "CUDA_VISIBLE_DEVICES": uuids}) == 1
    with pytest.raises(RuntimeError, match="does not show it"):
        trial_cuda_index(["1"], {**noset, "CUDA_VISIBLE_DEVICES": "4,5"})


def test_the_trial_makes_its_gpu_the_current_cuda_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    import torch

    from search.trainable import NOSET_CUDA_VAR, select_trial_gpu

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["5"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.delenv(NOSET_CUDA_VAR, raising=False)
    assert select_trial_gpu() is None and chosen == []  # Ray's CUDA_VISIBLE_DEVICES rules
    monkeypatch.setenv(NOSET_CUDA_VAR, "1")
    assert select_trial_gpu() == 1 and chosen == [1]


def test_token_never_travels_in_the_runtime_env(tmp_path: Path) -> None:
    with pytest.raises(jobs.JobClientError, match="token"):
        jobs.submit_job(
            "http://127.0.0.1:1", ["true"], working_dir=tmp_path, env_vars={"RAY_AUTH_TOKEN": "x"}
        )
    assert {"runs/", ".git/", "*.pt"} <= set(jobs.DEFAULT_EXCLUDES)


def test_submit_command_passes_sweep_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import launch

    calls: list[tuple[Any, ...]] = []

    def fake_submit(
        address: str, sweep_args: list[str], *, working_dir: Path, sweep_name: str | None
    ) -> str:
        calls.append((address, sweep_args, working_dir, sweep_name))
        return "raysubmit_TEST"

    monkeypatch.setattr(jobs, "submit_sweep", fake_submit)
    rc = launch.main(
        ["submit", "--address", "head:8265", "--config", "configs/sweep_mvtec.yaml",
         "--set", "search.num_trials=4", "--name", "exp", "--storage", "/mnt/runs"]
    )  # fmt: skip
    assert rc == 0
    address, sweep_args, working_dir, sweep_name = calls[0]
    assert address == "http://head:8265" and working_dir == ROOT
    assert sweep_name == "exp"  # the job's dashboard label
    assert sweep_args == [
        "--config", "configs/sweep_mvtec.yaml", "--set", "search.num_trials=4",
        "--name", "exp", "--storage", "/mnt/runs",
    ]  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "raysubmit_TEST"
    assert "status --job raysubmit_TEST --address http://head:8265" in out[-1]


def test_submit_without_address_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import launch

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert launch.main(["submit", "--name", "x"]) == 2
    assert "--address http://HEAD:8265" in capsys.readouterr().err


def test_cluster_package_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, cluster, cluster.jobs, cluster.driver; "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_commands_in_the_cluster_docs_follow_the_cli() -> None:
    """Every `python launch.py ...` in docs/cluster.md's code blocks parses with launch.py."""
    from launch import build_parser

    text = (ROOT / "docs" / "cluster.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"python launch\.py ([^|&#)]*)", line):
                commands.append(match.group(1).strip())
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"docs/cluster.md: `launch.py {command}` does not parse")


# ------------------------------------------------------------------------------- helpers


def _wait_for(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    output: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds or as
    soon as ``proc`` (the process that should make it happen) has exited, with the tail of
    ``output()`` (what that process printed) in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            tail = f":\n{output()[-4000:]}" if output else ""
            pytest.fail(f"process exited with {proc.returncode} while waiting for {what}{tail}")
        time.sleep(0.3)
    tail = f"; its output so far:\n{output()[-4000:]}" if output else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def _sweep_args(data_root: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """`launch.py sweep/submit` options of a tiny demo sweep (fifo: every trial finishes)."""
    args = ["--name", name, "--storage", str(storage)]
    for item in (f"data.root={data_root}", *FAST_SWEEP, "scheduler.type=fifo", *extra):
        args += ["--set", item]
    return args


def _workers(exp: Path) -> dict[str, dict[str, Any]]:
    """Trial dir name -> the worker.json its (last) process wrote: pid, hostname, node_id."""
    found = {}
    for path in exp.glob("trial_*/worker.json"):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written right now
    return found


def _trial_nodes(exp: Path) -> dict[str, str]:
    """Trial dir name -> Ray node id of the (last) process that ran it."""
    return {trial: info["node_id"] for trial, info in _workers(exp).items()}


def _http_json(url: str, *, token: str | None = None, timeout: float = 10.0) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=headers), timeout=timeout
    ) as r:
        return json.loads(r.read().decode())


def _assert_loopback_only(port: int) -> None:
    """Whatever listens on ``port`` is bound to 127.0.0.1 only, and no other address answers."""
    assert listening_addresses(port) == {"127.0.0.1"}, listening_addresses(port)
    for ip in external_addresses():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"


# ---------------------------------------------- `weights` and `dashboard` commands (no Ray)


def test_weights_fetch_writes_the_files_and_prints_the_overrides_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    import torch

    import launch
    from mmr import weights
    from mmr.config import load_config
    from mmr.model import build_teacher

    made: dict[str, torch.nn.Module] = {}

    def fake_hub_model(name: str, *, role: str, key: str, **kwargs: Any) -> torch.nn.Module:
        torch.manual_seed(len(made) + 1)  # timm without the download
        made[role] = timm.create_model(name, pretrained=False, **kwargs)
        return made[role]

    monkeypatch.setattr(weights, "create_hub_model", fake_hub_model)
    to = tmp_path / "shared weights"  # a space: the printed overrides must be quoted
    rc = launch.main(["weights", "fetch", "--to", str(to), "--config", "configs/tiny.yaml"])
    assert rc == 0
    out = capsys.readouterr().out
    teacher = to / "resnet18.tv_in1k.pth"
    encoder = to / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
    assert teacher.is_file() and encoder.is_file()
    assert f"teacher: {teacher}" in out and f"encoder: {encoder}" in out
    line = next(x for x in out.splitlines() if "--set" in x)
    # The printed line is what a user pastes: it parses and points the config at the files.
    args = launch.build_parser().parse_args(
        ["train", "--config", "configs/tiny.yaml", *shlex.split(line)]
    )
    cfg = load_config(args.config, args.overrides)
    assert (cfg.model.teacher_checkpoint, cfg.model.encoder_checkpoint) == (
        str(teacher),
        str(encoder),
    )
    net = build_teacher(cfg.model).net
    fetched = made["teacher"].state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, fetched[k]), k

    # A sweep config is not a training config: say which file to pass instead.
    rc = launch.main(["weights", "fetch", "--to", str(to), "--config", "configs/demo_sweep.yaml"])
    assert rc == 2 and "base:" in capsys.readouterr().err


def test_a_missing_checkpoint_file_fails_at_once_with_the_path_and_the_fix(
    tmp_path: Path,
    synthetic_root: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import launch
    import mmr.train as train_module
    from mmr.config import load_config
    from mmr.errors import ConfigError
    from mmr.train import fit
    from search.trainable import _deterministic

    missing = tmp_path / "weights" / "resnet18.tv_in1k.pth"
    overrides = [f"data.root={synthetic_root}", *FAST]
    argv = ["train", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "out")]
    for item in (*overrides, f"model.teacher_checkpoint={missing}"):
        argv += ["--set", item]
    # At once = before any epoch is trained.
    epochs: list[object] = []
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: epochs.append(a))
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "launch.py weights fetch --to DIR" in err
    assert epochs == []

    # In a trial (fit), the same error is deterministic: Tune's retries end at once.
    cfg = load_config(
        "configs/tiny.yaml", [*overrides, f"model.encoder_checkpoint={tmp_path / 'nope.pth'}"]
    ).resolve_paths()
    with pytest.raises(
        ConfigError, match="model.encoder_checkpoint.*nope.pth.*weights fetch"
    ) as e:
        fit(cfg, final_test=False)
    assert _deterministic(e.value)


def test_dashboard_refuses_a_directory_that_is_not_an_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import launch

    assert launch.main(["dashboard", str(tmp_path)]) == 2
    assert "not an mmr-sweep experiment directory" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_dashboard_command_serves_the_study_journal_on_loopback(tmp_path: Path) -> None:
    import optuna

    from search.config import SPEC_FILE
    from search.resolve import resolve_sweep
    from search.samplers import study_storage

    # An experiment dir as a sweep leaves it: sweep.json + the study journal.
    spec = resolve_sweep(None, [f"data.root={tmp_path}"], name="dash", storage=str(tmp_path))
    exp = spec.experiment_dir
    exp.mkdir()
    (exp / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    study = optuna.create_study(
        study_name="dash", storage=study_storage(exp), direction="maximize"
    )
    dist = {"model.mask_ratio": optuna.distributions.FloatDistribution(0.1, 0.8)}
    for x in (0.2, 0.5, 0.7):
        study.add_trial(
            optuna.trial.create_trial(params={"model.mask_ratio": x}, distributions=dist, value=x)
        )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "launch.py", "dashboard", str(exp), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def studies() -> Any:
            try:
                return _http_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except (urllib.error.URLError, OSError):
                return None

        found = _wait_for(studies, 120, "optuna-dashboard to answer", proc)
        assert [s["study_name"] for s in found] == ["dash"]
        detail = _http_json(f"http://127.0.0.1:{port}/api/studies/{found[0]['study_id']}")
        assert sorted(t["values"][0] for t in detail["trials"]) == [0.2, 0.5, 0.7]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        _assert_loopback_only(port)
    finally:
        proc.terminate()  # by PID: the dashboard is this test's child
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"http://127.0.0.1:{port}/" in out and str(exp / "study.journal") in out


# ------------------------------------------------- a real two-node cluster, token auth on

_DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")

@ray.remote(num_cpus=0.5, resources={"worker_node": 1})
def where():
    return ray.get_runtime_context().get_node_id()

print(json.dumps({"task": ray.get(where.remote(), timeout=120),
                  "driver": ray.get_runtime_context().get_node_id()}))
"""

# Runs as a Ray Job: joins the cluster like the sweep driver does, uses the second node.
_JOB = """
import os, ray
print("launch.py uploaded:", os.path.isfile("launch.py"))
ray.init()

@ray.remote(num_cpus=0.5, resources={"worker_node": 1})
class Probe:  # like a Tune trial: an actor placed by its resources
    def node(self):
        return ray.get_runtime_context().get_node_id()

print("hello from the job; actor on", ray.get(Probe.remote().node.remote(), timeout=120))
try:
    os.getcwd()
    print("working dir: kept")
except FileNotFoundError:
    print("working dir: deleted under the driver")
"""


def _bare_python(tmp_path: Path) -> Path:
    """A Python of a fresh virtualenv: the standard library, none of mmr-sweep's packages."""
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A client environment with no token anywhere (own HOME, no RAY_AUTH_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp_path), **extra)
    return env


def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return cli(*args, env=env, timeout=180)


@pytest.mark.slow
@pytest.mark.timeout(600)
class TestTwoNodeCluster:
    """One cluster shared by the tests of this class, in the production layout: a head
    without CPUs (drivers and Ray Jobs run there, trials never do) and a node with CPUs and
    {"worker_node": 1}. Both run from one temp dir, as two plain `ray start` on one machine
    share /tmp/ray, so a job's working_dir is unpacked twice into one directory."""

    @pytest.fixture(scope="class")
    def cluster(self) -> Iterator[LocalCluster]:
        with local_cluster(head_cpus=0, worker_cpus=2, shared_temp_dir=True) as c:
            yield c

    @pytest.fixture()
    def token_env(self, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
        """This process finds the token the way a user's shell would: RAY_AUTH_TOKEN_PATH."""
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))

    def test_task_needing_the_custom_resource_runs_on_the_second_node(
        self, cluster: LocalCluster, tmp_path: Path
    ) -> None:
        out = subprocess.run(
            [sys.executable, "-c", _DRIVER, cluster.gcs_address],
            cwd=tmp_path,
            env=cluster.client_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        where = json.loads(out.stdout.strip().splitlines()[-1])
        assert where["task"] == cluster.worker_node_id() != cluster.head_node_id()

    def test_drivers_need_the_token_and_token_mode(
        self, cluster: LocalCluster, tmp_path: Path
    ) -> None:
        code = (
            "import sys, ray\n"
            "if sys.argv[2] == 'enable':\n"
            "    from cluster.auth import enable_client_token_auth\n"
            "    enable_client_token_auth()\n"
            "ray.init(address=sys.argv[1])\n"
            "print('CONNECTED')\n"
        )

        def driver(mode: str, **env: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", code, cluster.gcs_address, mode],
                cwd=ROOT,
                env=_clean_env(tmp_path, **env),
                capture_output=True,
                text=True,
                timeout=180,
            )

        # The GCS itself refuses a driver without the token, or with a wrong one. (Ray retries
        # the refused connection once a second for 20 s; two tries say the same.)
        for env in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}):
            out = driver("plain", RAY_gcs_server_port_wait_time_s="2", **env)
            assert out.returncode != 0 and "CONNECTED" not in out.stdout
            assert "InvalidAuthToken" in out.stderr, out.stderr[-2000:]
        # Ray sends a token found in RAY_AUTH_TOKEN(_PATH) only in token mode (checked by hand:
        # without it the driver fails like above); enable_client_token_auth switches it on,
        # here after `import ray`, as in launch.py.
        out = driver("enable", RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
        assert out.returncode == 0 and "CONNECTED" in out.stdout, out.stderr[-2000:]

    def test_job_submitted_with_token_succeeds_and_its_logs_come_back(
        self, cluster: LocalCluster, token_env: None
    ) -> None:
        job_id = jobs.submit_job(cluster.dashboard_url, ["python", "-c", _JOB], working_dir=ROOT)
        assert jobs.wait_for_job(cluster.dashboard_url, job_id, timeout=300) == "SUCCEEDED"
        status, logs = jobs.job_status(cluster.dashboard_url, job_id)
        assert status == "SUCCEEDED"
        assert f"hello from the job; actor on {cluster.worker_node_id()}" in logs
        assert "launch.py uploaded: True" in logs
        # Why the sweep driver leaves its working dir (cluster.driver.leave_job_working_dir):
        # the second node unpacked the job's package again, into the same shared directory,
        # deleting the driver's working directory (oneMKL then aborts `import torch`).
        assert "working dir: deleted under the driver" in logs
        # The dashboard's REST API lists the (now dead) actor with its node.
        probes = cluster.actors(class_name="Probe")
        assert probes and {a["node_id"] for a in probes} == {cluster.worker_node_id()}

    def test_sweep_with_address_runs_its_trials_on_the_second_node(
        self, cluster: LocalCluster, synthetic_root: Path, tmp_path: Path
    ) -> None:
        from search.results import load_trials

        # Trials need {"worker_node": 1}: only the second node has it.
        args = _sweep_args(
            synthetic_root, tmp_path / "runs", "onworker", "search.num_trials=2",
            "search.max_concurrent=1", "resources.custom={worker_node: 1}",
        )  # fmt: skip
        out = _launch(["sweep", "--address", cluster.gcs_address, *args], cluster.client_env())
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        exp = tmp_path / "runs" / "onworker"
        df = load_trials(exp)
        assert len(df) == 2 and set(df["state"]) == {"done"}, df
        nodes = _trial_nodes(exp)
        assert sorted(nodes) == sorted(f"trial_{t}" for t in df["trial"])
        assert set(nodes.values()) == {cluster.worker_node_id()} != {cluster.head_node_id()}
        assert cluster.token not in out.stdout + out.stderr

    def test_cli_submit_runs_a_real_sweep_and_status_reports_it(
        self, cluster: LocalCluster, synthetic_root: Path, tmp_path: Path, token_env: None
    ) -> None:
        from search.results import load_trials

        env = cluster.client_env()
        storage = tmp_path / "runs"
        sweep = _sweep_args(synthetic_root, storage, "submitted", "search.num_trials=1")
        sub = _launch(["submit", "--address", cluster.dashboard_url, *sweep], env)
        assert sub.returncode == 0, sub.stderr[-3000:]
        job_id = sub.stdout.splitlines()[0].strip()
        assert re.fullmatch(r"raysubmit_\w+", job_id), sub.stdout
        final = jobs.wait_for_job(cluster.dashboard_url, job_id, timeout=300)
        st = _launch(["status", "--job", job_id, "--address", cluster.dashboard_url], env)
        assert st.returncode == 0, st.stderr[-3000:]
        lines = st.stdout.splitlines()
        assert (final, lines[0]) == ("SUCCEEDED", f"job {job_id}: SUCCEEDED"), st.stdout[-3000:]
        # The log tail is the sweep driver's own output, run on the cluster.
        tail = lines[lines.index("--- last log lines ---") + 1 :]
        assert f"experiment: {storage / 'submitted'} (" in "\n".join(tail)
        df = load_trials(storage / "submitted")
        assert list(df["state"]) == ["done"]
        from ray.job_submission import JobSubmissionClient

        info = JobSubmissionClient(
            cluster.dashboard_url, headers=cluster.auth_headers()
        ).get_job_info(job_id)
        sets = [a for i, a in enumerate(sweep) if i and sweep[i - 1] == "--set"]
        assert shlex.split(info.entrypoint) == [
            "python", "launch.py", "sweep", "--address", "auto",
            *[x for item in sets for x in ("--set", item)],
            "--name", "submitted", "--storage", str(storage),
        ]  # fmt: skip
        for text in (sub.stdout, sub.stderr, st.stdout, st.stderr):
            assert cluster.token not in text

    def test_a_job_whose_python_lacks_the_dependencies_says_how_to_start_ray(
        self, cluster: LocalCluster, tmp_path: Path, token_env: None
    ) -> None:
        # The head's PATH finds a Python without mmr-sweep's dependencies (a cluster started
        # from a venv that was not activated): the job's `python` is that one.
        bare = _bare_python(tmp_path)
        path = f"{bare.parent}:{os.environ['PATH']}"
        job_id = jobs.submit_job(
            cluster.dashboard_url,
            jobs.sweep_entrypoint(["--set", "search.num_trials=1"]),
            working_dir=ROOT,
            env_vars={"PATH": path},
        )
        assert jobs.wait_for_job(cluster.dashboard_url, job_id, timeout=300) == "FAILED"
        _, logs = jobs.job_status(cluster.dashboard_url, job_id)
        assert f"runs `python` from the head node's PATH, which is {bare}" in logs, logs
        assert "ray start --head" in logs and "cluster/Dockerfile" in logs
        assert "Traceback" not in logs

    def test_status_without_or_with_a_wrong_token_explains_the_fix(
        self, cluster: LocalCluster, tmp_path: Path
    ) -> None:
        args = ["status", "--job", "raysubmit_x", "--address", cluster.dashboard_url]
        none = _launch(args, _clean_env(tmp_path))
        assert none.returncode == 2
        assert "401" in none.stderr and "RAY_AUTH_TOKEN" in none.stderr
        assert cluster.dashboard_url in none.stderr
        wrong = _launch(args, _clean_env(tmp_path, RAY_AUTH_TOKEN="not-the-token"))
        assert wrong.returncode == 2 and "rejected" in wrong.stderr
        assert "not-the-token" not in wrong.stderr
        with pytest.raises(urllib.error.HTTPError) as err:
            cluster.api_get("/api/v0/nodes", token=False)
        assert err.value.code == 401

    def test_dashboard_answers_on_loopback_only(self, cluster: LocalCluster) -> None:
        assert cluster.api_get("/api/version")  # 127.0.0.1 answers
        _assert_loopback_only(cluster.dashboard_port)
        # Ray reports the node by the machine's address, where the dashboard must not answer.
        for ip in {n["node_ip"] for n in cluster.nodes()} - {"127.0.0.1"}:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                assert s.connect_ex((ip, cluster.dashboard_port)) != 0, ip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_losing_the_second_node_mid_sweep_retries_its_trial_on_the_head(
    synthetic_root: Path, tmp_path: Path
) -> None:
    from search.results import load_trials

    # Both nodes offer one "slot" (and one CPU): one trial runs on each.
    with local_cluster(
        head_cpus=1, worker_cpus=1, head_resources={"slot": 1},
        worker_resources={"slot": 1, "worker_node": 1},
    ) as c:  # fmt: skip
        head_pid = c.head.popen.pid
        worker_id, head_id = c.worker_node_id(), c.head_node_id()
        node_markers = [c.head.marker, c.worker.marker]
        exp = tmp_path / "runs" / "failover"
        # Trials of ~10 s (64 px, 8 rounds of 6 epochs): long enough to lose one midway.
        args = _sweep_args(
            synthetic_root, tmp_path / "runs", "failover", "search.num_trials=2",
            "search.max_concurrent=2", "resources.custom={slot: 1}", "max_failures=1",
            "data.resize=72", "data.image_size=64", "train.epochs=48", "train.eval_every=6",
        )  # fmt: skip
        driver = subprocess.Popen(
            [sys.executable, "launch.py", "sweep", "--address", c.gcs_address, *args],
            cwd=ROOT,
            env=c.client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def checkpointed_on_the_second_node() -> str | None:
                # Two rounds recorded by the driver: the first one's checkpoint is registered
                # (a checkpoint dir alone may belong to a round the driver never received).
                for trial, node in _trial_nodes(exp).items():
                    result = exp / trial / "result.json"
                    if node == worker_id and result.is_file():
                        if len(result.read_text().splitlines()) >= 2:
                            return trial
                return None

            victim = _wait_for(
                checkpointed_on_the_second_node, 240, "2 rounds of a trial on node 2", driver
            )
            killed = c.kill_worker(sig=signal.SIGKILL)  # every process of node 2, by PID
            out, _ = driver.communicate(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
        assert driver.returncode == 0, out[-4000:]
        assert killed and head_pid not in killed
        assert all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in killed)
        assert c.head.popen.poll() is None
        assert {n["node_id"]: n["state"] for n in c.nodes()} == {
            head_id: "ALIVE",
            worker_id: "DEAD",
        }
        df = load_trials(exp)
        assert len(df) == 2 and set(df["state"]) == {"done"}, df
        # The lost trial ran again on the remaining capacity, from its last checkpoint: a
        # second start after round 1 (a trial that had finished would not restart at all).
        assert _trial_nodes(exp)[victim] == head_id
        results = [json.loads(x) for x in (exp / victim / "result.json").read_text().splitlines()]
        starts = [r["training_iteration"] for r in results if r["iterations_since_restore"] == 1]
        assert len(starts) == 2 and starts[1] > 1, starts
        assert sorted({r["training_iteration"] for r in results}) == list(range(1, 9))
        recorded = c.pids()
    # The context ended exactly what it started: nothing of either node is left.
    assert not [p for m in node_markers for p in marked_processes(m)]
    assert all(not Path(f"/proc/{p}").exists() or _is_zombie(p) for p in recorded)


# ------------------------------------------------------- the embedded Ray of `launch.py sweep`


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedded_ray_dashboard_is_local_needs_the_token_and_lists_the_trial_actors(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """`launch.py sweep` without --address: its own Ray, dashboard on, token auth on."""
    from search.results import load_trials

    # A private token file and HOME: the shared ~/.ray is never read or written.
    token_file = tmp_path / "auth_token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    token = token_file.read_text()
    home = tmp_path / "home"
    home.mkdir()
    marker = f"embedded-{secrets.token_hex(8)}"  # inherited by every Ray process it starts
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER")) and k != "MMR_DASHBOARD"
    }
    import matplotlib

    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        HOME=str(home),
        MPLCONFIGDIR=matplotlib.get_cachedir(),  # no font-cache rebuild in the fresh HOME
        RAY_USAGE_STATS_ENABLED="0",
        **{MARKER_VAR: marker},
    )
    exp = tmp_path / "runs" / "embedded"
    args = _sweep_args(
        synthetic_root, tmp_path / "runs", "embedded", "search.num_trials=2",
        "search.max_concurrent=1", "train.epochs=24", "train.eval_every=3",
    )  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "launch.py", "sweep", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()

    def printed() -> str:
        reader.join(timeout=10)  # the driver has exited: read the rest of its output
        return "".join(lines)

    try:
        banner = _wait_for(
            lambda: next((x for x in list(lines) if x.startswith("Ray dashboard:")), None),
            180,
            "the dashboard's address",
            driver,
            printed,
        )
        m = re.fullmatch(r"Ray dashboard: http://127\.0\.0\.1:(\d+) \((.*)\)\n", banner)
        assert m, banner
        assert m.group(2) == f"local only; token auth on: log in with the token in {token_file}"
        url = f"http://127.0.0.1:{m.group(1)}"

        def trial_actors() -> list[dict[str, Any]] | None:
            """Alive actors the REST API lists that are running this sweep's trials."""
            pids = {info["pid"] for info in _workers(exp).values()}
            try:
                body = _http_json(f"{url}/api/v0/actors?detail=1&limit=1000", token=token)
            except (urllib.error.URLError, OSError):
                return None
            actors = body["data"]["result"]["result"]
            return [a for a in actors if a["state"] == "ALIVE" and a.get("pid") in pids] or None

        found = _wait_for(
            trial_actors, 240, "the REST API to list a running trial", driver, printed
        )
        assert driver.poll() is None  # listed while the sweep runs
        # Each trial's actor is named after its trial (Tune's own wrapper would list every
        # one as ImplicitFunc / train_trial): sweep, trial id and params.
        assert {a["class_name"] for a in found} == {"SweepTrial"}
        ids = {p.parent.name.removeprefix("trial_") for p in exp.glob("trial_*/worker.json")}
        for actor in found:
            named = re.fullmatch(r"embedded trial (\w+) (.*)", actor["repr_name"])
            assert named and named.group(1) in ids, actor["repr_name"]
            assert "mask_ratio=" in named.group(2) and "teacher_layers=[" in named.group(2)
        # The driver's job carries the sweep's name and experiment.
        drivers = [
            j
            for j in _http_json(f"{url}/api/jobs/", token=token)
            if j["type"] == "DRIVER" and j["status"] == "RUNNING"
        ]
        assert [j["metadata"].get("mmr_sweep_name") for j in drivers] == ["embedded"]
        assert drivers[0]["metadata"]["mmr_experiment"] == str(exp)
        with pytest.raises(urllib.error.HTTPError) as err:
            _http_json(f"{url}/api/v0/actors")  # no token
        assert err.value.code == 401
        _assert_loopback_only(int(m.group(1)))
        driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            driver.terminate()  # the driver shuts its Ray down on SIGTERM
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait(timeout=30)
        reader.join(timeout=30)
        # Ray's processes of the sweep end with its driver; any that do not are killed by PID.
        forced = end_marked(marker, timeout=60)
    output = "".join(lines)
    assert driver.returncode == 0, output[-4000:]
    assert not forced, f"embedded Ray processes {forced} outlived the sweep"
    assert token not in output
    assert not (home / ".ray").exists()
    df = load_trials(exp)
    assert len(df) == 2 and set(df["state"]) == {"done"}, df


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------ an autoscaling cluster (fake node provider)

_CHECK_RESOURCES = """
import json, sys, ray
from cluster.auth import enable_client_token_auth
from mmr.errors import UserInputError
from search.config import ResourcesConfig
from search.resources import autoscaler_node_types, check_resources

enable_client_token_auth()
ray.init(address=sys.argv[1], logging_level="ERROR")
try:  # a resource no node type has: the autoscaler launches nothing for it
    check_resources(ResourcesConfig(cpu=1, custom={"tpu": 1}), launch_wait_s=5, poll_s=0.5)
    refused = None
except UserInputError as exc:
    refused = str(exc)
print(json.dumps({"types": autoscaler_node_types(), "refused": refused,
                  "nodes": len([n for n in ray.nodes() if n["Alive"]])}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_sweep_on_an_autoscaling_cluster_waits_for_its_gpu_node(
    synthetic_root: Path, tmp_path: Path
) -> None:
    from search.results import load_trials

    # As cluster/aws.yaml: a CPU head and GPU workers at min_workers 0 (none up at start).
    gpu_type = {
        "resources": {"CPU": 1, "GPU": 1},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    }
    with local_cluster(
        head_cpus=1, with_worker=False, autoscaling_node_types={"gpu_worker": gpu_type}
    ) as c:
        env = c.client_env()
        probe = subprocess.run(
            [sys.executable, "-c", _CHECK_RESOURCES, c.gcs_address],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert seen["types"] == {}  # Ray's v1 autoscaler: runs, does not publish its types
        assert "started no node" in seen["refused"] and "'tpu': 1.0" in seen["refused"]
        assert seen["nodes"] == 1  # nothing was launched for it
        assert not any(n["resources_total"].get("GPU") for n in c.alive_nodes())

        args = _sweep_args(
            synthetic_root, tmp_path / "runs", "autoscaled", "search.num_trials=1",
            "resources.gpu=1",
        )  # fmt: skip
        out = _launch(["sweep", "--address", c.gcs_address, *args], env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "asked the cluster's autoscaler" in out.stdout
        gpu_nodes = [n["node_id"] for n in c.alive_nodes() if n["resources_total"].get("GPU")]
        assert len(gpu_nodes) == 1
        exp = tmp_path / "runs" / "autoscaled"
        assert list(load_trials(exp)["state"]) == ["done"]
        assert set(_trial_nodes(exp).values()) == set(gpu_nodes)
