"""Anomaly-map overlays of test images: a PNG grid and an animated GIF per task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["overlay_frames", "save_grid", "save_gif"]


def overlay_frames(
    images: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    image_size: int,
    alpha: float = 0.45,
) -> list[np.ndarray]:
    """RGB uint8 frames: image | heat-map overlay | ground truth (when masks exist).

    Maps are scaled by the min/max over all given maps, so colours compare across images.
    """
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    r = images.shape[-1]
    top = (r - image_size) // 2
    crop = images[:, :, top : top + image_size, top : top + image_size].cpu()
    m = maps.float().cpu()
    lo, hi = float(m.min()), float(m.max())
    norm = ((m - lo) / (hi - lo + 1e-12)).numpy()
    frames = []
    for i in range(len(crop)):
        img = crop[i].permute(1, 2, 0).numpy().astype(np.float32) / 255.0
        heat = cmap(norm[i])[..., :3]
        panels = [img, (1 - alpha) * img + alpha * heat]
        if masks is not None:
            gt = masks[i, 0, top : top + image_size, top : top + image_size].cpu().numpy()
            panels.append(np.repeat(gt[..., None].astype(np.float32), 3, axis=2))
        sep = np.ones((image_size, 2, 3), dtype=np.float32)
        row = np.concatenate([p for panel in panels for p in (panel, sep)][:-1], axis=1)
        frames.append((np.clip(row, 0, 1) * 255).astype(np.uint8))
    return frames


def save_grid(
    frames: list[np.ndarray], titles: list[str], path: str | Path, *, columns: int = 2
) -> None:
    """A PNG grid of overlay frames with one title each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(frames) // columns))
    h, w = frames[0].shape[:2]
    fig, axes = plt.subplots(
        rows, columns, figsize=(columns * w / 60, rows * (h / 60 + 0.4)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, frame, title in zip(axes.flat, frames, titles, strict=False):
        ax.imshow(frame)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_gif(frames: list[np.ndarray], path: str | Path, *, ms_per_frame: int = 700) -> None:
    """An animated GIF cycling through the overlay frames."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
