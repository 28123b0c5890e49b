"""Reach against budget: how many trials the shipped default needs, and what no budget buys.

``python -m benchmarks.budgets`` replays, through ``benchmarks.replay`` on the fixed-teacher
curves and search seeds nobody chose on (``--seed-offset``, 230 by default), the shipped
default, its search alone, FIFO + TPE and FIFO + random with each of ``BUDGETS`` trials per
search (2 at a time, with the ideal early-stopping bound); then once with the production sweep's
search shape (trials, trials at once and start-up trials read from ``configs/sweep_mvtec.yaml``);
then each category (``--categories``, default all) alone at the largest budget. Each replay writes
``<out>_t<N>.json`` (``_production``, ``_<category>_t<N>``) and its ``.md``; one already
written with the same settings is reused, so an interrupted run resumes (one replayed with
other settings, or a file this command did not write, is refused before anything runs). The
table and the bound are printed and written to ``<out>.md``. Nothing is chosen here: it
reports the default already chosen on seeds 0-29 (``benchmarks.evidence``).

The bound: a search's confirmed export exists only after the search stops and its confirmation
trials have trained. Even a search that stopped at the very moment its incumbent first reached
the target (which no search can know) costs its median epochs to the target plus the
confirmation, so FIFO + random's median epochs to the target over the fewest such median of
any strategy replayed, early stopping at its ideal (the oracle table) included, is the most any
of them can save at that budget. ``fixed_bound`` asks the same of a search whose number of trials
is fixed before it starts, as every sweep's is, and which reaches the target in 90% of the
searches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks import replay
from benchmarks.common import ROOT

__all__ = [
    "BUDGETS",
    "NAMES",
    "production_shape",
    "bound",
    "fixed_bound",
    "render",
    "plan",
    "check",
    "execute",
    "run",
]

log = logging.getLogger(__name__)

BUDGETS = (8, 12, 16, 24, 32, 48)
# The shipped default, its search alone, the runner-up sampler and the reference.
NAMES = ("default", "fifo_gp", "fifo_tpe", "fifo_random")
# Also replayed on one category's real curves: the early-stopping strategies the oracle table
# bounds, so that the real-curves bound there covers early stopping too.
STOPPING = tuple(n for n in replay.ORACLE_STRATEGIES if n not in NAMES)
PRODUCTION = ROOT / "configs" / "sweep_mvtec.yaml"
TABLE = ROOT / "benchmarks" / "data" / "curves_fixed.csv"
KEY = "epochs_to_target"  # best - 0.01
KEY2 = "epochs_to_target_0.02"
REACH = 0.9  # the reach target: best - 0.01 in 90% of the searches
SUMMARY_HEAD = "Search seeds "  # how render's text begins: <out>.md is ours to rewrite


def production_shape(path: Path = PRODUCTION) -> dict[str, int]:
    """The production sweep's ``search.num_trials``, ``max_concurrent`` and
    ``n_startup_trials``."""
    search = yaml.safe_load(Path(path).read_text())["search"]
    return {k: int(search[k]) for k in ("num_trials", "max_concurrent", "n_startup_trials")}


def replay_argv(
    out: Path,
    *,
    table: Path,
    seeds: int,
    offset: int,
    trials: int,
    concurrent: int = 2,
    n_startup_trials: int = 4,
    oracle: bool = True,
    category: str | None = None,
    workers: int | None = None,
    strategies: Sequence[str] = NAMES,
) -> list[str]:
    """``benchmarks.replay``'s arguments for one budget."""
    # Relative to the working directory where it lies below it: the documents name no machine.
    shown = os.path.relpath(table) if Path(table).resolve().is_relative_to(Path.cwd()) else table
    argv = ["--table", str(shown), "--whole-configs", "--warm-seeds", "0"]
    argv += ["--seeds", str(seeds), "--seed-offset", str(offset), "--trials", str(trials)]
    argv += ["--concurrent", str(concurrent), "--n-startup-trials", str(n_startup_trials)]
    argv += [] if oracle else ["--oracle-seeds", "0"]
    argv += ["--categories", category] if category else []
    argv += ["--workers", str(workers)] if workers else []
    argv += ["--strategies", ",".join(strategies)]
    return argv + ["--json", f"{out}.json", "--markdown", f"{out}.md"]


