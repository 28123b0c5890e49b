"""CPU seconds of the augmentation and of a tiny-config training epoch, for before/after
comparisons on a busy machine.

    python -m benchmarks.cpu_time [CODE_ROOT] [--paper]

``time.process_time()`` (the process's CPU seconds, one torch thread) is far less sensitive to
other processes than wall time. Medians of 5 after a warm-up: one augmented epoch
(``train_batches``, 100 random images 256 -> 224 px, batch 16) and one training epoch of the
tiny config (``mmr.train.train_epoch``, 96 images, batch 16). ``CODE_ROOT``: a checkout to
measure (e.g. a ``git worktree`` of an older commit); default this one. Run the two roots
alternately in fresh processes.

``--paper``: instead, one training epoch of the paper config (``configs/mvtec.yaml``,
wide_resnet50_2 + ViT-B/16 at 224 px, random init) on 8 images at 256 px, batch 4 (two steps),
median of 3 after a warm-up.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _median_cpu_s(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--paper"]
    paper = "--paper" in sys.argv[1:]
    root = Path(args[0] if args else Path(__file__).resolve().parent.parent)
    sys.path.insert(0, str(root))
    import torch

    from mmr import train
    from mmr.config import load_config
    from mmr.model import param_groups
    from mmr.transforms import train_batches

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (100, 3, 256, 256), dtype=torch.uint8, generator=gen)

    def training_epoch(config: str, overrides: dict, shape: tuple[int, ...]) -> Callable[[], None]:
        """One ``train_epoch`` of ``configs/<config>`` (random init, CPU) on random images."""
        cfg = load_config(root / "configs" / config).override(
            {"model.pretrained": False, "train.device": "cpu", **overrides}
        )
        model = train.build_models(cfg, ["m"], torch.device("cpu"))["m"]
        opt = torch.optim.AdamW(
            param_groups(model, weight_decay=0.05), lr=1e-4, betas=cfg.train.betas
        )
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        # Older checkouts name the epoch function _train_epoch, and older still also pass it
        # the task name and epoch.
        epoch_fn = next(
            getattr(train, n) for n in ("train_epoch", "_train_epoch") if hasattr(train, n)
        )
        extra = ("m", 1) if "name" in inspect.signature(epoch_fn).parameters else ()
        return lambda: epoch_fn(model, opt, images, gen, cfg, *extra)

    if paper:
        epoch = training_epoch("mvtec.yaml", {"train.batch_size": 4}, (8, 3, 256, 256))
        cpu_s = _median_cpu_s(epoch, 3)
        print(json.dumps({"root": str(root), "mmr": train.__file__, "paper_epoch_cpu_s": cpu_s}))
        return

    def augment_epoch() -> None:
        for _ in train_batches(u8, batch_size=16, image_size=224, generator=gen):
            pass

    train_epoch = training_epoch("tiny.yaml", {}, (96, 3, 72, 72))
    result = {
        "root": str(root),
        "mmr": train.__file__,  # which checkout was measured
        "augment_epoch_cpu_s": _median_cpu_s(augment_epoch),
        "tiny_train_epoch_cpu_s": _median_cpu_s(train_epoch),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
