"""Old home of :mod:`search.callbacks.tensorboard`, kept for experiments saved before issue 23.

Tune pickles a sweep's callbacks by module path in the experiment (``tuner.pkl``); resuming
an older experiment unpickles them from here. New code imports ``search.callbacks.tensorboard``.
"""

from search.callbacks.tensorboard import TrialTensorBoard  # noqa: F401
