"""Sweep orchestration: Ray, the Tuner, resume, and the end-of-sweep summary and export."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from cluster.driver import leave_job_working_dir
from cluster.ray_start import init_ray
from mmr.errors import UserInputError
from mmr.fileio import atomic_write

# MirrorSync lived here before issue 23: Tune unpickles an older experiment's callbacks
# (tuner.pkl) by that path on resume.
from search.callbacks.lifecycle import EndDeterministicFailures, MirrorSync
from search.callbacks.progress import ProgressTable
from search.callbacks.result_files import RoundCSVLogger, RoundJsonLogger
from search.callbacks.tensorboard import TrialTensorBoard
from search.claim import CLAIM_FILE, claimed
from search.config import SweepSpec, is_experiment, load_spec
from search.contract import FAILED_MARKER, SPEC_FILE, planned_trials
from search.resources import check_resources
from search.scheduler import make_scheduler
from search.searcher import PlannedTrials, RetryingLimiter, make_searcher
from search.storage import is_empty, is_uri, probe_writable, push, remove_from_trials, resuming
from search.trainable import trial_trainable

__all__ = [
    "SweepRun",
    "check_resources",
    "check_sweep_data",
    "resume_sweep",
    "run_sweep",
]

log = logging.getLogger(__name__)

Write = Callable[[str], None]


def echo(text: str) -> None:
    """``print`` for the sweep's progress, held by a callback that the Tuner pickles.

    Not ``print`` itself: once a worker's or the autoscaler's log line reaches the driver,
    Ray (its tqdm support) replaces ``builtins.print``, and pickling the original by name
    then fails ("it's not the same object as builtins.print").
    """
    print(text)


@dataclass
class SweepRun:
    """What a finished (or interrupted) sweep leaves behind."""

    experiment_dir: Path  # local: sweep.json, study journal (and trials, for local storage)
    seconds: float
    export_dir: Path | None
    location: str  # where Tune keeps the trials: the experiment dir or a storage URI
    interrupted: bool = False  # stopped by Ctrl-C with trials unfinished (resume continues)


def check_sweep_data(spec: SweepSpec, *, address: str | None, write: Write) -> None:
    """Checks the base config's data on the driver, before any trial starts, and the data of
    every choice of a categorical (or fixed) space dimension over a ``data.*`` key.

    A truncated image or a missing mask would otherwise fail every trial, each after Ray
    started it. On a cluster whose data is mounted on the workers only, the trials check it.
    """
    from mmr.data import resolve_root
    from mmr.datacheck import check_data

    data = spec.base.data
    root = resolve_root(data.root)
    if address and data.dataset != "synthetic" and not root.exists():
        write(f"data.root {root} is not visible on this machine: the trials check the data")
        return
    check_data(data)
    for param, value in _data_choices(spec):
        _check_data_choice(spec, param, value, address=address, write=write)


def _data_choices(spec: SweepSpec) -> list[tuple[Any, Any]]:
    """``(param, value)`` for each choice of the space's categorical/fixed ``data.*`` keys."""
    return [
        (p, value)
        for p in spec.space.params
        if p.key.startswith("data.") and p.type in ("categorical", "fixed")
        for value in p.candidate_values()
    ]


def _check_data_choice(
    spec: SweepSpec, param: Any, value: Any, *, address: str | None, write: Write
) -> None:
    """Checks the data a trial sampling ``param = value`` would train on (as check_sweep_data)."""
    from mmr.config import PATH_KEYS
    from mmr.data import resolve_root
    from mmr.datacheck import check_data

    where = f"space dimension {param.name}, choice {value!r}"
    if (
        param.key in PATH_KEYS
        and value is not None
        and not Path(str(value)).expanduser().is_absolute()
    ):
        raise UserInputError(
            f"{where}: a relative path would be read from each trial's own directory: give "
            "the absolute path in the space"
        )
    data = spec.base.override({param.key: value}).data
    if data == spec.base.data:
        return
    root = resolve_root(data.root)
    if address and data.dataset != "synthetic" and not root.exists():
        write(f"{where}: data.root {root} is not visible on this machine: the trials check it")
        return
    try:
        check_data(data)
    except UserInputError as exc:
        raise type(exc)(f"{where}: {exc} (or remove the choice from the space)") from exc


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _job_metadata(spec: SweepSpec) -> dict[str, str]:
    """The driver job's labels in the Ray dashboard: which sweep it runs, and where."""
    return {"mmr_sweep_name": spec.sweep.name, "mmr_experiment": spec.experiment_location}


