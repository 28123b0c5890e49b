"""Old home of :mod:`search.callbacks.result_files`, kept for experiments saved before issue 23.

Tune pickles a sweep's callbacks by module path in the experiment (``tuner.pkl``); resuming
an older experiment unpickles them from here. New code imports ``search.callbacks.result_files``.
"""

from search.callbacks.result_files import RoundCSVLogger, RoundJsonLogger  # noqa: F401
