"""The Tune trainable: a few lines around ``mmr.train.fit``."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.train._internal.checkpoint_manager import _TrainingResult
from ray.train._internal.storage import _exists_at_fs_path
from ray.tune.result import TRAINING_ITERATION
from ray.tune.trainable import wrap_function

from mmr.config import Config
from search.callbacks.lifecycle import EndDeterministicFailures  # noqa: F401  (see below)
from search.config import SweepSpec
from search.contract import (
    CONFIRM_KEY,
    FAILED_MARKER,
    META_KEYS,
    OBJECTIVE,
    ROUND_METADATA,
    ROUNDS_KEY,
    TEST_SCORES_FILE,
    WORKER_FILE,
)
from search.storage import join, read_file, write_file

__all__ = [
    "describe_trial",
    "select_trial_gpu",
    "train_trial",
    "trial_config",
    "trial_cuda_index",
    "trial_trainable",
]

logger = logging.getLogger(__name__)
# EndDeterministicFailures lived here before issue 23: Tune unpickles an older experiment's
# callbacks (tuner.pkl) by that path on resume.

# When set, Ray leaves CUDA_VISIBLE_DEVICES alone: every trial sees every GPU of its node.
NOSET_CUDA_VAR = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def trial_config(spec: SweepSpec, config: dict[str, Any]) -> Config:
    """The training config of one trial: the base, its sampled params, its category."""
    params = {k: v for k, v in config.items() if k not in META_KEYS}
    cfg = spec.base.override(params)
    if config.get("category") is not None:
        cfg = cfg.override({"data.categories": [config["category"]]})
    return cfg


def trial_cuda_index(gpu_ids: Sequence[int | str], environ: Mapping[str, str]) -> int | None:
    """The CUDA device index of the trial's GPU when Ray did not narrow the visible GPUs.

    Normally Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU, which is then ``cuda:0``.
    With ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set it does not, and every trial
    would train on GPU 0; its GPU is ``ray.get_gpu_ids()`` instead: an entry of the node's
    CUDA_VISIBLE_DEVICES when that is set (CUDA numbers the visible GPUs 0, 1, ...), else
    a physical index. Returns None when there is nothing to choose.

    Raises:
        RuntimeError: Ray's GPU id is not among the GPUs CUDA_VISIBLE_DEVICES shows.
    """
    if environ.get(NOSET_CUDA_VAR, "").strip().lower() not in ("1", "true") or not gpu_ids:
        return None
    gpu = str(gpu_ids[0]).strip()  # a trial trains on one device; extra GPUs go unused
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    if not visible:
        return int(gpu)
    if gpu not in visible:
        raise RuntimeError(
            f"Ray assigned GPU {gpu!r} to this trial, but CUDA_VISIBLE_DEVICES="
            f"{','.join(visible)} does not show it; unset {NOSET_CUDA_VAR} so that Ray "
            "sets CUDA_VISIBLE_DEVICES per trial"
        )
    return visible.index(gpu)


def select_trial_gpu() -> int | None:
    """Makes the trial's GPU the current CUDA device when Ray left all GPUs visible.

    ``train.device`` auto/cuda (``torch.device("cuda")``) then means that GPU. Returns its
    index, or None when Ray's CUDA_VISIBLE_DEVICES already narrowed it (or no GPU).
    """
    index = trial_cuda_index(ray.get_gpu_ids(), os.environ)
    if index is not None:
        import torch

        torch.cuda.set_device(index)
    return index


def train_trial(config: dict[str, Any], *, spec: dict[str, Any]) -> None:
    """Trains one trial, reporting the objective and a checkpoint after every round.

    A restarted trial (worker died, driver resumed) continues from ``tune.get_checkpoint()``.
    A deterministic failure (NaN loss, bad data, CUDA OOM) is recorded in the trial dir so
    that Ray's retries, meant for lost workers, end at once with the same error.
    """
    from mmr.checkpoint import checkpoint_due
    from mmr.device import allocator_env, limit_memory, release_memory
    from mmr.train import fit

    # Before CUDA starts in this worker (a reused worker keeps its first trial's allocator).
    os.environ.update(allocator_env())
    # One INFO line per persisted round checkpoint would flood the driver's terminal.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    sweep = SweepSpec.from_dict(spec)
    cfg = trial_config(sweep, config)
    # The trial's dir on the experiment storage, which every node sees, through the storage's
    # own filesystem (a local/NFS path or s3://...). get_trial_dir() is the driver's staging
    # dir, absent on other nodes, and for a reused actor a node-local dir never synced.
    storage = tune.get_context().get_storage()
    fs, trial_dir = storage.storage_filesystem, storage.trial_fs_path
    fs.create_dir(trial_dir, recursive=True)
    failed = read_file(fs, join(trial_dir, FAILED_MARKER))
    if failed is not None:  # a retry of a deterministic failure: end before any work
        raise RuntimeError(json.loads(failed)["error"])
    # Where this attempt runs (a retried trial may move to another node), and how many
    # attempts did real work so far.
    previous = read_file(fs, join(trial_dir, WORKER_FILE))
    attempt = 1 + (json.loads(previous).get("attempt", 1) if previous else 0)
    write_file(
        fs,
        join(trial_dir, WORKER_FILE),
        json.dumps(
            {
                "pid": os.getpid(),
                "hostname": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "attempt": attempt,
            }
        ),
    )
    select_trial_gpu()

    # Trials sharing a GPU (resources.gpu < 1) each get a cap, so that a neighbour's peak
    # cannot take the memory this trial was promised.
    limit_memory(sweep.sweep.resources.gpu)
    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="mmr-ckpt-") as tmp:

        def report(round_: int, metrics: dict[str, float]) -> None:
            metrics = dict(metrics)
            metrics[ROUNDS_KEY] = cfg.num_rounds
            metrics[OBJECTIVE] = sweep.objective_value(metrics)
            if checkpoint_due(cfg, round_):  # fit wrote this round's checkpoint
                saved = tune.Checkpoint.from_directory(tmp)
                # Its round, for a restore that must fall back to it (see surviving_checkpoint).
                saved.set_metadata({ROUND_METADATA: round_})
                tune.report(metrics, checkpoint=saved)
            else:
                tune.report(metrics)

        try:
            if checkpoint is None:
                fit(cfg, report=report, checkpoint_dir=tmp, final_test=False)
            else:
                with checkpoint.as_directory() as resume:
                    fit(
                        cfg,
                        report=report,
                        checkpoint_dir=tmp,
                        resume_from=resume,
                        final_test=False,
                    )
            if config.get(CONFIRM_KEY) is not None:
                write_file(fs, join(trial_dir, TEST_SCORES_FILE), test_scores(tmp))
        except Exception as exc:
            if _deterministic(exc):
                error = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                write_file(fs, join(trial_dir, FAILED_MARKER), error)
            raise
        finally:
            # Ray may run the next trial in this process: hand back the cached GPU memory.
            release_memory()


def test_scores(checkpoint_dir: str) -> str:
    """The held-out test half's image scores of a trained checkpoint, as JSON
    ``{category: {"labels": [...], "scores": [...]}}``: a confirmation trial's, so that the
    driver can bootstrap its gain over the baseline over the test images. The scores are the
    ones evaluation ranks by (the maximum of each anomaly map)."""
    from mmr.train import evaluate_checkpoint

    _, _, outputs = evaluate_checkpoint(checkpoint_dir, split="test", device="auto")
    out = {}
    for task, (data, maps) in outputs.items():
        out[task] = {
            "labels": [int(x) for x in data.labels.tolist()],
            "scores": maps.flatten(1).amax(dim=1).double().cpu().tolist(),
        }
    return json.dumps(out)


def describe_trial(sweep: str, trial_id: str, config: dict[str, Any]) -> str:
    """One line naming a trial: sweep, id, category and params (the dashboard's actor name)."""
    parts = [f"{sweep} trial {trial_id}"]
    if config.get("category") is not None:
        parts.append(f"[{config['category']}]")
    for key, value in config.items():
        if key not in META_KEYS:
            shown = f"{value:.3g}" if isinstance(value, float) else value
            shown = list(shown) if isinstance(shown, tuple) else shown
            parts.append(f"{key.rsplit('.', 1)[-1]}={shown}")
    if config.get("baseline"):
        parts.append("(baseline)")
    return " ".join(parts)


def trial_trainable(spec: SweepSpec) -> type[tune.Trainable]:
    """The Tune trainable of a sweep: :func:`train_trial` as a class that names its trial.

    Tune wraps a function trainable in a class whose actors the Ray dashboard lists as
    ``ImplicitFunc`` / ``train_trial``, all alike. Ray takes an actor's name from its
    ``__repr__`` once, when the actor starts, so each trial needs its own actor (the sweep
    runs with ``reuse_actors=False``) for the name to be that trial's.
    """
    r = spec.sweep.resources
    resources = {"cpu": r.cpu, "gpu": r.gpu, **r.custom}
    fn = tune.with_resources(tune.with_parameters(train_trial, spec=spec.to_dict()), resources)
    sweep = spec.sweep.name

    class SweepTrial(wrap_function(fn)):  # type: ignore[misc]
        def __repr__(self) -> str:
            return describe_trial(sweep, self.trial_id, dict(self.config or {}))

        def restore(self, checkpoint_path: Any) -> Any:
            return super().restore(surviving_checkpoint(checkpoint_path))

    # The dashboard shows the qualified name; "trial_trainable.<locals>." is noise there.
    SweepTrial.__qualname__ = SweepTrial.__name__
    return SweepTrial


def surviving_checkpoint(result: Any) -> Any:
    """The checkpoint a restored trial can continue from, when Tune's own is gone.

    Tune deletes a trial's older round checkpoints (``num_to_keep``) as soon as it registers a
    newer one, but writes the experiment state that names the newest one later. A driver
    killed in between leaves a state naming a deleted checkpoint (or, killed during the
    deletion, a directory without its ``checkpoint.pt``), and Tune's restore then fails the
    trial. The trial continues instead from the newest whole checkpoint still in its
    directory, with Tune's round count set to that checkpoint's round.
    """
    from mmr.checkpoint import CHECKPOINT_NAME

    if not isinstance(result, _TrainingResult):
        return result
    ckpt = result.checkpoint

    def whole(path: str) -> bool:
        return _exists_at_fs_path(ckpt.filesystem, join(path, CHECKPOINT_NAME))

    if whole(ckpt.path):
        return result
    fs, trial_dir = ckpt.filesystem, os.path.dirname(ckpt.path.rstrip("/"))
    found = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    names = sorted(
        info.base_name
        for info in found
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    for name in reversed(names):
        newer = tune.Checkpoint(join(trial_dir, name), filesystem=fs)
        round_ = newer.get_metadata().get(ROUND_METADATA) if whole(newer.path) else None
        if round_ is not None:
            logger.warning(
                "checkpoint %s is gone (the driver died before saving the experiment state); "
                "continuing from %s (round %d)", ckpt.path, newer.path, round_,
            )  # fmt: skip
            return _TrainingResult(
                checkpoint=newer, metrics={**result.metrics, TRAINING_ITERATION: round_}
            )
    return result  # nothing to fall back to: Tune's own error says which checkpoint is gone


def _deterministic(exc: BaseException) -> bool:
    """Failures that a retry would only repeat (unlike a lost worker or node)."""
    import torch

    from mmr.errors import UserInputError
    from mmr.train import TrainingDiverged

    return isinstance(exc, TrainingDiverged | UserInputError | torch.OutOfMemoryError)
