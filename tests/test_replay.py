"""The curve recorder's table format and the replay benchmark, on small made-up curve tables.

Nothing here reads the long recording (``benchmarks/data/curves.csv``): every table is built
by ``made_up`` with known answers (which configuration is best, how early values rank).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import curves
from benchmarks import replay as R
from benchmarks import replay_sim as S

made_up = curves.made_up_rows


def table(**kw) -> S.CurveTable:
    return S.CurveTable.from_frame(made_up(**kw))


# ----------------------------------------------------------------------------- recorder


def test_planned_runs_cover_grid_seed_major_with_baseline_first():
    runs = curves.planned_runs()
    assert len(curves.configurations()) == 48
    assert len(runs) == 48 * len(curves.SEEDS) * len(curves.CATEGORIES)
    assert len({r.key for r in runs}) == len(runs)
    half = len(runs) // 2
    assert {r.seed for r in runs[:half]} == {curves.SEEDS[0]}  # seed-major
    assert [r.category for r in runs[:2]] == list(curves.CATEGORIES)  # both kinds interleaved
    tiny = {"mask_ratio": 0.4, "patch_size": 8, "teacher_layers": (1, 2, 3), "lr": 1.0e-3}
    assert tiny in curves.configurations()  # the sweeps' baseline trial is recorded


def test_load_curves_drops_incomplete_runs_and_record_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "EPOCHS", 3)
    runs = curves.planned_runs()
    path = tmp_path / "curves.csv"
    done = made_up(epochs=3, configs=[runs[0].config], seeds=(runs[0].seed,), categories=("nut",))
    curves._append(path, done.to_dict("records"))
    # A run killed after writing 2 of its 3 rows, and a line cut short by the kill.
    cut = made_up(epochs=3, configs=[runs[1].config], seeds=(runs[1].seed,), categories=("nut",))
    curves._append(path, cut.iloc[:2].to_dict("records"))
    with path.open("a") as f:
        f.write("5,0.1,8,1-2")
    frame = curves.load_curves(path)
    assert set(frame["config"]) == {runs[0].config}
    assert len(frame) == 3

    trained = []

    def fake_train(run, *args):
        trained.append(run.key)
        return made_up(
            epochs=3, configs=[run.config], seeds=(run.seed,), categories=(run.category,)
        ).to_dict("records")

    monkeypatch.setattr(curves, "train_run", fake_train)
    assert curves.record(path, limit=2) == 2
    recorded_before = {(runs[0].config, "nut", runs[0].seed)}
    assert recorded_before.isdisjoint(trained)  # the recorded run was skipped
    assert len(curves.load_curves(path)) == 3 * 3


def test_load_curves_keeps_diverged_runs(tmp_path):
    frame = made_up(epochs=4, configs=[0], seeds=(54,), categories=("nut",)).iloc[:2].copy()
    frame["status"] = "diverged"
    path = tmp_path / "c.csv"
    curves._append(path, frame.to_dict("records"))
    t = S.CurveTable.from_frame(curves.load_curves(path))
    assert len(t.val[(0, "nut", 54)]) == 2 and math.isnan(t.test[(0, "nut", 54)])


# ----------------------------------------------------------------------------- mapping


def test_nearest_maps_to_closest_recorded_config_log_scale_and_categories():
    from spaces import load_space

    t = table(configs=[0, 1, 2, 3, 47])
    space = load_space(R.ROOT / "spaces" / "demo.yaml")
    near = S.Nearest(t, space, ["nut", "fabric"])
    grid = curves.configurations()
    sample = {
        "model.mask_ratio": 0.12,
        "model.patch_size": 8,
        "model.teacher_layers": [1, 2, 3],
        "train.lr": 6.0e-4,  # linearly nearer 3e-4, on the log scale (the space's) nearer 1e-3
    }
    chosen = grid[near(sample)]
    assert chosen["lr"] == 1.0e-3 and chosen["mask_ratio"] == 0.1
    sample["train.lr"] = 2.0e-3  # log10 distance to 3e-3 (0.18) < to 1e-3 (0.30)
    assert grid[near(sample)]["lr"] == 3.0e-3
    # Unrecorded categorical value: a mismatch costs one full range, like the far numbers.
    sample.update({"model.patch_size": 16, "train.lr": 3e-4})
    assert near(sample) == 0
    sample.update({"model.teacher_layers": [2, 3], "model.mask_ratio": 0.8, "train.lr": 1e-2})
    assert near(sample) == 47


def test_configs_need_every_category():
    frame = pd.concat(
        [
            made_up(configs=[0, 1], categories=("nut",)),
            made_up(configs=[1], categories=("fabric",)),
        ]
    )
    t = S.CurveTable.from_frame(frame)
    assert t.configs(["nut", "fabric"]) == [1]
    assert t.configs(["nut"]) == [0, 1]


# ----------------------------------------------------------------------------- the loop


def test_fifo_trains_every_trial_fully_and_counts_model_epochs():
    t = table(epochs=12)
    trace = S.simulate(R.STRATEGIES["fifo_random"], t, seed=0, num_trials=6)
    assert [s for _, _, s in trace.decisions()] == ["done"] * 6
    assert trace.epochs == 6 * 12 * 2  # 2 categories trained in lockstep
    assert trace.trials[0].baseline and not any(x.baseline for x in trace.trials[1:])
    assert trace.study_states == {"COMPLETE": 6}


def test_asha_stops_trials_and_study_records_them_pruned():
    t = table(epochs=12)
    strategy = dataclasses.replace(
        R.STRATEGIES["asha_random"], eval_every=2
    )  # 6 rounds: rungs 1, 3
    trace = S.simulate(strategy, t, seed=1, num_trials=10, max_concurrent=1)
    stopped = [x for x in trace.trials if x.state == "stopped"]
    assert stopped and trace.epochs < 10 * 12 * 2
    assert trace.study_states.get("PRUNED") == len(stopped)
    assert trace.study_states.get("COMPLETE") == 10 - len(stopped)
    assert not trace.trials[0].state == "stopped"  # the baseline is never stopped


def test_round_schedule_goes_through_the_categories_one_after_another():
    assert S.round_schedule("lockstep", 12, 5, 2) == [((5, 5), 5), ((10, 10), 5), ((12, 12), 2)]
    assert S.round_schedule("sequential", 12, 6, 2) == [
        ((6, 0), 6),
        ((12, 0), 6),
        ((12, 6), 6),
        ((12, 12), 6),
    ]
    curves = [np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.7, 0.9])]
    assert S.round_value(curves, (3, 0)) == pytest.approx(0.3)  # grid not started
    assert S.round_value(curves, (3, 2)) == pytest.approx(0.5)  # nut at its last value
    assert S.round_value([curves[0][:2], curves[1]], (3, 2)) is None  # diverged


def test_sequential_trial_stopped_after_its_first_category_cost_that_category_only():
    t = table(epochs=12)
    cats = R.STRATEGIES["asha_random_cats"]  # one round per category, rf 2
    trace = S.simulate(cats, t, seed=1, num_trials=10, max_concurrent=1)
    stopped = [x for x in trace.trials if x.state == "stopped"]
    assert stopped and {x.rounds for x in stopped} == {1}
    assert {x.rounds for x in trace.trials if x.state == "done"} == {2}
    # One trial at a time: each round cost one category's 12 epochs, whatever the trial.
    assert trace.epochs == 12 * sum(x.rounds for x in trace.trials)
    assert trace.study_states.get("PRUNED") == len(stopped)
    assert trace.trials[0].state == "done"  # the baseline is never stopped
    # Without stopping, the order changes the path, not the cost or the finished trials.
    fifo = dataclasses.replace(R.STRATEGIES["fifo_random"], eval_every=6)
    seq = S.simulate(
        dataclasses.replace(fifo, category_order="sequential"), t, seed=1, num_trials=4
    )
    lock = S.simulate(fifo, t, seed=1, num_trials=4)
    assert seq.epochs == lock.epochs == 4 * 12 * 2
    assert seq.decisions() == [(c, 4, s) for c, _, s in lock.decisions()]
    assert [x.objective for x in seq.trials] == [x.objective for x in lock.trials]
    assert seq.final_test == lock.final_test


def test_replay_finds_made_up_best_and_reports_epochs_to_target():
    t = table(epochs=12, configs=[12, 13, 14, 15])  # lr varies; 14 (lr 3e-3) is BEST
    best = t.best_test(["nut", "fabric"])
    assert best == pytest.approx(0.95)
    traces = [S.simulate(R.STRATEGIES["fifo_random"], t, seed=s, num_trials=8) for s in range(2)]
    doc = R.summarize(traces, best)
    assert set(doc) >= {"epochs_to_target", "final_test_auroc", "reached"}
    assert set(doc["epochs_to_target"]) == {"median", "q25", "q75"}
    for trace in traces:
        spent = trace.epochs_to(best - 0.01)
        # The target was reached at the incumbent change that brought a near-best config.
        assert any(e == spent and v >= best - 0.01 for e, v in trace.incumbents)
        assert all(v < best - 0.01 for e, v in trace.incumbents if e < spent)
        assert spent % 12 == 0 and trace.final_test == pytest.approx(best)


def test_summarize_counts_unreached_as_infinite():
    a, b, c = S.SearchTrace(), S.SearchTrace(), S.SearchTrace()
    a.incumbents, a.final_test = [(10.0, 0.5), (30.0, 0.9)], 0.9
    b.incumbents, b.final_test = [(20.0, 0.9)], 0.9
    c.incumbents, c.final_test = [(10.0, 0.5)], 0.5
    doc = R.summarize([a, b, c], best=0.91)
    assert doc["reached"] == pytest.approx(2 / 3, abs=1e-3)
    assert doc["epochs_to_target"]["median"] == 30.0
    assert doc["epochs_to_target"]["q75"] is None  # the unreached seed is infinite
    doc = R.summarize([c], best=0.91)
    assert doc["reached"] == 0 and doc["epochs_to_target"]["median"] is None


def test_rung_metric_variants_change_what_asha_sees():
    st = {"smooth": None, "best": -math.inf}
    assert [S._rung_value("best", v, st) for v in (0.5, 0.7, 0.6)] == [0.5, 0.7, 0.7]
    st = {"smooth": None, "best": -math.inf}
    assert [S._rung_value("smoothed", v, st) for v in (0.4, 0.8)] == pytest.approx([0.4, 0.6])
    assert S._rung_value("last", 0.3, st) == 0.3


def test_rank_correlations_see_crossing_curves():
    straight = R.rank_correlations(table(epochs=12, configs=list(range(0, 48, 3))), [1, 12])
    crossing = R.rank_correlations(
        table(epochs=12, configs=list(range(0, 48, 3)), crossing=True), [1, 12]
    )
    assert straight["nut"]["val@1"] > 0.9 and straight["nut"]["val@12"] == 1.0
    assert crossing["nut"]["val@1"] < -0.9
    assert crossing["nut"]["test@12"] > 0.9


def test_oracle_table_ranks_runs_by_their_final_values_from_the_first_epoch():
    crossing = table(epochs=12, configs=list(range(0, 48, 3)), crossing=True)
    ideal = crossing.oracle()
    assert R.rank_correlations(ideal, [1])["nut"]["val@1"] == 1.0  # -0.9 on the real table
    key = next(iter(crossing.val))
    assert ideal.val[key][0] == crossing.val[key][-1] and ideal.test == crossing.test


def test_early_stopping_pays_only_when_early_values_rank_right():
    kw = {"num_trials": 16, "max_concurrent": 1}
    asha = dataclasses.replace(R.STRATEGIES["asha_random"], eval_every=1, grace_period=1)
    good, bad = table(epochs=9), table(epochs=9, crossing=True)
    target = good.best_test(["nut", "fabric"]) - 0.01
    reach_good = [S.simulate(asha, good, seed=s, **kw).epochs_to(target) for s in range(4)]
    reach_bad = [S.simulate(asha, bad, seed=s, **kw).epochs_to(target) for s in range(4)]
    assert sum(map(math.isinf, reach_bad)) > sum(map(math.isinf, reach_good))


def test_per_category_routing_gives_each_study_its_category():
    t = table(epochs=12)
    trace = S.simulate(R.STRATEGIES["asha_tpe/per_category"], t, seed=0, num_trials=4)
    assert sorted(x.category for x in trace.trials) == ["fabric"] * 4 + ["nut"] * 4
    assert trace.epochs <= 8 * 12  # one model-epoch per epoch of a per-category trial


def test_cli_writes_interface_json(tmp_path):
    path = tmp_path / "curves.csv"
    made_up(epochs=12, configs=list(range(0, 48, 4))).to_csv(path, index=False)
    out = tmp_path / "out.json"
    R.main(
        [
            "--table",
            str(path),
            "--seeds",
            "2",
            "--json",
            str(out),
            "--only",
            f"{R.DEFAULT_STRATEGY},asha_tpe",
            "--trials",
            "4",
            "--workers",
            "1",
            "--markdown",
            str(tmp_path / "replay.md"),
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["default"] == R.DEFAULT_STRATEGY == "fifo_gp_confirm1x2"
    assert doc["rule"] == "reach" and doc["best"] == R.evidence_best(doc, rule="reach")
    for name in ("fifo_random", "asha_tpe", R.DEFAULT_STRATEGY):
        assert set(doc[name]["epochs_to_target"]) == {"median", "q25", "q75"}
        assert set(doc[name]["final_test_auroc"]) == {"median", "q25", "q75"}
        assert 0 <= doc[name]["reached"] <= 1
    assert doc["meta"]["seeds"] == 2
    for name in R.WARM_START_STRATEGIES:
        assert set(doc["warm_start"]) >= {f"{name}/cold/all", f"{name}/warm/other_seed"}
    assert set(doc["oracle"]) == set(R.ORACLE_STRATEGIES)
    md = (tmp_path / "replay.md").read_text()
    assert f"`{R.DEFAULT_STRATEGY}` (default)" in md and "`fifo_random`" in md and "Spearman" in md
    assert "Ideal early stopping" in md
    assert doc["best"] in R.STRATEGIES and f"Evidence picks `{doc['best']}`" in md


def _entry(median, reached, final, q75=None):
    return {
        "epochs_to_target": {"median": median, "q25": median, "q75": q75 or median},
        "reached": reached,
        "final_test_auroc": {"median": final, "q25": final, "q75": final},
    }


def test_evidence_best_takes_fewest_epochs_among_strategies_as_good_as_the_reference():
    doc = {
        "fifo_random": _entry(900.0, 0.6, 0.80),
        "asha_random": _entry(300.0, 0.6, 0.79),  # cheapest, but final 0.01 worse
        "asha_tpe": _entry(400.0, 0.5, 0.81),  # reaches the target less often
        "fifo_tpe": _entry(600.0, 0.7, 0.797),  # within 0.005: eligible
        "asha_tpe_best": _entry(100.0, 1.0, 0.9),  # replay-only rung metric: not shippable
        "asha_tpe/per_category": _entry(100.0, 1.0, 0.9),
    }
    assert R.evidence_best(doc) == "fifo_tpe"
    doc["fifo_tpe"]["final_test_auroc"]["median"] = 0.794
    assert R.evidence_best(doc) == "fifo_random"  # the reference is always eligible
    doc["fifo_gp"] = _entry(None, 0.6, 0.80, q75=None)
    assert R.evidence_best(doc) == "fifo_random"  # unreached medians count as infinite


def test_evidence_uses_best_minus_002_when_the_reference_rarely_reaches_best_minus_001():
    doc = {
        "fifo_random": _entry(None, 0.4, 0.80),
        "asha_tpe": _entry(None, 0.45, 0.80),  # would win on best - 0.01 reached
        "fifo_tpe": _entry(None, 0.2, 0.80),
    }
    doc["fifo_random"].update({"epochs_to_target_0.02": {"median": 800.0, "q75": None},
                               "reached_0.02": 0.9})  # fmt: skip
    doc["asha_tpe"].update({"epochs_to_target_0.02": {"median": 900.0, "q75": None},
                            "reached_0.02": 0.9})  # fmt: skip
    doc["fifo_tpe"].update({"epochs_to_target_0.02": {"median": 400.0, "q75": 600.0},
                            "reached_0.02": 0.95})  # fmt: skip
    assert R.decisive_target(doc) == "epochs_to_target_0.02"
    assert R.evidence_best(doc) == "fifo_tpe"
    doc["fifo_random"]["epochs_to_target"]["median"] = 900.0
    assert R.decisive_target(doc) == "epochs_to_target"
    assert R.evidence_best(doc) == "fifo_random"  # asha_tpe's median is unreached


def test_the_reach_rule_puts_reach_of_best_minus_001_before_epochs():
    doc = {
        "fifo_random": _entry(900.0, 0.6, 0.80),
        "asha_random": _entry(300.0, 0.6, 0.80),  # cheapest at the same reach
        "fifo_gp": _entry(700.0, 0.9, 0.80),  # reaches best - 0.01 most often
        "fifo_tpe": _entry(800.0, 0.86, 0.80),  # within REACH_SLACK of it, dearer
        "fifo_cmaes": _entry(None, 1.0, 0.79),  # reaches most, but final 0.01 worse
        "asha_tpe_best": _entry(100.0, 1.0, 0.9),  # replay-only rung metric: not shippable
    }
    assert R.evidence_best(doc, rule="epochs") == "asha_random"
    assert R.evidence_best(doc, rule="reach") == "fifo_gp"
    doc["fifo_tpe"]["epochs_to_target"]["median"] = 600.0  # tied on reach, now cheaper
    assert R.evidence_best(doc, rule="reach") == "fifo_tpe"
    doc["fifo_tpe"]["reached"] = 0.84  # no longer within 0.05 of fifo_gp's reach
    assert R.evidence_best(doc, rule="reach") == "fifo_gp"
    # A document names its rule; one without a name was written under the first rule.
    assert R.evidence_best(doc) == "asha_random"
    assert R.evidence_best({**doc, "rule": "reach"}) == "fifo_gp"
    with pytest.raises(ValueError, match="unknown rule 'fast'"):
        R.evidence_best(doc, rule="fast")
    with pytest.raises(ValueError, match="unknown rule 'fast'"):  # before any replay
        R.run_replay(table(epochs=2, configs=[0]), [R.STRATEGIES["fifo_random"]], seeds=1,
                     rule="fast")  # fmt: skip


def test_the_reach_rule_needs_the_references_reach_of_best_minus_001_too():
    doc = {
        "fifo_random": _entry(None, 0.3, 0.80),
        "asha_tpe": _entry(None, 0.28, 0.80),  # fewer at best - 0.01 than the reference
        "fifo_tpe": _entry(None, 0.3, 0.80),
    }
    for name, epochs, reached in (("fifo_random", 900.0, 0.6), ("asha_tpe", 300.0, 0.9),
                                  ("fifo_tpe", 600.0, 0.7)):  # fmt: skip
        doc[name].update({"epochs_to_target_0.02": {"median": epochs, "q75": None},
                          "reached_0.02": reached})  # fmt: skip
    assert R.decisive_target(doc) == "epochs_to_target_0.02"
    assert R.evidence_best(doc, rule="epochs") == "asha_tpe"
    assert R.evidence_best(doc, rule="reach") == "fifo_tpe"  # unreached -0.01 medians tie
    # Two reach best - 0.01 in most searches: the fewer epochs to best - 0.01 wins, not to
    # the decisive best - 0.02.
    for name, e1, r1, e2 in (("fifo_gp", 1000.0, 0.6, 800.0), ("median_gp", 900.0, 0.58, 850.0)):
        doc[name] = _entry(e1, r1, 0.80)
        doc[name].update({"epochs_to_target_0.02": {"median": e2, "q75": e2},
                          "reached_0.02": 0.9})  # fmt: skip
    assert R.evidence_best(doc, rule="reach") == "median_gp"
    # Tied on both targets' epochs: the higher reach of best - 0.01 wins, not of the decisive
    # best - 0.02.
    doc["fifo_gp"] = _entry(900.0, 0.6, 0.80)
    doc["fifo_gp"].update({"epochs_to_target_0.02": {"median": 850.0, "q75": 850.0},
                           "reached_0.02": 0.95})  # fmt: skip
    assert R.evidence_best(doc, rule="reach") == "fifo_gp"
    doc["fifo_gp"]["reached"] = 0.57
    assert R.evidence_best(doc, rule="reach") == "median_gp"


def test_best_by_validation_is_what_picking_by_validation_ships():
    t = table(epochs=4, configs=[12, 13, 14, 15])  # 14 is the made-up best on test
    assert t.best_by_validation(["nut", "fabric"]) == (14, pytest.approx(0.95))
    for key in [k for k in t.val if k[0] == 12]:  # 12 now looks best on validation only
        t.val[key] = t.val[key] + 0.5
    config, test = t.best_by_validation(["nut", "fabric"])
    assert config == 12 and test == pytest.approx(t.final_test(12, ["nut", "fabric"]))
    assert test < t.best_test(["nut", "fabric"]) - 0.01


def test_default_names_what_the_demo_sweep_runs():
    """The demo runs what the default resolves to on the demo's base config (a default that
    stops by category would resolve to FIFO there: the demo trains one category)."""
    from search.resolve import resolve_sweep

    spec = resolve_sweep(S.SWEEP)
    default = R.STRATEGIES[R.DEFAULT_STRATEGY]
    as_default = resolve_sweep(S.SWEEP, default.overrides(epochs=spec.base.train.epochs))
    assert spec.sweep.search.sampler == default.sampler
    assert spec.sweep.scheduler.type == as_default.sweep.scheduler.type
    if spec.sweep.scheduler.type != "fifo":  # FIFO stops nothing: its settings are unused
        assert spec.sweep.scheduler.grace_period == default.grace_period
        assert spec.sweep.scheduler.reduction_factor == default.reduction_factor
        assert spec.sweep.scheduler.min_samples == default.min_samples
        assert spec.base.train.eval_every == as_default.base.train.eval_every
        assert spec.base.train.category_order == default.category_order
    confirm = spec.sweep.search.confirm
    assert (confirm.top_k, confirm.seeds) == (default.confirm_top_k, default.confirm_seeds)


def test_readme_quotes_the_committed_replay():
    """The README's figures on the default, its reference and warm starts are the replay's."""
    doc = json.loads(EVIDENCE.read_text())
    text = (S.ROOT / "README.md").read_text()
    start = text.index("## Choosing the search strategy")
    section = " ".join(text[start : text.index("\n## ", start + 3)].split())
    seeds = doc["meta"]["seeds"]

    def of(e: dict, key: str = "reached") -> str:
        return f"{round(e[key] * seeds)} of {seeds}"

    def median(e: dict) -> float | None:
        return e["epochs_to_target"]["median"]

    default, ref, former = doc[doc["default"]], doc["fifo_random"], doc["asha_tpe"]
    assert doc["default"] == "median_cmaes"  # "CMA-ES ... with median stopping"
    final = default["final_test_auroc"]["median"]
    assert final == ref["final_test_auroc"]["median"]  # "at the same median final test AUROC"
    claims = [of(default), of(ref), of(former), f"{median(ref) / median(default):.2f}x"]
    claims.append(f"({final})")
    # "No strategy came near 3x fewer epochs, not even with [oracle] early values."
    entries = [doc[n] for n in R.STRATEGIES if n in doc] + list(doc["oracle"].values())
    assert max(median(ref) / median(e) for e in entries if median(e)) < 2
    for name in R.WARM_START_STRATEGIES:  # "cut the median epochs ... 1.45x for TPE (696 to 480)"
        cold, warm = (doc["warm_start"][f"{name}/{k}"] for k in ("cold/all", "warm/other_seed"))
        claims += [
            f"{median(cold) / median(warm):.2f}x",
            f"({median(cold):.0f} to {median(warm):.0f}",
        ]
    cma = doc["warm_start"]
    claims.append(
        f"{of(cma['median_cmaes/warm/other_seed'])} seeds against "
        f"{round(cma['median_cmaes/cold/all']['reached'] * seeds)} cold"
    )
    for claim in claims:
        assert claim in section, claim


@pytest.mark.parametrize("name", ["sweep_mvtec", "sweep_aebad_s"])
def test_production_sweeps_run_the_evidence_default(name):
    """The production sweeps run what the replay's pick resolves to on their base config:
    its sampler, its scheduler (and, with early stopping, its rounds), its confirmation."""
    from search.resolve import resolve_sweep

    path, cats = S.ROOT / "configs" / f"{name}.yaml", ["a", "b", "c"]
    spec = resolve_sweep(path, categories=cats)
    default = R.STRATEGIES[R.DEFAULT_STRATEGY]
    as_default = resolve_sweep(
        path, default.overrides(epochs=spec.base.train.epochs), categories=cats
    )
    assert spec.sweep.search.sampler == default.sampler
    # What the default resolves to on this base (stopping by category resolves to FIFO where
    # a base trains one model, as AeBAD-S does).
    assert spec.sweep.scheduler.type == as_default.sweep.scheduler.type
    if spec.sweep.scheduler.type != "fifo":
        assert spec.sweep.scheduler.min_samples == default.min_samples
        assert spec.sweep.scheduler.grace_period == default.grace_period < spec.base.num_rounds
        assert spec.base.train.category_order == default.category_order
        assert spec.base.num_rounds == as_default.base.num_rounds
    confirm = spec.sweep.search.confirm
    assert (confirm.top_k, confirm.seeds) == (default.confirm_top_k, default.confirm_seeds)


@pytest.mark.slow
def test_real_tuner_makes_the_replayed_decisions(ray_session, tmp_path):
    t = table(epochs=4, configs=list(range(0, 48, 2)))
    states = {}
    # Lean: each Tune trial costs ~1 s of actor start and reports even when instant.
    runs = (
        ("asha_tpe", 6, 1),
        (R.DEFAULT_STRATEGY, 5, 1),  # its search (the confirmation is replayed after it)
        ("median_cmaes", 7, 1),
        ("fifo_random", 3, 1),
        ("median_cmaes_seq", 7, 2),  # categories one after another: 2 x 2 rounds
        ("asha_random_cats", 6, 0),  # one round per category
    )
    for name, trials, every in runs:
        strategy = dataclasses.replace(R.STRATEGIES[name], eval_every=every)
        simulated = S.simulate(strategy, t, seed=3, num_trials=trials, max_concurrent=1)
        real = S.tuner_decisions(strategy, t, seed=3, num_trials=trials, storage=str(tmp_path))
        assert real == simulated.decisions(), name
        states[name] = {s for _, _, s in real}
    for name in ("asha_tpe", "median_cmaes", "median_cmaes_seq", "asha_random_cats"):
        assert "stopped" in states[name], name  # the comparison covered early stopping


def test_made_up_rows_match_recorder_columns():
    assert list(made_up(epochs=2, configs=[0]).columns) == list(curves.COLUMNS)
    assert Path(curves.DEFAULT_OUT).parent.name == "data"


def test_replay_is_deterministic_for_a_seed_with_hyperband_brackets():
    t = table(epochs=12)
    strategy = dataclasses.replace(R.STRATEGIES["hyperband_random"], eval_every=2)
    runs = [S.simulate(strategy, t, seed=5, num_trials=10).decisions() for _ in range(2)]
    assert runs[0] == runs[1]
    assert any(s == "stopped" for _, _, s in runs[0])


def test_record_shards_split_the_plan_without_overlap(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "EPOCHS", 2)
    runs = curves.planned_runs()
    trained: dict[int, list] = {0: [], 1: []}

    def fake_train(shard):
        def train(run, *args):
            trained[shard].append(run.key)
            return made_up(
                epochs=2, configs=[run.config], seeds=(run.seed,), categories=(run.category,)
            ).to_dict("records")

        return train

    path = tmp_path / "curves.csv"
    for k in (0, 1):
        monkeypatch.setattr(curves, "train_run", fake_train(k))
        assert curves.record(path, limit=3, shard=(k, 2)) == 3
    assert trained[0] == [r.key for r in runs[0:6:2]]
    assert trained[1] == [r.key for r in runs[1:6:2]]
    assert len(curves.load_curves(path)) == 6 * 2  # both shards' runs, whole, in one file
    with pytest.raises(ValueError, match="shard 2/2"):
        curves.record(path, shard=(2, 2))


EVIDENCE = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "replay.json"


def test_committed_replay_evidence_is_from_the_full_recording_and_its_rule():
    """BENCHMARKS.md section 7 quotes this file: real curves, all runs, the rule's own pick."""
    doc = json.loads(EVIDENCE.read_text())
    assert not str(doc["meta"]["source"]).startswith("made up")
    assert doc["meta"]["seeds"] >= 30
    assert doc["meta"]["table"]["runs"] == len(curves.planned_runs())
    # What the shipped sweep configs ran until the fixed-teacher curves (see the test below).
    assert doc["default"] == R.FIRST_TABLE_DEFAULT
    assert R.evidence_best(doc) == doc["best"]  # the rule, rerun on the committed figures
    assert doc["best"] == doc["default"]  # and the shipped configs ran what it picked
    assert set(doc["oracle"]) == set(R.ORACLE_STRATEGIES) and doc["warm_start"]


