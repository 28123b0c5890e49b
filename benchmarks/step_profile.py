"""Host<->device synchronisations per training step, counted on a CPU with ``torch.profiler``.

    python -m benchmarks.step_profile --config configs/tiny.yaml [--set KEY=VALUE ...]
                                      [--steps 4] [--json OUT.json]

Builds the config's model (``pretrained=false``: the weights do not change which ops run),
runs warm-up epochs of ``mmr.train``'s own epoch function on random uint8 images, then profiles
one more epoch and writes ``{"syncs_per_step": ..., "ops_per_step": ...,
"host_reads_per_step": ..., ...}``. The optimiser and the precision are the ones CUDA runs
(fused AdamW; ``precision: auto`` profiles bf16 autocast). Target: 0 syncs and 0 host reads per
step (``tests/test_benchmarks.py``); the command exits with status 1 otherwise.

What counts as a sync: the ops that make the host wait for a CUDA stream, found by name and
arguments in the CPU profile, counting only the outermost one of a nest (``item`` calls
``_local_scalar_dense``: one sync):

- ``aten::_local_scalar_dense`` / ``aten::item`` / ``aten::is_nonzero`` (``.item()``,
  ``float(t)``, ``if t:``), and ops whose output size depends on the data
  (``aten::nonzero``, ``aten::masked_select``, ``aten::_unique2``, ...): they read device
  memory on the host;
- blocking device copies: an ``aten::to`` overload that takes a device (``to.device``,
  ``to.dtype_layout`` unless it names a memory format, ``to.other``) with
  ``non_blocking=False``. On a CPU such a copy is a
  no-op, but the call still reaches the profiler with its arguments; on CUDA it waits for
  the stream (device to host), or for a copy from pageable memory (host to device). This
  also catches ``torch.tensor(data, device=...)``. A ``.to(device)`` of a tensor already
  there is counted as well (write ``.to(dtype)``): the rule cannot tell, so it errs on the
  strict side.

Not counted: ops inside ``mmr.transforms.HOST_DRAW`` (the epoch's draws, made on CPU tensors
by construction, which ``draw_epoch`` enforces), and the scalar reads inside
``aten::_fused_adamw_`` (the CPU kernel reads the step count with ``item()``; the CUDA kernel
reads it on the device), and ``aten::to`` calls of the autograd engine's backward functions
(``ToCopyBackward0`` casts a gradient back to its input's dtype, with a device argument; a
gradient would only cross devices for an input that was copied across with grad, which the
step has none of: the images are copied without grad). Syncing reads (``item``, ``nonzero``,
...) in backward functions do count.

Not visible to the profiler on a CPU: ``.cpu()``, ``.tolist()`` and ``.numpy()`` of a tensor
that is already on the CPU do not reach the dispatcher. :func:`count_host_reads` catches those
at the Python level instead: while the step runs, ``torch.Tensor``'s ``item``, ``tolist``,
``numpy``, ``cpu``, ``__float__``, ``__int__``, ``__index__``, ``__bool__`` and
``__complex__``, and ``torch.cuda.synchronize``, count their calls (wherever they are made:
the model, its helpers, the optimiser), outside ``HOST_DRAW`` as above. The profile reports
them as ``host_reads`` (target: none). The loop reads its loss once per round, outside the
step (``mmr.train._check_losses``).

``ops_per_step``: the outermost ``aten::`` calls per step (each is at least one kernel launch
on CUDA), a measure of the step's launch overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HOST_READS",
    "SYNC_OPS",
    "count_host_reads",
    "count_syncs",
    "profile_config",
    "profile_steps",
]

# Ops that read device memory on the host (or size their output from it).
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::masked_select",
        "aten::masked_scatter",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::repeat_interleave",
    }
)
# Ops whose insides are not counted (see the module docstring).
_FUSED_ON_DEVICE = frozenset({"aten::_fused_adamw_", "aten::_fused_adam_"})
_AUTOGRAD = "autograd::engine::evaluate_function"


def _blocking_copy(evt: Any) -> bool:
    """An ``aten::to`` to a device without ``non_blocking`` (see the module docstring)."""
    if evt.name != "aten::to":
        return False
    args = list(getattr(evt, "concrete_inputs", None) or [])
    # Positions of non_blocking in the overloads: to.device(self, device, dtype, non_blocking,
    # copy, memory_format), to.dtype_layout(self, dtype, layout, device, pin_memory,
    # non_blocking, copy, memory_format), to.other(self, other, non_blocking, copy, fmt).
    # to.dtype(self, dtype, non_blocking, copy, fmt) has 5 too, with an int dtype second.
    if len(args) == 6:
        return args[3] is not True
    if len(args) == 8:
        # With a memory format it is a layout conversion (.to(memory_format=...), which
        # convolution backward also makes); a plain .to(device) leaves the format None.
        return args[7] is None and args[5] is not True
    if len(args) == 5 and args[1] is None:
        return args[2] is not True
    return False


def count_syncs(events: Iterable[Any], *, host_scopes: Sequence[str] = ()) -> dict[str, Any]:
    """Counts the syncing ops and the outermost ``aten::`` ops of profiler ``events``
    (``prof.events()``), skipping everything inside a range named in ``host_scopes``.

    Returns ``{"syncs": n, "ops": n, "by_name": {name: n}}``.
    """
    syncs, ops = Counter(), 0
    for evt in events:
        chain, parent = [], evt.cpu_parent
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        if any(p.name in host_scopes or p.name in _FUSED_ON_DEVICE for p in chain):
            continue
        if evt.name in host_scopes:
            continue
        if evt.name.startswith("aten::") and not any(p.name.startswith("aten::") for p in chain):
            ops += 1
        if evt.name == "aten::to" and any(p.name.startswith(_AUTOGRAD) for p in chain):
            continue  # a gradient cast back to its input's dtype (see the module docstring)
        if _is_sync(evt) and not any(_is_sync(p) for p in chain):
            syncs[evt.name] += 1
    return {"syncs": sum(syncs.values()), "ops": ops, "by_name": dict(syncs)}


def _is_sync(evt: Any) -> bool:
    return evt.name in SYNC_OPS or _blocking_copy(evt)


# torch.Tensor methods that hand a tensor's value to Python: on CUDA each waits for the stream.
HOST_READS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__float__",
    "__int__",
    "__index__",
    "__bool__",
    "__complex__",
)


@contextlib.contextmanager
def count_host_reads(*, host_scopes: Sequence[str] | None = None) -> Iterator[Counter]:
    """Counts, inside the block, the calls that read a tensor's value on the host.

    ``torch.Tensor``'s :data:`HOST_READS` methods and ``torch.cuda.synchronize`` are replaced
    by counting wrappers (restored on exit), so that the calls are seen on a CPU too, made in
    any function the block runs. Calls inside a ``torch.profiler.record_function`` range named
    in ``host_scopes`` (default: ``mmr.transforms.HOST_DRAW``, the epoch's draws on CPU tensors)
    are not counted. Yields a ``Counter`` of ``{"Tensor.item": n, ...}``; its ``sites``
    attribute holds ``"file:line in function"`` of each counted call (the innermost frame
    outside torch), for the failure message.
    """
    import torch

    if host_scopes is None:
        from mmr.transforms import HOST_DRAW

        host_scopes = (HOST_DRAW,)
    counts: Counter = Counter()
    counts.sites = []  # type: ignore[attr-defined]
    local = threading.local()  # depth inside a host scope, per thread
    rf = torch.autograd.profiler.record_function
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, new)

    def counted(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not getattr(local, "depth", 0):
                counts[key] += 1
                counts.sites.append(_call_site())  # type: ignore[attr-defined]
            return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", key)
        return wrapper

    enter, exit_ = rf.__enter__, rf.__exit__

    def scoped_enter(self: Any) -> Any:
        if self.name in host_scopes:
            local.depth = getattr(local, "depth", 0) + 1
        return enter(self)

    def scoped_exit(self: Any, *exc: Any) -> Any:
        if self.name in host_scopes:
            local.depth -= 1
        return exit_(self, *exc)

    try:
        patch(rf, "__enter__", scoped_enter)
        patch(rf, "__exit__", scoped_exit)
        for name in HOST_READS:
            patch(torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name)))
        patch(torch.cuda, "synchronize", counted("cuda.synchronize", torch.cuda.synchronize))
        yield counts
    finally:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


_MISSING = object()


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None and (
        "/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def profile_steps(cfg: Any, *, steps: int = 4, warmup_epochs: int = 2) -> dict[str, Any]:
    """Profiles one epoch of ``steps`` full batches of ``mmr.train``'s epoch function (after
    ``warmup_epochs``) on the CPU; returns per-step counts and what was run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mmr.train import build_models, make_optimizer, train_epoch
    from mmr.transforms import HOST_DRAW

    over: dict[str, Any] = {"train.device": "cpu", "model.pretrained": False}
    if cfg.train.precision == "auto":  # what "auto" runs on CUDA: the bf16 autocast path
        over["train.precision"] = "bf16"
    cfg = cfg.override(over)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device("cpu")
    model = build_models(cfg, ["profile"], device)["profile"]
    opt = make_optimizer(model, cfg, device, fused=True)  # as on CUDA
    size, batch = cfg.data.resize, cfg.train.batch_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    images = torch.randint(
        0, 256, (batch * steps, 3, size, size), dtype=torch.uint8, generator=gen
    )
    for _ in range(warmup_epochs):
        train_epoch(model, opt, images, gen, cfg)
    with (
        count_host_reads(host_scopes=(HOST_DRAW,)) as reads,
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof,
    ):
        train_epoch(model, opt, images, gen, cfg)
    counts = count_syncs(prof.events(), host_scopes=(HOST_DRAW,))
    return {
        "syncs_per_step": counts["syncs"] / steps,
        "ops_per_step": counts["ops"] / steps,
        "steps": steps,
        "syncs_by_op": counts["by_name"],
        "host_reads_per_step": sum(reads.values()) / steps,
        "host_reads": dict(reads),
        "host_read_sites": sorted(set(reads.sites)),
        "batch_size": batch,
        "image_size": cfg.data.image_size,
        "source_size": size,
        "teacher": cfg.model.teacher,
        "encoder": cfg.model.encoder,
        "precision": cfg.train.precision,
        "augment": cfg.data.augment,
        "torch": torch.__version__,
    }


def profile_config(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> dict:
    """:func:`profile_steps` of a config file with ``--set`` style ``overrides``."""
    from mmr.config import load_config

    result = profile_steps(load_config(path, overrides), **kwargs)
    result["config"] = str(path)
    result["overrides"] = list(overrides)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override (repeatable)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4, help="profiled steps (full batches)")
    parser.add_argument("--json", help="write the result to this JSON file")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    result = profile_config(args.config, args.overrides, steps=args.steps)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    if result["syncs_per_step"] or result["host_reads_per_step"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
