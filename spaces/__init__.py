"""Search spaces: YAML files (``demo.yaml``, ``paper.yaml`` here) turned into Optuna
define-by-run functions. The code lives in ``spaces.space``; this re-exports its public names.
"""

from spaces.space import SPACES_DIR, Param, Space, SpaceError, load_space, read_space

__all__ = ["Param", "Space", "SpaceError", "load_space", "read_space", "SPACES_DIR"]
