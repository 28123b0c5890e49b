"""Monitoring: trial names, TensorBoard, MLflow / W&B tracking, the report page.

The trial actors' names in the Ray dashboard are checked through its REST API in
tests/test_cluster.py (the embedded-dashboard test, token auth on).
"""

from __future__ import annotations

import glob
import json
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmr.config import ConfigError
from mmr.errors import UserInputError
from search.report_page import REPORT_FILE, write_report
from search.resolve import resolve_sweep
from search.results import trial_state
from search.trainable import describe_trial

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search import spec_for  # noqa: E402  (the lean sweep settings of the search tests)

# ------------------------------------------------------------------------- config and names


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("tracking.mlflow.trackinguri=x", "tracking.mlflow.trackinguri"),
        ("tracking.wandb={project: p, mode: cloud}", "tracking.wandb.mode"),
        ("tracking.neptune={project: p}", "tracking.neptune"),
        ("tracking.mlflow.tracking_uri=[1]", "tracking.mlflow.tracking_uri"),
    ],
)
def test_bad_tracking_keys_are_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve_sweep(None, [override])


def test_tracking_config_resolves_local_stores_to_absolute_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = resolve_sweep(
        None, ["tracking.mlflow.tracking_uri=runs/mlflow.db", "tracking.wandb.mode=offline"]
    )
    t = spec.sweep.tracking
    assert t.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (t.wandb.mode, t.wandb.project) == ("offline", None)
    assert resolve_sweep(None).sweep.tracking.enabled is False
    http = resolve_sweep(None, ["tracking.mlflow.tracking_uri=http://mlflow:5000"])
    assert http.sweep.tracking.mlflow.tracking_uri == "http://mlflow:5000"


def test_missing_tracking_package_fails_before_ray_starts(
    synthetic_root, tmp_path, monkeypatch
) -> None:
    import search.callbacks.tracking  # noqa: F401  (Ray's W&B module, imported before wandb is hidden)
    import search.sweep

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(search.sweep, "init_ray", no_ray)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    spec = spec_for(tmp_path, synthetic_root, "tracking.wandb.mode=offline", name="nowandb")
    with pytest.raises(UserInputError, match=r'tracking\.wandb .*pip install -e "\.\[tracking\]"'):
        search.sweep.run_sweep(spec, write=lambda _: None, dashboard=False)
    assert not spec.experiment_dir.exists()


def test_an_mlflow_store_mlflow_refuses_fails_before_ray_starts(tmp_path, monkeypatch) -> None:
    from search.callbacks.tracking import check_tracking

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    # An unknown scheme, and a plain directory (MLflow 3's file store, refused by default).
    for uri in ("nosuchscheme://host/x", str(tmp_path / "mlruns")):
        spec = resolve_sweep(None, [f"tracking.mlflow.tracking_uri={uri}"])
        with pytest.raises(UserInputError, match=r"tracking\.mlflow\.tracking_uri .*\.db"):
            check_tracking(spec.sweep.tracking)
    ok = resolve_sweep(None, [f"tracking.mlflow.tracking_uri={tmp_path / 'mlflow.db'}"])
    check_tracking(ok.sweep.tracking)


def test_trial_description_names_id_category_and_params() -> None:
    config = {
        "model.mask_ratio": 0.123456,
        "model.teacher_layers": (2, 3),
        "train.lr": 0.001,
        "category": "disk",
        "baseline": False,
        "study_trial": 3,
    }
    assert describe_trial("demo", "ab12", config) == (
        "demo trial ab12 [disk] mask_ratio=0.123 teacher_layers=[2, 3] lr=0.001"
    )
    assert describe_trial("demo", "0", {"model.mask_ratio": 0.4, "baseline": True}).endswith(
        "mask_ratio=0.4 (baseline)"
    )


def test_final_states() -> None:
    full = {"training_iteration": 4, "rounds_total": 4}
    assert trial_state("TERMINATED", full, 4) == "done"
    assert trial_state("TERMINATED", {"training_iteration": 2, "rounds_total": 4}, 4) == "stopped"
    assert trial_state("TERMINATED", {"training_iteration": 2}, 2) == "done"  # total from config
    assert trial_state("ERROR", full, 4) == "failed"


class _FakeQueue(list):
    def put(self, item) -> None:
        self.append(item)


