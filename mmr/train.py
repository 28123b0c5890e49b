"""Training loop: one MMR model per task, trained in lockstep (or one task after another,
``train.category_order: sequential``), evaluated every few epochs.

``fit`` is the single boundary between the search layer and the model: it calls
``report(round, metrics)`` after each validation round and can resume from its own checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmr.checkpoint import (
    CHECKPOINT_NAME,
    checkpoint_due,
    load_checkpoint,
    model_file,
    restore_training,
    save_checkpoint,
)
from mmr.config import Config
from mmr.data import (
    Sample,
    Task,
    center_crop,
    center_crop_masks,
    list_tasks,
    load_images,
    load_masks,
    split_task,
    train_batches,
)
from mmr.device import cudnn_benchmark, fp32_math
from mmr.fileio import atomic_path, atomic_write
from mmr.metrics import evaluate
from mmr.model import MMR, build_teacher, param_groups
from mmr.report import flatten_metrics

__all__ = [
    "EvalSet",
    "TaskStreams",
    "TrainingDiverged",
    "fit",
    "run_training",
    "evaluate_checkpoint",
    "lr_at",
    "build_models",
    "load_models",
    "make_optimizer",
    "precision_autocast",
    "prepare_eval",
    "predict_maps",
    "score_maps",
    "resolve_device",
    "train_epoch",
    "with_listed_tasks",
]

log = logging.getLogger(__name__)

ReportFn = Callable[[int, dict[str, float]], None]
EpochFn = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the metrics of such a run would be garbage."""


@dataclass
class EvalSet:
    """One task's evaluation data, kept on the training device."""

    images: torch.Tensor  # uint8 N x 3 x R x R (resized, not yet cropped)
    masks: torch.Tensor | None  # uint8 N x 1 x R x R (0/1), None for mask-less datasets
    labels: torch.Tensor  # int64 N
    groups: list[str]  # reporting unit of each image
    samples: list[Sample]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from mmr.errors import ConfigError

        raise ConfigError(
            "train.device is 'cuda' but no CUDA GPU is visible: use "
            "train.device=auto or cpu, or run on a GPU worker"
        )
    return torch.device(name)


def lr_at(epoch: int, cfg: Config) -> float:
    """Learning rate of 0-based ``epoch``, as the official schedule sets it per epoch.

    Linear warm-up (epoch 0 at lr 0), then lr / 10 for each milestone ``m`` that the epoch's
    1-based number has reached (``epoch + 1 >= m``): with milestones 120 and 160 the drops
    happen at 0-based epochs 119 and 159. As in the official code, a milestone that falls
    inside the warm-up is never applied.
    """
    t = cfg.train
    if epoch < t.warmup_epochs:
        return t.lr * epoch / t.warmup_epochs
    steps = sum(t.warmup_epochs <= m - 1 <= epoch for m in t.lr_milestones)
    return t.lr * 0.1**steps


def with_listed_tasks(cfg: Config, tasks: list[Task]) -> Config:
    """``cfg`` with ``data.categories: all`` replaced by the listed tasks' names when the tasks
    train one after another: their number sets the rounds (``Config.num_rounds``) and their
    order the training order, so a checkpoint must name them."""
    if not cfg.sequential or cfg.num_tasks is not None:
        return cfg
    return cfg.override({"data.categories": [task.name for task in tasks]})