# ----------------------------------------------------------------------------- fairness


def test_trained_counts_searches_that_finished_a_run_at_the_target_whatever_they_picked():
    def trace(*trials):
        t = S.SearchTrace()
        t.trials = [
            S.TrialRecord(f"t{i}", i, 1, None, 0.0, state=state, test=test)
            for i, (state, test) in enumerate(trials)
        ]
        t.incumbents = [(10.0, 0.5)]  # none reached the target: validation picked a poor run
        return t

    hit = trace(("done", 0.5), ("done", 0.95))  # trained a run at the target, did not pick it
    stopped = trace(("done", 0.5), ("stopped", 0.95))  # the good run never finished
    missed = trace(("done", 0.5), ("done", 0.6))
    doc = R.summarize([hit, stopped, missed], best=0.955)
    assert doc["reached"] == 0
    assert doc["trained"] == pytest.approx(1 / 3, abs=1e-3)
    assert doc["trained_0.02"] == pytest.approx(1 / 3, abs=1e-3)  # 0.6 < 0.935 as well
    per_category = trace(("done", 0.95))
    per_category.trials[0].category = "nut"  # one run is not the objective: no figure
    assert "trained" not in R.summarize([per_category], best=0.955)
    # A replayed search: what it trained bounds what it reached.
    t = table(epochs=6, configs=[12, 13, 14, 15])
    traces = [S.simulate(R.STRATEGIES["fifo_random"], t, seed=s, num_trials=3) for s in range(4)]
    doc = R.summarize(traces, t.best_test(t.categories))
    assert doc["reached"] <= doc["trained"] and doc["trained"] > 0


