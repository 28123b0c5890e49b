"""The models ``predict`` runs: a ``model.pt`` through the torch model, an ``.onnx`` file
through onnxruntime (without importing the torch model code), behind one ``Predictor``
interface that maps preprocessed uint8 images to anomaly maps."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmr.errors import UserInputError

__all__ = [
    "ONNX_FORMAT",
    "ONNX_META_KEY",
    "ModelInfo",
    "Predictor",
    "center_crop_np",
    "load_predictor",
]

log = logging.getLogger(__name__)

ONNX_META_KEY = "mmr_sweep"  # metadata_props key of the JSON written by mmr.onnx_export
ONNX_FORMAT = "mmr-sweep-onnx/1"


@dataclass(frozen=True)
class ModelInfo:
    """What predict needs to know of a model, whatever its file format."""

    source: str  # the model file
    kind: str  # "torch" or "onnx"
    categories: tuple[str, ...]  # one model (task) per category
    resize: int  # data.resize
    image_size: int  # data.image_size (center crop)
    interpolation: str  # data.test_interpolation
    thresholds: dict[str, dict[str, Any]]  # {category: mmr.thresholds.choose_thresholds(...)}
    batch_size: int  # eval.batch_size, the evaluation's batch


class Predictor(Protocol):
    """Anomaly maps of preprocessed images."""

    info: ModelInfo

    def maps(self, category: str, images: np.ndarray) -> np.ndarray:
        """uint8 N x 3 x resize x resize images -> float32 N x image_size x image_size maps."""
        ...


def load_predictor(model: str | os.PathLike[str], *, device: str = "auto") -> Predictor:
    """A predictor for an export directory, a ``model.pt`` (or checkpoint) or an ``.onnx``."""
    path = Path(model)
    if not path.exists():
        raise UserInputError(
            f"MODEL {path} does not exist: pass an export directory, its model.pt, or an "
            ".onnx file written by `launch.py export --format onnx`"
        )
    if path.is_dir():
        if (path / "model.pt").is_file():
            path = path / "model.pt"
        else:
            inner = sorted(path.glob("*/model.pt"))
            hint = f" (per-category models: pass e.g. {inner[0]})" if inner else ""
            raise UserInputError(
                f"MODEL {path} holds no model.pt{hint}: pass an export or `train --out` "
                "directory, a model.pt, or an .onnx file"
            )
    if path.suffix.lower() == ".onnx":
        return _OnnxPredictor(path, device=device)
    return _TorchPredictor(path, device=device)


class _TorchPredictor:
    """A ``model.pt`` through the torch model code, as ``mmr.train.predict_maps`` runs it."""

    def __init__(self, path: Path, *, device: str) -> None:
        from mmr.checkpoint import load_checkpoint
        from mmr.train import load_models, resolve_device

        state = load_checkpoint(path)
        self.device = resolve_device(device)
        self.cfg, self.models = load_models(state, self.device)
        d = self.cfg.data
        self.info = ModelInfo(
            source=str(path),
            kind="torch",
            categories=tuple(self.models),
            resize=d.resize,
            image_size=d.image_size,
            interpolation=d.test_interpolation,
            thresholds={k: dict(v) for k, v in state.get("thresholds", {}).items()},
            batch_size=self.cfg.eval.batch_size,
        )

    def maps(self, category: str, images: np.ndarray) -> np.ndarray:
        import torch

        from mmr.data import center_crop
        from mmr.train import precision_autocast

        model = self.models[category]
        batch = torch.from_numpy(images).to(self.device)
        with torch.no_grad(), precision_autocast(self.cfg, self.device):
            x = center_crop(batch, image_size=self.cfg.data.image_size)
            out = model.anomaly_map(x, blur_sigma=self.cfg.eval.blur_sigma).float()
        return out.cpu().numpy()


class _OnnxPredictor:
    """One ``<category>.onnx`` through onnxruntime (no torch model code imported)."""

    def __init__(self, path: Path, *, device: str) -> None:
        try:
            import onnx
            import onnxruntime as ort
        except ModuleNotFoundError as exc:
            raise UserInputError(
                f"MODEL {path} is an ONNX file, which needs onnx and onnxruntime: "
                'pip install -e ".[deploy]"'
            ) from exc
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for a broken file
            raise UserInputError(
                f"MODEL {path} is not a readable ONNX file ({type(exc).__name__}): export it "
                "again with `launch.py export EXP --format onnx`"
            ) from exc
        props = {p.key: p.value for p in proto.metadata_props}
        try:
            meta = json.loads(props[ONNX_META_KEY])
        except (KeyError, ValueError):
            meta = {}
        if meta.get("format") != ONNX_FORMAT:
            raise UserInputError(
                f"MODEL {path} is not an mmr-sweep ONNX model of format {ONNX_FORMAT} (its "
                f"metadata says {meta.get('format')!r}): export it again with this version's "
                "`launch.py export EXP --format onnx`"
            )
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda"):
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" in available:
                providers.insert(0, "CUDAExecutionProvider")
            elif device == "cuda":
                raise UserInputError(
                    "--device cuda: onnxruntime has no CUDA provider here: install "
                    "onnxruntime-gpu, or use --device cpu"
                )
        self.session = ort.InferenceSession(proto.SerializeToString(), providers=providers)
        self.category = str(meta["category"])
        self.info = ModelInfo(
            source=str(path),
            kind="onnx",
            categories=(self.category,),
            resize=int(meta["resize"]),
            image_size=int(meta["image_size"]),
            interpolation=str(meta["interpolation"]),
            thresholds={self.category: meta["thresholds"]} if meta.get("thresholds") else {},
            batch_size=int(meta.get("batch_size", 32)),
        )

    def maps(self, category: str, images: np.ndarray) -> np.ndarray:
        crop = center_crop_np(images, self.info.image_size)
        (out,) = self.session.run(["anomaly_map"], {"images": np.ascontiguousarray(crop)})
        return out


def center_crop_np(images: np.ndarray, size: int) -> np.ndarray:
    """The center crop of ``mmr.transforms.center_crop`` (same rounding) on numpy arrays."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]
