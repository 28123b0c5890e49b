"""A real two-node Ray cluster on this machine, started as child processes, token auth ON.

Tests use it to exercise what a user's cluster does (job submission, a sweep whose trials need
a resource only the second node has, losing a node mid-sweep) without touching anybody else's
Ray processes on this machine:

- every node is one ``ray start --block`` child process; ``--block`` makes it stop its own
  raylet, GCS and workers when it receives SIGTERM, so ending the cluster never needs
  ``ray stop`` (which kills EVERY Ray process on the machine, other people's too);
- ports are picked free, the dashboard binds 127.0.0.1 only, each node has its own short
  temp dir (Unix socket paths are limited to 107 bytes; two nodes sharing a session dir on one
  machine would unpack and garbage-collect the same runtime-env directories), the token lives
  in a private file named by RAY_AUTH_TOKEN_PATH (``~/.ray/auth_token`` is never touched);
- every process of a node is recorded (PID + start time, so a reused PID is never signalled)
  and carries the marker variable ``MMR_TEST_RAY_NODE`` in its environment; at the end exactly
  those processes are ended, and the helper raises if any had to be force-killed.

Ray itself maps ``--node-ip-address=127.0.0.1`` to the machine's routable address on Linux
and its GCS/raylet gRPC servers listen on all interfaces (there is no option to change it);
the token authenticates those. Only the dashboard can be, and is, bound to 127.0.0.1.

Usage::

    with local_cluster() as c:
        env = c.client_env()                 # for subprocesses: RAY_AUTH_MODE + token path
        subprocess.run([... "--address", c.gcs_address], env=env)
        c.api_get("/api/v0/actors")          # dashboard REST API, token attached
        c.kill_worker()                      # the second node dies (SIGKILL, by PID)
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER_VAR",
    "ClusterStartError",
    "LocalCluster",
    "end_marked",
    "external_addresses",
    "free_port",
    "listening_addresses",
    "local_cluster",
    "marked_processes",
]

# The environment variables through which Ray picks its auth mode and token: the nodes and
# clients get ours, never whatever the calling shell had.
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Variables that would send a child to some other cluster.
_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
# Set in each node's environment (value: the node's temp dir); inherited by every process
# the node starts, including orphans, so leftovers can be found without guessing by name.
MARKER_VAR = "MMR_TEST_RAY_NODE"


class ClusterStartError(RuntimeError):
    """The test cluster did not come up; the message carries the tail of the node logs."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_executable() -> str:
    """The ``ray`` CLI of the interpreter running the tests (not whatever PATH finds first)."""
    candidate = Path(sys.executable).with_name("ray")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if found is None:
        raise ClusterStartError("the `ray` command is not installed next to this Python")
    return found


def _psutil() -> Any:
    """psutil as bundled with Ray (importing ray puts ray/thirdparty_files on sys.path)."""
    import importlib

    import ray  # noqa: F401  (must come first)

    return importlib.import_module("psutil")


def _alive(proc: Any) -> bool:
    """True while ``proc`` (a psutil.Process) exists, is the same process, and is no zombie."""
    psutil = _psutil()
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def marked_processes(marker: str) -> list[Any]:
    """Live processes of this user whose environment has ``MMR_TEST_RAY_NODE`` == marker."""
    psutil = _psutil()
    me, here = os.getuid(), os.getpid()
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid == here or proc.info["uids"] is None or proc.info["uids"].real != me:
                continue
            if proc.environ().get(MARKER_VAR) == marker and _alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def end_marked(marker: str, *, timeout: float = 60.0) -> list[int]:
    """Wait for the processes carrying ``MMR_TEST_RAY_NODE=marker`` to exit on their own.

    For Ray started by a driver the test launched with the marker in its environment (an
    embedded ``ray.init``): its GCS, raylet, dashboard and workers inherit the marker. Whatever
    is still alive after ``timeout`` seconds is SIGKILLed by PID; returns those PIDs (empty
    when everything ended by itself).
    """
    psutil = _psutil()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and marked_processes(marker):
        time.sleep(0.3)
    forced = []
    for proc in marked_processes(marker):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # psutil refuses if the PID now names another process
            forced.append(proc.pid)
    return forced