def test_configs_counts_searches_that_trained_each_configuration_and_what_they_exported():
    def trace(final, *trials):
        t = S.SearchTrace()
        t.trials = [
            S.TrialRecord(f"t{i}", config, 1, None, 0.0, state=state)
            for i, (config, state) in enumerate(trials)
        ]
        t.final_config = final
        return t

    # A configuration trained twice in one search counts once; a stopped trial not at all.
    a = trace(3, (3, "done"), (3, "done"), (5, "stopped"))
    b = trace(5, (5, "done"), (3, "done"), (7, "stopped"))
    doc = R.summarize([a, b], best=0.9)["configs"]
    assert doc == {"trained": {"3": 2, "5": 1}, "exported": {"3": 1, "5": 1}}
    per_category = trace(None, (3, "done"))
    per_category.trials[0].category = "nut"  # no single run per trial: no figure
    assert "configs" not in R.summarize([per_category], best=0.9)


def test_incumbent_is_chosen_by_validation_never_by_test():
    inc = S.Incumbent([None])
    assert inc.offer(None, state="done", objective=0.90, test=0.60)
    assert not inc.offer(None, state="done", objective=0.80, test=0.95)  # better test, worse val
    assert inc.test == pytest.approx(0.60)
    assert not inc.offer(None, state="done", objective=0.90, test=0.99)  # a tie keeps the first
    assert inc.test == pytest.approx(0.60)


