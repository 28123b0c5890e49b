"""search.warm_start and search.share_across_categories: validation, added trials, sharing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from mmr.errors import UserInputError
from search.config import SPEC_FILE
from search.contract import OBJECTIVE, ROUNDS_KEY
from search.resolve import resolve_sweep
from search.samplers import add_warm_trials, study_storage
from search.searcher import PerCategorySearch, make_searcher

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo_sweep.yaml"
CATS = ["nut", "fabric"]


def source_experiment(tmp_path: Path, name: str = "old", *, space: str | None = None) -> Path:
    """An earlier sweep's experiment dir: sweep.json and a study journal with four trials."""
    over = [f"name={name}", f"storage={tmp_path}"] + ([f"space={space}"] if space else [])
    spec = resolve_sweep(DEMO, over, categories=["nut"])
    exp = tmp_path / name
    exp.mkdir()
    (exp / SPEC_FILE).write_text(json.dumps(spec.to_dict()))
    study = optuna.create_study(study_name=name, storage=study_storage(exp), direction="maximize")
    dists = {
        "model.mask_ratio": optuna.distributions.FloatDistribution(0.1, 0.8),
        "model.patch_size": optuna.distributions.CategoricalDistribution([8, 16]),
        "model.teacher_layers": optuna.distributions.CategoricalDistribution(["[1,2,3]", "[2,3]"]),
        "train.lr": optuna.distributions.FloatDistribution(3e-4, 1e-2, log=True),
    }

    def params(mask: float) -> dict:
        return {
            "model.mask_ratio": mask,
            "model.patch_size": 16,
            "model.teacher_layers": "[2,3]",
            "train.lr": 1e-3,
        }

    study.add_trial(optuna.trial.create_trial(params=params(0.2), distributions=dists, value=0.9))
    study.add_trial(
        optuna.trial.create_trial(
            params=params(0.3),
            distributions=dists,
            state=TrialState.PRUNED,
            intermediate_values={1: 0.6},
        )
    )
    study.add_trial(
        optuna.trial.create_trial(params=params(0.4), distributions=dists, state=TrialState.FAIL)
    )
    study.add_trial(optuna.trial.create_trial(params=params(0.5), distributions=dists, value=0.7))
    return exp


def test_warm_start_adds_finished_trials_pruned_as_pruned(tmp_path):
    src = source_experiment(tmp_path)
    spec = resolve_sweep(
        DEMO, [f"search.warm_start=[{src}]", f"storage={tmp_path}"], categories=["nut"]
    )
    assert spec.sweep.search.warm_start == (str(src.resolve()),)
    searcher = make_searcher(spec, tmp_path / "new")
    # Everything but the enqueued baseline (WAITING) came from the source.
    trials = [t for t in searcher.study.get_trials() if t.state != TrialState.WAITING]
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.COMPLETE,
    ]
    assert [t.params["model.mask_ratio"] for t in trials] == [0.2, 0.3, 0.5]
    assert trials[1].intermediate_values == {1: 0.6}
    assert all(t.user_attrs["warm_start"] for t in trials)
    # The first Tune trial still runs the base config, and is marked the baseline.
    config = searcher.suggest("t0")
    assert config["baseline"] is True and config["model.mask_ratio"] == 0.4


def test_warm_start_tpe_models_from_the_first_sampled_trial(tmp_path):
    src = source_experiment(tmp_path)
    over = [f"storage={tmp_path}", "search.n_startup_trials=2", "search.sampler=tpe"]
    cold = make_searcher(resolve_sweep(DEMO, over, categories=["nut"]), tmp_path / "a")
    warm = make_searcher(
        resolve_sweep(DEMO, [*over, f"search.warm_start=[{src}]"], categories=["nut"]),
        tmp_path / "b",
    )
    for s in (cold, warm):
        s.suggest("t0")  # the baseline
    # TPE with 2 finished (warm) trials is past its random start-up: the startup-trial count
    # includes added trials, so the warm study samples with TPE's model at once.
    sampler = warm.study.sampler
    finished = warm.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) >= sampler._n_startup_trials
    assert not cold.study.get_trials(states=(TrialState.COMPLETE,))


