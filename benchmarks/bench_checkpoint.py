"""Bytes and seconds of a trial's round checkpoints and of loading one for export, on a CPU.

    python -m benchmarks.bench_checkpoint [--configs tiny,paper] [--categories 1,15]
                                          [--rounds 20] [--json OUT.json]

For each config and number of categories (one student + AdamW per category, one shared
teacher, as ``mmr.train.fit`` holds them; ``pretrained=false``, one optimiser step so that
AdamW has its state), times ``mmr.checkpoint.save_checkpoint`` into a temporary directory:

- a resumable round (students + AdamW state + teacher + RNG states): what every round wrote
  before, the reference;
- the last round, without AdamW state (nothing resumes a finished run);
- per round over a run of ``--rounds`` rounds with ``train.checkpoint_every`` = 1 and 5.

Export: the old path loaded the file three times without ``mmap`` (``load_checkpoint``, then
``evaluate_checkpoint`` with its own load and ``load_models``'s); now once with ``mmap=True``.

Seconds are this machine's (page cache, local disk); on a GPU node each byte is also copied
from the device first, and Ray Tune copies the directory to the experiment storage after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, jsonable

__all__ = ["measure", "main"]

CONFIGS = {"tiny": ROOT / "configs" / "tiny.yaml", "paper": ROOT / "configs" / "mvtec.yaml"}


def measure(config: str, categories: int, *, rounds: int = 20, repeats: int = 3) -> dict:
    """Sizes and median timings of one config with ``categories`` students."""
    import torch

    from mmr.checkpoint import checkpoint_due, load_checkpoint, save_checkpoint
    from mmr.config import load_config
    from mmr.train import build_models, make_optimizer

    cfg = load_config(CONFIGS[config]).override(
        {
            "model.pretrained": False,
            "train.device": "cpu",
            "train.epochs": rounds,
            "train.eval_every": 1,
            "train.warmup_epochs": 0,  # below train.epochs (the paper config warms up for 50)
        }  # fmt: skip
    )
    names = [f"c{i}" for i in range(categories)]
    device = torch.device("cpu")
    models = build_models(cfg, names, device)
    optimizers = {n: make_optimizer(m, cfg, device) for n, m in models.items()}
    for opt in optimizers.values():  # one step creates AdamW's two moments per parameter
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    generators = {n: torch.Generator().manual_seed(i) for i, n in enumerate(names)}
    history = [{"image_auroc": 0.5, "epoch": 1}]
    teacher = next(iter(models.values())).teacher
    teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())

    def timed(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        out: dict[str, Any] = {"config": config, "categories": categories}

        def save(opts: Any) -> None:
            save_checkpoint(path, cfg, models, opts, generators, 1, history)

        out["resumable_s"] = timed(lambda: save(optimizers))
        out["resumable_bytes"] = path.stat().st_size
        out["old_export_load_s"] = timed(
            lambda: [torch.load(path, map_location="cpu", weights_only=True) for _ in range(3)]
        )
        out["export_load_s"] = timed(lambda: load_checkpoint(path))
        out["final_s"] = timed(lambda: save(None))
        out["final_bytes"] = path.stat().st_size
    out["teacher_bytes"] = teacher_bytes
    for k in (1, 5):
        ck = cfg.override({"train.checkpoint_every": k})
        due = [r for r in range(1, rounds + 1) if checkpoint_due(ck, r)]
        full = len(due) - 1  # the last round saves without AdamW state
        out[f"per_round_bytes_k{k}"] = (
            full * out["resumable_bytes"] + out["final_bytes"]
        ) / rounds
        out[f"per_round_s_k{k}"] = (full * out["resumable_s"] + out["final_s"]) / rounds
    out["rounds"] = rounds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--configs", default="tiny,paper")
    parser.add_argument("--categories", default="1,15")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the amortised run")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    results = []
    for config in args.configs.split(","):
        for n in (int(c) for c in args.categories.split(",")):
            r = measure(config, n, rounds=args.rounds)
            results.append(r)
            print(
                f"{config:5} x{n:<3} resumable {r['resumable_bytes'] / 2**20:9.1f} MiB "
                f"{r['resumable_s']:6.2f} s | last round {r['final_bytes'] / 2**20:9.1f} MiB "
                f"{r['final_s']:6.2f} s | per round (k=1) "
                f"{r['per_round_bytes_k1'] / 2**20:9.1f} MiB {r['per_round_s_k1']:6.2f} s, "
                f"(k=5) {r['per_round_bytes_k5'] / 2**20:9.1f} MiB {r['per_round_s_k5']:6.2f} s"
                f" | export load {r['old_export_load_s']:.2f} s -> {r['export_load_s']:.3f} s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=jsonable))


if __name__ == "__main__":
    main()
