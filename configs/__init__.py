"""The shipped configs: training configs (``tiny.yaml``, ``mvtec.yaml``, ...) and sweep configs
(``demo_sweep.yaml``, ``sweep_*.yaml``), installed as package data so that ``search.config``
finds them (``configs/...`` paths in a sweep, the demo sweep) without a checkout."""
