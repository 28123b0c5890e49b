"""Client side of Ray Jobs: submit a sweep to a running cluster and follow it.

A sweep is submitted through the cluster's dashboard job API (``http://HEAD:8265``) with
Ray's ``JobSubmissionClient``: the project directory is uploaded as the job's ``working_dir``
(without experiment results, caches, VCS data or weight files) and the entrypoint is
``python launch.py sweep --address auto <sweep options>``, built with :func:`shlex.join` from
an argument list, so no user input is ever spliced into a shell string.

Token authentication: every request carries ``Authorization: Bearer <token>``, with the token
taken, in Ray's own order of precedence, from ``RAY_AUTH_TOKEN``, from the file named by
``RAY_AUTH_TOKEN_PATH``, or from ``~/.ray/auth_token``. The header is set explicitly because
Ray's client only attaches the token itself when ``RAY_AUTH_MODE=token`` is set in this
process. The token is never logged, printed or put into the job's runtime environment.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cluster.auth import TOKEN_HELP, find_token
from mmr.errors import UserInputError

if TYPE_CHECKING:  # the Ray import costs ~1 s: done inside the functions
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "JobClientError",
    "DEFAULT_EXCLUDES",
    "TERMINAL_STATES",
    "build_entrypoint",
    "dashboard_url",
    "sweep_options",
    "sweep_entrypoint",
    "submit_job",
    "submit_sweep",
    "job_status",
    "wait_for_job",
    "stop_job",
]

logger = logging.getLogger(__name__)

# Never uploaded with the project: results, caches, VCS data, environments, weight files.
# (Ray additionally honours the project's .gitignore and a .rayignore, if present.)
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "runs/",
    "out/",
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.safetensors",
    "*.onnx",
    "*.tar",
    "*.tar.gz",
    "*.zip",
)

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Seconds the dashboard has to answer the first request before the client gives up.
CONNECT_TIMEOUT_S = 10.0


class JobClientError(UserInputError):
    """The job API could not be used; the message names the address and the fix."""


def dashboard_url(address: str | None) -> str:
    """``HEAD:8265`` or ``http(s)://HEAD:8265`` -> the dashboard URL (no trailing slash).

    ``None`` falls back to ``RAY_API_SERVER_ADDRESS``, like Ray's own job CLI.
    """
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS", "")
    if not address:
        raise JobClientError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard of the "
            "cluster; after `ray up`, run `ray dashboard CLUSTER.yaml` and use "
            "http://127.0.0.1:8265)"
        )
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise JobClientError(
            f"--address {address!r} is not a dashboard URL: jobs are submitted over HTTP to "
            "the Ray dashboard, e.g. http://HEAD:8265 (not ray://HEAD:10001 or HEAD:6379)"
        )
    return address


def _auth_error(address: str, exc: Exception) -> JobClientError:
    text = str(exc)
    if text.startswith("Authentication failed"):  # Ray's wording for HTTP 403
        return JobClientError(
            f"the Ray cluster at {address} rejected the auth token (HTTP 403): the token "
            f"does not match the cluster's; {TOKEN_HELP}"
        )
    return JobClientError(
        f"the Ray cluster at {address} requires token authentication (HTTP 401) and no "
        f"token was sent; {TOKEN_HELP}"
    )


def _unreachable(address: str) -> JobClientError:
    return JobClientError(
        f"cannot reach the Ray dashboard at {address}: check that the cluster is up and the "
        "address is its dashboard (port 8265). The dashboard listens on the head's "
        "127.0.0.1 only: forward it first (`ray dashboard cluster/aws.yaml`, or "
        "`kubectl port-forward svc/HEAD-SVC 8265:8265`) and use http://127.0.0.1:8265"
    )


def _call(address: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one client call, turning connection and auth failures into JobClientError."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as exc:
        raise _auth_error(address, exc) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.Timeout):
        raise _unreachable(address) from None


def _probe_dashboard(url: str, headers: dict[str, str] | None, timeout: float) -> None:
    """Fail in seconds when ``url`` is not an answering Ray dashboard.

    Ray's client sends its requests without a time-out: an address that accepts the
    connection but never answers (a dead head behind a load balancer, a port-forward whose
    pod is gone) would hang ``submit``/``status --job`` forever. Auth errors are left to the
    client's own call, which tells a missing token from a wrong one.
    """
    import requests

    try:
        resp = requests.get(f"{url}/api/version", headers=headers, timeout=timeout)
    except requests.Timeout:
        raise JobClientError(
            f"the Ray dashboard at {url} did not answer within {timeout:g} s: check that the "
            "cluster is up and that the address (or its port-forward) still reaches the "
            "head's dashboard, port 8265"
        ) from None
    except requests.exceptions.ConnectionError:
        raise _unreachable(url) from None
    if resp.status_code in (401, 403):
        return
    try:
        is_ray = resp.ok and "ray_version" in resp.json()
    except ValueError:
        is_ray = False
    if not is_ray:
        raise JobClientError(
            f"{url} answers (GET /api/version: HTTP {resp.status_code}) but is not a Ray "
            "dashboard: pass the cluster's dashboard URL, http://HEAD:8265 (forwarded to "
            "http://127.0.0.1:8265 with `ray dashboard cluster/aws.yaml` or kubectl "
            "port-forward)"
        )


def _client(address: str | None, token: str | None) -> tuple[JobSubmissionClient, str]:
    """A JobSubmissionClient for the dashboard at ``address``, with the token header set."""
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    secret, source = find_token(token)
    logger.debug("Ray job API at %s, auth token from: %s", url, source)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    _probe_dashboard(url, headers, CONNECT_TIMEOUT_S)
    # The constructor already talks to the cluster (version check).
    client = _call(url, JobSubmissionClient, url, headers=headers)
    return client, url


def build_entrypoint(argv: Sequence[str]) -> str:
    """Quote an argument list into the single command string Ray Jobs expects.

    Every element is quoted by :func:`shlex.join`, so ``shlex.split`` of the result gives
    back exactly ``argv``: nothing a user typed can add a command.
    """
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("empty entrypoint")
    return shlex.join(argv)


def sweep_options(
    *,
    project_root: Path,
    config: str | None = None,
    overrides: Sequence[str] = (),
    name: str | None = None,
    storage: str | None = None,
) -> list[str]:
    """The ``launch.py sweep`` options of a submitted job, paths made valid on the cluster.

    The job runs in the uploaded copy of ``project_root``, so a local ``config`` file inside
    the project is passed relative to it; a local file outside the project would not exist
    on the cluster and is an error; a path that does not exist here is passed unchanged (a
    file on the cluster's shared storage).
    """
    args: list[str] = []
    if config:
        local = Path(config).expanduser()
        if local.is_file():
            root = Path(project_root).resolve()
            try:
                config = local.resolve().relative_to(root).as_posix()
            except ValueError:
                raise JobClientError(
                    f"--config {config} is outside the project directory {root}, the only "
                    "directory uploaded with the job: copy it into the project (e.g. "
                    "configs/), or put it on the cluster's shared storage and pass that path"
                ) from None
        else:
            logger.warning("--config %s is not a local file: it must exist on the cluster", config)
        args += ["--config", config]
    for item in overrides:
        args += ["--set", str(item)]
    if name:
        args += ["--name", name]
    if storage:
        args += ["--storage", storage]
    return args


def sweep_entrypoint(sweep_args: Sequence[str], *, python: str = "python") -> list[str]:
    """``python launch.py sweep --address auto <sweep_args>`` as an argument list.

    Inside a Ray Job the driver joins the cluster it runs on (``--address auto``, which Ray
    resolves from the ``RAY_ADDRESS`` the job supervisor sets), never an embedded one.
    """
    args = [str(a) for a in sweep_args]
    if any(a == "--address" or a.startswith("--address=") for a in args):
        raise JobClientError(
            "do not pass --address in the sweep options of a submitted job: the job's "
            "driver always joins the cluster it was submitted to"
        )
    return [python, "launch.py", "sweep", "--address", "auto", *args]


def submit_job(
    address: str | None,
    entrypoint: Sequence[str],
    *,
    working_dir: Path,
    excludes: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    token: str | None = None,
) -> str:
    """Submit ``entrypoint`` (an argument list) as a Ray Job; returns the job id.

    Args:
        address: dashboard URL of the cluster, ``http://HEAD:8265`` (default: the
            ``RAY_API_SERVER_ADDRESS`` environment variable).
        entrypoint: the command as a list of arguments (quoted with :func:`build_entrypoint`).
        working_dir: directory uploaded as the job's working directory.
        excludes: extra gitignore-style patterns not to upload (added to DEFAULT_EXCLUDES).
        env_vars: environment variables for the job (never put the auth token here: runtime
            environments are visible in the dashboard).
        submission_id: job id to use (default: generated by Ray).
        metadata: free-form labels shown with the job.
        token: auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
    """
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise JobClientError(f"working_dir {working_dir} is not a directory")
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": [*DEFAULT_EXCLUDES, *excludes],
    }
    if env_vars:
        if any(k.upper().startswith("RAY_AUTH") for k in env_vars):
            raise JobClientError("the auth token must not travel in the job's env_vars")
        runtime_env["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    command = build_entrypoint(entrypoint)
    client, url = _client(address, token)
    try:
        job_id = _call(
            url,
            client.submit_job,
            entrypoint=command,
            runtime_env=runtime_env,
            submission_id=submission_id,
            metadata=dict(metadata) if metadata else None,
        )
    except ValueError as exc:  # e.g. the package exceeds Ray's upload limit
        raise JobClientError(f"cannot package {working_dir} for {url}: {exc}") from None
    except RuntimeError as exc:  # an HTTP error answer of the job API
        if "413" in str(exc):
            raise JobClientError(
                f"{working_dir} is too large to upload to {url} ({exc}): keep datasets, "
                "weights and results out of the project directory, or list them in "
                ".rayignore"
            ) from None
        raise JobClientError(f"the cluster at {url} refused the job: {exc}") from None
    logger.info("submitted job %s to %s: %s", job_id, url, command)
    return str(job_id)


def submit_sweep(
    address: str | None,
    sweep_args: Sequence[str],
    *,
    working_dir: Path,
    excludes: Sequence[str] = (),
    submission_id: str | None = None,
    token: str | None = None,
    sweep_name: str | None = None,
) -> str:
    """Submit ``launch.py sweep <sweep_args>`` as a Ray Job; returns the job id.

    ``sweep_args`` are the sweep options (``--config``, ``--set``, ``--name``, ``--storage``)
    exactly as a user would give them to ``launch.py sweep``; relative paths are resolved on
    the cluster against the uploaded project directory. Results must go to storage every
    node shares (an NFS path or ``s3://...``): the job's own working directory is temporary.
    ``sweep_name`` labels the job in the dashboard (metadata ``mmr_sweep_name``).
    """
    args = [str(a) for a in sweep_args]
    if not any(a == "--storage" or a.startswith("--storage=") for a in args):
        logger.warning(
            "no --storage given: the sweep writes to its config's `storage`; on a cluster "
            "that must be shared storage (NFS path or s3://...), not a relative directory"
        )
    return submit_job(
        address,
        sweep_entrypoint(args),
        working_dir=working_dir,
        excludes=excludes,
        submission_id=submission_id,
        metadata={"mmr_sweep": "sweep", **({"mmr_sweep_name": sweep_name} if sweep_name else {})},
        token=token,
    )


def _not_found(url: str, job_id: str, exc: RuntimeError) -> JobClientError | None:
    if "404" in str(exc) or "does not exist" in str(exc):
        return JobClientError(
            f"no job {job_id!r} on the cluster at {url}: use the id printed by "
            "`launch.py submit` (`ray job list --address URL` lists them all)"
        )
    return None


def job_status(
    address: str | None, job_id: str, *, tail: int = 40, token: str | None = None
) -> tuple[str, str]:
    """State of a submitted job and the last ``tail`` lines of its logs.

    Returns ``(status, log_tail)`` with status one of PENDING, RUNNING, SUCCEEDED, FAILED,
    STOPPED. When the job ended without logs (e.g. its environment could not be set up),
    Ray's message about it is the log tail, prefixed with ``[ray]``.
    """
    client, url = _client(address, token)
    try:
        info = _call(url, client.get_job_info, job_id)
        logs = _call(url, client.get_job_logs, job_id)
    except RuntimeError as exc:
        err = _not_found(url, job_id, exc)
        if err is None:
            raise
        raise err from None
    status = str(getattr(info.status, "value", info.status))
    lines = logs.splitlines()[-tail:] if tail > 0 else []
    if status in {"FAILED", "STOPPED"} and info.message and not lines:
        lines = [f"[ray] {info.message}"]
    return status, "\n".join(lines)


def wait_for_job(
    address: str | None,
    job_id: str,
    *,
    timeout: float = 600.0,
    poll: float = 1.0,
    token: str | None = None,
) -> str:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; returns that status."""
    client, url = _client(address, token)
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = _call(url, client.get_job_status, job_id)
        except RuntimeError as exc:
            err = _not_found(url, job_id, exc)
            if err is None:
                raise
            raise err from None
        status = str(getattr(status, "value", status))
        if status in TERMINAL_STATES:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s")
        time.sleep(poll)


def stop_job(address: str | None, job_id: str, *, token: str | None = None) -> bool:
    """Ask the cluster to stop a job; True if it was running."""
    client, url = _client(address, token)
    try:
        return bool(_call(url, client.stop_job, job_id))
    except RuntimeError as exc:
        err = _not_found(url, job_id, exc)
        if err is None:
            raise
        raise err from None
