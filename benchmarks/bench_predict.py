"""Predict throughput: the torch model (eager) against its ONNX export under onnxruntime.

Both sides are what ``launch.py predict`` runs per batch (``mmr.predict`` predictors: center
crop, normalisation, anomaly map with blur), on the same uint8 batch of the tiny config's
model (64 px, random weights: the throughput does not depend on training). Rounds interleave
the two sides, so that the load of a shared machine hits both alike; the figure is the median
images/s of each and the ratio onnxruntime / torch.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, format_row, row

__all__ = ["run", "throughput"]

SECTION = "predict"


def _median_ips(fn: Callable[[], Any], images: int, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return images * calls / (time.perf_counter() - start)


def throughput(
    *,
    batch: int,
    rounds: int,
    calls: int,
    device: str = "cpu",
    onnx_device: str | None = None,
    image_size: int | None = None,
) -> dict[str, float]:
    """Median images/s of the torch (on ``device``) and the onnxruntime predictor (on
    ``onnx_device``, default ``device``) over interleaved rounds."""
    import numpy as np
    import torch

    from mmr.checkpoint import CHECKPOINT_FORMAT
    from mmr.config import load_config
    from mmr.onnx_export import export_onnx
    from mmr.predict import load_predictor
    from mmr.train import build_models

    over = [] if image_size is None else [f"data.image_size={image_size}",
                                          f"data.resize={image_size * 9 // 8}"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "tiny.yaml", over)
    models = build_models(cfg, ["part"], torch.device("cpu"))
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": 0,
        "teacher": models["part"].teacher.state_dict(),
        "students": {"part": models["part"].student.state_dict()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        torch.save(state, Path(tmp) / "model.pt")
        export_onnx(state, tmp)
        eager = load_predictor(Path(tmp) / "model.pt", device=device)
        onnx = load_predictor(Path(tmp) / "part.onnx", device=onnx_device or device)
        rng = np.random.default_rng(0)
        r = cfg.data.resize
        images = rng.integers(0, 256, (batch, 3, r, r), dtype=np.uint8)
        sides = {
            "torch": lambda: eager.maps("part", images),
            "onnx": lambda: onnx.maps("part", images),
        }
        for fn in sides.values():  # warm-up (allocations, oneDNN/ORT kernel choice)
            fn()
        ips: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(rounds):
            for name, fn in sides.items():
                ips[name].append(_median_ips(fn, batch, calls))
    return {k: statistics.median(v) for k, v in ips.items()}


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """One row: predict images/s, onnxruntime (project) vs torch eager (reference), CPU."""
    import torch

    rounds, calls, batch = (1, 1, 4) if smoke else (5, 2, 16) if quick else (11, 3, 32)
    threads = torch.get_num_threads()
    result = throughput(batch=batch, rounds=rounds, calls=calls)
    return [
        row(
            "predict_onnx_cpu",
            f"predict images/s at batch {batch}, tiny config (64 px)",
            result["onnx"],
            result["torch"],
            unit="img/s",
            higher_is_better=True,
            note=f"onnxruntime CPU provider vs torch eager ({threads} threads), median of "
            f"{rounds} interleaved rounds of {calls} calls; `benchmarks/bench_predict.py`",
            section=SECTION,
        )
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    for result in run(quick=parser.parse_args().quick):
        print(format_row(result))