def _replay(out: Path, argv: list[str]) -> dict[str, Any]:
    path = Path(f"{out}.json")
    if not path.exists():
        log.info("replaying %s", path.name)
        with contextlib.redirect_stdout(io.StringIO()):
            replay.main(argv)
    return json.loads(path.read_text())


def _settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a replay document was replayed with, as ``plan`` states it."""
    return {
        "search_seeds": list(meta.get("search_seeds", [])),
        "num_trials": meta.get("num_trials"),
        "max_concurrent": meta.get("max_concurrent"),
        "n_startup_trials": meta.get("n_startup_trials", 4),
        "categories": (meta.get("table") or {}).get("categories"),
        "table": Path(str((meta.get("curves") or {}).get("path"))).name,
    }


def _strategies(names: Sequence[str]) -> list[str]:
    return sorted({replay.DEFAULT_STRATEGY if n == "default" else n for n in names})


def _mismatch(path: Path, want: Mapping[str, Any]) -> str | None:
    """Why the replay already at ``path`` cannot be reused for ``want`` (None: it can)."""
    try:
        doc = json.loads(path.read_text())
        have = {
            **_settings(doc["meta"]),
            "strategies": _strategies(doc.keys() & replay.STRATEGIES.keys()),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "is not a benchmarks.replay output"
    diff = [k for k, v in want.items() if v is not None and have[k] != v]
    if diff:
        return (
            "was replayed with other settings ("
            + ", ".join(f"{k} {have[k]} instead of {want[k]}" for k in diff)
            + ")"
        )
    return None


def _median(entry: Mapping[str, Any], key: str = KEY) -> float:
    value = entry[key]["median"]
    return math.inf if value is None else float(value)


def _confirm_epochs(doc: Mapping[str, Any]) -> int:
    """Model-epochs of the default's confirmation: (top-k + the baseline) x seeds x epochs x
    categories."""
    strategy = replay.STRATEGIES[doc["default"]]
    table = doc["meta"]["table"]
    per = (strategy.confirm_top_k + 1) * strategy.confirm_seeds
    return per * table["epochs"] * len(table["categories"])


def _searches(doc: Mapping[str, Any], *, oracle: bool = True) -> list[tuple[str, Any, Any]]:
    """``(name, strategy, entry)`` of every search alone in a replay document, the ideal
    early-stopping replays as ``<name> (oracle)`` (``oracle``); the confirmed default is left
    out: the bounds add its confirmation to a search's own epochs."""
    named = [(k, v) for k, v in doc.items() if k in replay.STRATEGIES]
    if oracle:
        named += [(f"{k} (oracle)", v) for k, v in (doc.get("oracle") or {}).items()]
    out = []
    for name, entry in named:
        strategy = replay.STRATEGIES[name.removesuffix(" (oracle)")]
        if not strategy.confirm_top_k:
            out.append((name, strategy, entry))
    return out


def bound(
    docs: Mapping[int, Mapping[str, Any]], key: str = KEY, *, oracle: bool = True
) -> dict[str, Any]:
    """The most any replayed strategy saves against FIFO + random at the target ``key``,
    confirmation included, if it stopped the moment its incumbent first reached the target.

    ``docs``: replay documents by trials per search. The reference is FIFO + random's median at
    the largest budget where it has one (None when it never has). ``oracle``: count the ideal
    early-stopping replays too (False: only the strategies as they run on the real curves)."""
    with_ref = [n for n in sorted(docs) if math.isfinite(_median(docs[n]["fifo_random"], key))]
    fewest: tuple[float, str, int] = (math.inf, "", 0)
    for n, doc in docs.items():
        for name, _, entry in _searches(doc, oracle=oracle):
            fewest = min(fewest, (_median(entry, key), name, n))
    any_doc = next(iter(docs.values()))
    confirm = _confirm_epochs(any_doc)
    out: dict[str, Any] = {
        "fewest": fewest[0],
        "strategy": fewest[1],
        "trials": fewest[2],
        "confirm": confirm,
        "reference": None,
        "reference_trials": None,
        "ratio": None,
    }
    if with_ref:
        n = with_ref[-1]
        out["reference"] = _median(docs[n]["fifo_random"], key)
        out["reference_trials"] = n
        out["ratio"] = out["reference"] / (fewest[0] + confirm)
    return out


