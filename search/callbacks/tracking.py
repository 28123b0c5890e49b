"""The experiment-tracking callbacks: MLflow and Weights & Biases through Ray Tune's logger
callbacks. Imported only for sweeps with ``tracking:`` set (MLflow takes seconds to import).

``tracking.mlflow`` and ``tracking.wandb`` in the sweep config add Tune's
``MLflowLoggerCallback`` / ``WandbLoggerCallback`` (one run per trial: params, every round's
metrics), extended only by what Tune leaves out: each run's final state (``done``,
``stopped`` early by the scheduler, ``failed``) and, once the sweep is exported, one more run
holding the export (best config, results tables, trials table, report) as artefacts.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

from mmr.errors import UserInputError
from search.config import SweepSpec, TrackingConfig
from search.results import trial_state

__all__ = [
    "STATE_KEY",
    "MLflowTrialLogger",
    "WandbTrialLogger",
    "check_tracking",
    "describe_tracking",
    "tracking_callbacks",
    "log_export",
]

log = logging.getLogger(__name__)

STATE_KEY = "trial_state"  # MLflow tag / W&B config key: done | stopped | failed
INSTALL = 'pip install -e ".[tracking]"'


def _import(package: str, key: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise UserInputError(
            f"{key} is set but the {package!r} package is not installed ({exc}): run "
            f"`{INSTALL}` in the project's checkout (or `pip install {package}`), or remove "
            f"{key} from the sweep config"
        ) from None


def check_tracking(tracking: TrackingConfig) -> None:
    """Fails with the install command when a configured tracker's package is missing.

    Called before Ray starts, so that a missing package never leaves a half-started sweep.
    """
    if tracking.mlflow is not None:
        mlflow = _import("mlflow", "tracking.mlflow")
        uri = tracking.mlflow.tracking_uri
        try:  # opens the store: a bad URI, or a store MLflow refuses, fails here
            mlflow.MlflowClient(tracking_uri=uri)
        except mlflow.exceptions.MlflowException as exc:
            raise UserInputError(
                f"tracking.mlflow.tracking_uri {uri!r} cannot be used: {exc}. For a local "
                "store give a file ending in .db (e.g. runs/mlflow.db, an SQLite store)"
            ) from None
    if tracking.wandb is not None:
        _import("wandb", "tracking.wandb")


def _names(spec: SweepSpec) -> tuple[str, str, str]:
    """MLflow experiment, W&B project and W&B group names (default: the sweep's name)."""
    t, name = spec.sweep.tracking, spec.sweep.name
    experiment = (t.mlflow.experiment_name if t.mlflow else None) or name
    project = (t.wandb.project if t.wandb else None) or name
    group = (t.wandb.group if t.wandb else None) or name
    return experiment, project, group


def describe_tracking(spec: SweepSpec) -> list[str]:
    """One line per configured tracker: where the sweep's runs go."""
    t = spec.sweep.tracking
    experiment, project, group = _names(spec)
    lines = []
    if t.mlflow is not None:
        where = t.mlflow.tracking_uri or "MLflow's default tracking URI"
        lines.append(f"MLflow: a run per trial in {where}, experiment {experiment!r}")
    if t.wandb is not None:
        lines.append(f"W&B ({t.wandb.mode}): a run per trial, project {project!r} group {group!r}")
    return lines


def _final_state(trial: Any, failed: bool, num_rounds: int) -> str:
    status = "ERROR" if failed else "TERMINATED"
    return trial_state(status, dict(trial.last_result or {}), num_rounds)


def _mlflow_experiment(uri: str | None, name: str) -> str:
    """The id of MLflow experiment ``name``, created if new.

    With a local SQLite store the artefacts go beside the database (``mlartifacts/``):
    MLflow's default is ``./mlruns`` in whatever directory the driver runs from.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri and uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


class MLflowTrialLogger(MLflowLoggerCallback):
    """Tune's MLflow callback; each run also gets its trial's final state as a tag."""

    def __init__(self, spec: SweepSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_rounds = spec.base.num_rounds

    def setup(self, *args: Any, **kwargs: Any) -> None:
        _mlflow_experiment(self.tracking_uri, self.experiment_name)  # Tune's then finds it
        super().setup(*args, **kwargs)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        import mlflow

        run_id = self._trial_runs.get(trial)
        if run_id is not None:
            state = _final_state(trial, failed, self._num_rounds)
            mlflow.MlflowClient(tracking_uri=self.tracking_uri).set_tag(run_id, STATE_KEY, state)
        super().log_trial_end(trial, failed=failed)


class WandbTrialLogger(WandbLoggerCallback):
    """Tune's W&B callback; each run's config also gets its trial's final state."""

    def __init__(self, spec: SweepSpec, *, mode: str, **kwargs: Any) -> None:
        super().__init__(mode=mode, **kwargs)
        self._num_rounds = spec.base.num_rounds
        self._mode = mode

    def setup(self, *args: Any, **kwargs: Any) -> None:
        if self._mode == "offline":
            # Tune asks for an API key unless the environment says offline.
            os.environ["WANDB_MODE"] = "offline"
        super().setup(*args, **kwargs)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in self._trial_queues:
            # A result's "config" entry updates the W&B run's config (Tune's own route).
            state = _final_state(trial, failed, self._num_rounds)
            self.log_trial_result(0, trial, {"config": {STATE_KEY: state}})
        super().log_trial_end(trial, failed=failed)


def tracking_callbacks(spec: SweepSpec) -> list[tune.Callback]:
    """The Tune callbacks of ``spec.sweep.tracking`` (none when nothing is configured)."""
    t = spec.sweep.tracking
    experiment, project, group = _names(spec)
    callbacks: list[tune.Callback] = []
    if t.mlflow is not None:
        callbacks.append(
            MLflowTrialLogger(
                spec,
                tracking_uri=t.mlflow.tracking_uri,
                experiment_name=experiment,
                tags={"mmr_sweep": spec.sweep.name},
            )
        )
    if t.wandb is not None:
        callbacks.append(
            WandbTrialLogger(
                spec,
                mode=t.wandb.mode,
                project=project,
                group=group,
                dir=str(spec.experiment_dir),  # wandb/<run dirs> beside the trials
            )
        )
    return callbacks


def _export_files(export_dir: Path) -> list[Path]:
    """What an export run keeps: every file but the checkpoints (already in the trials)."""
    return sorted(p for p in export_dir.rglob("*") if p.is_file() and p.suffix != ".pt")


def log_export(spec: SweepSpec, export_dir: Path) -> list[str]:
    """Logs the exported files as artefacts of one run per tracker; returns where they went."""
    t = spec.sweep.tracking
    if not t.enabled:
        return []
    experiment, project, group = _names(spec)
    files = _export_files(export_dir)
    summary = json.loads((export_dir / "summary.json").read_text())
    best = {
        f"best_trial/{study}": str(entry["best_trial"])
        for study, entry in summary.get("studies", {}).items()
    }
    run_name = f"{spec.sweep.name}-export"
    where: list[str] = []
    if t.mlflow is not None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=t.mlflow.tracking_uri)
        exp_id = _mlflow_experiment(t.mlflow.tracking_uri, experiment)
        run = client.create_run(
            exp_id,
            run_name=run_name,
            tags={"mmr_sweep": spec.sweep.name, "kind": "export", **best},
        )
        for path in files:
            parent = path.parent.relative_to(export_dir).as_posix()
            client.log_artifact(run.info.run_id, str(path), None if parent == "." else parent)
        client.set_terminated(run.info.run_id, "FINISHED")
        where.append(f"MLflow run {run.info.run_id} (experiment {experiment!r})")
    if t.wandb is not None:
        import wandb

        run = wandb.init(
            project=project,
            group=group,
            name=run_name,
            job_type="export",
            mode=t.wandb.mode,
            dir=str(spec.experiment_dir),
            config={"mmr_sweep": spec.sweep.name, **best},
            reinit="create_new",
        )
        artifact = wandb.Artifact(f"{spec.sweep.name}-export", type="sweep-export")
        for path in files:
            artifact.add_file(str(path), name=path.relative_to(export_dir).as_posix())
        run.log_artifact(artifact)
        run.finish()
        where.append(f"W&B run {run.name} ({t.wandb.mode}, project {project!r})")
    return where