class _NoRayResumeHint(logging.Filter):
    """Drops Tune's own lines after a Ctrl-C: its ``Tuner.restore(...)`` hint and the list of
    trials that "did not complete"; the sweep prints ``launch.py resume EXP`` instead."""

    DROPPED = ("Experiment has been interrupted", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.DROPPED)


def _quiet_tune_output() -> None:
    """Environment for Tune's driver output, set before the Tuner runs."""
    tune_log = logging.getLogger("ray.tune.tune")  # ray/tune/tune.py: run()'s last lines
    if not any(isinstance(f, _NoRayResumeHint) for f in tune_log.filters):
        tune_log.addFilter(_NoRayResumeHint())
    # Round checkpoints force an experiment snapshot each (num_to_keep=1); with short rounds
    # Tune warns about it every few seconds, which drowns the progress table.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's newer console output prints a box and `tensorboard --logdir` of the driver's
    # staging dir under /tmp/ray (not where the event files end up), even with verbose=0;
    # the older output honours verbose=0. The sweep prints its own table and TensorBoard line.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _announce(spec: SweepSpec, write: Write) -> None:
    """Where to follow the sweep: TensorBoard on the experiment, and the trackers."""
    write(f"TensorBoard: tensorboard --logdir {spec.experiment_location}")
    if spec.sweep.tracking.enabled:
        from search.callbacks.tracking import describe_tracking

        for line in describe_tracking(spec):
            write(line)


def _run_config(spec: SweepSpec, write: Write, started: float) -> tune.RunConfig:
    _quiet_tune_output()
    return tune.RunConfig(
        name=spec.sweep.name,
        storage_path=spec.sweep.storage,
        failure_config=tune.FailureConfig(max_failures=spec.sweep.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[
            ProgressTable(spec, write=write, started=started),
            # Tune's file loggers, keeping each round once after a restart repeated rounds.
            RoundJsonLogger(),
            RoundCSVLogger(),
            TrialTensorBoard(),
            EndDeterministicFailures(spec.sweep.max_failures),
        ]
        + ([MirrorSync(spec)] if is_uri(spec.sweep.storage) else [])
        + _tracking_callbacks(spec),
        verbose=0,
    )


def _check_tracking(spec: SweepSpec) -> None:
    # search.callbacks.tracking imports MLflow/W&B (seconds): only for sweeps that track.
    if spec.sweep.tracking.enabled:
        from search.callbacks.tracking import check_tracking

        check_tracking(spec.sweep.tracking)


def _tracking_callbacks(spec: SweepSpec) -> list[tune.Callback]:
    if not spec.sweep.tracking.enabled:
        return []
    from search.callbacks.tracking import tracking_callbacks

    return tracking_callbacks(spec)


def _prepare_storage(spec: SweepSpec) -> None:
    location = spec.experiment_location
    if is_experiment(location):
        raise UserInputError(
            f"experiment {location!r} already exists: continue it with `launch.py resume "
            f"{location}` (or `sweep --resume`), or pick another --name"
        )
    if not is_empty(location) and not _only_claim(location):
        raise UserInputError(
            f"{location!r} already exists, is not empty and is not an mmr-sweep experiment "
            f"(no {SPEC_FILE}): a sweep never writes into it; pick another --name (or "
            "--storage)"
        )
    # Probe the storage root: the experiment itself is created only once Ray is up and the
    # resources fit, so a failed start leaves no half-made experiment behind.
    probe_writable(spec.sweep.storage)


def _only_claim(location: str) -> bool:
    """Whether the local ``location`` holds nothing but this sweep's claim (search.claim)."""
    return (
        not is_uri(location) and Path(location).is_dir() and os.listdir(location) == [CLAIM_FILE]
    )


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    resume: bool = False,
    write: Write = echo,
    dashboard: bool = True,
    export: bool = True,
    check_resume: bool = True,
) -> SweepRun:
    """Runs (or with ``resume`` continues) a sweep and exports its best configuration.

    With ``resume`` and ``check_resume``, ``spec`` must equal the stored one: a changed value
    is refused (``_refuse_resume_changes``), never dropped silently.
    """
    location = spec.experiment_location
    if resume and is_experiment(location):
        if check_resume:
            _apply_resume_changes(spec, load_spec(location), write)
        return resume_sweep(
            location, address=address, write=write, dashboard=dashboard, export=export
        )
    leave_job_working_dir()  # the spec's paths are absolute already
    if not is_experiment(location) and not is_empty(location) and not _only_claim(location):
        _prepare_storage(spec)  # refuses a foreign folder before the claim writes into it
    probe_writable(spec.sweep.storage)  # an unwritable --storage says so, not "cannot claim"
    # Claimed before anything else: a second sweep of this name is refused, not merged in.
    with claimed(spec.experiment_dir, location):
        return _start_sweep(spec, address=address, write=write, dashboard=dashboard, export=export)


