"""The sweep's Ray Tune callbacks, one module each by what they do.

- :mod:`~search.callbacks.progress`: the live terminal table (``ProgressTable``);
- :mod:`~search.callbacks.result_files`: the JSON/CSV result-file loggers that keep each round
  once after a restart (``RoundJsonLogger``, ``RoundCSVLogger``);
- :mod:`~search.callbacks.tensorboard`: TensorBoard event files (``TrialTensorBoard``);
- :mod:`~search.callbacks.lifecycle`: trial and experiment lifecycle (``EndDeterministicFailures``,
  ``MirrorSync``);
- :mod:`~search.callbacks.tracking`: MLflow / W&B. Never imported here: it imports MLflow and
  W&B (seconds), so the sweep imports it only when ``tracking:`` is set.
"""
