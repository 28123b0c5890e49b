"""MMR (Masked Multi-scale Reconstruction) for industrial anomaly detection.

This package holds the model, data, training, metrics and config. It imports neither Ray nor
Optuna: the search layer (``search/``) builds on it.
"""

__version__ = "0.1.0"
