"""ONNX export of trained models: the whole inference of one category as one graph.

``<category>.onnx`` takes ``images``: uint8 ``batch x 3 x S x S``, the images resized to
``data.resize`` and center-cropped to ``S = data.image_size`` (the crop is a slice: see
``mmr.predictors.center_crop_np``), and returns ``anomaly_map`` (float32 ``batch x S x S``:
ImageNet normalisation, teacher, student, per-stage 1 - cos, bilinear up-sampling, sum,
Gaussian blur) and ``score`` (float32 ``batch``, the map's max). The batch is dynamic.
``metadata_props`` holds ``mmr_sweep``: JSON with the format, category, preprocessing (resize,
image_size, interpolation), blur sigma and the thresholds stored with the model; the config is
stored flat beside it (``mmr_sweep.config``).

Exported with torch's TorchScript-based exporter (``dynamo=False``, opset 17): it traces this
model's fixed-shape code in seconds, and the result matches the torch maps to ~1e-6.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmr.fileio import atomic_write

__all__ = ["OPSET", "export_model_onnx", "export_onnx"]

log = logging.getLogger(__name__)

OPSET = 17


class _Inference(nn.Module):
    """uint8 center-cropped images -> (blurred anomaly map, image score)."""

    def __init__(self, model: nn.Module, *, blur_sigma: float) -> None:
        super().__init__()
        from mmr.transforms import _stats

        self.model = model
        self.blur_sigma = blur_sigma
        scale, shift = _stats(torch.device("cpu"))
        self.register_buffer("scale", scale.clone(), persistent=False)
        self.register_buffer("shift", shift.clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The same float32 ops as mmr.transforms.normalize: x * scale + shift.
        x = images.to(torch.float32) * self.scale + self.shift
        maps = self.model.anomaly_map(x, blur_sigma=self.blur_sigma)
        return maps, maps.flatten(1).amax(dim=1)


def export_onnx(
    state: Mapping[str, Any],
    out_dir: str | Path,
    *,
    thresholds: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Writes ``out_dir/<category>.onnx`` for every model of a checkpoint or model file.

    Args:
        state: a loaded checkpoint or ``model.pt`` (``mmr.checkpoint.load_checkpoint``).
        out_dir: an existing directory.
        thresholds: ``{category: thresholds}``; default the model file's ``thresholds``.

    Returns:
        The files written (atomically).
    """
    import onnx  # the `deploy` extra

    from mmr.predictors import ONNX_FORMAT, ONNX_META_KEY
    from mmr.train import load_models

    if thresholds is None:
        thresholds = state.get("thresholds", {})
    cfg, models = load_models(state, "cpu")
    written = []
    for category, model in models.items():
        graph = _Inference(model.eval(), blur_sigma=cfg.eval.blur_sigma).eval()
        s = cfg.data.image_size
        example = torch.zeros(2, 3, s, s, dtype=torch.uint8)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # Tracing warns about the shape checks and Python ints it freezes: the shapes
            # other than the batch are fixed by the model's input size.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["anomaly_map", "score"],
                dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"},
                              "score": {0: "batch"}},
            )  # fmt: skip
        proto = onnx.load_from_string(buffer.getvalue())
        meta = {
            "format": ONNX_FORMAT,
            "category": category,
            "resize": cfg.data.resize,
            "image_size": s,
            "interpolation": cfg.data.test_interpolation,
            "blur_sigma": cfg.eval.blur_sigma,
            "batch_size": cfg.eval.batch_size,
            "thresholds": dict(thresholds[category]) if category in thresholds else None,
        }
        for key, value in (
            (ONNX_META_KEY, json.dumps(meta)),
            (f"{ONNX_META_KEY}.config", json.dumps(cfg.to_dict())),
        ):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        path = Path(out_dir) / f"{category}.onnx"
        atomic_write(path, proto.SerializeToString())
        log.info("wrote %s", path)
        written.append(path)
    return written


def export_model_onnx(model: str | Path, out: str | Path) -> list[Path]:
    """``launch.py export MODEL --format onnx``: ``<category>.onnx`` of a ``model.pt`` (or of
    the ``train --out`` / export directory holding it) into ``out``.

    ``out`` is written through a staging folder and replaced only when it is empty or an
    earlier ONNX export of the same model (``mmr.outdir`` rules).
    """

    from mmr.checkpoint import load_checkpoint
    from mmr.errors import UserInputError
    from mmr.outdir import check_replaceable, staged

    path = Path(model)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise UserInputError(
            f"{model} is neither an experiment nor a model: pass an experiment directory, a "
            "`train --out` or export directory (holding model.pt), or a model.pt"
        )
    path = path.resolve()
    out = Path(out).resolve()
    fix = "pass an empty or new directory as --out"
    owner = str(path)
    replace = check_replaceable(out, kind="export-onnx", owner=owner, what=f"--out {out}", fix=fix)
    state = load_checkpoint(path)

    def recheck() -> None:
        check_replaceable(out, kind="export-onnx", owner=owner, what=f"--out {out}", fix=fix)

    with staged(out, kind="export-onnx", owner=owner, replace=replace, recheck=recheck) as tmp:
        names = [p.name for p in export_onnx(state, tmp)]
    return [out / n for n in names]