def listening_addresses(port: int) -> set[str]:
    """The local IP addresses on which some process of this machine listens on TCP ``port``."""
    psutil = _psutil()
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def external_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (where a 0.0.0.0 bind would answer)."""
    psutil = _psutil()
    return sorted(
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    )


@dataclass
class _Node:
    """One ``ray start --block`` child and every process recorded under it."""

    name: str
    temp_dir: Path  # the node's --temp-dir (may be shared with the other node)
    marker: str  # the value of MARKER_VAR in its processes (one per node)
    popen: subprocess.Popen[bytes]
    log_path: Path
    procs: dict[int, Any] = field(default_factory=dict)  # pid -> psutil.Process

    def record(self) -> None:
        """Remember the node's processes: its descendants and whatever carries its marker."""
        psutil = _psutil()
        found = marked_processes(self.marker)
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.popen.pid)
            found += [root, *root.children(recursive=True)]
        for proc in found:
            self.procs.setdefault(proc.pid, proc)

    def running(self) -> list[int]:
        """PIDs of recorded or marked processes that are still alive."""
        self.record()
        return sorted(pid for pid, proc in self.procs.items() if _alive(proc))

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of this node's ``ray start`` output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def end(self, *, sig: int, timeout: float, term_rest: bool = False) -> list[int]:
        """Send ``sig`` (SIGTERM: to ``ray start`` only; else to every process of the node).

        Waits up to ``timeout`` seconds for all of the node's processes to exit, SIGKILLs
        whatever is left and returns those PIDs (empty after a clean shutdown). With
        ``term_rest``, processes left once ``ray start`` has ended get a SIGTERM first: the
        nodes an autoscaler started, which ``ray start`` does not stop.
        """
        psutil = _psutil()
        self.record()
        if sig == signal.SIGTERM:
            targets = [p for pid, p in self.procs.items() if pid == self.popen.pid]
        else:
            targets = list(self.procs.values())
        for proc in targets:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)  # psutil refuses if the PID now names another process
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout)
        if term_rest:
            for pid in self.running():
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.procs[pid].terminate()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            time.sleep(0.2)
        forced = []
        for pid in self.running():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.procs[pid].kill()
                forced.append(pid)
        if self.popen.poll() is None:
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        return forced


