"""Overrides that make a test trial take a few seconds: 32 px, a 2-block ViT, 4 rounds of one
epoch, on the ``disk`` category (imported as ``from fast import FAST``, like raycluster), and
``cli``: ``launch.py`` run as a user runs it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAST = [
    "data.resize=40",
    "data.image_size=32",
    "data.categories=[disk]",
    "model.encoder_depth=2",
    "train.epochs=4",
    "train.eval_every=1",
    "train.warmup_epochs=1",
    "train.lr_milestones=[3]",
    "train.batch_size=4",
    "eval.blur_sigma=0.5",
]
# A test sweep's: the demo sweep confirms its best afterwards (4 more trials), so tests opt in
# where they test confirmation.
FAST_SWEEP = [*FAST, "search.confirm.top_k=0"]


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python launch.py ARGS...`` from the checkout, output captured as text."""
    return subprocess.run(
        [sys.executable, "launch.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
