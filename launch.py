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
from typing import Any

from mmr.errors import UserInputError

ROOT = Path(__file__).resolve().parent


class UserError(UserInputError):
    """Bad command-line input: printed as one clear line, exit code 2."""


def _add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="sweep config YAML (default: the built-in demo sweep)")
    _add_set_option(
        p,
        "override a sweep or training key, e.g. search.num_trials=16 or "
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
    _add_set_option(p, "override a key, e.g. model.mask_ratio=0.5 (repeatable)")
    p.add_argument(
        "--out",
        help="output directory (default: runs/train, or runs/train-2, ... when that holds a run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier training run in --out (nothing else is ever replaced)",
    )

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
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run failed trials again, from their last round checkpoint (default: they stay "
        "failed)",
    )

    p = sub.add_parser("status", help="table of a sweep's trials, or a submitted job's state")
    p.add_argument("experiment", nargs="?", help="experiment directory")
    p.add_argument("--job", help="job id printed by `submit`")
    p.add_argument("--address", help="dashboard address of the cluster, http://HEAD:8265")

    p = sub.add_parser("export", help="best config, checkpoint, tables and plots of a sweep")
    p.add_argument("experiment", help="experiment directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--trial",
        help="export this trial (an id from `status`) instead of the best; with several "
        "objectives the default is the front trial with the best first objective",
    )
    p.add_argument(
        "--format",
        choices=("pt", "onnx"),
        default="pt",
        help="onnx: also write <category>.onnx beside model.pt (needs the `deploy` extra); "
        "EXPERIMENT may then also be a `train --out` directory or a model.pt",
    )

    p = sub.add_parser(
        "predict",
        help="score new images with an exported model (model.pt or .onnx)",
        description="Scores images with an export's model.pt, a `train --out` model.pt or a "
        "<category>.onnx; writes predictions.csv, summary.json and overlays/ to --out. Exit "
        "code 0: every image scored; 3: some images could not be read and were skipped (they "
        "are listed, with the reason, in the summary and the CSV's error column); 2: bad input.",
    )
    p.add_argument("model", help="export directory, model.pt, or <category>.onnx")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--category",
        help="the category's model to use (default: the model's only one, or the "
        "<category>/test/... part of each image path)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="image threshold in raw score units, replacing the one chosen at export",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: eval's)")
    p.add_argument("--maps", action="store_true", help="also write the raw maps as maps/*.npy")
    p.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")

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


def cmd_train(args: argparse.Namespace) -> int:
    from mmr.config import load_config

    try:
        cfg = load_config(args.config, args.overrides).resolve_paths()
    except UserInputError:
        if args.config and _config_kind(Path(args.config)) == "sweep":
            raise UserError(
                f"--config {args.config} is a sweep config (it has sweep sections such as "
                "base/space/search): run it with `launch.py sweep --config "
                f"{args.config}`; `train` takes a training config, such as the sweep's `base:`"
            ) from None
        raise
    from mmr.outdir import train_output

    label = Path(args.config).stem if args.config else "defaults"
    with train_output(args.out, overwrite=args.overwrite) as out:
        if args.out is None:
            print(f"train: writing to {out}")
        return _train(cfg, out, label)


