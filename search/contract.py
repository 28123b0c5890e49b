"""The trial contract: what a trial reports, what its config carries besides the sampled
params, the files trials and the driver share, and how many trials a sweep plans.

The trainable writes these names and the driver (searcher, schedulers, callbacks, results,
benchmarks) reads them; this module imports neither Ray nor the trainable, so reading an
experiment's results does not pull in the trial machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from search.config import SweepSpec

__all__ = [
    "CONFIRM_DIR",
    "CONFIRM_FILE",
    "CONFIRM_KEY",
    "FAILED_MARKER",
    "JOURNAL_FILE",
    "META_KEYS",
    "OBJECTIVE",
    "REPEATED_FILE",
    "ROUNDS_KEY",
    "ROUND_METADATA",
    "SPEC_FILE",
    "TEST_SCORES_FILE",
    "WORKER_FILE",
    "planned_trials",
]

# Reported with every result.
OBJECTIVE = "objective"  # the reported key the searcher and scheduler optimise
ROUNDS_KEY = "rounds_total"  # rounds of a full run: a trial that reached it is done

# Trial-config keys that are not params: the searcher adds them, the trainable drops them.
CONFIRM_KEY = "confirm_of"  # a confirmation trial's: the search trial whose config it trains
META_KEYS = ("baseline", "category", "study_trial", CONFIRM_KEY)

# Files in a trial's directory (on the experiment's storage).
FAILED_MARKER = "trial_failed.json"  # a deterministic failure: retries end at once
WORKER_FILE = "worker.json"  # pid, host and Ray node of the process running the trial
REPEATED_FILE = "result_repeated.json"  # result.json rows of rounds trained again, superseded
ROUND_METADATA = "mmr_round"  # a round checkpoint's metadata key: the round it was saved at
TEST_SCORES_FILE = "test_scores.json"  # a confirmation trial's test-half image scores

# The sweep's own files in the experiment directory (the local mirror for URI storage).
SPEC_FILE = "sweep.json"
JOURNAL_FILE = "study.journal"
CONFIRM_DIR = "confirm"  # the confirmation runs' own Tune experiment, inside the experiment
CONFIRM_FILE = "confirm.json"  # what they showed (search.confirm)


def planned_trials(spec: SweepSpec) -> int:
    """Trials a sweep runs in all: ``search.num_trials`` per study, and per-category sweeps
    (``objective.per_category``) run one study per category."""
    n = spec.sweep.search.num_trials
    return n * len(spec.categories) if spec.sweep.objective.per_category else n
