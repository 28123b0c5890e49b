"""benchmarks.testbed: how much of a curve table's spread is configuration, how much seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import curves, testbed


def test_icc_is_one_without_seed_noise_and_near_zero_for_pure_noise():
    configs = np.linspace(0.6, 0.9, 12)[:, None]
    assert testbed.icc1(np.repeat(configs, 3, axis=1)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert abs(testbed.icc1(rng.normal(0.7, 0.05, size=(400, 3)))) < 0.1
    # Hand-computed: two configs x two seeds, MSB = 2 * (0.0025 + 0.0025) / 1 = 0.01,
    # MSW = 4 * 0.0001 / (2 * 1) = 0.0002.
    m = np.array([[0.60, 0.62], [0.70, 0.72]])
    assert testbed.icc1(m) == pytest.approx((0.01 - 0.0002) / (0.01 + 0.0002))


def test_noise_stats_of_a_table_whose_configurations_dominate():
    frame = curves.made_up_rows(epochs=6)  # sd 0.002 noise on the curves, test = quality
    stats = testbed.noise_stats(frame)
    assert set(stats) == {"nut", "fabric"}
    for row in stats.values():
        assert row["configs"] == 48 and row["seeds"] == 2
        assert row["icc"] == pytest.approx(1.0) and row["seed_rank"] > 0.95
        assert row["gap_seed"] == pytest.approx(0.0) and row["sd_config"] > 0.05
        assert row["val_test_run"] > 0.9 and row["val_test_mean"] > 0.9


def test_noise_stats_see_seed_noise_that_swamps_configurations():
    frame = curves.made_up_rows(epochs=6)
    last = frame["test_image_auroc"].notna()
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.5, size=int(last.sum()))
    frame.loc[last, "test_image_auroc"] = frame.loc[last, "test_image_auroc"] + noise
    row = testbed.noise_stats(frame)["nut"]
    assert row["icc"] < 0.3 and row["seed_rank"] < 0.5 and row["val_test_run"] < 0.5
    md = testbed.render({"made-up": testbed.noise_stats(frame)})
    assert "| made-up | nut |" in md and "icc" in md.splitlines()[0]


def test_fixed_testbed_plan_is_configuration_major_with_every_seed_and_category():
    runs = curves.planned_runs(curves.FIXED)
    per_config = len(curves.FIXED.seeds) * len(curves.FIXED.categories)
    assert len(curves.FIXED.seeds) >= 3 and len(curves.FIXED.categories) >= 4
    assert len(runs) == 48 * per_config and len({r.key for r in runs}) == len(runs)
    for start in range(0, len(runs), per_config):
        block = runs[start : start + per_config]
        assert len({r.config for r in block}) == 1  # a prefix holds whole configurations
        assert {(r.seed, r.category) for r in block} == {
            (s, c) for s in curves.FIXED.seeds for c in curves.FIXED.categories
        }
    from mmr.config import load_config

    # Both tables predate model.teacher_seed: without a file, a run draws its teacher from its
    # training seed as the first table's runs did, whatever the tiny config fixes.
    first = load_config(curves.BASE_CONFIG, runs[0].overrides())
    assert first.model.teacher_seed is None and first.model.teacher_checkpoint is None
    fixed = load_config(curves.BASE_CONFIG, runs[0].overrides(Path("/t.pt")))
    assert fixed.model.teacher_checkpoint == "/t.pt"


def test_the_tiny_configs_teacher_is_the_testbeds_chosen_teacher(tmp_path, monkeypatch):
    import torch

    from benchmarks import teacher
    from mmr.config import load_config
    from mmr.model import build_teacher

    monkeypatch.setenv("MMR_CACHE_DIR", str(tmp_path))
    chosen = torch.load(teacher.teacher_file(), weights_only=True)
    cfg = load_config(curves.BASE_CONFIG).model
    assert cfg.teacher_seed == teacher.CHOSEN_SEED
    tiny = build_teacher(cfg).net.state_dict()
    assert tiny.keys() == chosen.keys() and all(torch.equal(tiny[k], chosen[k]) for k in tiny)


def test_fixed_teacher_file_is_the_same_weights_wherever_it_is_built(tmp_path, monkeypatch):
    from benchmarks import teacher

    monkeypatch.setenv("MMR_CACHE_DIR", str(tmp_path / "a"))
    a = teacher.teacher_file(3)
    monkeypatch.setenv("MMR_CACHE_DIR", str(tmp_path / "b"))
    b = teacher.teacher_file(3)
    assert a != b and teacher.sha256(a) == teacher.sha256(b)
    monkeypatch.setenv("MMR_CACHE_DIR", str(tmp_path / "c"))
    assert teacher.sha256(teacher.teacher_file(4)) != teacher.sha256(a)


def test_readme_quotes_the_seed_noise_of_the_recorded_curves():
    stats = testbed.noise_stats(curves.load_curves(curves.DEFAULT_OUT))
    text = (curves.ROOT / "README.md").read_text()
    start = text.index("## Telling a better configuration from a lucky seed")
    section = " ".join(text[start : text.index("\n## ", start + 3)].split())
    nut, fabric = stats["nut"], stats["fabric"]
    assert f"{nut['gap_seed']:.3f} (nut) and {fabric['gap_seed']:.3f} (fabric)" in section
    assert f"Spearman {nut['seed_rank']:.2f} and {fabric['seed_rank']:.2f}" in section
    assert f"correlation {nut['icc']:.2f} and {fabric['icc']:.2f})" in section
    assert max(nut["icc"], fabric["icc"]) < 0.1  # "as much as the configurations differ"


def test_a_testbed_with_scores_records_each_runs_test_image_scores(tmp_path, monkeypatch):
    monkeypatch.setattr(curves, "EPOCHS", 3)
    bed = curves.Testbed("t", tmp_path / "c.csv", (1,), ("nut",), True, False, scores=True)
    assert curves.record(limit=1, testbed=bed) == 1
    table, scores = curves.load_curves(bed.out), curves.load_scores(bed.scores_path())
    (key,) = {(int(c), k, int(s)) for c, k, s in table[["config", "category", "seed"]].values}
    labels, values = scores[key]
    assert len(labels) == len(values) > 0 and set(labels) == {0, 1}
    from mmr.metrics import image_auroc

    test = table.sort_values("epoch")["test_image_auroc"].iloc[-1]
    assert image_auroc(np.array(values), np.array(labels)) == pytest.approx(test, abs=1e-5)
    # A run whose scores line is missing counts as pending (it is trained again); a line
    # cut short by a kill is skipped and ended before the next one.
    bed.scores_path().write_text('{"config": 1, "categ')
    assert list(curves.pending(bed.out, curves.planned_runs(bed)[:1], bed.scores_path()))
    curves._append_line(bed.scores_path(), {"config": 7, "category": "x", "seed": 1,
                                            "labels": [0], "scores": [0.5]})  # fmt: skip
    assert list(curves.load_scores(bed.scores_path())) == [(7, "x", 1)]


def test_the_readme_quotes_the_committed_fixed_teacher_figures():
    """The README's figures on the fixed-teacher curves are benchmarks/data/testbed.json's
    (written with the replay's snapshot of the table), and that snapshot is the replay's."""
    import json

    root = Path(__file__).resolve().parent.parent
    doc = json.loads((root / "benchmarks" / "data" / "testbed.json").read_text())
    replay = json.loads((root / "benchmarks" / "data" / "replay_fixed_choose.json").read_text())
    runs = doc["runs"]["curves_fixed.csv"]
    assert runs == replay["meta"]["curves"]["runs"]
    stats = doc["stats"]["curves_fixed.csv"]
    iccs = [row["icc"] for row in stats.values()]
    positive = [row["val_test_run"] for row in stats.values() if row["val_test_run"] > 0]
    text = " ".join((root / "README.md").read_text().split())
    planned = len(curves.planned_runs(curves.FIXED))
    configs = min(row["configs"] for row in stats.values())
    claims = [
        f"from all {runs} of {planned} runs"
        if runs == planned
        else f"from its first {runs} of {planned} runs",
        f"intra-class correlation {min(iccs):.2f}-{max(iccs):.2f} over its "
        + ("" if runs == planned else "first ")
        + f"{configs} configurations",
        f"(Spearman {min(positive):.2f}-{max(positive):.2f} per run, pill in reverse)",
    ]
    for claim in claims:
        assert claim in text, claim
    assert stats["pill"]["val_test_run"] < 0