def test_incumbent_is_never_a_stopped_or_failed_trial():
    inc = S.Incumbent(["nut", "fabric"])
    assert not inc.offer("nut", state="stopped", objective=0.99, test=0.99)
    assert not inc.offer("nut", state="failed", objective=0.99, test=0.99)
    assert inc.offer("nut", state="done", objective=0.70, test=0.70)
    assert math.isnan(inc.test)  # fabric has no finished trial yet
    assert inc.offer("fabric", state="done", objective=0.50, test=0.50)
    assert not inc.offer("fabric", state="stopped", objective=0.95, test=0.95)
    assert inc.test == pytest.approx(0.60)


def test_replayed_search_ships_the_best_validation_run_not_the_best_test_one():
    # Test values reversed against validation: the run a search should ship (best validation)
    # has the worst test value. A replay that looked at test values would ship another.
    frame = made_up(epochs=6, configs=[12, 13, 14, 15])
    order = frame.groupby("config")["test_image_auroc"].max().sort_values()
    flipped = dict(zip(order.index, order.values[::-1], strict=True))
    last = frame["test_image_auroc"].notna()
    frame.loc[last, "test_image_auroc"] = frame.loc[last, "config"].map(flipped)
    t = S.CurveTable.from_frame(frame)
    trace = S.simulate(R.STRATEGIES["fifo_random"], t, seed=0, num_trials=8, max_concurrent=1)
    cats = t.categories
    done = [x for x in trace.trials if x.state == "done"]
    by_val = max(done, key=lambda x: np.mean([t.val[(x.config, k, x.seed)][-1] for k in cats]))
    assert trace.final_test == pytest.approx(
        np.mean([t.test[(by_val.config, k, by_val.seed)] for k in cats])
    )
    assert trace.final_test < max(
        np.mean([t.test[(x.config, k, x.seed)] for k in cats]) for x in done
    )


def test_every_incumbent_of_a_search_that_stops_trials_is_a_finished_trial():
    # Curves that fall towards their final value: a trial stopped early reported a value
    # above what the finished trials end with, so only the "ran every round" rule keeps it out.
    frame = made_up(epochs=12)
    frame["val_image_auroc"] = (
        frame.groupby(["config", "category", "seed"])["test_image_auroc"].transform("last")
        + 0.3 * (12 - frame["epoch"]) / 12
    )
    t = S.CurveTable.from_frame(frame)
    strategy = dataclasses.replace(R.STRATEGIES["median_random"], eval_every=2)
    trace = S.simulate(strategy, t, seed=3, num_trials=12, max_concurrent=1)
    cats = t.categories

    def test_of(x):
        return float(np.mean([t.test[(x.config, k, x.seed)] for k in cats]))

    stopped = [x for x in trace.trials if x.state == "stopped"]
    assert stopped and max(x.objective for x in stopped) > trace.final_test
    finished = {round(test_of(x), 9) for x in trace.trials if x.state == "done"}
    assert {round(v, 9) for _, v in trace.incumbents} <= finished


