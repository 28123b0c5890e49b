"""mmr-sweep command line: ``python launch.py <command>`` (also the ``mmr-sweep`` script).

Each command parses its arguments and calls one library function; heavy imports (torch, Ray)
happen inside the command so that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mmr.errors import UserInputError

ROOT = Path(__file__).resolve().parent


class UserError(UserInputError):
    """Bad command-line input: printed as one clear line, exit code 2."""


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="sweep config YAML (default: the built-in demo sweep)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep or training key, e.g. search.num_trials=16 or "
        "train.epochs=20 (repeatable)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster address (ray://HOST:10001 or HOST:6379); default: an embedded local Ray",
    )
    p.add_argument("--name", help="experiment name (default: the config's name)")
    p.add_argument("--storage", help="experiment storage: local dir, NFS path or s3://...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmr-sweep",
        description="Hyper-parameter search for MMR anomaly detection (Ray Tune + Optuna).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in MVTec AD layout")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--categories",
        type=int,
        default=None,
        help="number of categories (default: all built-in kinds)",
    )
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = sub.add_parser("train", help="one MMR run over the config's categories")
    p.add_argument("--config", help="training config YAML (default: all defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. model.mask_ratio=0.5 (repeatable)",
    )
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")

    p = sub.add_parser("sweep", help="run a hyper-parameter search (no arguments: the demo)")
    _add_sweep_options(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment of the same name if it exists",
    )

    p = sub.add_parser("resume", help="continue an interrupted sweep")
    p.add_argument("experiment", help="experiment directory")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")

    p = sub.add_parser("status", help="table of a sweep's trials, or a submitted job's state")
    p.add_argument("experiment", nargs="?", help="experiment directory")
    p.add_argument("--job", help="job id printed by `submit`")
    p.add_argument("--address", help="dashboard address of the cluster, http://HEAD:8265")

    p = sub.add_parser("export", help="best config, checkpoint, tables and plots of a sweep")
    p.add_argument("experiment", help="experiment directory")
    p.add_argument("--out", required=True, help="output directory")

    p = sub.add_parser("submit", help="submit a sweep as a Ray Job to a running cluster")
    _add_sweep_options(p)
    p.set_defaults(address=None)

    p = sub.add_parser("weights", help="stage pretrained weights for offline workers")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    w = wsub.add_parser("fetch", help="download the teacher/encoder weights a config needs")
    w.add_argument("--to", required=True, help="directory on shared storage")
    w.add_argument("--config", help="training config whose weights to fetch (default: paper)")

    p = sub.add_parser("dashboard", help="optuna-dashboard on a sweep's study (127.0.0.1)")
    p.add_argument("experiment", help="experiment directory")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    return parser


def cmd_synth(args: argparse.Namespace) -> int:
    from mmr import synth

    out = synth.generate(
        Path(args.out), categories=args.categories, size=args.size, seed=args.seed
    )
    print(f"synthetic dataset written to {out}")
    return 0


def _not_built(args: argparse.Namespace) -> int:
    raise UserError(f"`{args.command}` is not built yet in this version of mmr-sweep")


COMMANDS = {
    "synth": cmd_synth,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS.get(args.command, _not_built)(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
