"""Training checkpoints: a plain dict per file, written atomically, read memory-mapped.

A checkpoint holds the config, the shared teacher, one student per task, the optimiser and
generator states and every RNG state, so that a resumed run continues exactly as an
uninterrupted one; ``model_file`` keeps the deployable part (``model.pt``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmr.config import Config
from mmr.errors import UserInputError
from mmr.fileio import atomic_path

if TYPE_CHECKING:
    from mmr.model import MMR

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "checkpoint_due",
    "load_checkpoint",
    "model_file",
    "restore_training",
    "save_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mmr-sweep/1"


def checkpoint_due(cfg: Config, round_: int) -> bool:
    """Whether round ``round_`` (1-based) writes a checkpoint: every
    ``train.checkpoint_every`` rounds, and always the last one.

    A lost worker's trial resumes from the latest checkpoint, so a larger interval trades
    repeated rounds after a failure for less writing in every round.
    """
    return round_ % cfg.train.checkpoint_every == 0 or round_ >= cfg.num_rounds


def save_checkpoint(
    path: Path,
    cfg: Config,
    models: Mapping[str, MMR],
    optimizers: Mapping[str, torch.optim.Optimizer] | None,
    generators: Mapping[str, torch.Generator],
    epoch: int,
    history: list[dict[str, float]],
    *,
    streams: Mapping[str, Mapping[str, torch.Tensor | None]] | None = None,
) -> None:
    """Writes a plain-dict checkpoint (loadable with ``weights_only=True``) atomically.

    ``optimizers`` None leaves out the optimiser state: such a checkpoint can be evaluated and
    exported, not trained further. ``epoch`` counts epoch steps: the epochs of a lockstep run,
    the epochs of every task so far in a sequential one (``train.category_order``).
    ``streams``: each task's RNG stream (``mmr.train.TaskStreams.states``).
    """
    teacher = next(iter(models.values())).teacher
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "round": len(history),
        "teacher": teacher.state_dict(),
        "students": {name: m.student.state_dict() for name, m in models.items()},
        "generators": {name: g.get_state() for name, g in generators.items()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": list(random.getstate()[1]),
        "history": history,
    }
    if streams is not None:
        state["task_rng"] = {
            name: {k: v for k, v in st.items() if v is not None} for name, st in streams.items()
        }
    if optimizers is not None:
        state["optimizers"] = {name: o.state_dict() for name, o in optimizers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint file (or ``DIR/checkpoint.pt``) with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserInputError(
            f"checkpoint {str(path)!r} does not exist: pass the file written "
            "by a training run (or the directory holding checkpoint.pt)"
        )
    from mmr.weights import load_torch_file

    # mmap: tensors are read from the file as they are used, not all copied into memory
    # first (a 15-category checkpoint is several GB).
    state = load_torch_file(path, what="checkpoint", mmap=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(
            f"{str(path)!r} is not an mmr-sweep checkpoint (expected format {CHECKPOINT_FORMAT})"
        )
    return state


def restore_training(
    state: Mapping[str, Any],
    cfg: Config,
    models: Mapping[str, MMR],
    optimizers: Mapping[str, torch.optim.Optimizer],
    generators: Mapping[str, torch.Generator],
    *,
    streams: Any = None,
) -> int:
    """Loads a checkpoint's weights, optimiser, generator and RNG states into a training run
    built from ``cfg``; returns the epoch step it continues after (see ``save_checkpoint``).

    ``streams``: the run's ``mmr.train.TaskStreams``; a checkpoint written before tasks had
    their own streams continues the first task's from the saved global RNG state.
    """

    if set(state["students"]) != set(models):
        raise UserInputError(
            f"checkpoint holds tasks {sorted(state['students'])} but the "
            f"config trains {sorted(models)}: resume with the same config"
        )
    saved = Config.from_dict(state["config"])
    if saved.model != cfg.model:
        raise UserInputError(
            "checkpoint was written with a different model config: resume "
            "with the config it was trained with"
        )
    epoch = int(state["epoch"])
    saved_order = saved.train.category_order
    if saved_order != cfg.train.category_order:
        raise UserInputError(
            f"checkpoint was written with train.category_order={saved_order}: resume with "
            "the same order"
        )
    total = cfg.total_epochs if cfg.total_epochs is not None else cfg.train.epochs
    if "optimizers" not in state and epoch < total:
        raise UserInputError(
            f"checkpoint holds no optimiser state (it was written after the last epoch, "
            f"{epoch}): it can be evaluated or exported, not trained to train.epochs="
            f"{cfg.train.epochs}"
        )
    teacher = next(iter(models.values())).teacher
    teacher.load_state_dict(state["teacher"])
    for name, model in models.items():
        model.student.load_state_dict(state["students"][name])
        if "optimizers" in state:
            optimizers[name].load_state_dict(_owned(state["optimizers"][name]))
        generators[name].set_state(state["generators"][name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if streams is not None:
        if "task_rng" in state:
            streams.load(state["task_rng"])
        else:
            streams.load({next(iter(models)): {"cpu": torch.get_rng_state()}})
    return epoch


def _owned(optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimiser state dict whose tensors own their memory.

    ``load_checkpoint`` maps the file, and ``Optimizer.load_state_dict`` keeps a tensor that
    needs no move to another device or dtype: the moments and step counts of a CPU trial would
    stay views of the file, and a checkpoint file written over in place while the trial trains
    would change them under the optimiser.
    """
    return {
        **optimizer_state,
        "state": {
            key: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in entry.items()}
            for key, entry in optimizer_state["state"].items()
        },
    }


def model_file(
    state: Mapping[str, Any], *, thresholds: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The deployable part of a checkpoint: config, teacher and students (no optimiser).

    ``thresholds`` (``{task: mmr.thresholds.choose_thresholds(...)}``) are stored under the
    optional ``thresholds`` key that ``launch.py predict`` uses; a model file without it (an
    older export) still predicts, reporting raw scores only.
    """
    out = {key: state[key] for key in ("format", "config", "epoch", "teacher", "students")}
    if thresholds is None and "thresholds" in state:
        thresholds = state["thresholds"]
    if thresholds is not None:
        out["thresholds"] = {task: dict(t) for task, t in thresholds.items()}
    return out
