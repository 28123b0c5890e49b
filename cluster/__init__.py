"""Cluster side of mmr-sweep: `ray up` / KubeRay configs (YAML files here) and the client of
Ray's job API (:mod:`cluster.jobs`, :mod:`cluster.auth`) and the driver's checks before it
joins a cluster (:mod:`cluster.driver`). Imports neither torch nor Ray."""