@pytest.mark.parametrize(
    ("failed", "result", "state"),
    [
        (False, {"training_iteration": 4, "rounds_total": 4}, "done"),
        (False, {"training_iteration": 2, "rounds_total": 4}, "stopped"),
        (True, {"training_iteration": 2, "rounds_total": 4}, "failed"),
    ],
)
def test_wandb_run_gets_the_final_state_before_it_ends(failed, result, state, tmp_path) -> None:
    """The W&B logger queues the state as a config update, then Tune's end of the run.

    (The sweep test below reads a real offline run back for params and history only: under
    heavy load its offline runs were seen to lose their last records, this update included.)
    """
    from ray.air.integrations.wandb import _QueueItem

    from search.callbacks.tracking import tracking_callbacks

    spec = resolve_sweep(None, ["tracking.wandb.mode=offline"], storage=str(tmp_path))
    (logger,) = tracking_callbacks(spec)
    trial = type("T", (), {"last_result": result, "trial_id": "t", "config": {}})()
    queue = _FakeQueue()
    logger._trial_queues[trial] = queue
    logger._trial_logging_actors[trial] = object()
    logger._cleanup_logging_actors = lambda *a, **k: None  # no Ray here
    logger.log_trial_end(trial, failed=failed)
    assert queue[0][0] == _QueueItem.RESULT and queue[0][1]["config"] == {"trial_state": state}
    assert queue[-1] == (_QueueItem.END, None)


# ------------------------------------------------------------------------------ the report


def _fake_export(out: Path, *, pareto: bool) -> dict:
    """An export dir as search.export writes it (two trials, plots), without a sweep."""
    (out / "plots").mkdir(parents=True)
    for name, colour in (("optimization_history", "navy"), ("overlays_disk", "red")):
        Image.new("RGB", (120, 60), colour).save(out / "plots" / f"{name}.png")
    pd.DataFrame(
        {
            "trial": ["t0", "t1"],
            "state": ["done", "stopped"],
            "baseline": [True, False],
            "study_trial": [0, 1],
            "mask_ratio": [0.4, 0.7],
            "objective": [0.61, 0.55],
        }
    ).to_csv(out / "trials.csv", index=False)
    test = {"image_auroc": 0.7, "disk/image_auroc": 0.7}
    summary = {
        "studies": {
            "s": {
                "best_trial": "t0",
                "best_val_objective": 0.61,
                "baseline_trial": "t0",
                "baseline_val_objective": 0.61,
                "best_test": test,
                "baseline_test": test,
            }
        }
    }
    (out / "summary.json").write_text(json.dumps(summary))
    if pareto:
        pd.DataFrame(
            {"trial": ["t0", "t1"], "image_auroc": [0.61, 0.55], "latency_ms": [3.0, 1.0],
             "baseline": [True, False], "on_front": [True, True]}
        ).to_csv(out / "pareto.csv", index=False)  # fmt: skip
    return {
        "baseline (test)": {"disk": {"image_auroc": 0.7}},
        "best (test)": {"disk": {"image_auroc": 0.81}},
    }


class _Page(HTMLParser):
    """Table ids, image sources and text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self.tables.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data: str) -> None:
        self.text.append(data.strip())


@pytest.mark.parametrize("pareto", [False, True])
def test_report_page_is_one_self_contained_file(tmp_path: Path, pareto: bool) -> None:
    out = tmp_path / "export"
    rows = _fake_export(out, pareto=pareto)
    path = write_report(out, title="s", rows=rows, params=["mask_ratio"])
    page = _Page(path.read_text())
    assert page.tables[:1] == ["results-0"]
    assert {"comparison", "trials"} <= set(page.tables)
    assert ("pareto" in page.tables) == pareto
    assert len(page.images) == 2 and all(
        src.startswith("data:image/png;base64,") for src in page.images
    )
    assert "81" in page.text  # best's test image AUROC, in %
    # Nothing refers to a file beside the page: moved alone, it shows the same.
    moved = tmp_path / "elsewhere.html"
    shutil.copy(path, moved)
    shutil.rmtree(out)
    assert _Page(moved.read_text()).images == page.images


def _chromium() -> str | None:
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )


def test_report_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "headless Chromium is not installed (Debian/Ubuntu: apt-get install chromium): "
            "report.html is checked as HTML only, not rendered in a browser"
        )
    out = tmp_path / "export"
    path = write_report(out, title="s", rows=_fake_export(out, pareto=True), params=["mask_ratio"])
    flags = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = path.as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    page = _Page(dom)  # the DOM Chromium built from the page
    assert {"results-0", "pareto", "comparison", "trials"} <= set(page.tables)
    assert len(page.images) == 2 and all(s.startswith("data:image/png") for s in page.images)
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1000,1400", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1000, 1400)
    # The embedded plots were drawn: their flat colours are on the screenshot.
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert (0, 0, 128) in colours and (255, 0, 0) in colours  # navy plot, red overlay


# ----------------------------------------------------------- a sweep with every tracker on


def _wandb_records(path: Path) -> list:
    """Records of an offline W&B run file (LevelDB log blocks of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first, else middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _wandb_run(run_dir: Path) -> tuple[dict, list[dict], list[str]]:
    """Config, history rows and artifact names of an offline W&B run directory."""
    config: dict = {}
    history: list[dict] = []
    artifacts: list[str] = []

    def values(items) -> dict:  # an item names its key in `key` or `nested_key`
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}

    for r in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            config.update(values((r.run.config if kind == "run" else r.config).update))
        if kind == "history":
            history.append(values(r.history.item))
        if kind == "artifact":
            artifacts += [e.path for e in r.artifact.manifest.contents]
    return config, history, artifacts