def test_strategies_replay_the_same_training_seed_draws_for_a_search_seed():
    # Random search samples the same points whatever the scheduler: trial k must then replay
    # the same recorded run (configuration and training seed) under every strategy, and the
    # draws must use every recorded seed (not the same one for every trial).
    t = table(epochs=12)
    runs = {}
    for name in ("fifo_random", "median_random", "asha_random"):
        trace = S.simulate(R.STRATEGIES[name], t, seed=5, num_trials=16, max_concurrent=1)
        runs[name] = [(x.config, x.seed) for x in trace.trials]
    assert runs["fifo_random"] == runs["median_random"] == runs["asha_random"]
    assert {seed for _, seed in runs["fifo_random"]} == set(curves.SEEDS)
    other = S.simulate(R.STRATEGIES["fifo_random"], t, seed=6, num_trials=16, max_concurrent=1)
    assert [(x.config, x.seed) for x in other.trials] != runs["fifo_random"]


def _short_and_long(name: str, tab: S.CurveTable, seed: int) -> tuple:
    """The same search seed replayed with 6 and with 10 trials, and the longer one's runs."""
    kw = {"seed": seed, "max_concurrent": 2, "n_startup_trials": 2}
    short = S.simulate(R.STRATEGIES[name], tab, num_trials=6, **kw)
    long = S.simulate(R.STRATEGIES[name], tab, num_trials=10, **kw)
    runs = [(x.config, x.seed, x.rounds, x.state) for x in long.trials]
    assert [(x.config, x.seed, x.rounds, x.state) for x in short.trials] == runs[:6], name
    return short, long, runs


def test_a_longer_search_begins_with_the_shorter_one_without_early_stopping():
    # BENCHMARKS section 11's budget table rests on this: without early stopping, trial k of a
    # search depends on trials before it only, never on how many trials follow, so a larger
    # budget replays the smaller one's trials and then more (reach can only grow with it).
    t = table(epochs=12)
    for name in ("fifo_gp", "fifo_tpe"):
        _, _, runs = _short_and_long(name, t, seed=3)
        assert len(set(runs)) > 3  # the model sampled different points, not one repeated


def test_a_longer_search_with_early_stopping_begins_with_the_shorter_one():
    # benchmarks.budgets.fixed_bound rests on this: per search seed, the first N trials of a
    # longer search are the shorter search's, stopped where it stopped them, so its cost and
    # what it reaches only grow with the trials (real and ideal early stopping alike).
    t = table(epochs=12)
    for tab in (t, t.oracle()):
        for name in ("asha_random", "asha_tpe", "hyperband_random", "median_random"):
            short, long, _ = _short_and_long(name, tab, seed=5)
            assert long.epochs >= short.epochs, name
            assert {x.state for x in long.trials} >= {"done", "stopped"}, name  # it stopped some


def test_replay_cli_takes_seed_offset_and_strategy_names_and_records_the_table(tmp_path):
    path = tmp_path / "curves.csv"
    made_up(epochs=12, configs=list(range(0, 48, 6))).to_csv(path, index=False)
    out = tmp_path / "out.json"
    args = ["--table", str(path), "--seeds", "2", "--trials", "4", "--workers", "1"]
    common = [*args, "--warm-seeds", "0", "--oracle-seeds", "0", "--json", str(out)]
    R.main(
        [*common, "--seed-offset", "40", "--n-startup-trials", "3"]
        + ["--strategies", "default,median_cmaes_pruned"]
    )
    doc = json.loads(out.read_text())
    assert doc["meta"]["n_startup_trials"] == 3
    assert set(doc) >= {"fifo_random", R.DEFAULT_STRATEGY, "median_cmaes_pruned", "default"}
    assert doc["default"] == R.DEFAULT_STRATEGY
    assert doc["meta"]["search_seeds"] == [40, 41]
    assert doc["meta"]["curves"]["path"] == str(path)
    assert doc["meta"]["curves"]["categories"] == ["fabric", "nut"]
    assert doc["meta"]["curves"]["seeds"] == sorted(curves.SEEDS)
    for name in (R.DEFAULT_STRATEGY, "median_cmaes_pruned"):
        assert set(doc[name]) >= {"epochs_to_target", "final_test_auroc", "reached"}
    assert doc["median_cmaes_pruned"]["cma_generations"]["median"] is not None
    with pytest.raises(SystemExit):
        R.main([*common, "--strategies", "no_such_strategy"])


def test_seed_offset_replays_other_searches():
    t = table(epochs=12, configs=list(range(0, 48, 6)))
    strategy = R.STRATEGIES["fifo_random"]
    a = R.run_replay(t, [strategy], seeds=2, num_trials=4, seed_offset=0)
    b = R.run_replay(t, [strategy], seeds=2, num_trials=4, seed_offset=0)
    c = R.run_replay(t, [strategy], seeds=2, num_trials=4, seed_offset=50)
    assert a["meta"]["search_seeds"] == [0, 1] and c["meta"]["search_seeds"] == [50, 51]
    assert a["fifo_random"]["epochs_total"] == b["fifo_random"]["epochs_total"]
    traces0 = [S.simulate(strategy, t, seed=s, num_trials=4) for s in (0, 1)]
    traces50 = [S.simulate(strategy, t, seed=s, num_trials=4) for s in (50, 51)]
    assert [x.decisions() for x in traces0] != [x.decisions() for x in traces50]


def test_cmaes_learns_from_stopped_trials_only_when_asked():
    t = table(epochs=12)
    plain = dataclasses.replace(R.STRATEGIES["median_cmaes"], eval_every=2)
    pruned = dataclasses.replace(R.STRATEGIES["median_cmaes_pruned"], eval_every=2)
    kw = {"seed": 2, "num_trials": 24, "max_concurrent": 1, "n_startup_trials": 2}
    a, b = S.simulate(plain, t, **kw), S.simulate(pruned, t, **kw)
    assert a.study_states.get("PRUNED") and b.study_states.get("PRUNED")
    assert b.cma_generations > a.cma_generations