def _start_sweep(
    spec: SweepSpec, *, address: str | None, write: Write, dashboard: bool, export: bool
) -> SweepRun:
    location = spec.experiment_location
    _prepare_storage(spec)
    _check_tracking(spec)
    check_sweep_data(spec, address=address, write=write)
    init_ray(address, dashboard=dashboard, write=write, job_metadata=_job_metadata(spec))
    check_resources(spec.sweep.resources, write=write)
    started = time.time()
    exp = spec.experiment_dir
    exp.mkdir(parents=True, exist_ok=True)
    atomic_write(exp / SPEC_FILE, json.dumps(spec.to_dict(), indent=2))
    if is_uri(location):
        push(exp, location)
    s = spec.sweep.search
    num_samples = planned_trials(spec)
    tuner = tune.Tuner(
        trial_trainable(spec),
        tune_config=tune.TuneConfig(
            # Ray's limiter, as max_concurrent_trials would add it, that also follows the
            # failed trials `resume --retry-failed` runs again.
            search_alg=PlannedTrials(
                RetryingLimiter(make_searcher(spec, exp), max_concurrent=s.max_concurrent),
                location=location,
            ),
            scheduler=make_scheduler(spec, location),
            num_samples=num_samples,
            trial_dirname_creator=_trial_dirname,
            # An actor per trial: the dashboard names each actor after its trial (its
            # __repr__, read once when the actor starts); see trial_trainable.
            reuse_actors=False,
            trial_name_creator=_trial_dirname,
        ),
        run_config=_run_config(spec, write, started),
    )
    c = spec.sweep.search.confirm
    after = f" + {(c.top_k + 1) * c.seeds} confirmation trials after them" if c.top_k else ""
    write(f"sweep {spec.sweep.name}: {num_samples} trials{after}, experiment {location}")
    _announce(spec, write)
    tuner.fit()
    return _finish(spec, started, write, export)


# What identifies the experiment (equal by construction) or names a file whose content is
# compared anyway (the base config and the space are stored inline).
_RESUME_IGNORED = ("sweep.name", "sweep.storage", "sweep.base", "sweep.space")