def _train(cfg: Any, out: Path, label: str) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mmr.imagecache import decode_progress
    from mmr.train import run_training

    bars: list[tqdm] = []  # the epoch bar, made at the first epoch (not while data loads)

    def bar() -> tqdm:
        if not bars:
            bars.append(
                # Sequential category order: every task's epochs, one task after another.
                tqdm(total=cfg.total_epochs, unit="epoch", desc="train", dynamic_ncols=True)
            )
        return bars[0]

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        bar().set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
        bar().update(1)

    def report(round_: int, metrics: dict[str, float]) -> None:
        shown = {k: f"{metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc") if k in metrics}
        bar().write(f"round {round_} (epoch {int(metrics['epoch'])}): val {shown}")

    def decoding(what: str, total: int) -> tuple[Any, Any]:
        progress = tqdm(total=total, unit="img", desc=what, dynamic_ncols=True, leave=False)
        return (lambda: progress.update(1)), progress.close

    # Log lines go above the bars instead of onto them.
    with logging_redirect_tqdm(), decode_progress(decoding):
        try:
            result = run_training(cfg, out, label=label, on_epoch=on_epoch, report=report)
        except BaseException:
            for b in bars:
                b.leave = False  # an error message, not a stale half-done bar, is the last line
            raise
        finally:
            for b in bars:
                b.close()
    mean = result["test_mean"]
    print("test (held-out half): " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    print(f"wrote {out / 'metrics.json'}, {out / 'results.md'}, {out / 'model.pt'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from search.resolve import resolve_sweep

    try:
        spec = resolve_sweep(args.config, args.overrides, name=args.name, storage=args.storage)
    except UserInputError:
        if args.config and _config_kind(Path(args.config)) == "train":
            raise UserError(
                f"--config {args.config} is a training config (sections data/model/train/"
                f"eval): train it once with `launch.py train --config {args.config}`, or "
                f"search around it with `launch.py sweep --set base={args.config}`"
            ) from None
        raise
    from search.sweep import run_sweep

    run = run_sweep(
        spec,
        address=args.address,
        resume=args.resume,
        dashboard=_dashboard_wanted(),
        # Only what was given is compared with the stored sweep: `sweep --name X --resume`
        # alone continues X as stored.
        check_resume=bool(args.config or args.overrides),
    )
    print(f"experiment: {run.location} ({run.seconds:.0f} s)")
    return 130 if run.interrupted else 0


def cmd_resume(args: argparse.Namespace) -> int:
    from search.config import load_spec

    load_spec(args.experiment)  # a clear error before Ray starts
    from search.sweep import resume_sweep

    run = resume_sweep(
        args.experiment,
        address=args.address,
        dashboard=_dashboard_wanted(),
        retry_failed=args.retry_failed,
    )
    print(f"experiment: {run.location} ({run.seconds:.0f} s)")
    return 130 if run.interrupted else 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.job:
        return cmd_job_status(args)
    if not args.experiment:
        raise UserError("status needs an EXPERIMENT_DIR (or --job ID --address URL)")
    from search.config import load_spec

    load_spec(args.experiment)
    from search.results import status_table

    print(status_table(args.experiment))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search.config import is_experiment, load_spec

    if args.format == "onnx" and not is_experiment(str(args.experiment)):
        from mmr.onnx_export import export_model_onnx

        for path in export_model_onnx(args.experiment, args.out):
            print(f"wrote {path}")
        return 0
    load_spec(args.experiment)
    from search.export import export_experiment

    out = export_experiment(
        args.experiment, args.out, trial=args.trial, onnx=args.format == "onnx"
    )
    print(f"exported to {out}")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from mmr.predict import predict

    def progress(total: int) -> tuple[Any, Any]:
        bar = tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True, file=sys.stderr)
        return bar.update, bar.close

    with logging_redirect_tqdm():
        summary = predict(
            args.model,
            args.images,
            args.out,
            category=args.category,
            threshold=args.threshold,
            device=args.device,
            batch_size=args.batch_size,
            overlays=not args.no_overlays,
            save_maps=args.maps,
            progress=progress,
        )
    for path, error in summary.skipped:
        print(f"skipped {path}: {error}", file=sys.stderr)
    print(summary.line())
    return 3 if summary.skipped else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.jobs import dashboard_url, submit_sweep, sweep_options

    if not (ROOT / "pyproject.toml").is_file():
        raise UserError(
            f"submit uploads the project directory, but {ROOT} is not a checkout of "
            "mmr-sweep: run `python launch.py submit ...` from the project's checkout"
        )
    url = dashboard_url(args.address)
    sweep_args = sweep_options(
        project_root=ROOT,
        config=args.config,
        overrides=args.overrides,
        name=args.name,
        storage=args.storage,
    )
    name = _submitted_sweep_name(args.config, args.overrides, args.name)
    job_id = submit_sweep(url, sweep_args, working_dir=ROOT, sweep_name=name)
    print(job_id)
    print(f"submitted to {url}; follow it with:")
    print(f"  python launch.py status --job {job_id} --address {url}")
    return 0


def _submitted_sweep_name(
    config: str | None, overrides: Sequence[str], name: str | None
) -> str | None:
    """The name a submitted sweep will run under, for the job's label in the dashboard.

    As ``launch.py sweep`` resolves it: ``--name``, else a ``--set name=...``, else the
    config's ``name``. None when the config is not a local file (it lives on the cluster).
    """
    import yaml

    from search.resolve import load_sweep_config

    if name:
        return name
    for item in reversed(list(overrides)):
        key, _, value = item.partition("=")
        if key.strip() == "name":
            return str(yaml.safe_load(value))
    if config is not None and not Path(config).expanduser().is_file():
        return None
    raw, _ = load_sweep_config(Path(config).expanduser() if config else None)
    return str(raw["name"]) if raw.get("name") else None


def cmd_job_status(args: argparse.Namespace) -> int:
    from cluster.jobs import job_status

    status, log_tail = job_status(args.address, args.job)
    print(f"job {args.job}: {status}")
    if log_tail:
        print("--- last log lines ---")
        print(log_tail)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    import shlex

    from mmr.config import load_config

    if args.config and _is_sweep_config(Path(args.config)):
        raise UserError(
            f"--config {args.config} is a sweep config: pass the training config it names "
            "as `base:` (e.g. configs/mvtec.yaml), whose model.teacher/model.encoder are fetched"
        )
    cfg = load_config(args.config)
    from mmr.weights import fetch_weights

    paths = fetch_weights(cfg.model, args.to)
    print(f"wrote the weights of {cfg.model.teacher} and {cfg.model.encoder}:")
    for role, path in paths.items():
        print(f"  {role}: {path}")
    print("point the training config at them (or add these to `train`, `sweep`, `submit`):")
    print(
        "  "
        + " ".join(
            f"--set {shlex.quote(f'model.{role}_checkpoint={path}')}"
            for role, path in paths.items()
        )
    )
    return 0


def _is_sweep_config(path: Path) -> bool:
    """A YAML mapping with a sweep's `base` and `space` keys (not a training config)."""
    return _config_kind(path, strict=True) == "sweep"


def _config_kind(path: Path, *, strict: bool = False) -> str | None:
    """``train`` or ``sweep`` when the YAML file's top-level keys are of one kind only.

    ``strict``: a sweep config must name both ``base`` and ``space``.
    """
    import yaml

    from search.config import SWEEP_SECTIONS

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None  # the loaders report it
    if not isinstance(raw, dict) or not raw:
        return None
    keys = set(raw)
    if keys <= {"data", "model", "train", "eval"}:
        return "train"
    if keys <= set(SWEEP_SECTIONS) and (not strict or {"base", "space"} <= keys):
        return "sweep"
    return None


def cmd_dashboard(args: argparse.Namespace) -> int:
    import errno
    import socket

    from search.config import load_spec

    spec = load_spec(args.experiment)
    exp = Path(args.experiment).resolve()
    from optuna_dashboard import run_server

    from search.samplers import study_storage

    storage = study_storage(exp)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: optuna-dashboard binds {args.host}: anyone who can reach this machine "
            "on that address can read and edit the study (it has no authentication)",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"optuna-dashboard of sweep {spec.sweep.name}: http://{host}:{args.port}/")
    print(f"  study journal {exp / 'study.journal'}; Ctrl-C stops it", flush=True)
    try:
        run_server(storage, host=args.host, port=args.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {args.port} on {args.host} is already in use: pass another --port"
            ) from None
        if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise UserError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pass "
                "--host 127.0.0.1 (the default) or an address of this machine, and a --port "
                "above 1023"
            ) from None
        raise
    return 0


def _dashboard_wanted() -> bool:
    """The embedded Ray dashboard is on unless MMR_DASHBOARD=0 (tests, tiny machines)."""
    import os

    return os.environ.get("MMR_DASHBOARD", "1") != "0"


COMMANDS = {
    "synth": cmd_synth,
    "train": cmd_train,
    "sweep": cmd_sweep,
    "resume": cmd_resume,
    "status": cmd_status,
    "export": cmd_export,
    "predict": cmd_predict,
    "submit": cmd_submit,
    "weights": cmd_weights,
    "dashboard": cmd_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)  # argparse admits only these commands
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        from cluster.driver import missing_dependency_message

        # A missing dependency means the wrong interpreter (e.g. a Ray Job's `python`).
        message = missing_dependency_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
