"""The search's bookkeeping without a Ray cluster: the study a sweep leaves, the best trial,
the scheduler settings a sweep accepts.

``StudySearch`` is driven the way Tune drives it (``suggest``, ``on_trial_result``,
``on_trial_complete``), and the study is read back from its journal file.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mmr.config import Config, ConfigError
from search.contract import OBJECTIVE, ROUNDS_KEY
from search.resolve import resolve_sweep
from search.results import best_trials
from search.samplers import study_storage
from search.searcher import RetryingLimiter, StudySearch
from spaces import load_space

SPACE = {
    "mask_ratio": {"type": "float", "low": 0.1, "high": 0.8},
    "patch_size": {"type": "categorical", "choices": [8, 16]},
}
SPACE_KEYS = {"model.mask_ratio", "model.patch_size"}
ROUNDS = 4
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def make_search(exp: Path, *, category: str | None = None) -> StudySearch:
    space = load_space(SPACE)
    return StudySearch(
        space,
        baseline=space.baseline(Config()),
        study_name="s",
        storage=study_storage(exp),
        sampler=optuna.samplers.RandomSampler(seed=0),
        category=category,
    )


def result(round_: int, value: float) -> dict:
    return {"training_iteration": round_, OBJECTIVE: value, ROUNDS_KEY: ROUNDS}


def reread(exp: Path) -> dict[int, optuna.trial.FrozenTrial]:
    """The study as a fresh process sees it (from the journal file)."""
    study = optuna.load_study(study_name="s", storage=study_storage(exp))
    return {t.number: t for t in study.get_trials()}


def run_rounds(search: StudySearch, trial_id: str, values: list[float]) -> None:
    for i, value in enumerate(values, start=1):
        search.on_trial_result(trial_id, result(i, value))


def test_study_records_complete_pruned_and_failed_trials_with_their_rounds(tmp_path):
    search = make_search(tmp_path, category="disk")
    configs = {t: search.suggest(t) for t in ("base", "full", "stopped", "broken", "late")}

    # The first trial is the base config, unchanged, and marked.
    assert configs["base"]["baseline"] is True
    assert configs["base"]["model.mask_ratio"] == Config().model.mask_ratio
    assert configs["base"]["model.patch_size"] == Config().model.patch_size
    assert [c["baseline"] for c in configs.values()] == [True, False, False, False, False]
    assert [c["study_trial"] for c in configs.values()] == [0, 1, 2, 3, 4]
    assert {c["category"] for c in configs.values()} == {"disk"}
    meta = {"baseline", "study_trial", "category"}
    assert all(set(c) == SPACE_KEYS | meta for c in configs.values())

    # Every round: Tune reports each result, the last one again at completion.
    run_rounds(search, "base", [0.5, 0.6, 0.7, 0.8])
    search.on_trial_complete("base", result(4, 0.8))
    run_rounds(search, "full", [0.4, 0.5, 0.6])
    search.on_trial_complete("full", result(4, 0.65))  # the final round, passed only here
    # Stopped by ASHA at round 2: Tune passes the stopping result to on_trial_complete only.
    run_rounds(search, "stopped", [0.9])
    search.on_trial_complete("stopped", result(2, 0.95))
    # An error after two rounds: FAIL, whatever it reported before.
    run_rounds(search, "broken", [0.3, 0.99])
    search.on_trial_complete("broken", error=True)
    # An error passed together with a result is a failure too (OptunaSearch: COMPLETE).
    run_rounds(search, "late", [0.2])
    search.on_trial_complete("late", result(1, 0.2), error=True)

    trials = reread(tmp_path)
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == pytest.approx(0.8)
    assert trials[0].intermediate_values == pytest.approx({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8})
    assert trials[1].state == TrialState.COMPLETE and trials[1].value == pytest.approx(0.65)
    assert trials[1].intermediate_values == pytest.approx({1: 0.4, 2: 0.5, 3: 0.6})
    # PRUNED, valued (as Optuna's pruners do) by its last intermediate value, which is there.
    assert trials[2].state == TrialState.PRUNED
    assert trials[2].intermediate_values == pytest.approx({1: 0.9, 2: 0.95})
    assert trials[2].value == pytest.approx(0.95)
    assert trials[3].state == TrialState.FAIL and trials[3].value is None
    assert trials[3].intermediate_values == pytest.approx({1: 0.3, 2: 0.99})
    assert trials[4].state == TrialState.FAIL


def test_a_failed_trial_run_again_gets_a_new_record_marked_as_its_retry(tmp_path):
    search = make_search(tmp_path)
    limiter = RetryingLimiter(search, max_concurrent=1)
    config = limiter.suggest("t")
    run_rounds(limiter, "t", [0.5])
    limiter.on_trial_complete("t", error=True)
    assert limiter.suggest("next") is not None  # the failed trial no longer counts as live
    limiter.on_trial_complete("next", result(ROUNDS, 0.1))

    # `resume --retry-failed`: the same Tune trial (same id) reports again, then completes.
    # Ray's own limiter drops that completion, since the trial is no longer live for it.
    run_rounds(limiter, "t", [0.5, 0.6, 0.7])
    assert limiter.suggest("extra") is None  # the retried trial counts against the limit
    limiter.on_trial_complete("t", result(ROUNDS, 0.8))

    # A retry whose first result is its last: ASHA stops it at the final round, and Tune
    # passes that result to on_trial_complete only.
    other = limiter.suggest("v")
    limiter.on_trial_complete("v", error=True)
    limiter.on_trial_complete("v", result(ROUNDS, 0.9))

    trials = reread(tmp_path)
    retried = {
        RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t for t in trials.values()
    }
    assert retried[other["study_trial"]].state == TrialState.COMPLETE
    assert trials[other["study_trial"]].state == TrialState.FAIL
    original, retry = trials[config["study_trial"]], retried[config["study_trial"]]
    assert original.state == TrialState.FAIL  # Optuna never rewrites a finished trial
    assert retry.state == TrialState.COMPLETE and retry.value == pytest.approx(0.8)
    assert retry.params == original.params
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == original.number
    assert retry.intermediate_values == pytest.approx({1: 0.5, 2: 0.6, 3: 0.7})
    # Nothing is left RUNNING, and no other trial claims the original's params as a retry.
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    assert sorted(t.number for t in trials.values() if "failed_trial" in t.system_attrs) == [
        retry.number,
        retried[other["study_trial"]].number,
    ]

    # A retry that fails again before reporting leaves the failure as it was: no new record.
    search2 = make_search(tmp_path / "again")
    search2.suggest("u")
    search2.on_trial_complete("u", error=True)
    search2.on_trial_complete("u", error=True)
    assert [t.state for t in reread(tmp_path / "again").values()] == [TrialState.FAIL]


def test_a_finished_trial_reporting_again_changes_nothing(tmp_path):
    search = make_search(tmp_path)
    search.suggest("t")
    search.on_trial_complete("t", result(ROUNDS, 0.7))
    search.on_trial_result("t", result(ROUNDS, 0.1))
    search.on_trial_complete("t", result(ROUNDS, 0.1))
    (only,) = reread(tmp_path).values()
    assert only.state == TrialState.COMPLETE and only.value == pytest.approx(0.7)


# ----------------------------------------------------------------------------- best trial


def rows(*trials: tuple) -> pd.DataFrame:
    """``load_trials``-like rows: (trial, state, rounds, objective, baseline, category)."""
    cols = ["trial", "state", "rounds", OBJECTIVE, "baseline", "category"]
    return pd.DataFrame([dict(zip(cols, t, strict=True)) for t in trials])


def test_a_fully_trained_trial_beats_a_stopped_one_with_a_higher_value():
    df = rows(
        ("base", "done", 4, 0.70, True, None),
        ("early", "stopped", 1, 0.99, False, None),  # a lucky first rung
        ("mid", "stopped", 2, 0.95, False, None),
        ("crashed", "failed", 3, 0.97, False, None),
        ("going", "running", 3, 0.98, False, None),
        ("good", "done", 4, 0.80, False, None),
        ("worse", "done", 4, 0.75, False, None),
    )
    assert best_trials(df)[None]["trial"] == "good"


def test_while_no_trial_has_finished_the_furthest_trained_is_the_best_so_far():
    df = rows(
        ("base", "running", 3, 0.70, True, None),
        ("early", "stopped", 1, 0.99, False, None),
        ("other", "running", 3, 0.72, False, None),
        ("new", "pending", 0, None, False, None),
    )
    assert best_trials(df)[None]["trial"] == "other"
    assert best_trials(rows(("new", "pending", 0, None, True, None))) == {}


def test_each_category_gets_its_own_best_trial():
    df = rows(
        ("d0", "done", 4, 0.60, True, "disk"),
        ("d1", "stopped", 2, 0.95, False, "disk"),
        ("d2", "done", 4, 0.65, False, "disk"),
        ("g0", "done", 4, 0.90, True, "grid"),
        ("g1", "done", 4, 0.50, False, "grid"),
    )
    best = best_trials(df)
    assert {c: r["trial"] for c, r in best.items()} == {"disk": "d2", "grid": "g0"}


# ----------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize(
    "scheduler, grace, epochs, every",
    [("asha", 4, 4, 1), ("asha", 3, 12, 6), ("asha", 5, 4, 1), ("median", 2, 12, 6)],
)
def test_a_grace_period_the_scheduler_can_never_use_is_refused_naming_the_keys(
    synthetic_root, tmp_path, scheduler, grace, epochs, every
):
    overrides = [
        f"data.root={synthetic_root}",
        f"scheduler.type={scheduler}",
        f"train.epochs={epochs}",
        f"train.eval_every={every}",
        "train.warmup_epochs=1",
        "train.lr_milestones=[1]",
        f"scheduler.grace_period={grace}",
    ]
    with pytest.raises(ConfigError) as err:
        resolve_sweep(None, overrides, name="g", storage=str(tmp_path))
    message = str(err.value)
    rounds = -(-epochs // every)
    for part in (
        f"scheduler.grace_period={grace}",
        f"train.epochs={epochs}",
        f"train.eval_every={every}",
        f"below {rounds}",
        "scheduler.type=fifo",
        "ASHA" if scheduler == "asha" else "median stopping",
    ):
        assert part in message, message
    assert not (tmp_path / "g").exists()
    # The same rounds with a grace period below them, or FIFO, are fine.
    for fix in (f"scheduler.grace_period={rounds - 1}", "scheduler.type=fifo"):
        ok = resolve_sweep(None, [*overrides, fix], name="g", storage=str(tmp_path))
        assert ok.base.num_rounds == rounds


def test_an_objective_on_pro_official_needs_eval_official_pro(synthetic_root, tmp_path):
    overrides = [f"data.root={synthetic_root}", "objective.metric=pro_official"]
    with pytest.raises(ConfigError, match="eval.official_pro"):
        resolve_sweep(None, overrides, name="p", storage=str(tmp_path))
    assert not (tmp_path / "p").exists()
    ok = resolve_sweep(
        None, [*overrides, "eval.official_pro=true"], name="p", storage=str(tmp_path)
    )
    assert ok.base.eval.official_pro


def test_restore_falls_back_to_the_newest_surviving_round_checkpoint(tmp_path: Path) -> None:
    """A driver killed after Tune deleted the checkpoint its saved state names (num_to_keep)."""
    import pyarrow.fs as pafs
    from ray import tune
    from ray.train._internal.checkpoint_manager import _TrainingResult

    from search.contract import ROUND_METADATA
    from search.trainable import surviving_checkpoint

    fs = pafs.LocalFileSystem()
    trial_dir = tmp_path / "trial_x"
    for index, round_ in ((2, 3), (3, 4), (4, None)):  # checkpoint_000004: no round (not ours)
        path = trial_dir / f"checkpoint_{index:06d}"
        path.mkdir(parents=True)
        (path / "checkpoint.pt").write_bytes(b"x")
        if round_ is not None:
            tune.Checkpoint(str(path), filesystem=fs).set_metadata({ROUND_METADATA: round_})
    gone = tune.Checkpoint(str(trial_dir / "checkpoint_000001"), filesystem=fs)
    result = _TrainingResult(checkpoint=gone, metrics={"training_iteration": 2, "x": 1})

    restored = surviving_checkpoint(result)
    assert restored.checkpoint.path == str(trial_dir / "checkpoint_000003")
    assert restored.metrics == {"training_iteration": 4, "x": 1}  # Tune counts from its round

    kept = _TrainingResult(
        checkpoint=tune.Checkpoint(str(trial_dir / "checkpoint_000002"), filesystem=fs),
        metrics={"training_iteration": 3},
    )
    assert surviving_checkpoint(kept) is kept  # an existing checkpoint is used as it is
    # Killed while Tune deleted checkpoint_000003: its directory and metadata survive, not its
    # checkpoint.pt. The fallback is the newest whole one, with its own round.
    (trial_dir / "checkpoint_000003" / "checkpoint.pt").unlink()
    half = _TrainingResult(
        checkpoint=tune.Checkpoint(str(trial_dir / "checkpoint_000003"), filesystem=fs),
        metrics={"training_iteration": 4},
    )
    restored = surviving_checkpoint(half)
    assert restored.checkpoint.path == str(trial_dir / "checkpoint_000002")
    assert restored.metrics == {"training_iteration": 3}
    empty = _TrainingResult(
        checkpoint=tune.Checkpoint(str(tmp_path / "other" / "checkpoint_000001"), filesystem=fs),
        metrics={},
    )
    assert surviving_checkpoint(empty) is empty  # nothing to fall back to: Tune's own error


CONDITIONAL_SPACE = """
mask_ratio: {type: float, low: 0.1, high: 0.8}
patch_size: {type: categorical, choices: [8, 16]}
lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
train.warmup_epochs:
  - {type: int, low: 0, high: 2, when: {patch_size: 8}}
  - {type: int, low: 3, high: 5, when: {patch_size: 16}}
