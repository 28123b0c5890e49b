"""The evidence behind the shipped search default, in one command: chosen on some search seeds,
reported on others.

``python -m benchmarks.evidence --table benchmarks/data/curves_fixed.csv --out
benchmarks/data/replay_fixed`` runs, through ``benchmarks.replay`` (each step writes its
``<out>_<step>.json`` and ``.md``):

1. ``choose``: every search strategy (no confirmation) on search seeds ``0 .. C - 1``;
   ``replay.evidence_best`` names the search strategy to ship.
2. ``confirm``: that strategy and its confirmation variants on the same seeds;
   ``replay.confirm_sizes`` names the confirmation after it. The pick is the search strategy
   with those sizes (or without confirmation when none is justified).
3. ``unseen``: the pick, the shipped default (``replay.DEFAULT_STRATEGY``, when another), the
   pick's search alone, FIFO + random and ``REPORTED`` on the ``R`` search seeds after those
   (or from ``--report-offset`` on: seeds of someone else's choosing), which chose nothing,
   with the ideal early-stopping bound (``oracle``).
4. ``unseen_<category>``: the same seeds with each category's curves alone as the objective.
5. ``unseen_t<N>`` (``--budgets N,...``): the pick, its search and FIFO + random with N
   trials per search on the same seeds: how reach grows with the budget (reported only).

Only configurations recorded with every seed on every category are replayed (``replay
--whole-configs``; ``--all-configs`` replays the others too), so a table still being recorded
can be replayed at any time; ``--testbed``
also writes ``benchmarks.testbed``'s figures for the first table and this one. It prints the
pick and whether it is the shipped default; ``--check`` exits with 1 when it is not. Choosing
on seeds ``0 .. C - 1`` and reporting on the next ``R`` is the rule: a default picked on the
seeds that report it proves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import replay
from benchmarks.common import ROOT

__all__ = ["REPORTED", "foreign_outputs", "search_strategies", "run"]

log = logging.getLogger(__name__)

# Reported beside the pick on the unseen seeds (chosen before seeing them: every sampler
# without early stopping, the first table's default and the early-stopping families).
REPORTED = (
    "fifo_random",
    "fifo_tpe",
    "fifo_gp",
    "fifo_cmaes",
    replay.FIRST_TABLE_DEFAULT,
    "asha_gp_g3",
    "median_random_cats",
    "asha_random_cats",
    "median_cmaes_cats",
)


def search_strategies() -> list[str]:
    """Every replayed strategy that is a search alone (no confirmation runs after it)."""
    return [n for n, s in replay.STRATEGIES.items() if not s.confirm_top_k]


def _replay(out: Path, step: str, args: list[str]) -> dict[str, Any]:
    """One ``benchmarks.replay`` run writing ``<out>_<step>.json`` and ``.md`` (its JSON on
    stdout, which the files hold, is dropped; its progress log stays)."""
    path = out.with_name(f"{out.name}_{step}.json")
    with contextlib.redirect_stdout(io.StringIO()):
        replay.main([*args, "--json", str(path), "--markdown", str(path.with_suffix(".md"))])
    log.info("%s: %s", step, path)
    return json.loads(path.read_text())


def run(
    table: Path,
    out: Path,
    *,
    choose_seeds: int = 30,
    report_seeds: int = 100,
    report_offset: int | None = None,
    trials: int = 24,
    workers: int = 2,
    whole: bool = True,
    choose: Sequence[str] | None = None,
    reported: Sequence[str] = REPORTED,
    per_category: bool = True,
    budgets: Sequence[int] = (),
    rule: str = replay.RULES[0],
) -> dict[str, Any]:
    """The steps of the module doc; returns ``{"pick", "search", "sizes", "default"}``.

    ``choose``: the search strategies step 1 compares (default: ``search_strategies()``);
    ``report_offset``: the first reporting seed (default: ``choose_seeds``, right after them);
    ``rule``: ``replay.evidence_best``'s rule for step 1's pick.
    """

    def with_trials(n: int) -> list[str]:
        out = ["--table", str(table), "--trials", str(n), "--workers", str(workers)]
        out += ["--rule", rule, "--warm-seeds", "0"]
        return out + (["--whole-configs"] if whole else [])

    common = with_trials(trials)
    names = list(choose or search_strategies())
    first = _replay(
        out, "choose", [*common, "--seeds", str(choose_seeds), "--strategies", ",".join(names)]
    )
    base = first["best"]
    sizes = [
        n
        for n, s in replay.STRATEGIES.items()
        if s.confirm_top_k and n == f"{base}_confirm{s.confirm_top_k}x{s.confirm_seeds}"
    ]
    second = _replay(
        out,
        "confirm",
        [
            *common,
            "--seeds",
            str(choose_seeds),
            "--oracle-seeds",
            "0",
            "--strategies",
            ",".join([base, *sizes]),
        ],
    )
    confirmed = replay.confirm_sizes(second, base)
    pick = confirmed or base
    # FIFO + random with the pick's confirmation too: the reference's whole budget alike.
    alike = f"fifo_random{pick.removeprefix(base)}" if confirmed else "fifo_random"
    report = [pick, replay.DEFAULT_STRATEGY, base, *reported, alike]
    report = [n for n in dict.fromkeys(report) if n in replay.STRATEGIES]
    first_report = choose_seeds if report_offset is None else report_offset
    offset = ["--seeds", str(report_seeds), "--seed-offset", str(first_report)]
    third = _replay(out, "unseen", [*common, *offset, "--strategies", ",".join(report)])
    if per_category:
        for category in third["meta"]["table"]["categories"]:
            _replay(
                out,
                f"unseen_{category}",
                [
                    *common,
                    *offset,
                    "--oracle-seeds",
                    "0",
                    "--categories",
                    category,
                    "--strategies",
                    ",".join(dict.fromkeys([pick, replay.DEFAULT_STRATEGY, base])),
                ],
            )
    for budget in budgets:
        _replay(
            out,
            f"unseen_t{budget}",
            [
                *with_trials(budget),
                *offset,
                "--oracle-seeds",
                "0",
                "--strategies",
                ",".join(dict.fromkeys([pick, base, alike])),
            ],
        )
    return {"pick": pick, "search": base, "sizes": confirmed, "default": replay.DEFAULT_STRATEGY}


def foreign_outputs(out: Path, testbed: Path | None = None) -> list[Path]:
    """Files at the output paths that no earlier evidence or testbed run wrote: refused, as
    the project never overwrites what it did not write."""

    def ours(path: Path, keys: set[str]) -> bool:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and keys <= set(doc)

    bad = []
    for path in sorted(out.parent.glob(f"{out.name}_*")):
        if path.suffix == ".json" and not ours(path, {"meta", "fifo_random"}):
            bad.append(path)
        elif path.suffix == ".md" and not ours(path.with_suffix(".json"), {"meta"}):
            bad.append(path)
    if testbed is not None and testbed.exists() and not ours(testbed, {"stats", "runs"}):
        bad.append(testbed)
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks/data/curves_fixed.csv")
    parser.add_argument(
        "--out", type=Path, required=True, help="prefix of the files (<out>_choose.json, ...)"
    )
    parser.add_argument("--choose-seeds", type=int, default=30, help="seeds 0 .. C - 1 choose")
    parser.add_argument("--report-seeds", type=int, default=100, help="the next R report")
    parser.add_argument(
        "--report-offset",
        type=int,
        default=None,
        help="first reporting seed (default: right after the choosing ones; any seeds >= C)",
    )
    parser.add_argument("--trials", type=int, default=24, help="trials per search")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--all-configs",
        action="store_true",
        help="also replay configurations recorded with only some of their seeds",
    )
    parser.add_argument("--choose", default="", help="step 1's strategies (default: all)")
    parser.add_argument(
        "--reported", default=",".join(REPORTED), help="step 3's strategies beside the pick"
    )
    parser.add_argument("--no-per-category", action="store_true", help="skip step 4")
    parser.add_argument(
        "--budgets", default="", help="step 5: trials per search to replay besides --trials"
    )
    parser.add_argument(
        "--testbed", type=Path, default=None, help="also write benchmarks.testbed's JSON here"
    )
    parser.add_argument(
        "--rule",
        choices=replay.RULES,
        default=replay.RULES[0],
        help="replay.evidence_best's rule (epochs: the first, which chose until 2026-12-06)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 unless pick == default")
    args = parser.parse_args(argv)
    if not args.table.is_file():
        parser.error(f"--table {args.table}: no such file (record one: benchmarks.curves)")
    if args.choose_seeds < 1 or args.report_seeds < 1:
        parser.error("--choose-seeds and --report-seeds must be >= 1")
    if args.report_offset is not None and args.report_offset < args.choose_seeds:
        parser.error(
            f"--report-offset {args.report_offset} reports on seeds that chose "
            f"(0-{args.choose_seeds - 1}): give {args.choose_seeds} or more"
        )
    unknown = [
        n
        for n in [*args.choose.split(","), *args.reported.split(",")]
        if n and n not in replay.STRATEGIES
    ]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r} (see benchmarks.replay.STRATEGIES)")
    foreign = foreign_outputs(args.out, args.testbed)
    if foreign:
        parser.error(
            f"{foreign[0]} exists and is not a replay or testbed output: "
            "pick another --out / --testbed (nothing is overwritten)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(
        args.table,
        args.out,
        choose_seeds=args.choose_seeds,
        report_seeds=args.report_seeds,
        report_offset=args.report_offset,
        trials=args.trials,
        workers=args.workers,
        whole=not args.all_configs,
        choose=[n for n in args.choose.split(",") if n] or None,
        reported=[n for n in args.reported.split(",") if n],
        per_category=not args.no_per_category,
        budgets=[int(b) for b in args.budgets.split(",") if b],
        rule=args.rule,
    )
    if args.testbed is not None:
        from benchmarks import testbed

        testbed.main([str(replay.DEFAULT_TABLE), str(args.table), "--json", str(args.testbed)])
    same = result["pick"] == result["default"]
    print(
        f"evidence (seeds 0-{args.choose_seeds - 1}, rule {args.rule}): search "
        f"{result['search']}, confirmation {result['sizes'] or 'none justified'} -> "
        f"{result['pick']}; shipped default "
        f"{result['default']}: {'the same' if same else 'DIFFERENT'}"
    )
    return 1 if args.check and not same else 0


if __name__ == "__main__":
    sys.exit(main())