@dataclass
class LocalCluster:
    """Handle on a running local cluster; build it with :func:`local_cluster`."""

    temp_dir: Path  # private root dir: node temp dirs, token file, node logs
    gcs_address: str  # "127.0.0.1:PORT": for ray.init / `launch.py sweep --address`
    dashboard_url: str  # "http://127.0.0.1:PORT": job API and REST state API
    token_file: Path  # the cluster token, mode 0600
    head: _Node
    worker: _Node | None  # None once the second node was killed
    worker_resources: dict[str, float]
    head_resources: dict[str, float] = field(default_factory=dict)

    @property
    def token(self) -> str:
        """The cluster's auth token (never print it)."""
        return self.token_file.read_text().strip()

    @property
    def dashboard_port(self) -> int:
        """Port of the dashboard (bound to 127.0.0.1)."""
        return int(self.dashboard_url.rsplit(":", 1)[1])

    def pids(self) -> list[int]:
        """PIDs of this cluster's live processes (head and worker node), recorded now."""
        return sorted(pid for node in self._nodes() for pid in node.running())

    def _nodes(self) -> list[_Node]:
        return [self.head] + ([self.worker] if self.worker is not None else [])

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess: token auth on, this cluster's token file.

        RAY_ADDRESS is left unset on purpose: pass the address explicitly.
        """
        env = dict(os.environ if base is None else base)
        for var in (*_AUTH_VARS, *_ADDRESS_VARS, MARKER_VAR):
            env.pop(var, None)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate against this cluster's dashboard."""
        return {"Authorization": f"Bearer {self.token}"}

    def api_get(self, path: str, *, timeout: float = 10.0, token: bool = True) -> Any:
        """GET a dashboard REST path (e.g. ``/api/v0/actors``) and return the decoded JSON."""
        req = urllib.request.Request(
            self.dashboard_url + path, headers=self.auth_headers() if token else {}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def nodes(self) -> list[dict[str, Any]]:
        """Nodes from the state API (``node_id``, ``state``, ``is_head_node``, resources)."""
        body = self.api_get("/api/v0/nodes?detail=1&limit=100")
        return list(body["data"]["result"]["result"])

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Nodes whose state is ALIVE."""
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def worker_node_id(self) -> str:
        """Node id of the second node (found by a custom resource only it has)."""
        only_worker = [k for k in self.worker_resources if k not in self.head_resources]
        if not only_worker:
            raise LookupError("the second node has no resource of its own to find it by")
        for n in self.nodes():
            if only_worker[0] in (n.get("resources_total") or {}):
                return str(n["node_id"])
        raise LookupError(f"no node with resource {only_worker[0]!r} in the cluster")

    def actors(self, *, class_name: str | None = None) -> list[dict[str, Any]]:
        """Actors known to the cluster (alive and dead), e.g. Tune's trial actors.

        Each has ``actor_id``, ``class_name``, ``state``, ``node_id`` and ``pid``.
        """
        body = self.api_get("/api/v0/actors?detail=1&limit=10000")
        found = list(body["data"]["result"]["result"])
        if class_name is not None:
            found = [a for a in found if a.get("class_name") == class_name]
        return found

    def head_node_id(self) -> str:
        """Node id of the head node."""
        for n in self.nodes():
            if n.get("is_head_node"):
                return str(n["node_id"])
        raise LookupError("no head node in the cluster")

    def wait_for_nodes(self, count: int, *, timeout: float = 120.0) -> None:
        """Block until ``count`` nodes are ALIVE; ClusterStartError if not within timeout."""
        deadline = time.monotonic() + timeout
        last: object = "no answer yet"
        while time.monotonic() < deadline:
            exited = [n.name for n in self._nodes() if n.popen.poll() is not None]
            if exited:
                raise ClusterStartError(self._failure(f"`ray start` of {exited} exited"))
            try:
                alive = len(self.alive_nodes())
                if alive == count:
                    return
                last = f"{alive} node(s) alive"
            except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.5)
        raise ClusterStartError(self._failure(f"waiting for {count} alive nodes: {last}"))

    def wait_node_dead(self, node_id: str, *, timeout: float = 60.0) -> None:
        """Block until the head reports ``node_id`` as DEAD."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(n["node_id"] == node_id and n["state"] == "DEAD" for n in self.nodes()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {node_id} still not DEAD after {timeout:.0f}s")

    def kill_worker(self, *, sig: int = signal.SIGKILL, timeout: float = 20.0) -> list[int]:
        """End the second node's processes by PID (default SIGKILL: the machine died).

        Returns the PIDs of the node that were running just before; raises if any survives.
        """
        if self.worker is None:
            raise RuntimeError("the second node was already stopped")
        node, self.worker = self.worker, None
        before = node.running()
        forced = node.end(sig=sig, timeout=timeout)
        if sig != signal.SIGKILL and forced:
            raise RuntimeError(f"second-node processes {forced} survived {sig!r}")
        if node.running():
            raise RuntimeError(f"second-node processes {node.running()} still running")
        return before

    def _failure(self, what: str) -> str:
        parts = [f"test Ray cluster in {self.temp_dir}: {what}"]
        for node in self._nodes():
            parts.append(f"--- {node.name}: `ray start` pid {node.popen.pid}, last output ---")
            parts.append(node.log_tail())
        return "\n".join(parts)

    def stop(self, *, timeout: float = 30.0) -> list[int]:
        """SIGTERM each node's ``ray start`` (second node first); returns force-killed PIDs.

        ``ray start --block`` ends its own raylet, GCS and workers on SIGTERM, so the list is
        empty after a clean shutdown. Nodes started by a fake autoscaler run under the
        head's monitor: they get their SIGTERM once the head has stopped (no autoscaler is
        left to replace them).
        """
        forced: list[int] = []
        for node in [n for n in (self.worker, self.head) if n is not None]:
            forced += node.end(sig=signal.SIGTERM, timeout=timeout, term_rest=node is self.head)
        self.worker = None
        return forced


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux).

    If pytest itself is killed, the ``ray start --block`` children then shut their nodes
    down instead of leaking Ray processes onto a shared machine.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_node(
    name: str, args: list[str], *, env: Mapping[str, str], root: Path, temp_dir: Path
) -> _Node:
    temp_dir.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{name}.out"
    marker = str(root / name)
    node_env = {**env, MARKER_VAR: marker}
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [_ray_executable(), "start", "--block", f"--temp-dir={temp_dir}", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=node_env,
            cwd=str(temp_dir),
            # Own session: a Ctrl-C in pytest's terminal does not hit the nodes directly;
            # the helper ends them in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only a prctl call before exec
        )
    node = _Node(name=name, temp_dir=temp_dir, marker=marker, popen=popen, log_path=log_path)
    node.record()
    return node


