"""The driver's side of a cluster: is the address reachable, is this a job's interpreter, and
where a job's driver may keep its working directory.

``ray.init(address=...)`` on an address where no GCS answers does not fail: it retries for
minutes, printing GCS time-outs with the address rewritten to the node's IP. The checks here
answer in seconds, with the address as the user typed it. Imports neither torch nor Ray.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from mmr.errors import UserInputError

__all__ = [
    "RAY_JOB_ENV_VAR",
    "check_gcs_address",
    "in_ray_job",
    "leave_job_working_dir",
    "missing_dependency_message",
]

logger = logging.getLogger(__name__)

# Set by Ray's job supervisor in the environment of every job entrypoint (the job's config).
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Top-level modules of mmr-sweep's dependencies: missing one means a wrong interpreter.
_DEPENDENCIES = frozenset(
    {"torch", "torchvision", "timm", "einops", "torchmetrics", "ray", "optuna", "yaml",
     "pandas", "numpy", "scipy", "sklearn", "matplotlib", "PIL", "tqdm", "cmaes",
     "tensorboardX", "optuna_dashboard"}
)  # fmt: skip
_ADDRESS_HELP = (
    "check that the cluster is up (`ray status` on the head) and that the address is the "
    "head's GCS address HOST:6379 as printed by `ray start --head` (or ray://HOST:10001 for "
    "Ray Client); from outside the cluster network submit a Ray Job instead: "
    "`launch.py submit --address http://HEAD:8265`"
)


def _split_address(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``ray://HOST:PORT`` -> (host, port); None for anything else."""
    text = address.strip()
    if text.startswith("ray://"):
        text = text[len("ray://") :]
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_gcs_address(address: str, *, timeout: float = 10.0) -> None:
    """Fail in seconds, naming ``address`` as typed, when no Ray cluster can answer there.

    ``auto`` is checked through ``RAY_ADDRESS`` when that is set (a Ray Job's driver has it);
    without it Ray's own lookup of a local cluster fails quickly by itself. Only reachability
    is checked: the GCS handshake (and the token) is Ray's.

    Raises:
        UserInputError: the host does not resolve, nothing listens on the port, the port does
            not answer within ``timeout`` seconds, or an HTTP server (e.g. the dashboard)
            answers there instead of the GCS.
    """
    shown = address
    if address.strip() == "auto":
        address = os.environ.get("RAY_ADDRESS", "").strip()
        if not address or address == "auto":
            return
        shown = f"auto (RAY_ADDRESS={address})"
    if address.startswith(("http://", "https://")):
        raise UserInputError(
            f"--address {shown} is a dashboard URL: `sweep`/`resume --address` join the "
            "cluster's GCS (HOST:6379 or ray://HOST:10001); `launch.py submit --address "
            f"{address}` runs the sweep as a Ray Job through the dashboard"
        )
    parts = _split_address(address)
    if parts is None:
        raise UserInputError(
            f"--address {shown!r} is not a cluster address: pass HOST:6379 (the head's GCS), "
            "ray://HOST:10001 (Ray Client) or auto (inside the cluster)"
        )
    host, port = parts
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise UserInputError(
            f"cannot connect to the Ray cluster at {shown}: host {host!r} is unknown "
            f"({exc.strerror}); {_ADDRESS_HELP}"
        ) from None
    except TimeoutError:
        raise UserInputError(
            f"cannot connect to the Ray cluster at {shown}: {host}:{port} did not answer "
            f"within {timeout:g} s (a firewall, or not this network); {_ADDRESS_HELP}"
        ) from None
    except OSError as exc:
        why = (
            "nothing listens there (connection refused)"
            if exc.errno == errno.ECONNREFUSED
            else exc.strerror or str(exc)
        )
        raise UserInputError(
            f"cannot connect to the Ray cluster at {shown}: {why}; {_ADDRESS_HELP}"
        ) from None
    with conn:
        answer = _answer_to_http1(conn, timeout=timeout)
    if answer is None:
        raise UserInputError(
            f"{shown} accepts connections but does not answer like a Ray GCS (no reply "
            f"within {timeout:g} s): check the port; {_ADDRESS_HELP}"
        )
    if answer.startswith(b"HTTP/1."):
        raise UserInputError(
            f"{shown} answers HTTP, so it is not the cluster's GCS port (likely the "
            "dashboard, 8265): `sweep`/`resume --address` take HOST:6379 or "
            f"ray://HOST:10001; to submit through the dashboard use `launch.py submit "
            f"--address http://{host}:{port}`"
        )


