"""Can the cluster run one trial, counting the nodes its autoscaler can still start?

The project's cluster files start GPU workers at ``min_workers: 0``: a GPU sweep then starts
on a cluster whose only live node is a CPU head. Looking at live nodes alone would refuse
it; instead, when no live node fits a trial, the autoscaler is asked for one
(``ray.autoscaler.sdk.request_resources``) and the driver waits, with a time limit, until
such a node joins. A cluster without an autoscaler (``ray start`` by hand, the embedded
local Ray) is still refused at once.

How the autoscaler is seen (Ray 2.60):

- autoscaler v2 publishes its node types in the GCS (``get_cluster_config()``, which Ray
  Train uses the same way): a trial that fits none of them is refused at once;
- autoscaler v1 publishes only a status report (what ``ray status`` prints): which node types
  are launching, never the types it could launch. Without an autoscaling config its
  read-only stand-in names every node ``node_<id>`` and can start nothing. With one, the
  request either shows up as a launch within ``launch_wait_s`` or the sweep is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray

from mmr.errors import UserInputError
from search.config import ResourcesConfig

__all__ = ["NODE_WAIT_ENV", "check_resources", "autoscaler_node_types"]

log = logging.getLogger(__name__)

# Seconds to wait for the autoscaler's node (GPU nodes take minutes to boot and pull images).
NODE_WAIT_ENV = "MMR_NODE_WAIT_S"
DEFAULT_NODE_WAIT_S = 900.0
# Seconds a v1 autoscaler has to start launching a node for the request.
DEFAULT_LAUNCH_WAIT_S = 60.0
_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS


def _need(res: ResourcesConfig) -> dict[str, float]:
    need = {"CPU": res.cpu, "GPU": res.gpu, **res.custom}
    return {k: float(v) for k, v in need.items() if v > 0}


def _fits(node: Mapping[str, float], need: Mapping[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in need.items())


def _alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def autoscaler_node_types() -> dict[str, dict[str, float]] | None:
    """Node types the cluster's autoscaler may start, ``{name: resources}``.

    ``{}`` when an autoscaler runs that does not publish its node types (Ray's v1
    autoscaler); None when there is no autoscaler that can start nodes.
    """
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return {g.name: dict(g.resources) for g in config.node_group_configs if g.max_count != 0}
    report = _autoscaler_report()
    if report is None:
        return None
    from ray.autoscaler._private.util import format_readonly_node_type

    mapping = report.get("node_type_mapping") or {}
    if all(kind == format_readonly_node_type(node) for node, kind in mapping.items()):
        return None  # the read-only stand-in of a cluster without autoscaling config
    return {}


def _autoscaler_report() -> dict[str, Any] | None:
    """The v1 autoscaler's last status report (``ray status``), or None."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_STATUS_KEY)
    if not raw:
        return None
    try:
        return json.loads(raw).get("autoscaler_report")
    except ValueError:
        return None


def _launching(report: Mapping[str, Any] | None) -> bool:
    return bool(report and (report.get("pending_launches") or report.get("pending_nodes")))


def _describe(nodes: list[dict[str, float]], res: ResourcesConfig) -> str:
    shown = ("CPU", "GPU", *res.custom)
    return "; ".join(
        ", ".join(f"{k}={v:g}" for k, v in sorted(node.items()) if k in shown) for node in nodes
    )


def check_resources(
    res: ResourcesConfig,
    *,
    write: Callable[[str], None] | None = None,
    wait_s: float | None = None,
    launch_wait_s: float = DEFAULT_LAUNCH_WAIT_S,
    poll_s: float = 1.0,
) -> None:
    """Returns once some node can run one trial; fails when none is up or can be started.

    Args:
        res: the sweep's resources per trial.
        write: where to say that the driver waits for the autoscaler.
        wait_s: most seconds to wait for an autoscaled node (default ``$MMR_NODE_WAIT_S``,
            else 900).
        launch_wait_s: seconds a v1 autoscaler has to start launching a node.
        poll_s: seconds between looks at the cluster.

    Raises:
        UserInputError: no live node fits and the autoscaler cannot, or did not in time,
            start one; the message names the resources and what to change.
    """
    need = _need(res)
    nodes = _alive_nodes()
    if any(_fits(node, need) for node in nodes):
        return
    types = autoscaler_node_types()
    if types is None or (types and not any(_fits(r, need) for r in types.values())):
        raise _no_node(res, need, nodes, types)
    if wait_s is None:
        wait_s = float(os.environ.get(NODE_WAIT_ENV, DEFAULT_NODE_WAIT_S))
    from ray.autoscaler.sdk import request_resources

    if write is not None:
        write(
            f"no live node fits one trial {need}: asked the cluster's autoscaler for one, "
            f"waiting up to {wait_s:g} s (${NODE_WAIT_ENV})"
        )
    started = time.monotonic()
    request_resources(bundles=[need])
    try:
        seen_launch = bool(types)  # v2 said a node type fits: nothing to confirm
        while time.monotonic() - started < wait_s:
            if any(_fits(node, need) for node in _alive_nodes()):
                log.info("a node for %s joined after %.0f s", need, time.monotonic() - started)
                return
            seen_launch = seen_launch or _launching(_autoscaler_report())
            if not seen_launch and time.monotonic() - started > launch_wait_s:
                raise UserInputError(
                    f"resources per trial {need} fit on no live node (nodes: "
                    f"{_describe(nodes, res) or 'none'}) and the cluster's autoscaler "
                    f"started no node for them within {launch_wait_s:g} s: none of its node "
                    "types has them, or it is at max_workers; lower resources.* or add a "
                    "node type that has them (`ray status` on the head shows the autoscaler)"
                )
            time.sleep(poll_s)
        raise UserInputError(
            f"no node with resources per trial {need} joined within {wait_s:g} s after the "
            "autoscaler was asked for one: check `ray status` and the autoscaler log on the "
            "head (failed launches, cloud quota, images), or wait longer with "
            f"{NODE_WAIT_ENV}=SECONDS"
        )
    finally:
        # A standing request keeps nodes up for good; Tune's queued trials now ask instead.
        request_resources(bundles=[])


def _no_node(
    res: ResourcesConfig,
    need: dict[str, float],
    nodes: list[dict[str, float]],
    types: dict[str, dict[str, float]] | None,
) -> UserInputError:
    if res.gpu and not any(n.get("GPU") for n in [*nodes, *(types or {}).values()]):
        hint = (
            "this cluster has no GPU: set resources.gpu=0 (training then runs on CPU) or "
            "connect to a GPU cluster with --address"
        )
    else:
        hint = "lower resources.* or add nodes that have them"
    kinds = ""
    if types:
        shown = ("CPU", "GPU", *res.custom)
        kinds = (
            " and none of the autoscaler's node types ("
            + "; ".join(
                f"{name}: " + ", ".join(f"{k}={v:g}" for k, v in sorted(r.items()) if k in shown)
                for name, r in sorted(types.items())
            )
            + ")"
        )
    return UserInputError(
        f"resources per trial {need} fit on no node of the cluster "
        f"(nodes: {_describe(nodes, res) or 'none'}){kinds}: {hint}"
    )