def _readme_section(title: str) -> str:
    text = (S.ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    return " ".join(text[start : text.index("\n## ", start + 3)].split())


def test_default_was_chosen_on_seeds_0_29_and_the_readme_reports_unseen_seeds():
    data = S.ROOT / "benchmarks" / "data"
    choose = json.loads((data / "replay_choose.json").read_text())
    unseen = json.loads((data / "replay_unseen.json").read_text())
    # The first table's evidence: its rule's pick, the default until the fixed-teacher curves.
    assert choose["meta"]["search_seeds"] == [0, 29] and choose["best"] == R.FIRST_TABLE_DEFAULT
    first, last = unseen["meta"]["search_seeds"]
    assert first > 29 and last - first + 1 >= 100  # reported on seeds nobody tuned on
    assert unseen["default"] == R.FIRST_TABLE_DEFAULT
    assert unseen["meta"]["curves"]["path"] == choose["meta"]["curves"]["path"]
    section = _readme_section("Choosing the search strategy")
    n = last - first + 1
    d, ref, pruned = (
        unseen[R.FIRST_TABLE_DEFAULT],
        unseen["fifo_random"],
        unseen["median_cmaes_pruned"],
    )
    med = lambda e: e["epochs_to_target"]["median"]  # noqa: E731
    claims = [
        f"{round(d['reached'] * n)} of {n} against {round(ref['reached'] * n)}",
        f"{med(ref) / med(d):.2f}x fewer epochs ({med(d):.0f} against {med(ref):.0f})",
        f"did {med(ref) / med(pruned):.2f}x",
        f"({med(choose['median_cmaes_pruned']):.0f} against "
        f"{med(choose[R.FIRST_TABLE_DEFAULT]):.0f}",
        f"{round(choose['median_cmaes_pruned']['reached'] * 30)} against "
        f"{round(choose[R.FIRST_TABLE_DEFAULT]['reached'] * 30)} of 30",
        f"(median {d['cma_generations']['median']:.0f} per search)",
        f"({pruned['cma_generations']['median']:.0f} generations)",
    ]
    for claim in claims:
        assert claim in section, claim


def test_confirmation_picks_by_fresh_seeds_validation_and_counts_its_cost():
    t = table(epochs=12)
    plain = R.STRATEGIES["fifo_random"]
    confirmed = R.STRATEGIES["fifo_random_confirm2x1"]
    a = S.simulate(plain, t, seed=4, num_trials=8, max_concurrent=1)
    b = S.simulate(confirmed, t, seed=4, num_trials=8, max_concurrent=1)
    assert [x.config for x in a.trials] == [x.config for x in b.trials]
    cats = t.categories
    # Cost: the search's, plus (top 2 + baseline) x 1 fresh seed x 12 epochs x 2 categories.
    assert b.epochs == a.epochs + 3 * 12 * len(cats)
    assert len(b.incumbents) == 1 and b.incumbents[0][0] == b.epochs
    done = [x for x in b.trials if x.state == "done"]
    top = sorted((x for x in done if not x.baseline), key=lambda x: -x.objective)[:2]
    candidates = [*top, done[0]]
    assert done[0].baseline

    def fresh_val(x):
        (other,) = [s for s in t.seeds(x.config, cats) if s != x.seed]
        return np.mean([t.val[(x.config, k, other)][-1] for k in cats])

    pick = max(candidates, key=lambda x: (fresh_val(x), x.baseline))
    assert b.final_config == pick.config
    assert b.final_test == pytest.approx(
        np.mean([t.test[(pick.config, k, pick.seed)] for k in cats])
    )
    assert b.final_true_test == pytest.approx(t.final_test(pick.config, cats))


def _with_scores(t: S.CurveTable, n: int = 20) -> S.CurveTable:
    """Made-up test scores per run whose separation follows the run's test value."""
    labels = np.array([1] * n + [0] * n)
    for i, key in enumerate(sorted(t.test)):
        rng = np.random.default_rng(i)
        shift = 4 * (t.test[key] - 0.5)
        t.scores[key] = (labels, rng.normal(0, 1, 2 * n) + shift * labels)
    return t


def test_confirmation_interval_is_the_services_over_fresh_seeds_scores():
    from mmr.metrics import image_auroc
    from search.confirm import gain_interval

    t = _with_scores(table(epochs=12))
    cats = t.categories
    confirmed = R.STRATEGIES["fifo_random_confirm2x1"]
    traces = [S.simulate(confirmed, t, seed=s, num_trials=8, max_concurrent=1) for s in range(6)]
    gained = [tr for tr in traces if tr.confirm_gain is not None]
    assert gained  # some searches export a configuration other than the baseline
    for tr in traces:
        base = next(x for x in tr.trials if x.baseline)
        if tr.final_config == base.config:
            assert tr.confirm_gain is None
            continue
        done = [x for x in tr.trials if x.state == "done" and not x.baseline]
        pick = max((x for x in done if x.config == tr.final_config), key=lambda x: x.objective)
        runs = []
        for x in (pick, base):  # each configuration's one fresh seed (not its search seed)
            (other,) = [s for s in t.seeds(x.config, cats) if s != x.seed]
            runs.append([{k: t.scores[(x.config, k, other)] for k in cats}])
        assert tr.confirm_gain == pytest.approx(gain_interval(*runs, seed=traces.index(tr)))
        expected = np.mean([image_auroc(s, y) for y, s in runs[0][0].values()]) - np.mean(
            [image_auroc(s, y) for y, s in runs[1][0].values()]
        )
        assert tr.confirm_gain[0] == pytest.approx(expected)
        assert tr.true_gain == pytest.approx(
            t.final_test(pick.config, cats) - t.final_test(base.config, cats)
        )
    doc = R.summarize(traces, t.best_test(cats))["confirm_interval"]
    covered = [lo <= tr.true_gain <= hi for tr in gained for _, lo, hi in [tr.confirm_gain]]
    assert doc["intervals"] == len(gained) and doc["searches"] == 6
    assert doc["coverage"] == pytest.approx(np.mean(covered), abs=1e-4)
    # Without recorded scores there is no interval (an older table).
    t.scores.clear()
    plain = S.simulate(confirmed, t, seed=0, num_trials=8, max_concurrent=1)
    assert plain.confirm_gain is None and "confirm_interval" not in R.summarize([plain], 0.9)


def test_confirmation_sizes_need_coverage_and_no_worse_export_and_are_not_the_search():
    def confirmed(total, final, coverage):
        e = _entry(50.0, 1.0, final)  # reaches sooner than anything: must not win the search
        e["epochs_total"] = {"median": total}
        e["confirm_interval"] = {"coverage": coverage}
        return e

    doc = {
        "fifo_random": _entry(900.0, 0.6, 0.80),
        "fifo_tpe": _entry(600.0, 0.7, 0.80),
        "fifo_tpe_confirm1x1": confirmed(700.0, 0.80, 0.99),  # one seed: a sweep refuses it
        "fifo_tpe_confirm1x2": confirmed(800.0, 0.80, 0.95),
        "fifo_tpe_confirm2x2": confirmed(900.0, 0.81, 0.97),
        "fifo_tpe_confirm3x2": confirmed(750.0, 0.79, 0.99),  # exports worse than the search
        "fifo_tpe_confirm2x1": confirmed(750.0, 0.80, 0.85),  # covers too rarely
        "fifo_random_confirm1x1": confirmed(100.0, 0.9, 1.0),  # another base's
    }
    assert R.evidence_best(doc) == "fifo_tpe"  # confirmation variants never win the search
    assert R.confirm_sizes(doc, "fifo_tpe") == "fifo_tpe_confirm1x2"  # cheapest eligible
    with pytest.raises(ValueError, match="search.confirm.seeds"):  # why 1x1 is not eligible
        S.sweep_spec(
            R.STRATEGIES["fifo_tpe"],
            table=table(epochs=12),
            categories=["nut"],
            num_trials=4,
            max_concurrent=1,
            seed=0,
            n_startup_trials=2,
            extra=["search.confirm.top_k=1", "search.confirm.seeds=1"],
        )
    doc["fifo_tpe_confirm1x2"]["confirm_interval"]["coverage"] = 0.89
    assert R.confirm_sizes(doc, "fifo_tpe") == "fifo_tpe_confirm2x2"
    doc["fifo_tpe_confirm2x2"]["final_test_auroc"]["median"] = 0.799
    assert R.confirm_sizes(doc, "fifo_tpe") is None  # none justified


def _fixed(name: str, prefix: str = "replay_fixed") -> dict:
    return json.loads((S.ROOT / "benchmarks" / "data" / f"{prefix}_{name}.json").read_text())


def _reach(name: str) -> dict:
    return _fixed(name, "replay_reach")


def test_the_default_is_the_rules_pick_on_fixed_teacher_seeds_0_29():
    """The shipped default: the search strategy evidence_best (rule "reach") picks on seeds
    0-29 of the fixed-teacher curves, then the confirmation sizes confirm_sizes picks after it,
    reported on seeds after those the first rule reported on."""
    choose, confirm, unseen = _reach("choose"), _reach("confirm"), _reach("unseen")
    for doc in (choose, confirm, unseen):
        assert doc["meta"]["curves"]["path"] == "benchmarks/data/curves_fixed.csv"
        assert doc["meta"]["curves"]["runs"] == choose["meta"]["curves"]["runs"]
        assert not str(doc["meta"]["source"]).startswith("made up")
        assert doc["rule"] == "reach"
    assert choose["meta"]["search_seeds"] == confirm["meta"]["search_seeds"] == [0, 29]
    # Every search strategy competed, and the rule, rerun, names the same pick.
    searches = [n for n, s in R.STRATEGIES.items() if shippable_search(s)]
    assert set(searches) <= set(choose)
    assert R.evidence_best(choose) == choose["best"]
    base = choose["best"]
    assert R.confirm_sizes(confirm, base) == confirm["confirm_best"] == R.DEFAULT_STRATEGY
    assert R.DEFAULT_STRATEGY.startswith(f"{base}_confirm")
    first, last = unseen["meta"]["search_seeds"]
    # Reported on seeds nobody chose on, nor saw before the rule was revised.
    assert first > _fixed("unseen")["meta"]["search_seeds"][1] and last - first + 1 >= 100
    assert unseen["default"] == R.DEFAULT_STRATEGY and R.DEFAULT_STRATEGY in unseen


def test_the_first_rules_evidence_stays_as_it_was_written():
    """The first rule's files (seeds 0-29 chose, 30-129 reported) keep what they say: their
    pick, the default of their day, and the revised rule on the same choosing seeds."""
    choose, confirm, unseen = _fixed("choose"), _fixed("confirm"), _fixed("unseen")
    assert "rule" not in choose  # written under the first rule, before rules had names
    assert R.evidence_best(choose) == R.evidence_best(choose, rule="epochs") == choose["best"]
    assert choose["best"] == "median_tpe_cats"
    assert R.confirm_sizes(confirm, "median_tpe_cats") == unseen["default"]
    assert unseen["default"] == "median_tpe_cats_confirm1x2" != R.DEFAULT_STRATEGY
    assert unseen["meta"]["search_seeds"] == [30, 129]
    # The same replay on the same seeds: the revised rule picks the current default's search.
    assert R.evidence_best(choose, rule="reach") == _reach("choose")["best"]
    for name in searches_in(choose):
        assert _reach("choose")[name]["reached"] == choose[name]["reached"], name


def searches_in(doc: dict) -> list[str]:
    return [n for n in doc if n in R.STRATEGIES and shippable_search(R.STRATEGIES[n])]


def shippable_search(strategy: S.Strategy) -> bool:
    return R.shippable(strategy) and not strategy.confirm_top_k


def test_the_readme_reports_the_fixed_teacher_evidence():
    choose, unseen = _reach("choose"), _reach("unseen")
    section = _readme_section("Choosing the search strategy")
    base = choose["best"]
    d, ref, old = unseen[R.DEFAULT_STRATEGY], unseen["fifo_random"], unseen[R.FIRST_TABLE_DEFAULT]
    search, tpe = unseen[base], unseen["fifo_tpe"]
    n = unseen["meta"]["seeds"]
    first, last = unseen["meta"]["search_seeds"]
    med = lambda e, key: e[key]["median"]  # noqa: E731
    of = lambda e, key="reached", m=n: f"{round(e[key] * m)}"  # noqa: E731
    ci = d["confirm_interval"]
    k2 = "epochs_to_target_0.02"
    # "GP without early stopping reached best - 0.01 in 25 of 30 searches; the next, TPE
    # without early stopping, in 16, and FIFO + random search in 9."
    runner_up = max(
        (n2 for n2 in searches_in(choose) if n2 != base), key=lambda n2: choose[n2]["reached"]
    )
    assert (base, runner_up) == ("fifo_gp", "fifo_tpe")
    assert R.STRATEGIES[R.DEFAULT_STRATEGY].sampler == "gp"
    claims = [
        f"all {unseen['meta']['table']['runs']} runs of its "
        f"{unseen['meta']['table']['configs']} configurations",
        f"--report-offset {first}",
        f"the report on seeds {first}-{last}",
        f"best - 0.01 in {of(choose[base], m=30)} of 30 searches; the next, TPE without early "
        f"stopping, in {of(choose[runner_up], m=30)}, and FIFO + random search in "
        f"{of(choose['fifo_random'], m=30)}",
        f"On the {n} seeds {first}-{last}",
        f"reached best - 0.01 in {of(d)} of {n} against {of(ref)} for FIFO + random search "
        f"({of(tpe)} for TPE without early stopping), at a median final test AUROC of "
        f"{med(d, 'final_test_auroc')} against {med(ref, 'final_test_auroc')}",
        f"{d['epochs_total']['median']:.0f} model-epochs per search against "
        f"{ref['epochs_total']['median']:.0f} for FIFO + random's search alone",
        f"best - 0.02 after {med(ref, k2):.0f} epochs (median), the default's search after "
        f"{med(search, k2):.0f} ({med(ref, k2) / med(search, k2):.2f}x fewer)",
        f"covered the true gain in {round(ci['coverage'] * ci['intervals'])} of {n}",
        f"lay above zero in {round(ci['beyond_noise'] * ci['intervals'])}",
        f"the first table's default, in {of(old)} of {n}",
        f"best - 0.01 takes more trials than the replay's {unseen['meta']['num_trials']} "
        f"({round(d['reached'] * 100)}% with {unseen['meta']['num_trials']} trials",
    ]
    # "with 8 at once ... GP reached best - 0.01 in 69 of 100 searches, TPE ... in 55, FIFO +
    # random in 31 as before"
    c8 = _reach("concurrent8")
    assert c8["meta"]["max_concurrent"] == 8 and unseen["meta"]["max_concurrent"] == 2
    assert c8["meta"]["search_seeds"] == [first, last]
    assert c8["meta"]["num_trials"] == unseen["meta"]["num_trials"]
    claims.append(
        f"GP reached best - 0.01 in {of(c8['fifo_gp'])} of {n} searches, TPE in "
        f"{of(c8['fifo_tpe'])}, FIFO + random in {of(c8['fifo_random'])} as before"
    )
    assert c8["fifo_random"]["reached"] == ref["reached"]  # "as before"
    from search.resolve import load_sweep_config

    for name in ("sweep_mvtec", "sweep_aebad_s"):  # "the production sweeps' max_concurrent"
        raw, _ = load_sweep_config(S.ROOT / "configs" / f"{name}.yaml")
        assert raw["search"]["max_concurrent"] == c8["meta"]["max_concurrent"], name
    assert c8["fifo_gp"]["reached"] < d["reached"]
    # "with 48 trials per search instead of 24, in 98 of 100 against 55 ... though 98% with 48"
    t48 = _reach("unseen_t48")
    assert t48["meta"]["search_seeds"] == [first, last]
    b, b_ref = t48[R.DEFAULT_STRATEGY], t48["fifo_random"]
    claims += [
        f"with {t48['meta']['num_trials']} trials per search instead of "
        f"{unseen['meta']['num_trials']}, in {of(b)} of {n} against {of(b_ref)}",
        f"though {round(b['reached'] * 100)}% with {t48['meta']['num_trials']}",
    ]
    # "It does not save epochs": the confirmed default reaches the target only at its end.
    total = d["epochs_total"]["median"]
    assert med(d, "epochs_to_target") == total > ref["epochs_total"]["median"]
    # "every early-stopping strategy ... reached best - 0.01 less often"
    stopping = [n2 for n2 in searches_in(unseen) if R.STRATEGIES[n2].scheduler != "fifo"]
    assert len(stopping) >= 4 and all(unseen[n2]["reached"] < d["reached"] for n2 in stopping)
    assert d["reached"] < 0.9  # "not met"
    # "Whenever a search trained a run at best - 0.01, validation picked it."
    trained = [e for e in unseen.values() if isinstance(e, dict) and "trained" in e]
    assert len(trained) >= 10 and all(e["trained"] == e["reached"] for e in trained)
    # "even early values that rank runs as the final ones do would save at most 1.8x"
    oracle = unseen["oracle"]
    ideal = max(med(oracle["fifo_random"], k2) / med(e, k2) for e in oracle.values() if med(e, k2))
    assert ideal < 3
    claims.append(f"would save at most {ideal:.1f}x")
    # The first rule's paragraph, from its own files (seeds 0-29 chose, 30-129 reported).
    o_choose, o_unseen = _fixed("choose"), _fixed("unseen")
    o_base, o_key = o_choose["best"], R.decisive_target(o_choose)
    o_d, o_ref = o_unseen[o_unseen["default"]], o_unseen["fifo_random"]
    o_n = o_unseen["meta"]["seeds"]
    claims += [
        f"({med(o_choose['fifo_random'], o_key) / med(o_choose[o_base], o_key):.2f}x fewer "
        "epochs than FIFO + random there)",
        f"reached best - 0.01 in {of(o_d, m=o_n)} of {o_n} against {of(o_ref, m=o_n)} "
        f"({med(o_ref, o_key) / med(o_d, o_key):.2f}x fewer epochs at best - 0.02)",
        f"GP without early stopping reached it in {of(o_unseen['fifo_gp'], m=o_n)} of {o_n}",
    ]
    assert o_base == "median_tpe_cats" and o_key == k2
    for claim in claims:
        assert claim in section, claim


def _benchmarks_text() -> str:
    return " ".join((S.ROOT / "BENCHMARKS.md").read_text().split())


def test_benchmarks_explains_gp_on_fabric_from_the_configurations_it_trained():
    """BENCHMARKS section 11: why GP reaches fabric's target less often than random search."""
    doc = _reach("unseen_fabric")
    gp, rnd = doc["fifo_gp"]["configs"], doc["fifo_random"]["configs"]
    target = doc["meta"]["targets"]["best-0.01"]
    t = R.load_table(S.ROOT / "benchmarks" / "data" / "curves_fixed.csv")
    at_target = sorted(c for c in t.configs(["fabric"]) if t.final_test(c, ["fabric"]) >= target)
    assert at_target == [2, 18]  # "two configurations are at the target, 2 ... and 18"
    assert doc["fifo_gp"]["reached"] < doc["fifo_random"]["reached"]
    n = lambda counts, c: counts.get(str(c), 0)  # noqa: E731
    text = _benchmarks_text()
    claims = [
        "two configurations are at the target, 2 (mask ratio 0.1, lr 0.003) and 18",
        f"it trains configurations 0, 1 and 8 in {n(gp['trained'], 0)}, {n(gp['trained'], 1)} "
        f"and {n(gp['trained'], 8)} of 100 searches (random search {n(rnd['trained'], 0)}, "
        f"{n(rnd['trained'], 1)}, {n(rnd['trained'], 8)}) and 18 in only "
        f"{n(gp['trained'], 18)} (random {n(rnd['trained'], 18)})",
        f"GP exports 2 in {n(gp['exported'], 2)} searches and 9 in {n(gp['exported'], 9)}, "
        f"random search 18 in {n(rnd['exported'], 18)} and 2 in {n(rnd['exported'], 2)}",
    ]
    for claim in claims:
        assert claim in text, claim
    # "validation often prefers 9 (test 0.851)": 9 is below the target, GP exports it often.
    assert 9 not in at_target and f"prefers 9 (test {t.final_test(9, ['fabric']):.3f})" in text
    assert n(gp["exported"], 9) > n(rnd["exported"], 9)
    # "nearly flat over mask ratio 0.1 ... (seed means 0.862-0.875 for configurations 0, 1, 2
    # and 9 ...) where its test AUROC is not (0.828-0.917)"
    four = (0, 1, 2, 9)
    val = [
        float(np.mean([t.val[(c, "fabric", s)][-1] for s in t.seeds(c, ["fabric"])])) for c in four
    ]
    test = [t.final_test(c, ["fabric"]) for c in four]
    assert f"(seed means {min(val):.3f}-{max(val):.3f} for configurations 0, 1, 2 and 9" in text
    assert f"its test AUROC is not ({min(test):.3f}-{max(test):.3f})" in text


def test_benchmarks_bounds_the_epoch_ratios_with_confirmation_included():
    """BENCHMARKS section 11: the confirmed export exists only after the whole search and its
    confirmation, so the ratio's bound is the cheapest whole oracle search plus confirmation."""
    default = R.STRATEGIES[R.DEFAULT_STRATEGY]
    text = _benchmarks_text()

    def bound(doc: dict, replayed: dict, categories: int) -> tuple[str, float, float, float]:
        epochs = replayed["meta"]["table"]["epochs"]  # per confirmation trial and category
        confirm = (default.confirm_top_k + 1) * default.confirm_seeds * epochs * categories
        assert replayed[R.DEFAULT_STRATEGY]["epochs_total"]["median"] == (
            replayed["fifo_random"]["epochs_total"]["median"] + confirm
        )  # the default's cost: its whole search plus the confirmation
        oracle = {
            k: v for k, v in doc["oracle"].items() if isinstance(v, dict) and k != "fifo_random"
        }
        name = min(oracle, key=lambda k: oracle[k]["epochs_total"]["median"])
        return name, oracle[name]["epochs_total"]["median"], confirm, oracle[name]["reached"]

    fabric = _reach("oracle_fabric")
    name, search, confirm, reached = bound(fabric, _reach("unseen_fabric"), 1)
    ref = fabric["fifo_random"]["epochs_to_target"]["median"]
    assert name == "asha_random" and reached >= 0.5
    assert f"is `{name}`'s: {search:.0f} model-epochs on fabric (median), so " in text
    assert f"{search + confirm:.0f} with confirmation against FIFO + random's {ref:.0f}" in text
    one = ref / (search + confirm)
    assert f"({one:.1f}x, not 2x)" in text and one < 2
    for category in ("nut", "grid", "pill"):  # "FIFO + random has no median"
        doc = _reach(f"oracle_{category}")
        assert doc["fifo_random"]["epochs_to_target"]["median"] is None, category
        assert doc["fifo_random"]["epochs_to_target_0.02"]["median"] is None, category
    unseen = _reach("unseen")
    name, search, confirm, _ = bound(unseen, unseen, 4)
    ref = unseen["fifo_random"]["epochs_to_target_0.02"]["median"]
    assert name == "asha_random"
    assert (
        f"{search:.0f} + {confirm:.0f} = {search + confirm:.0f} against FIFO + random's " in text
    )
    assert f"{ref:.0f} to best - 0.02 ({ref / (search + confirm):.2f}x, not 3x)" in text
    assert ref / (search + confirm) < 3
    # The README's summary of both bounds.
    readme = _readme_section("Choosing the search strategy")
    assert f"and {ref / (search + confirm):.2f}x once the confirmation runs are counted" in readme
    assert f"2x on one category: {one:.1f}x on fabric with them counted" in readme


def test_gp_samples_with_the_running_trials_and_fewer_trials_when_more_run_at_once(monkeypatch):
    """README and BENCHMARKS: Optuna's GPSampler takes the trials still running into account;
    with 8 at once it samples 13 of 24 trials, with 2 at once 19 (the 4 start-up trials must
    finish first)."""
    import optuna.samplers._gp.sampler as gp  # private, in the Optuna versions pyproject allows

    asks: list[tuple[int, int]] = []
    sample = gp.GPSampler._sample_relative_impl

    def spy(self, study, completed, running, space):
        asks.append((len(completed), len(running)))
        return sample(self, study, completed, running, space)

    monkeypatch.setattr(gp.GPSampler, "_sample_relative_impl", spy)
    t = R.load_table(S.ROOT / "benchmarks" / "data" / "curves_fixed.csv")
    sampled = {}
    for concurrent in (8, 2):
        asks.clear()
        S.simulate(R.STRATEGIES["fifo_gp"], t, seed=130, num_trials=24, max_concurrent=concurrent)
        assert asks[0][0] == 4  # the model samples once the 4 start-up trials have finished
        assert all(running == concurrent - 1 for _, running in asks)  # the others still run
        sampled[concurrent] = len(asks)
    text = " ".join((S.ROOT / "README.md").read_text().split())
    claim = (
        f"so with 8 at once it samples {sampled[8]} of the 24 trials ({sampled[2]} with 2 at once)"
    )
    assert claim in text
    assert f"so it samples {sampled[8]} of the 24 trials with 8 at once ({sampled[2]} with 2)" in (
        _benchmarks_text()
    )


def test_benchmarks_sizes_the_best_configurations_cell_of_the_space():
    """BENCHMARKS section 11: the points that map to the only configuration at best - 0.01
    are 1.76% of the space, and 23 random trials train it with probability 34%."""
    from spaces import load_space

    unseen = _reach("unseen")
    t = R.load_table(S.ROOT / "benchmarks" / "data" / "curves_fixed.csv")
    cats = t.categories
    target = unseen["meta"]["targets"]["best-0.01"]
    (best,) = [c for c in t.configs(cats) if t.final_test(c, cats) >= target - 1e-9]
    space = load_space(S.ROOT / "spaces" / "demo.yaml")
    params = t.params[best]
    # The cell: per numeric parameter the stretch nearer its value than any other recorded one
    # (log scale for log: true), per categorical one choice of several.
    share = 1.0
    bounds = {}
    for p in space.params:
        name = p.key.rsplit(".", 1)[-1]
        if p.type == "categorical":
            share /= len(p.choices)
            continue
        scale = math.log if p.log else float
        values = sorted({scale(t.params[c][name]) for c in t.configs(cats)})
        i = values.index(scale(params[name]))
        lo = (values[i - 1] + values[i]) / 2 if i > 0 else scale(p.low)
        hi = (values[i] + values[i + 1]) / 2 if i + 1 < len(values) else scale(p.high)
        share *= (hi - lo) / (scale(p.high) - scale(p.low))
        bounds[name] = (math.exp(lo), math.exp(hi)) if p.log else (lo, hi)
    # The replay's own mapping agrees (uniform points through Nearest; 4 sigma).
    near = S.Nearest(t, space, cats)
    rng = np.random.default_rng(0)
    n = 8000
    hits = 0
    for _ in range(n):
        point = {}
        for p in space.params:
            if p.type == "categorical":
                point[p.key] = p.choices[rng.integers(len(p.choices))]
            elif p.log:
                point[p.key] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                point[p.key] = rng.uniform(p.low, p.high)
        hits += near(point) == best
    assert abs(hits / n - share) < 4 * math.sqrt(share * (1 - share) / n)
    random_trials = unseen["meta"]["num_trials"] - 1  # the first trial is the baseline
    p_hit = 1 - (1 - share) ** random_trials
    ref = unseen["fifo_random"]
    assert abs(ref["trained"] - p_hit) < 0.1  # what FIFO + random search trained, near it
    text = _benchmarks_text()
    lo, hi = bounds["lr"]
    claims = [
        f"only configuration {best} reaches best - 0.01 over the four categories",
        f"(mask ratio below {bounds['mask_ratio'][1]:.2f}, patch {params['patch_size']}, "
        f"stages 1-2-3, lr between {lo:.4f} and {hi:.4f}) are {share:.2%} of the space",
        f"A search of {random_trials} random trials (the 24th is the baseline) trains it with "
        f"probability 1 - (1 - {share:.4f})^{random_trials} = {p_hit:.0%}",
        f"GP trains it in {round(unseen['fifo_gp']['trained'] * 100)} of 100",
    ]
    for claim in claims:
        assert claim in text, claim
    assert params["teacher_layers"] in ((1, 2, 3), [1, 2, 3])