def _answer_to_http1(conn: socket.socket, *, timeout: float) -> bytes | None:
    """The first bytes the server on ``conn`` sends after a plain HTTP/1.0 request.

    The GCS and Ray Client speak gRPC (HTTP/2 only): they answer at once with an HTTP/2
    SETTINGS frame (a TLS server closes the connection); a web server answers with an
    ``HTTP/1.x`` status line. None when nothing came back within ``timeout`` seconds.
    """
    try:
        conn.settimeout(timeout)
        conn.sendall(b"GET / HTTP/1.0\r\nHost: ray\r\n\r\n")
        return conn.recv(8)
    except TimeoutError:
        return None
    except OSError:
        return b""  # reset or closed: not a web server


def in_ray_job() -> bool:
    """True inside a Ray Job's entrypoint (the job supervisor sets its config variable)."""
    return RAY_JOB_ENV_VAR in os.environ


def leave_job_working_dir() -> Path | None:
    """In a Ray Job's driver, move the working directory out of the job's unpacked package.

    A job's ``working_dir`` is unpacked under the node's session dir
    (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``) and the entrypoint runs
    there. Ray unpacks it again, with ``overwrite=True`` (delete, then extract), on each node
    that first starts a worker of the job. Two nodes on one machine share the session dir
    (plain ``ray start`` twice: both in ``/tmp/ray``), so when the trials start on the second
    node, the directory the driver runs in is deleted and replaced: the driver's working
    directory no longer exists, ``os.getcwd()`` fails, and oneMKL inside libtorch_cpu aborts
    the process when torch is first imported ("Intel oneMKL FATAL ERROR: Cannot load
    .../libtorch_cpu.so", exit 2; Tune imports torch through tensorboardX). Every user path
    is absolute once the sweep is resolved, so the driver can work from the temp dir instead.

    Returns the directory changed to, or None when the driver is not in a job package.
    """
    try:
        cwd: Path | str = Path(os.getcwd())
    except FileNotFoundError:  # already deleted under us: anywhere that exists is better
        cwd = "a deleted directory"
    else:
        if not (cwd.name.startswith("_ray_pkg_") and cwd.parent.name == "working_dir_files"):
            return None
    target = Path(tempfile.gettempdir())
    os.chdir(target)
    logger.info("job driver works in %s (Ray may re-extract its package %s)", target, cwd)
    return target


def missing_dependency_message(exc: ModuleNotFoundError) -> str | None:
    """What to do when a dependency of mmr-sweep is missing from this interpreter.

    None when ``exc`` is not about one of the project's dependencies. Inside a Ray Job this
    almost always means the job's ``python`` (found on the head's PATH) is not the
    interpreter Ray and mmr-sweep are installed in.
    """
    name = (exc.name or "").split(".")[0]
    if name not in _DEPENDENCIES:
        return None
    where = f"{sys.executable} (Python {sys.version.split()[0]})"
    if in_ray_job():
        return (
            f"this Ray Job runs `python` from the head node's PATH, which is {where} and "
            f"has no {name!r} (a dependency of mmr-sweep): the cluster was started from "
            "another environment than the one mmr-sweep is installed in. Start Ray on the "
            "head from that environment (activate it, then `ray start --head ...`, so its "
            "`python` comes first on PATH), or run the cluster from the image built with "
            "cluster/Dockerfile (or a `ray up` config in cluster/)"
        )
    return (
        f"{where} has no {name!r}, a dependency of mmr-sweep: run launch.py with the "
        "interpreter of the environment where mmr-sweep is installed (activate it), or "
        "install it there with `pip install -e .` from the project directory"
    )