def _apply_resume_changes(spec: SweepSpec, stored: SweepSpec, write: Write) -> None:
    """Applies the one change a resume can make, more trials, and refuses every other.

    A resumed sweep runs with the configuration stored in its experiment: Tune restores its
    failure policy, searcher and scheduler from its own saved state, and the trials already
    run were trained on the stored base config and space, so none of these can change on
    resume. ``search.num_trials`` may grow (one study: ``PlannedTrials`` reads the new count
    from the rewritten ``sweep.json``); the new count is written there and said.
    """
    old_n, new_n = stored.sweep.search.num_trials, spec.sweep.search.num_trials
    grow = new_n > old_n and not stored.sweep.objective.per_category
    if grow:
        search = dataclasses.replace(stored.sweep.search, num_trials=new_n)
        grown = dataclasses.replace(stored, sweep=dataclasses.replace(stored.sweep, search=search))
        _refuse_resume_changes(spec, grown)
        atomic_write(stored.experiment_dir / SPEC_FILE, json.dumps(grown.to_dict(), indent=2))
        if is_uri(stored.experiment_location):
            push(stored.experiment_dir, stored.experiment_location)
        write(f"search.num_trials: {old_n} -> {new_n} (the resumed sweep runs the new trials)")
        return
    _refuse_resume_changes(spec, stored)


def _refuse_resume_changes(spec: SweepSpec, stored: SweepSpec) -> None:
    """UserInputError naming every value of ``spec`` that differs from the stored sweep's
    (only ``search.num_trials`` may grow, see ``_apply_resume_changes``)."""
    new, old = _flat(spec.to_dict()), _flat(stored.to_dict())
    changed = [
        # As the user sets them: search.num_trials, train.epochs (the base config's keys).
        f"{key.removeprefix('sweep.').removeprefix('base.')} "
        f"({_show(old.get(key))} -> {_show(new.get(key))})"
        for key in sorted(new.keys() | old.keys())
        if new.get(key) != old.get(key) and not key.startswith(_RESUME_IGNORED)
    ]
    if changed:
        location = stored.experiment_location
        raise UserInputError(
            f"sweep --resume continues {location!r} with its stored configuration, which "
            f"cannot change on resume (Tune restores its searcher, scheduler and failure policy "
            f"from its saved state; only search.num_trials may grow, for one study), but these "
            f"values differ: {', '.join(changed[:6])}"
            + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            + f": drop those --set/--config values to continue it as it is (`launch.py resume "
            f"{location}`), or start a new sweep under another --name (it may warm-start from "
            f"this one: --set 'search.warm_start=[{location}]')"
        )


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict) and raw:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(raw) if isinstance(raw, tuple) else raw}


