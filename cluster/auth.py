"""Ray token authentication on the client side: where the token comes from, and token mode.

Ray (2.52+) reads the token from, in this order: ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH`` (unreadable or empty is an error, not "no token"), then
``~/.ray/auth_token``. A Ray *driver* (``ray.init(address=...)``) only sends it when
``RAY_AUTH_MODE=token`` is set in its environment; without that, connecting to a cluster with
token auth fails with "Failed to connect" (root cause ``InvalidAuthToken``), even though the
token is right there. :func:`enable_client_token_auth` closes that gap before ``ray.init``.

Tokens are never logged or printed here: only where they came from.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from mmr.errors import UserInputError

__all__ = ["TOKEN_HELP", "TokenError", "enable_client_token_auth", "find_token"]

logger = logging.getLogger(__name__)

TOKEN_HELP = (
    "provide the cluster's token: export RAY_AUTH_TOKEN=<token>, or "
    "RAY_AUTH_TOKEN_PATH=<file holding it>, or put it in ~/.ray/auth_token "
    "(on the head node, `ray get-auth-token` prints it; on KubeRay it is the `auth_token` "
    "key of the Secret named after the cluster)"
)


class TokenError(UserInputError):
    """A token source is configured but unusable; the message names it (never the token)."""


def _read_token_file(path: Path, origin: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenError(
            f"cannot read the Ray auth token file {path} ({origin}): {exc.strerror}"
        ) from None
    if not token:
        raise TokenError(f"the Ray auth token file {path} ({origin}) is empty")
    return token


def find_token(token: str | None = None) -> tuple[str | None, str]:
    """The token a client should send, and where it came from.

    Args:
        token: an explicit token; wins over every other source.

    Returns:
        ``(token, source)``; ``(None, "none")`` when no source has one. ``source`` is safe to
        log (a variable name or a file path).
    """
    if token and token.strip():
        return token.strip(), "argument"
    env_token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_token:
        return env_token, "RAY_AUTH_TOKEN"
    env_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if env_path:
        path = Path(env_path).expanduser()
        return _read_token_file(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return _read_token_file(default, "default token file"), str(default)
    return None, "none"


def enable_client_token_auth() -> str | None:
    """Call before ``ray.init(address=...)``: token mode on for this process if a token exists.

    Sets ``RAY_AUTH_MODE=token`` (inherited by child processes) when the variable is unset
    and :func:`find_token` finds a token; an explicit ``RAY_AUTH_MODE`` is left alone.
    Returns the token's source when token mode is (now) on with a token, else None.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        return None
    secret, source = find_token()
    if secret is None:
        return None
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        _refresh_ray_auth_config()
        logger.info("Ray token authentication on (token from %s)", source)
    return source


def _refresh_ray_auth_config() -> None:
    """Make an already imported Ray see the new RAY_AUTH_MODE.

    Ray reads its config when ``ray._raylet`` is imported; Ray's own token setup refreshes it
    the same way after changing the variable (``Config.initialize``) and drops the cached
    token (``AuthenticationTokenLoader.reset_cache``).
    """
    if "ray._raylet" not in sys.modules:
        return  # read fresh on import
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
