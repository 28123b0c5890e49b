"""benchmarks.evidence: the default's evidence in one command, chosen and reported on
disjoint search seeds."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from benchmarks import curves, evidence
from benchmarks import replay as R
from benchmarks import replay_sim as S


def _doc(out, step: str) -> dict:
    return json.loads(out.with_name(f"{out.name}_{step}.json").read_text())


def test_evidence_chooses_on_the_first_seeds_and_reports_on_the_next(tmp_path, capsys):
    path = tmp_path / "curves.csv"
    rows = curves.made_up_rows(epochs=8, configs=list(range(0, 48, 6)))
    # A configuration recorded with one seed only (a table still being recorded): left out.
    partial = rows[(rows["config"] == 3) & (rows["seed"] == min(curves.SEEDS))]
    rows = rows[rows["config"] != 3]
    pd.concat([rows, partial.assign(config=3)]).to_csv(path, index=False)
    out = tmp_path / "ev" / "replay_x"
    choose = "fifo_random,fifo_tpe,median_random"
    argv = ["--table", str(path), "--out", str(out), "--choose-seeds", "2", "--report-seeds"]
    argv += ["2", "--trials", "4", "--workers", "1", "--choose", choose, "--reported"]
    argv += ["fifo_random,median_cmaes", "--testbed", str(tmp_path / "testbed.json")]
    argv += ["--budgets", "6"]
    code = evidence.main(argv)
    first, second, third = _doc(out, "choose"), _doc(out, "confirm"), _doc(out, "unseen")
    assert first["meta"]["search_seeds"] == second["meta"]["search_seeds"] == [0, 1]
    assert third["meta"]["search_seeds"] == [2, 3]  # reported on seeds that chose nothing
    assert set(choose.split(",")) <= set(first) and R.evidence_best(first) == first["best"]
    assert first["rule"] == "reach"  # the current rule (--rule epochs: the first)
    base = first["best"]
    assert set(second) >= {base, f"{base}_confirm1x2"}
    pick = R.confirm_sizes(second, base) or base  # made-up curves have no test scores: None
    assert {pick, R.DEFAULT_STRATEGY, base, "median_cmaes"} <= set(third)
    for doc in (first, second, third):
        assert doc["meta"]["curves"]["whole_configs"] is True
        assert doc["meta"]["table"]["configs"] == 8  # the partial configuration left out
    for category in third["meta"]["table"]["categories"]:
        assert _doc(out, f"unseen_{category}")["meta"]["table"]["categories"] == [category]
    assert out.with_name(f"{out.name}_unseen.md").is_file()
    budget = _doc(out, "unseen_t6")
    assert budget["meta"]["num_trials"] == 6 and third["meta"]["num_trials"] == 4
    assert budget["meta"]["search_seeds"] == [2, 3] and {pick, base} <= set(budget)
    testbed = json.loads((tmp_path / "testbed.json").read_text())
    assert testbed["runs"]["curves.csv"] == third["meta"]["curves"]["runs"]
    printed = capsys.readouterr().out.splitlines()[-1]
    same = pick == R.DEFAULT_STRATEGY
    assert f"-> {pick}; shipped default {R.DEFAULT_STRATEGY}" in printed
    assert code == 0 and ("the same" if same else "DIFFERENT") in printed
    if not same:
        assert evidence.main([*argv, "--check", "--no-per-category"]) == 1


def test_whole_keeps_the_configurations_with_every_seed_on_every_category():
    rows = curves.made_up_rows(epochs=4, configs=[0, 6, 12])
    drop = (
        (rows["config"] == 6) & (rows["seed"] == max(curves.SEEDS)) & (rows["category"] == "nut")
    )
    t = S.CurveTable.from_frame(rows[~drop])
    whole = t.whole()
    assert sorted(whole.params) == [0, 12] and {k[0] for k in whole.val} == {0, 12}
    assert len(whole.val) == 2 * len(curves.SEEDS) * len(curves.CATEGORIES)
    assert sorted(t.params) == [0, 6, 12]  # the table itself unchanged


def test_evidence_refuses_unknown_strategies_and_missing_tables(tmp_path):
    with pytest.raises(SystemExit):
        evidence.main(["--table", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x_choose.json").exists()
    path = tmp_path / "c.csv"
    curves.made_up_rows(epochs=4, configs=[0, 6]).to_csv(path, index=False)
    with pytest.raises(SystemExit):
        evidence.main(["--table", str(path), "--out", str(tmp_path / "x"), "--choose", "nope"])
    assert not list(tmp_path.glob("x_*"))


def test_evidence_never_overwrites_files_it_did_not_write(tmp_path):
    path = tmp_path / "c.csv"
    curves.made_up_rows(epochs=4, configs=[0, 6]).to_csv(path, index=False)
    notes = tmp_path / "x_choose.md"
    notes.write_text("my notes\n")
    with pytest.raises(SystemExit):
        evidence.main(["--table", str(path), "--out", str(tmp_path / "x")])
    mine = tmp_path / "mine.json"
    mine.write_text('{"a": 1}\n')
    with pytest.raises(SystemExit):
        evidence.main(["--table", str(path), "--out", str(tmp_path / "y"), "--testbed", str(mine)])
    assert notes.read_text() == "my notes\n" and mine.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "mine.json", "x_choose.md"]


def test_evidence_reports_on_seeds_of_someone_elses_choosing(tmp_path):
    path = tmp_path / "c.csv"
    curves.made_up_rows(epochs=8, configs=[0, 6, 12]).to_csv(path, index=False)
    argv = ["--table", str(path), "--choose-seeds", "2", "--report-seeds", "2", "--trials", "3"]
    argv += ["--workers", "1", "--choose", "fifo_random,fifo_tpe", "--reported", "fifo_random"]
    argv += ["--no-per-category"]
    # Reporting on seeds that chose is refused before anything is written.
    with pytest.raises(SystemExit):
        evidence.main([*argv, "--out", str(tmp_path / "a"), "--report-offset", "1"])
    assert not list(tmp_path.glob("a_*"))
    evidence.main([*argv, "--out", str(tmp_path / "b"), "--report-offset", "1000"])
    assert _doc(tmp_path / "b", "choose")["meta"]["search_seeds"] == [0, 1]
    assert _doc(tmp_path / "b", "unseen")["meta"]["search_seeds"] == [1000, 1001]