class TaskStreams:
    """Each task's own stream of torch's global RNG, which MAE masking draws from.

    A task's masks then depend on its own epochs only, not on which tasks trained before it,
    so lockstep and sequential training give the same models. The first task continues the
    global stream (a one-task run draws exactly what it drew before the streams existed); the
    others start from seeds of their own. ``states`` (``{task: {"cpu": ..., "cuda": ...}}``)
    go into checkpoints.
    """

    def __init__(self, names: list[str], *, seed: int, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.states: dict[str, dict[str, torch.Tensor | None]] = {}
        for i, name in enumerate(names):
            if i == 0:
                self.states[name] = self._current()
                continue
            # A str seed hashes deterministically; distinct from the task's generator seed
            # (seed * 1000 + i), whose stream the augmentation draws from.
            draw = random.Random(f"masking-{seed}-{i}").getrandbits(63)
            cpu = torch.Generator().manual_seed(draw).get_state()
            cuda = None
            if self._cuda:
                cuda = torch.Generator(device=device).manual_seed(draw).get_state()
            self.states[name] = {"cpu": cpu, "cuda": cuda}

    def _current(self) -> dict[str, torch.Tensor | None]:
        return {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if self._cuda else None,
        }

    def load(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Takes the states a checkpoint saved (for the tasks it has)."""
        for name, state in states.items():
            if name in self.states:
                self.states[name] = {"cpu": state["cpu"].clone(), "cuda": state.get("cuda")}

    @contextlib.contextmanager
    def use(self, name: str) -> Any:
        """Draws from ``name``'s stream inside the block; its state advances."""
        state = self.states[name]
        torch.set_rng_state(state["cpu"])
        if self._cuda and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"])
        yield
        self.states[name] = self._current()


def build_models(cfg: Config, tasks: list[str], device: torch.device) -> dict[str, MMR]:
    """One MMR per task, sharing a single frozen teacher (built first: from ``train.seed``
    unless ``model.teacher_seed`` or its weights fix it)."""
    torch.manual_seed(cfg.train.seed)
    teacher = build_teacher(cfg.model)
    models = {}
    for name in tasks:
        models[name] = MMR(cfg.model, image_size=cfg.data.image_size, teacher=teacher)
    return {name: m.to(device) for name, m in models.items()}


def prepare_eval(cfg: Config, task: Task, samples: list[Sample], device: torch.device) -> EvalSet:
    """Loads (from the decoded-image cache) one task's evaluation images, masks and labels."""
    d = cfg.data
    images = load_images(
        [s.image for s in samples],
        size=d.resize,
        cache_dir=d.cache_dir,
        interpolation=d.test_interpolation,
    )
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    masks = None
    if task.has_masks:
        masks = load_masks(
            samples,
            size=d.resize,
            cache_dir=d.cache_dir,
            binarize=d.mask_binarize,
            crop=d.image_size,
        )
        if d.relabel_empty:
            # As the official test set: a defect the center crop cut away leaves a good image.
            cropped = center_crop_masks(masks, image_size=d.image_size)
            empty = (cropped.flatten(1).amax(dim=1) == 0) & (labels == 1)
            if bool(empty.any()):
                log.info(
                    "%s: %d anomalous image(s) with an empty mask after the crop count as good",
                    task.name,
                    int(empty.sum()),
                )
                labels = torch.where(empty, 0, labels)
    return EvalSet(
        images=images.to(device),
        masks=None if masks is None else masks.to(device),
        labels=labels,
        groups=[s.group for s in samples],
        samples=list(samples),
    )


@torch.no_grad()
def predict_maps(model: MMR, data: EvalSet, cfg: Config) -> torch.Tensor:
    """Anomaly maps (N x H x W float32) of the center-cropped evaluation images."""
    model.eval()
    maps = []
    with precision_autocast(cfg, data.images.device):
        for start in range(0, len(data.images), cfg.eval.batch_size):
            batch = center_crop(
                data.images[start : start + cfg.eval.batch_size], image_size=cfg.data.image_size
            )
            maps.append(model.anomaly_map(batch, blur_sigma=cfg.eval.blur_sigma).float())
    return torch.cat(maps)


def score_maps(maps: torch.Tensor, data: EvalSet, cfg: Config) -> dict[str, dict[str, float]]:
    """Metrics of each reporting unit (``{unit: {metric: value}}``)."""
    masks = None
    if data.masks is not None:
        masks = center_crop_masks(data.masks, image_size=cfg.data.image_size)[:, 0]
    out = {}
    for unit in sorted(set(data.groups)):
        idx = torch.tensor([i for i, g in enumerate(data.groups) if g == unit])
        unit_masks = None if masks is None else masks[idx.to(masks.device)]
        out[unit] = evaluate(
            maps[idx.to(maps.device)],
            unit_masks,
            data.labels[idx],
            fpr_limit=cfg.eval.aupro_fpr_limit,
            official_pro=cfg.eval.official_pro,
        )
    return out


def fit(
    cfg: Config,
    *,
    report: ReportFn | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_epoch: EpochFn | None = None,
    final_test: bool = True,
) -> dict[str, Any]:
    """Trains MMR on every task of ``cfg`` and evaluates it.

    Args:
        cfg: the training config.
        report: called as ``report(round, metrics)`` after each validation round, once the
            round's checkpoint is on disk; ``metrics`` is flat (see ``docs/design.md``).
        checkpoint_dir: where ``checkpoint.pt`` is written after each round (None: not saved).
        resume_from: a checkpoint file or a directory holding one; training continues after
            its round exactly as an uninterrupted run would.
        on_epoch: called as ``on_epoch(epoch, {"loss": ..., "lr": ...})`` after each epoch.
        final_test: evaluate the held-out test half at the end (search trials skip it: no
            search ever sees test numbers; export evaluates the chosen model instead).

    Returns:
        ``{"val": {unit: metrics}, "test": {unit: metrics}, "history": [...], "epochs": n,
        "seconds": wall time}``; ``test`` is the held-out half that no search ever sees.
    """
    started = time.perf_counter()
    t = cfg.train
    threads = t.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        # Ray sets OMP_NUM_THREADS to a trial's CPU allotment, but a reused worker process
        # keeps the thread count torch read when it was first imported: set it explicitly.
        torch.set_num_threads(threads)
    device = resolve_device(t.device)
    random.seed(t.seed)
    tasks = list_tasks(cfg.data)
    cfg = with_listed_tasks(cfg, tasks)
    log.info("tasks: %s on %s", [task.name for task in tasks], device)

    train_images, val_sets, test_sets = {}, {}, {}
    for task in tasks:
        val, test = split_task(task, cfg.data)
        paths = [s.image for s in task.train]
        # Random crops come from a higher-resolution copy (data.train_size), so that they are
        # down-sampled as the official crops from the original image are.
        train_images[task.name] = load_images(
            paths, size=cfg.data.train_size, cache_dir=cfg.data.cache_dir
        ).to(device)
        val_sets[task.name] = prepare_eval(cfg, task, val, device)
        if final_test:
            test_sets[task.name] = prepare_eval(cfg, task, test, device)

    models = build_models(cfg, [task.name for task in tasks], device)
    optimizers = {name: make_optimizer(m, cfg, device) for name, m in models.items()}
    generators = {}
    for i, name in enumerate(models):
        generators[name] = torch.Generator().manual_seed(t.seed * 1000 + i)
    streams = TaskStreams(list(models), seed=t.seed, device=device)
    # Lockstep: one phase training every task; sequential: one phase per task, in order.
    phases = [[name] for name in models] if cfg.sequential else [list(models)]
    history: list[dict[str, float]] = []
    start = 0  # epoch steps done: phase * train.epochs + the phase's epoch
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        start = restore_training(state, cfg, models, optimizers, generators, streams=streams)
        history = list(state["history"])
        log.info("resumed at epoch step %d (round %d)", start, len(history))

    val_metrics: dict[str, dict[str, float]] = {}
    if cfg.sequential and history:  # the finished tasks' metrics stay in every report
        from mmr.report import unflatten_metrics

        val_metrics = unflatten_metrics(history[-1])
    # Per-epoch mean losses stay on the device until the round ends: reading one is a host
    # sync, so the loss is read (and checked for NaN) once per round, not once per step.
    pending: list[tuple[int, float, torch.Tensor]] = []
    with cudnn_benchmark(device):
        for index, phase in enumerate(phases):
            for epoch in range(max(start - index * t.epochs, 0), t.epochs):
                lr = lr_at(epoch, cfg)  # the task's own epoch: each task has its schedule
                losses = []
                for name in phase:
                    for group in optimizers[name].param_groups:
                        group["lr"] = lr
                    try:
                        with streams.use(name):
                            losses.append(
                                train_epoch(
                                    models[name],
                                    optimizers[name],
                                    train_images[name],
                                    generators[name],
                                    cfg,
                                )
                            )
                    except torch.OutOfMemoryError as exc:
                        raise _out_of_memory(exc, cfg, len(models), epoch) from exc
                pending.append((epoch, lr, torch.stack(losses)))
                if on_epoch is not None:  # a per-epoch callback needs the loss now: one sync
                    loss = _check_losses(pending[-1:], phase)[-1]
                    on_epoch(epoch, {"loss": loss, "lr": lr})
                if (epoch + 1) % t.eval_every and epoch + 1 != t.epochs:
                    continue
                round_loss = _check_losses(pending, phase)[-1]
                pending.clear()
                if not cfg.sequential:
                    val_metrics = {}
                for name in phase:  # sequential: the tasks trained before keep their values
                    maps = predict_maps(models[name], val_sets[name], cfg)
                    val_metrics.update(score_maps(maps, val_sets[name], cfg))
                flat = flatten_metrics(val_metrics)
                flat.update(epoch=epoch + 1, loss=round_loss)
                if cfg.sequential:
                    flat["tasks_started"] = float(index + 1)
                history.append(flat)
                done = index + 1 == len(phases) and epoch + 1 == t.epochs
                if checkpoint_dir is not None and checkpoint_due(cfg, len(history)):
                    save_checkpoint(
                        Path(checkpoint_dir) / CHECKPOINT_NAME,
                        cfg,
                        models,
                        # Training is over after the last round: nothing resumes it, so its
                        # checkpoint (what export reads) leaves out the AdamW state (2/3 of it).
                        None if done else optimizers,
                        generators,
                        index * t.epochs + epoch + 1,
                        history,
                        streams=streams.states,
                    )
                if report is not None:
                    if done:
                        # Once per run, with the final round: the deployment cost of the
                        # trained model (every task's model has the same architecture: the
                        # first stands for all). Kept out of the history, which must not
                        # depend on the machine's speed.
                        flat = {**flat, **_speed(next(iter(models.values())), cfg)}
                    report(len(history), flat)

    if not val_metrics and history:  # resumed after the last round: rebuild from history
        from mmr.report import unflatten_metrics

        val_metrics = unflatten_metrics(history[-1])
    test_metrics = {}
    if final_test:
        log.info(
            "evaluating the held-out test half: %d images",
            sum(len(d.samples) for d in test_sets.values()),
        )
    for name, model in models.items() if final_test else ():
        test_metrics.update(
            score_maps(predict_maps(model, test_sets[name], cfg), test_sets[name], cfg)
        )
    return {
        "val": val_metrics,
        "test": test_metrics,
        "history": history,
        "epochs": t.epochs,
        "epoch_steps": cfg.total_epochs,
        "seconds": time.perf_counter() - started,
        "models": models,
    }


def make_optimizer(
    model: MMR, cfg: Config, device: torch.device, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the student's parameter groups; the fused kernel on CUDA (one launch per
    step for all parameters, step counts kept on the device). ``fused``: force it either way
    (the step profile runs CUDA's choice on a CPU)."""
    t = cfg.train
    return torch.optim.AdamW(
        param_groups(model, weight_decay=t.weight_decay),
        lr=t.lr,
        betas=t.betas,
        fused=device.type == "cuda" if fused is None else fused,
    )


def train_epoch(
    model: MMR,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    gen: torch.Generator,
    cfg: Config,
) -> torch.Tensor:
    """One epoch; returns the mean loss as a 0-d device tensor (reading it is left to the
    caller: nothing in the loop waits for the device)."""
    model.train()
    total = torch.zeros((), dtype=torch.float32, device=images.device)
    count = 0
    batches = train_batches(
        images,
        batch_size=cfg.train.batch_size,
        image_size=cfg.data.image_size,
        generator=gen,
        augment=cfg.data.augment,
    )
    for idx, x in batches:
        # TF32 for the model's float32 math only; the augmentation above runs exact.
        with fp32_math("tf32"):
            with precision_autocast(cfg, images.device):
                loss = model(x)
            # Dropped here rather than right after the step: the backward then reuses the
            # blocks just freed (the forward's activations would take them otherwise), 3.5%
            # less CPU time per paper-config epoch (benchmarks.cpu_time --paper).
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
        count += len(idx)
    # None are held between epochs, nor while the other categories of a lockstep trial train.
    opt.zero_grad(set_to_none=True)
    return total / max(count, 1)


def _speed(model: MMR, cfg: Config) -> dict[str, float]:
    from mmr.speed import speed_metrics

    device = next(model.student.parameters()).device
    return speed_metrics(
        model,
        eval_batch_size=cfg.eval.batch_size,
        blur_sigma=cfg.eval.blur_sigma,
        autocast=lambda: precision_autocast(cfg, device),
    )


def _out_of_memory(
    exc: torch.OutOfMemoryError, cfg: Config, tasks: int, epoch: int
) -> torch.OutOfMemoryError:
    """The same error, saying which settings size the trial's memory (a retry would only fail
    again: the search records it as final)."""
    t, d = cfg.train, cfg.data
    first_line = (str(exc).splitlines() or [""])[0]
    return torch.OutOfMemoryError(
        f"out of GPU memory at epoch {epoch}, training {tasks} task(s) at "
        f"train.batch_size={t.batch_size}, data.image_size={d.image_size}, "
        f"train.precision={t.precision}: lower train.batch_size, train fewer categories per "
        "run (data.categories; in a sweep objective.per_category: true gives each category "
        "its own trial), or give each trial a larger share of a GPU (resources.gpu: a trial "
        f"sharing a GPU may use resources.gpu x 0.95 of it). ({first_line})"
    )


def _check_losses(pending: list[tuple[int, float, torch.Tensor]], names: list[str]) -> list[float]:
    """Reads the pending epochs' losses (one host sync) and fails at the first epoch whose loss
    is NaN or infinite; returns each epoch's mean loss over the tasks."""
    values = torch.stack([losses for _, _, losses in pending]).tolist()
    for (epoch, lr, _), per_task in zip(pending, values, strict=True):
        bad = [name for name, v in zip(names, per_task, strict=True) if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(
                f"task {bad[0]!r}: loss is {per_task[names.index(bad[0])]} at epoch "
                f"{epoch} (lr {lr:.3g}); lower train.lr or use train.precision=fp32"
            )
    return [sum(v) / len(v) for v in values]


def precision_autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context ``train.precision`` asks for on ``device`` (bf16, or none)."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_models(
    path: str | Path | Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[Config, dict[str, MMR]]:
    """Rebuilds the trained models of a checkpoint or ``model.pt`` file (or of a checkpoint
    already loaded with :func:`load_checkpoint`)."""
    state = path if isinstance(path, Mapping) else load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    # The weights come from the file: never fetch pretrained weights to be overwritten.
    cfg = cfg.override(
        {
            "model.pretrained": False,
            "model.teacher_checkpoint": None,
            "model.encoder_checkpoint": None,
        }
    )
    models = build_models(cfg, list(state["students"]), torch.device(device))
    next(iter(models.values())).teacher.load_state_dict(state["teacher"])
    for name, model in models.items():
        model.student.load_state_dict(state["students"][name])
        model.eval()
    return cfg, models


def run_training(
    cfg: Config,
    out: str | Path,
    *,
    label: str = "MMR",
    report: ReportFn | None = None,
    on_epoch: EpochFn | None = None,
) -> dict[str, Any]:
    """``launch.py train``: fits, then writes config.yaml, metrics.json, results.md, model.pt.

    Every file is written atomically, so an interrupted run leaves no half-written output.
    """
    from mmr.config import dump_config
    from mmr.report import results_markdown, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    result = fit(cfg, report=report, on_epoch=on_epoch, checkpoint_dir=ckpt_dir)
    dump_config(cfg, out / "config.yaml")
    val, test = flatten_metrics(result["val"]), flatten_metrics(result["test"])
    summary = {
        "config": label,
        "epochs": result["epochs"],
        "seconds": result["seconds"],
        "val": {"mean": _means(val), "units": result["val"]},
        "test": {"mean": _means(test), "units": result["test"]},
        "history": result["history"],
    }
    write_json(summary, out / "metrics.json")
    tables = results_markdown(
        {f"{label} (test)": result["test"], f"{label} (val)": result["val"]},
        title="MMR results (test = held-out half, val = search split)",
    )
    atomic_write(out / "results.md", tables)
    state = load_checkpoint(ckpt_dir)
    from mmr.thresholds import validation_thresholds

    # The model file carries the validation half's decision thresholds (launch.py predict).
    thresholds = validation_thresholds(state, device=cfg.train.device)
    with atomic_path(out / "model.pt") as tmp:
        torch.save(model_file(state, thresholds=thresholds), tmp)
    return {"test_mean": _means(test), "val_mean": _means(val), "summary": summary}


def _means(flat: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in flat.items() if "/" not in k}


def evaluate_checkpoint(
    path: str | Path | Mapping[str, Any], *, split: str = "test", device: str = "auto"
) -> tuple[Config, dict[str, dict[str, float]], dict[str, tuple[EvalSet, torch.Tensor]]]:
    """Evaluates a checkpoint's models on the ``test`` (held-out) or ``val`` split.

    ``path``: a checkpoint file or directory, or a state :func:`load_checkpoint` returned
    (a caller that has one loads the file once). Returns the config it was trained with,
    ``{unit: metrics}`` and, per task, the evaluation data with its anomaly maps (for
    overlays).
    """
    state = path if isinstance(path, Mapping) else load_checkpoint(path)
    trained_cfg = Config.from_dict(state["config"])
    dev = resolve_device(device)
    cfg, models = load_models(state, dev)
    metrics: dict[str, dict[str, float]] = {}
    outputs: dict[str, tuple[EvalSet, torch.Tensor]] = {}
    for task in list_tasks(cfg.data):
        val, test = split_task(task, cfg.data)
        data = prepare_eval(cfg, task, test if split == "test" else val, dev)
        maps = predict_maps(models[task.name], data, cfg)
        metrics.update(score_maps(maps, data, cfg))
        outputs[task.name] = (data, maps)
    return trained_cfg, metrics, outputs
