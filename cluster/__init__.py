"""Cluster side of mmr-sweep: `ray up` / KubeRay configs (YAML files here) and the client of
Ray's job API (:mod:`cluster.jobs`, :mod:`cluster.auth`) and the driver's checks before it
joins a cluster (:mod:`cluster.driver`) and its Ray start-up (:mod:`cluster.ray_start`, which
imports Ray inside its functions only). Imports neither torch nor Ray."""