def test_warm_start_cmaes_starts_its_search_where_the_source_was_best(tmp_path):
    """WS-CMA-ES: with enough finished source trials CMA-ES starts from the region of the
    best of them; without them (or below ``CMA_SOURCE_MIN``) from the centre of the space."""
    from search.samplers import CMA_SOURCE_MIN, cma_source_trials, make_sampler, warm_trials
    from spaces import load_space

    spec = resolve_sweep(DEMO, ["search.sampler=cmaes", "search.n_startup_trials=2"],
                         categories=["nut"])  # fmt: skip
    space = spec.space
    dists = {p.name: p for p in space.params}
    assert {"model.mask_ratio", "train.lr"} <= set(dists)
    # A source sweep whose best trial had mask ratio 0.67 and lr 5e-3 (value 0.92).
    old = []
    for i, mask in enumerate(np.linspace(0.1, 0.8, 12)):
        lr = float(np.geomspace(4e-4, 9e-3, 12)[(i * 5) % 12])
        value = 1 - abs(mask - 0.75) - 0.1 * abs(np.log(lr / 5e-3))
        params = {"model.mask_ratio": float(mask), "model.patch_size": 16,
                  "model.teacher_layers": "[2,3]", "train.lr": lr}  # fmt: skip
        trial = optuna.trial.FixedTrial(params)
        space.define(trial)
        old.append(optuna.trial.create_trial(
            params=trial.params, distributions=trial.distributions, value=value
        ))  # fmt: skip
    old.append(optuna.trial.create_trial(
        params=old[0].params, distributions=old[0].distributions, state=TrialState.PRUNED,
        intermediate_values={1: 0.1},
    ))  # fmt: skip
    trials = warm_trials(space, old, 1)
    source = cma_source_trials(space, trials)
    assert len(source) == 12  # the COMPLETE ones, with the parameters CMA-ES models
    assert all(set(t.params) == {"model.mask_ratio", "train.lr"} for t in source)
    assert cma_source_trials(space, trials[: CMA_SOURCE_MIN - 1]) is None
    conditional = load_space({
        "patch_size": {"type": "categorical", "choices": [8, 16]},
        "mask_ratio": [{"type": "float", "low": 0.1, "high": 0.5, "when": {"patch_size": 8}},
                       {"type": "float", "low": 0.3, "high": 0.8, "when": {"patch_size": 16}}],
    })  # fmt: skip
    assert cma_source_trials(conditional, trials) is None

    def first_masks(warm: bool) -> list[float]:
        sampler = make_sampler(spec, space, warm=trials if warm else ())
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.add_trials(trials)  # both studies hold the warm trials; only one starts from them
        masks = []
        for _ in range(4):
            trial = study.ask()
            masks.append(space.define(trial)["model.mask_ratio"])
            study.tell(trial, 0.5)
        return masks

    best = max(source, key=lambda t: t.value).params["model.mask_ratio"]
    warm, cold = first_masks(True), first_masks(False)
    assert np.median([abs(m - best) for m in warm]) < 0.1, (best, warm)
    assert np.median([abs(m - best) for m in cold]) > 0.15, (best, cold)  # around the centre


def test_warm_start_skips_values_outside_the_new_space(tmp_path):
    from spaces import load_space

    src = source_experiment(tmp_path)
    study = optuna.create_study()
    narrow = load_space(
        {
            "mask_ratio": {"type": "float", "low": 0.25, "high": 0.8},
            "patch_size": {"type": "categorical", "choices": [8, 16]},
            "teacher_layers": {"type": "categorical", "choices": [[1, 2, 3], [2, 3]]},
            "lr": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True},
        }
    )
    old = optuna.load_study(study_name="old", storage=study_storage(src)).get_trials()
    finished = [t for t in old if t.state != TrialState.FAIL]
    assert add_warm_trials(study, narrow, finished) == 2  # mask 0.2 lies outside [0.25, 0.8]
    assert sorted(t.params["model.mask_ratio"] for t in study.get_trials()) == [0.3, 0.5]


def test_warm_start_refuses_a_non_experiment_and_another_space(tmp_path):
    with pytest.raises(UserInputError, match=r"search.warm_start: .* is not an mmr-sweep"):
        resolve_sweep(DEMO, [f"search.warm_start=[{tmp_path / 'nope'}]"], categories=["nut"])
    other = tmp_path / "space.yaml"
    other.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    src = source_experiment(tmp_path, space=str(other))
    with pytest.raises(UserInputError, match="same space keys"):
        resolve_sweep(DEMO, [f"search.warm_start=[{src}]"], categories=["nut"])


def test_share_across_categories_needs_per_category():
    from mmr.config import ConfigError

    with pytest.raises(ConfigError, match="share_across_categories"):
        resolve_sweep(DEMO, ["search.share_across_categories=true"], categories=CATS)


def finish(searcher, trial_id: str, value: float, rounds: int) -> None:
    result = {OBJECTIVE: value, "training_iteration": rounds, ROUNDS_KEY: rounds}
    searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=result)


@pytest.mark.parametrize("share", [True, False])
def test_share_across_categories_enqueues_a_top_trial_in_the_other_study(tmp_path, share):
    over = [
        f"storage={tmp_path}",
        "objective.per_category=true",
        f"search.share_across_categories={str(share).lower()}",
        "search.sampler=random",
    ]
    searcher = make_searcher(resolve_sweep(DEMO, over, categories=CATS), tmp_path / "x")
    assert isinstance(searcher, PerCategorySearch)
    first = {c: searcher.suggest(f"b-{c}") for c in ("nut", "fabric")}  # the two baselines
    nut = searcher.suggest("t1")
    assert nut["category"] == "nut" and not nut["baseline"]
    for c in first:
        finish(searcher, f"b-{c}", 0.5, 4)
    finish(searcher, "t1", 0.9, 4)  # nut's best trial, fully trained
    fabric = searcher.suggest("t2")
    assert fabric["category"] == "fabric"
    params = [k for k in nut if "." in k]
    same = all(fabric[k] == nut[k] for k in params)
    assert same is share


def test_warm_start_from_an_empty_sweep_or_other_objectives_adds_nothing(tmp_path, caplog):
    src = source_experiment(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / SPEC_FILE).write_text((src / SPEC_FILE).read_text())
    over = [f"storage={tmp_path}", f"search.warm_start=[{empty}]"]
    searcher = make_searcher(resolve_sweep(DEMO, over, categories=["nut"]), tmp_path / "a")
    assert not [t for t in searcher.study.get_trials() if t.state != TrialState.WAITING]
    assert "has no finished trial" in caplog.text
    # Two objectives: a one-objective source's values mean something else; PRUNED ones stay.
    over = [
        f"storage={tmp_path}",
        f"search.warm_start=[{src}]",
        "objective.metrics=[image_auroc, aupro]",
        "objective.guard={}",
        "search.sampler=tpe",  # CMA-ES optimises one objective
    ]
    searcher = make_searcher(resolve_sweep(DEMO, over, categories=["nut"]), tmp_path / "b")
    states = [t.state for t in searcher.study.get_trials() if t.state != TrialState.WAITING]
    assert states == [TrialState.PRUNED]
