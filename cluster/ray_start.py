"""The driver's Ray start-up: join a cluster at an address, or start an embedded local Ray
with its dashboard on 127.0.0.1.

Ray is imported inside the functions only: ``cluster`` stays importable without Ray (the job
client runs where Ray may be missing or slow to import).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from mmr.errors import UserInputError

__all__ = ["init_ray"]


def init_ray(
    address: str | None = None,
    *,
    dashboard: bool = True,
    write: Callable[[str], None] = print,
    job_metadata: dict[str, str] | None = None,
) -> None:
    """Connects to a cluster, or starts an embedded local Ray (dashboard on 127.0.0.1).

    ``job_metadata`` labels this driver's job in the dashboard (Jobs page, ``/api/jobs/``).
    """
    import ray

    if ray.is_initialized():
        return
    job_config = ray.job_config.JobConfig(metadata=dict(job_metadata or {}))
    if address:
        from cluster.auth import enable_client_token_auth
        from cluster.driver import check_gcs_address

        # ray.init on an address where nothing answers retries for many minutes.
        check_gcs_address(address)
        # A driver joins a token-auth cluster only with RAY_AUTH_MODE=token set.
        enable_client_token_auth()
        try:
            ray.init(address=address, logging_level=logging.WARNING, job_config=job_config)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserInputError(
                f"cannot connect to the Ray cluster at {address!r}: {exc}. Check the address "
                "(HOST:6379 or ray://HOST:10001) and that the cluster is up; for a cluster with "
                "token authentication export RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) and "
                "RAY_AUTH_MODE=token"
            ) from exc
        return
    try:
        context = ray.init(
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            job_config=job_config,
        )
    except ray.exceptions.AuthenticationError as exc:
        raise UserInputError(
            f"the embedded Ray cannot set up token authentication: {exc}. Point "
            "RAY_AUTH_TOKEN_PATH at an existing token file (or unset it: Ray then creates "
            "~/.ray/auth_token), or export RAY_AUTH_TOKEN"
        ) from exc
    url = getattr(context, "dashboard_url", None)
    if dashboard and url:
        write(f"Ray dashboard: http://{url} (local only; {_dashboard_login()})")


def _dashboard_login() -> str:
    """How to log in to the embedded dashboard: where its token is (never the token itself).

    ``ray.init`` sets RAY_AUTH_MODE=token when it turns token auth on by default, and reads
    the token in this order: RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file, ~/.ray/auth_token.
    """
    from cluster.auth import TokenError, find_token

    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode != "token":
        return f"token auth off: RAY_AUTH_MODE={mode}" if mode else "token auth off"
    try:
        secret, source = find_token()
    except TokenError:
        secret, source = None, ""
    if secret is None:
        return "token auth on"
    where = "$RAY_AUTH_TOKEN" if source == "RAY_AUTH_TOKEN" else source.split("=", 1)[-1]
    return f"token auth on: log in with the token in {where}"