def fixed_bound(
    docs: Mapping[int, Mapping[str, Any]], key: str = KEY, *, reach: float = REACH
) -> dict[str, Any]:
    """``bound``'s question for a search whose number of trials is fixed before it starts (as
    ``search.num_trials`` is in every sweep) and which must reach the target in ``reach`` of
    the searches; early stopping at its ideal included.

    A search of more trials begins with the shorter one (the tests replay both, with and
    without early stopping), so per search seed its cost and what it reaches only grow with
    its trials. Whatever budget B reaches the target in ``reach`` of the searches, a replayed
    budget N of a strategy bounds B's median cost from below by:

    - N's median epochs in all, where N reaches it in fewer searches (B lies above N);
    - FIFO (every search of one budget trains the same epochs): the ``reach`` quantile of the
      epochs to the target, which is at least their q75;
    - early stopping (its cost varies by seed): B's cost covers the epochs to the target in
      ``reach`` of the searches, so its median is at least their ``reach - 0.5`` quantile,
      which is at least their q25.

    The most any strategy saves against FIFO + random's median (as ``bound``) is the reference
    over the largest such lower bound plus the confirmation, for the strategy whose bound is
    lowest."""
    if reach < 0.75:
        raise ValueError(f"reach {reach}: the q25 bound for early stopping needs 0.75 or more")
    ideal = bound(docs, key)
    lowest: dict[str, tuple[float, int]] = {}  # strategy: (its largest lower bound, at trials)
    for n, doc in docs.items():
        for name, strategy, entry in _searches(doc):
            if entry[key.replace("epochs_to_target", "reached")] < reach:
                low = float(entry["epochs_total"]["median"])
            else:
                low = float(entry[key]["q75" if strategy.scheduler == "fifo" else "q25"])
            lowest[name] = max(lowest.get(name, (0.0, 0)), (low, n))
    name = min(lowest, key=lambda k: lowest[k][0])
    low, n = lowest[name]
    out = {"fewest": low, "strategy": name, "trials": n, "confirm": ideal["confirm"]}
    out["reference"], out["ratio"] = ideal["reference"], None
    if ideal["reference"] is not None:
        out["ratio"] = ideal["reference"] / (low + ideal["confirm"])
    return out


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.0f}"


def _of(entry: Mapping[str, Any], seeds: int, key: str = "reached") -> str:
    return f"{round(entry[key] * seeds)}/{seeds}"


