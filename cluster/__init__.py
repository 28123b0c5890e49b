"""Cluster side of mmr-sweep: `ray up` / KubeRay configs (YAML files here) and the client of
Ray's job API (:mod:`cluster.jobs`, :mod:`cluster.auth`). Imports neither torch nor Ray."""