@pytest.mark.slow
def test_sweep_tracks_to_mlflow_wandb_offline_and_tensorboard(
    ray_session, synthetic_root, tmp_path, monkeypatch, capfd
) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from search.results import load_trials
    from search.sweep import run_sweep

    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # never the real home
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    db = tmp_path / "mlflow.db"
    # The baseline runs; the second grid point names a teacher file that is not there: it fails.
    missing = str(tmp_path / "nosuch-teacher.pt")
    space = {
        "data.categories": {"type": "categorical", "choices": [["disk"]]},  # a list param
        "model.teacher_checkpoint": {"type": "categorical", "choices": [None, missing]},
        "teacher_layers": {"type": "categorical", "choices": [[1, 2, 3]]},
    }
    spec = spec_for(
        tmp_path, synthetic_root, "search.sampler=grid", "search.num_trials=2",
        "max_failures=0", "train.epochs=3", f"tracking.mlflow.tracking_uri={db}",
        "tracking.mlflow.experiment_name=mmr-test", "tracking.wandb.mode=offline",
        "tracking.wandb.project=proj", name="tracked", space=space,
    )  # fmt: skip
    lines: list[str] = []
    run = run_sweep(spec, write=lines.append, dashboard=False)
    exp = run.experiment_dir
    df = load_trials(exp)
    assert sorted(df["state"]) == ["done", "failed"], df
    done = str(df[df["state"] == "done"]["trial"].iloc[0])
    failed = str(df[df["state"] == "failed"]["trial"].iloc[0])

    # TensorBoard: the printed line points at the experiment, Ray's staging-dir hint is gone.
    assert f"TensorBoard: tensorboard --logdir {exp}" in lines
    assert "driver_artifacts" not in capfd.readouterr().out
    events = EventAccumulator(str(exp / f"trial_{done}"))
    events.Reload()
    rounds = [(e.step, e.value) for e in events.Scalars("ray/tune/image_auroc")]
    assert [s for s, _ in rounds] == [1, 2, 3]
    assert rounds[-1][1] == pytest.approx(float(df[df["trial"] == done]["image_auroc"].iloc[0]))
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["model.teacher_layers"].string_value == "[1, 2, 3]"  # Tune drops lists
    assert hparams["data.categories"].string_value == "['disk']"

    # MLflow: a run per trial (params, every round's metrics, final state) + the export run.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("mmr-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"trial_{done}", f"trial_{failed}", "tracked-export"}
    ok, bad = runs[f"trial_{done}"], runs[f"trial_{failed}"]
    assert "disk" in ok.data.params["data.categories"]
    assert {"model.teacher_layers", "baseline", "study_trial"} <= set(ok.data.params)
    assert (ok.info.status, ok.data.tags["trial_state"]) == ("FINISHED", "done")
    assert (bad.info.status, bad.data.tags["trial_state"]) == ("FAILED", "failed")
    history = client.get_metric_history(ok.info.run_id, "image_auroc")
    history = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in history] == [s for s, _ in rounds]
    assert [v for _, v in history] == pytest.approx([v for _, v in rounds], abs=1e-6)
    export = runs["tracked-export"]
    # Artefacts beside the database, never in ./mlruns of the driver's directory.
    assert export.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert export.data.tags["best_trial/tracked"] == done
    artefacts = {a.path for a in client.list_artifacts(export.info.run_id)}
    assert {"best.yaml", "results.md", "trials.csv", "summary.json", REPORT_FILE} <= artefacts
    assert "model.pt" not in artefacts and "plots" in artefacts

    # W&B offline: run directories with the config, every round and the final state.
    runs_wb: dict[str, tuple[dict, list, list]] = {}
    dirs = sorted(glob.glob(str(exp / "wandb" / "offline-run-*")))
    for run_dir in map(Path, dirs):
        # A W&B logging actor that Ray restarts continues its run in a second directory.
        config, history_wb, artifacts = runs_wb.setdefault(
            run_dir.name.rsplit("-", 1)[-1], ({}, [], [])
        )
        more = _wandb_run(run_dir)
        config.update(more[0])
        history_wb += more[1]
        artifacts += more[2]
    assert {done, failed} <= set(runs_wb) and len(runs_wb) == 3, dirs
    config, history_wb, _ = runs_wb[done]
    assert config["data.categories"] == ["disk"]
    # Rounds as logged (a prefix: under heavy load an offline run was seen to lose its last
    # records, the final state included; that is checked at the callback above).
    logged = [h["image_auroc"] for h in history_wb if "image_auroc" in h]
    assert logged and logged == pytest.approx([v for _, v in rounds][: len(logged)], abs=1e-6)
    (export_wb,) = [v for k, v in runs_wb.items() if k not in (done, failed)]
    assert {"best.yaml", "results.md", "trials.csv", REPORT_FILE} <= set(export_wb[2])
    assert (run.export_dir / REPORT_FILE).is_file()