"""


@pytest.mark.parametrize("sampler", ["cmaes", "gp"])
def test_a_sampler_with_the_demo_guards_prints_no_warning_per_trial(tmp_path, sampler):
    """CMA-ES draws the categorical parameters at random and ignores the guards' constraints
    by design, GP draws the conditional ones (here: `when:` branches) at random; Optuna warns
    about that after every trial unless told otherwise. Run in a fresh interpreter: the filter
    must hold outside pytest's warning capture."""
    import subprocess
    import sys

    space = tmp_path / "space.yaml"
    space.write_text(CONDITIONAL_SPACE)
    over = [f"search.sampler={sampler}"] + ([f"space={space}"] if sampler == "gp" else [])
    script = f"""
import warnings, optuna
from search.resolve import resolve_sweep
from search.samplers import make_sampler
spec = resolve_sweep(None, {over!r}, categories=["nut"])
assert spec.sweep.search.sampler == {sampler!r} and spec.sweep.objective.guard
optuna.logging.set_verbosity(optuna.logging.WARNING)  # as make_searcher sets it
with warnings.catch_warnings(record=True) as caught:
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec, spec.space))
    for i in range(12):
        trial = study.ask()
        spec.space.define(trial)
        trial.set_constraint("guard_aupro", 0.1 * (i % 2))
        study.tell(trial, 0.5 + 0.01 * i)
print(sorted({{str(w.message)[:60] for w in caught if issubclass(w.category, UserWarning)}}))
"""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout  # no warning
    assert "sampled independently" not in out.stderr, out.stderr[-2000:]  # nor a log line