def _show(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def resume_sweep(
    experiment: str | Path,
    *,
    address: str | None = None,
    write: Write = echo,
    dashboard: bool = True,
    export: bool = True,
    retry_failed: bool = False,
) -> SweepRun:
    """Continues an interrupted sweep: finished trials kept, study and rungs restored.

    ``experiment`` is the experiment directory or, for remote storage, its URI. Failed
    trials stay failed unless ``retry_failed``: then they run again from their last round
    checkpoint (or from the start), after their failure markers are cleared, and their
    studies record each retry as a new trial (see ``StudySearch``).
    """
    location = str(experiment) if is_uri(experiment) else str(Path(experiment).resolve())
    spec = load_spec(location)
    leave_job_working_dir()
    if not tune.Tuner.can_restore(location):
        raise UserInputError(
            f"{location!r} has no Tune state to resume yet (the sweep was "
            "stopped before its first trial started): run the sweep again"
        )
    done = _complete(spec, retry_failed=retry_failed)
    if done is not None and not _confirm_pending(spec):
        write(f"{spec.sweep.name}: already complete ({done} trials); nothing to resume")
        _say_failed(spec, write)
        export_dir = spec.experiment_dir / "export"
        return SweepRun(
            spec.experiment_dir, 0.0, export_dir if export_dir.is_dir() else None, location
        )
    with claimed(spec.experiment_dir, location):
        return _resume(spec, location, address, write, dashboard, export, retry_failed, done)


def _resume(
    spec: SweepSpec,
    location: str,
    address: str | None,
    write: Write,
    dashboard: bool,
    export: bool,
    retry_failed: bool,
    done: int | None,
) -> SweepRun:
    """Continues the sweep (``done``: its trials when only the confirmation is left)."""
    _check_tracking(spec)
    check_sweep_data(spec, address=address, write=write)
    init_ray(address, dashboard=dashboard, write=write, job_metadata=_job_metadata(spec))
    check_resources(spec.sweep.resources, write=write)
    started = time.time()
    _quiet_tune_output()
    if retry_failed:
        # Without this, a retried deterministic failure would end at once (train_trial).
        remove_from_trials(location, FAILED_MARKER)
    # resume_errored keeps each trial's id (the study knows it by that id); restart_errored
    # would start failed trials as new trials that no searcher suggested.
    tuner = tune.Tuner.restore(
        location,
        trainable=trial_trainable(spec),
        resume_unfinished=True,
        resume_errored=retry_failed,
        restart_errored=False,
    )
    retrying = " (failed trials run again)" if retry_failed else ""
    if done is not None:  # the search is complete: only its confirmation runs are left
        return _finish(spec, started, write, export)
    write(f"resuming sweep {spec.sweep.name} in {location}{retrying}")
    _announce(spec, write)
    with resuming(location, spec.experiment_dir):
        tuner.fit()
    return _finish(spec, started, write, export)


def _say_failed(spec: SweepSpec, write: Write) -> None:
    """Names the failed trials of a finished sweep and how to run them again."""
    from search.results import load_trials

    exp = spec.experiment_location
    failed = (load_trials(exp)["state"] == "failed").sum()
    if failed:
        write(
            f"{failed} trial(s) failed (`launch.py status {exp}` shows why); fix the cause, "
            f"then run them again with: launch.py resume {exp} --retry-failed"
        )


def _confirm_pending(spec: SweepSpec) -> bool:
    """Whether the sweep confirms its best configurations and has not written the result."""
    from search.confirm import read_confirm

    return spec.sweep.search.confirm.top_k > 0 and read_confirm(spec.experiment_dir) is None


def _confirm(spec: SweepSpec, write: Write) -> bool:
    """Runs the confirmation trials (``search.confirm``); False when they were interrupted."""
    from search.confirm import run_confirm

    callbacks = [
        RoundJsonLogger(),
        RoundCSVLogger(),
        TrialTensorBoard(),
        EndDeterministicFailures(spec.sweep.max_failures),
    ]
    return run_confirm(spec, write=write, trainable=trial_trainable(spec), callbacks=callbacks)


def _complete(spec: SweepSpec, *, retry_failed: bool) -> int | None:
    """The number of trials when the sweep has run all its planned trials, none unfinished
    (nor failed, with ``retry_failed``); None when resuming has something to run."""
    from search.results import load_trials

    states = load_trials(spec.experiment_location)["state"]
    unfinished = states.isin(["running", "pending"]).sum()
    failed = (states == "failed").sum() if retry_failed else 0
    if len(states) < planned_trials(spec) or unfinished or failed:
        return None
    return len(states)


def _finish(spec: SweepSpec, started: float, write: Write, export: bool) -> SweepRun:
    from search.results import load_trials, summary_table

    seconds = time.time() - started
    exp = spec.experiment_location
    write(summary_table(exp))
    states = load_trials(exp)["state"]
    _say_failed(spec, write)
    unfinished = states.isin(["running", "pending"]).sum()
    if unfinished:
        # Ctrl-C: Tune stopped gracefully and saved its state; a partial export would
        # present an unfinished search as its result.
        write(
            f"sweep interrupted with {unfinished} trial(s) unfinished; continue it with: "
            f"launch.py resume {exp}"
        )
        return SweepRun(spec.experiment_dir, seconds, None, exp, interrupted=True)
    if _confirm_pending(spec) and not _confirm(spec, write):
        write(f"confirmation runs interrupted; continue them with: launch.py resume {exp}")
        return SweepRun(spec.experiment_dir, time.time() - started, None, exp, interrupted=True)
    seconds = time.time() - started
    export_dir = None
    if export:
        from search.export import export_experiment

        export_dir = export_experiment(exp, spec.experiment_dir / "export")
        write(f"exported the best configuration to {export_dir}")
        if spec.sweep.tracking.enabled:
            from search.callbacks.tracking import log_export

            for where in log_export(spec, export_dir):
                write(f"logged the export to {where}")
    return SweepRun(spec.experiment_dir, seconds, export_dir, exp)