def _fake_autoscaling_config(
    node_types: Mapping[str, Mapping[str, Any]], gcs_port: int, head_cpus: int
) -> dict[str, Any]:
    """An autoscaling config for Ray's fake multi-node provider (nodes = local processes)."""
    return {
        "cluster_name": "mmr-test",
        "max_workers": sum(int(t.get("max_workers", 1)) for t in node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",  # not the default 6379 others may use
        },
        "auth": {"ssh_user": "nobody"},
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": head_cpus},
                "node_config": {},
                "max_workers": 0,
            },
            **{name: dict(t) for name, t in node_types.items()},
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextlib.contextmanager
def local_cluster(
    *,
    head_cpus: int = 1,
    worker_cpus: int = 1,
    worker_resources: Mapping[str, float] | None = None,
    head_resources: Mapping[str, float] | None = None,
    with_worker: bool = True,
    object_store_bytes: int = 150 * 1024 * 1024,
    fast_failure_detection: bool = True,
    timeout: float = 120.0,
    keep_temp: bool = False,
    shared_temp_dir: bool = False,
    autoscaling_node_types: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[LocalCluster]:
    """Start a head (+ a second node with a custom resource), token auth on.

    Yields a :class:`LocalCluster` once all nodes are ALIVE. On exit it ends exactly the
    processes it started (by PID) and raises if any of them had to be force-killed.

    Args:
        head_cpus: CPUs the head advertises.
        worker_cpus: CPUs the second node advertises.
        worker_resources: custom resources of the second node (default ``{"worker_node": 1}``).
        head_resources: custom resources of the head (default none). Give both nodes a
            resource, e.g. ``{"slot": 2}``, for trials that may run anywhere (failover).
        with_worker: start the second node at all.
        object_store_bytes: object store size per node (small: the machine is shared).
        fast_failure_detection: the head declares a silent node dead after ~5 s instead of
            ~15-30 s (GCS health checks every second, 5 misses), for failover tests.
        timeout: seconds to wait for the nodes to come up.
        keep_temp: keep the temp dir (node logs, session dirs) for debugging.
        shared_temp_dir: both nodes use one ``--temp-dir``, as two plain ``ray start`` on one
            machine share ``/tmp/ray``: they then unpack runtime-env packages (a job's
            ``working_dir``) into the same session directory.
        autoscaling_node_types: worker node types of a fake autoscaling cluster (Ray's
            ``fake_multinode`` provider: the head's autoscaler starts these nodes as local
            processes), e.g. ``{"gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0,
            "max_workers": 1, "node_config": {}}}``. Use it with ``with_worker=False``.
    """
    resources = dict(worker_resources or {"worker_node": 1})
    head_res = dict(head_resources or {})
    # Short private root under /tmp: the nodes' Unix sockets live below it.
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    token_file = root / "auth_token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))

    env = {k: v for k, v in os.environ.items() if k not in (*_AUTH_VARS, *_ADDRESS_VARS)}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
    )
    head_env = dict(env)
    if fast_failure_detection:
        head_env.update(
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="2000",
            RAY_health_check_failure_threshold="5",
        )
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-gpus=0",
        f"--object-store-memory={object_store_bytes}",
        "--disable-usage-stats",
        "--log-style=record",
    ]
    gcs_port, dash_port = free_port(), free_port()
    autoscaling: list[str] = []
    if autoscaling_node_types is not None:
        config_file = root / "autoscaling.json"
        config_file.write_text(
            json.dumps(_fake_autoscaling_config(autoscaling_node_types, gcs_port, head_cpus))
        )
        autoscaling = [f"--autoscaling-config={config_file}"]
        # The fake provider refuses to run without RAY_FAKE_CLUSTER; 1 s autoscaler rounds.
        head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    cluster: LocalCluster | None = None
    nodes: list[_Node] = []
    try:
        head = _start_node(
            "head",
            [
                "--head",
                f"--port={gcs_port}",
                f"--num-cpus={head_cpus}",
                *([f"--resources={json.dumps(head_res)}"] if head_res else []),
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                *autoscaling,
                *common,
            ],
            env=head_env,
            root=root,
            temp_dir=root / ("s" if shared_temp_dir else "h"),
        )
        nodes.append(head)
        cluster = LocalCluster(
            temp_dir=root,
            gcs_address=f"127.0.0.1:{gcs_port}",
            dashboard_url=f"http://127.0.0.1:{dash_port}",
            token_file=token_file,
            head=head,
            worker=None,
            worker_resources=resources,
            head_resources=head_res,
        )
        cluster.wait_for_nodes(1, timeout=timeout)
        if with_worker:
            worker = _start_node(
                "worker",
                [
                    f"--address=127.0.0.1:{gcs_port}",
                    f"--num-cpus={worker_cpus}",
                    f"--resources={json.dumps(resources)}",
                    f"--metrics-export-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    *common,
                ],
                env=env,
                root=root,
                temp_dir=root / ("s" if shared_temp_dir else "w"),
            )
            nodes.append(worker)
            cluster.worker = worker
            cluster.wait_for_nodes(2, timeout=timeout)
        logger.info(
            "test Ray cluster up: %s, dashboard %s", cluster.gcs_address, cluster.dashboard_url
        )
    except BaseException:
        for node in reversed(nodes):
            node.end(sig=signal.SIGTERM, timeout=30.0)
        if not keep_temp:
            shutil.rmtree(root, ignore_errors=True)
        raise

    try:
        yield cluster
    except BaseException:
        cluster.stop()
        if not keep_temp:
            shutil.rmtree(root, ignore_errors=True)
        raise
    forced = cluster.stop()
    left = [p.pid for node in nodes for p in marked_processes(node.marker)]
    if not keep_temp:
        shutil.rmtree(root, ignore_errors=True)
    if forced or left:
        raise RuntimeError(
            f"test Ray cluster did not shut down cleanly: force-killed {forced}, "
            f"still running {left}"
        )