def render(
    docs: Mapping[int, Mapping[str, Any]],
    production: Mapping[str, Any] | None = None,
    categories: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The budget table (one row per budget, then the production shape) and the bounds."""
    first = next(iter(docs.values()))
    meta = first["meta"]
    seeds = meta["seeds"]
    lo, hi = meta["search_seeds"]
    default = first["default"]
    lines = [
        f"Search seeds {lo}-{hi} ({seeds} searches per row), the mean over "
        f"{', '.join(meta['table']['categories'])} as the objective; target best - 0.01 "
        f"({meta['targets']['best-0.01']}) and best - 0.02 ({meta['targets']['best-0.02']}).",
        "",
        "| trials (at once, start-up) | default `" + default + "`: best - 0.01 reached "
        "| epochs in all (median) | its search: epochs to best - 0.01, median [q25, q75] "
        "| `fifo_tpe`: reached | FIFO + random: reached | epochs to best - 0.01 / best - 0.02 "
        "(median) | ideal early stopping: fewest epochs to best - 0.01 (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [(n, docs[n]) for n in sorted(docs)]
    if production is not None:
        rows.append((production["meta"]["num_trials"], production))
    for n, doc in rows:
        m = doc["meta"]
        shape = f"{n} ({m['max_concurrent']}, {m.get('n_startup_trials', 4)})"
        if doc is production:
            shape += " production"
        d, gp, ref = doc[default], doc["fifo_gp"], doc["fifo_random"]
        e = gp[KEY]
        oracle = {k: v for k, v in (doc.get("oracle") or {}).items() if k != "fifo_random"}
        if oracle:
            name = min(oracle, key=lambda k: _median(oracle[k]))
            best = _median(oracle[name])
            ideal = f"{_num(best)} (`{name}`)" if math.isfinite(best) else "-"
        else:
            ideal = "not replayed"
        lines.append(
            f"| {shape} | {_of(d, seeds)} | {_num(d['epochs_total']['median'])} "
            f"| {_num(e['median'])} [{_num(e['q25'])}, {_num(e['q75'])}] "
            f"| {_of(doc['fifo_tpe'], seeds)} | {_of(ref, seeds)} "
            f"| {_num(_median(ref))} / {_num(_median(ref, KEY2))} | {ideal} |"
        )
    lines.append("")
    together = f"the mean over the {len(meta['table']['categories'])} categories"
    for key, label in ((KEY, "best - 0.01"), (KEY2, "best - 0.02")):
        lines.append(_bound_sentence(docs, key, label, together))
    for category, doc in (categories or {}).items():
        what = (
            f"{category} alone ({doc['meta']['num_trials']} trials; the default reaches "
            f"best - 0.01 in {_of(doc[default], seeds)}, FIFO + random in "
            f"{_of(doc['fifo_random'], seeds)})"
        )
        lines.append(_bound_sentence({doc["meta"]["num_trials"]: doc}, KEY, "best - 0.01", what))
    return "\n".join(lines) + "\n"


def _bound_sentence(docs: Mapping[int, Mapping[str, Any]], key: str, label: str, what: str) -> str:
    b, real = bound(docs, key), bound(docs, key, oracle=False)
    if not math.isfinite(b["fewest"]):
        return (
            f"- {what}, {label}: no strategy replayed, early stopping at its ideal included, "
            "reaches the target in half of the searches, so no ratio exists."
        )
    head = (
        f"- {what}, {label}: the fewest median epochs to the target is "
        f"{_num(b['fewest'])} (`{b['strategy']}`, {b['trials']} trials); with the "
        f"confirmation's {b['confirm']} that is {_num(b['fewest'] + b['confirm'])}"
    )
    if b["ratio"] is None:
        return (
            head + ", and FIFO + random reaches the target in under half of the searches at "
            "every budget replayed, so no ratio exists."
        )
    return (
        head + f" against FIFO + random's {_num(b['reference'])} ({b['reference_trials']} "
        f"trials): at most {b['ratio']:.2f}x ({b['reference'] / b['fewest']:.2f}x without the "
        "confirmation; on the real curves, of the strategies replayed, "
        f"`{real['strategy']}`'s {_num(real['fewest'])}: {real['ratio']:.2f}x with it)"
        + _fixed_clause(docs, key)
    )


def _fixed_clause(docs: Mapping[int, Mapping[str, Any]], key: str) -> str:
    f = fixed_bound(docs, key)
    return (
        f"; with the number of trials fixed before the search starts, as every sweep's is, and "
        f"the target reached in {REACH:.0%} of the searches: at most {f['ratio']:.2f}x "
        f"(`{f['strategy']}`: {_num(f['fewest'])} epochs at least, from its {f['trials']}-trial "
        "replay)."
    )


def plan(
    out: Path,
    *,
    table: Path = TABLE,
    seeds: int = 100,
    offset: int = 230,
    budgets: Sequence[int] = BUDGETS,
    categories: Sequence[str] | None = (),
    production: Path | None = PRODUCTION,
    workers: int | None = None,
) -> list[tuple[str, Path, list[str], dict[str, Any]]]:
    """``(role, path prefix, benchmarks.replay arguments, settings)`` of every replay; role is
    ``t<N>``, ``production`` or ``<category>_t<N>``. ``categories``: each alone (None: all of the
    table's); ValueError names one the table lacks."""
    kw = {"table": table, "seeds": seeds, "offset": offset, "workers": workers}
    seeds_range = [offset, offset + seeds - 1]
    every = replay.load_table(table).categories  # what a replay of all of them records
    categories = every if categories is None else list(categories)
    unknown = [c for c in categories if c not in every]
    if unknown:
        raise ValueError(f"--categories: {unknown[0]!r} is not in {table} ({', '.join(every)})")

    def one(role: str, trials: int, concurrent: int = 2, startup: int = 4, **extra: Any):
        path = Path(f"{out}_{role}")
        argv = replay_argv(
            path, trials=trials, concurrent=concurrent, n_startup_trials=startup, **extra, **kw
        )
        want = {
            "strategies": _strategies(extra.get("strategies", NAMES)),
            "search_seeds": seeds_range,
            "num_trials": trials,
            "max_concurrent": concurrent,
            "n_startup_trials": startup,
            "categories": [extra["category"]] if extra.get("category") else every,
            "table": Path(table).name,
        }
        return role, path, argv, want

    steps = [one(f"t{n}", n) for n in budgets]
    if production is not None:
        shape = production_shape(production)
        steps.append(
            one(
                "production",
                shape["num_trials"],
                shape["max_concurrent"],
                shape["n_startup_trials"],
                oracle=False,
            )
        )
    steps += [
        one(f"{c}_t{max(budgets)}", max(budgets), category=c, strategies=NAMES + STOPPING)
        for c in categories
    ]
    return steps


def check(out: Path, steps: Sequence[tuple[str, Path, list[str], dict[str, Any]]]) -> None:
    """Raises ValueError, before anything is replayed or written, when an output path holds
    something this command did not write or a replay with other settings."""
    from benchmarks.evidence import foreign_outputs

    foreign = foreign_outputs(out)
    if foreign:
        raise ValueError(
            f"{foreign[0]} exists and is not a replay output: pick another --out "
            "(nothing is overwritten)"
        )
    summary = Path(f"{out}.md")
    if summary.exists() and not summary.read_text().startswith(SUMMARY_HEAD):
        raise ValueError(
            f"{summary} exists and was not written by benchmarks.budgets: pick another --out"
        )
    for _, path, _, want in steps:
        json_path = Path(f"{path}.json")
        why = _mismatch(json_path, want) if json_path.exists() else None
        if why:
            raise ValueError(
                f"{json_path} {why}: remove it to replay it again, or pick another --out"
            )


def run(out: Path, **kw: Any) -> str:
    """Replays what is missing (``plan``'s keywords), then renders the table (also to
    ``<out>.md``)."""
    steps = plan(out, **kw)
    check(out, steps)
    return execute(out, steps)


def execute(out: Path, steps: Sequence[tuple[str, Path, list[str], dict[str, Any]]]) -> str:
    """Replays what ``check``ed ``steps`` lack, then renders the table (also to ``<out>.md``)."""
    done = {role: _replay(path, argv) for role, path, argv, _ in steps}
    docs = {int(role[1:]): done[role] for role in done if re.fullmatch(r"t\d+", role)}
    categories = {
        role.rsplit("_t", 1)[0]: doc
        for role, doc in done.items()
        if role != "production" and not re.fullmatch(r"t\d+", role)
    }
    text = render(docs, done.get("production"), categories)
    Path(f"{out}.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "replay_budget")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--seed-offset", type=int, default=230)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument(
        "--categories", default="", help="each alone at the largest budget (default: all)"
    )
    parser.add_argument("--workers", type=int, default=None, help="replay processes (default 2)")
    parser.add_argument("--no-production", action="store_true", help="skip the production shape")
    args = parser.parse_args(argv)
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--budgets {args.budgets!r}: give trials per search, e.g. 8,16,24")
    if not budgets or min(budgets) < 1 or args.seeds < 1:
        parser.error(
            "--budgets and --seeds take positive numbers (e.g. --budgets 8,16 --seeds 100)"
        )
    if not args.table.is_file():
        parser.error(
            f"--table {args.table}: no such file (python -m benchmarks.curves records one)"
        )
    kw = {
        "table": args.table,
        "seeds": args.seeds,
        "offset": args.seed_offset,
        "budgets": budgets,
        "categories": [c for c in args.categories.split(",") if c] or None,
        "production": None if args.no_production else PRODUCTION,
        "workers": args.workers,
    }
    try:
        steps = plan(args.out, **kw)
        check(args.out, steps)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = execute(args.out, steps)
    print(text)


if __name__ == "__main__":
    main()
