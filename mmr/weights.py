"""Weights of the teacher CNN and the student ViT encoder: timm hub, local files, pre-staging.

Three sources, in this order of precedence for each network:

1. ``model.teacher_checkpoint`` / ``model.encoder_checkpoint``: a local file, read with
   ``torch.load(weights_only=True)`` (or safetensors). Teacher: torchvision/timm ResNet keys.
   Encoder: timm ViT keys, or the official MAE format (``{"model": ...}`` with ``decoder_*`` keys).
2. ``model.pretrained: true``: timm hub weights (``wide_resnet50_2.tv_in1k``,
   ``vit_base_patch16_224.mae`` for the defaults), taken from the local Hugging Face cache when
   present. Without a cached copy and without network access this fails within seconds with a
   ``ConfigError`` that says how to pre-stage the files (:func:`fetch_weights`).
3. Random initialisation otherwise.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_patch_embed
from timm.models import get_pretrained_cfg
from torch import nn

from mmr.config import ModelConfig
from mmr.errors import ConfigError, UserInputError
from mmr.fileio import atomic_path

__all__ = [
    "checkpoint_filename",
    "create_hub_model",
    "fetch_weights",
    "hub_name",
    "load_encoder_checkpoint",
    "load_teacher_checkpoint",
    "load_torch_file",
    "read_state_dict",
]

logger = logging.getLogger(__name__)

# Hub tags closest to the official MMR weights (torchvision WRN50-2, MAE ViT-B/16), used when the
# configured name carries no explicit ".tag".
PREFERRED_TAGS: dict[str, tuple[str, ...]] = {"teacher": ("tv_in1k",), "encoder": ("mae",)}
# Encoder keys that a checkpoint may carry and the student does not use: the MAE decoder and its
# mask token, the position embedding (the student's is fixed sin-cos), classifier heads.
_ENCODER_IGNORED = ("decoder_", "mask_token", "pos_embed", "head.", "fc_norm.", "pre_logits.")
_PROBE_TIMEOUT_S = 3.0
# huggingface_hub/torch.hub errors are OSError/ValueError subclasses, except raw httpx ones.
try:
    from httpx import HTTPError as _HTTPXError
except ImportError:  # older huggingface_hub uses requests (its errors are OSErrors)
    _HTTPXError = OSError
_NETWORK_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, _HTTPXError)


def hub_name(name: str, *, role: str) -> str:
    """The timm model name with the pretrained tag to load for ``role`` (teacher|encoder).

    An explicit tag (``"wide_resnet50_2.racm_in1k"``) is kept; otherwise the tag closest to the
    official MMR weights is chosen when timm has it, else timm's default tag.
    """
    if "." in name:
        return name
    for tag in PREFERRED_TAGS[role]:
        if timm.list_pretrained(f"{name}.{tag}"):
            return f"{name}.{tag}"
    default = get_pretrained_cfg(name)  # None for unknown names: create_model reports those
    return f"{name}.{default.tag}" if default is not None and default.tag else name


def checkpoint_filename(name: str, *, role: str) -> str:
    """File name that :func:`fetch_weights` writes for the weights of ``name``."""
    return f"{hub_name(name, role=role)}.pth"


def create_hub_model(name: str, *, role: str, key: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)`` that fails fast when offline.

    A copy in the Hugging Face (or torch hub) cache is loaded without touching the network.
    Otherwise the hub is probed for a few seconds; if it cannot be reached (or HF_HUB_OFFLINE is
    set) a ``ConfigError`` naming ``key`` explains how to pre-stage the weights.
    """
    full = hub_name(name, role=role)
    if not timm.is_model(full.split(".")[0]):
        raise ConfigError(f"{key}: timm has no model {name!r} (see timm.list_models())")
    pcfg = get_pretrained_cfg(full)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        raise ConfigError(
            f"{key}: timm has no pretrained weights for {full!r}; pick a name listed by "
            f"timm.list_pretrained(), give a local file via model.{role}_checkpoint, "
            "or set model.pretrained=false"
        )
    cached = _cached_file(pcfg)
    if cached is not None:
        logger.info("loading %s weights %s from the local cache %s", role, full, cached)
        overlay = {"file": str(cached), "custom_load": False}
        return timm.create_model(full, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    reason = _offline_reason(pcfg)
    if reason is not None:
        raise ConfigError(_unavailable_message(full, role=role, key=key, reason=reason))
    logger.info("downloading %s weights %s", role, full)
    try:
        return timm.create_model(full, pretrained=True, **kwargs)
    except _NETWORK_ERRORS as exc:
        reason = f"the download failed: {exc}"
        raise ConfigError(_unavailable_message(full, role=role, key=key, reason=reason)) from exc


def load_torch_file(
    path: str | Path,
    *,
    what: str,
    error: type[UserInputError] = UserInputError,
    mmap: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors that say what is wrong.

    torch answers a corrupt file with advice to retry with ``weights_only=False``, which runs
    the pickled code inside the file and cannot fix a corrupt one. This says instead whether
    the file is empty, corrupt, not a torch file at all, or holds pickled Python objects.
    ``mmap``: map the tensors from the file instead of reading them all (zip format only).

    Raises:
        UserInputError: (or ``error``) the file cannot be read as tensors; the message names it.
    """
    file = Path(path)
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise error(f"{what} {str(file)!r} cannot be read: {exc.strerror or exc}") from exc
    if not head:
        raise error(
            f"{what} {str(file)!r} is empty (0 bytes): it was not written completely; "
            "write it again (or restore it from a copy)"
        )
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise error(
            f"{what} {str(file)!r} is not a weights file (it is neither a torch.save archive "
            "nor a pickle): check the path"
        )
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            # Files in torch's legacy (non-zip) format cannot be memory-mapped: load them whole.
            if not mmap or "mmap can only be used" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors have no common base class
        text = str(exc)
        if "Unsupported global" in text:
            name = text.split("Unsupported global:", 1)[1].split(" was ", 1)[0].strip()
            raise error(
                f"{what} {str(file)!r} holds pickled Python objects ({name}), not only "
                "tensors; mmr-sweep never unpickles code from a file: save a plain dict of "
                "tensors where the file was made (e.g. torch.save(model.state_dict(), path))"
            ) from None
        raise error(
            f"{what} {str(file)!r} is corrupt or truncated (torch cannot read it: "
            f"{type(exc).__name__}): write it again, or restore it from a copy"
        ) from None


def read_state_dict(path: str | Path, *, key: str) -> dict[str, torch.Tensor]:
    """Reads a weight file into a flat ``{name: tensor}`` dict, unwrapping training checkpoints.

    Accepts a plain state dict, ``{"model": sd}`` (MAE), ``{"state_dict": sd}``, DataParallel
    ``module.`` prefixes and ``.safetensors`` files. Errors name ``key`` and the absolute path.
    """
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise ConfigError(
            f"{key}: weight file {str(file)!r} does not exist; check the path, or write the "
            "files with `launch.py weights fetch --to DIR` on a machine with internet access"
        )
    if file.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj: Any = safetensors.torch.load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ConfigError(
                f"{key}: {str(file)!r} is corrupt or not a safetensors file ({exc}): "
                "fetch it again (`launch.py weights fetch`)"
            ) from exc
    else:
        obj = load_torch_file(file, what=f"{key}: weight file", error=ConfigError)
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key}: {str(file)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_teacher_checkpoint(net: nn.Module, path: str | Path) -> None:
    """Loads a torchvision/timm CNN state dict into a timm ``features_only`` teacher.

    Keys of modules the features model does not hold (``fc``, stages after the last target
    stage) are dropped; everything the teacher holds must be present with matching shapes.
    """
    key = "model.teacher_checkpoint"
    state = read_state_dict(path, key=key)
    own = set(net.state_dict())
    modules = {k.split(".")[0] for k in own}
    dropped = sorted({k.split(".")[0] for k in state if k.split(".")[0] not in modules})
    if dropped:
        logger.info("teacher checkpoint: ignoring unused modules %s", dropped)
    state = {k: v for k, v in state.items() if k.split(".")[0] in modules}
    _load_exact(net, state, key=key, path=path, what="the teacher CNN")


def load_encoder_checkpoint(encoder: nn.Module, path: str | Path) -> None:
    """Loads timm- or MAE-format ViT weights into the student encoder.

    The MAE decoder, mask token, learned position embedding and heads are ignored; blocks
    beyond the encoder's depth are dropped; the patch embedding is resampled with timm's
    ``resample_patch_embed`` (FlexiViT) when the patch sizes differ.
    """
    key = "model.encoder_checkpoint"
    state = read_state_dict(path, key=key)
    depth = len(encoder.blocks)
    out: dict[str, torch.Tensor] = {}
    extra_blocks = set()
    for name, value in state.items():
        if name.startswith(_ENCODER_IGNORED):
            continue
        if name.startswith("blocks.") and int(name.split(".")[1]) >= depth:
            extra_blocks.add(int(name.split(".")[1]))
            continue
        out[name] = value
    if extra_blocks:
        logger.info(
            "encoder checkpoint: using the first %d of %d blocks", depth, depth + len(extra_blocks)
        )
    proj = "patch_embed.proj.weight"
    target = encoder.patch_embed.proj.weight.shape
    if proj in out and out[proj].ndim == 4 and out[proj].shape[-2:] != target[-2:]:
        logger.info(
            "resampling the patch embedding %s -> %s", tuple(out[proj].shape), tuple(target)
        )
        out[proj] = resample_patch_embed(out[proj].float(), list(target[-2:]))
    _load_exact(encoder, out, key=key, path=path, what="the ViT encoder")


def fetch_weights(cfg: ModelConfig, to: str | Path) -> dict[str, Path]:
    """Downloads the hub weights of ``cfg.teacher`` and ``cfg.encoder`` into files in ``to``.

    Needs internet access (or a warm cache). The files load through ``model.teacher_checkpoint``
    and ``model.encoder_checkpoint`` on machines without it. Returns ``{"teacher": path,
    "encoder": path}``.
    """
    folder = Path(to).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for role, name in (("teacher", cfg.teacher), ("encoder", cfg.encoder)):
        # Full networks at their native geometry (no head): usable for any stages/patch size.
        model = create_hub_model(name, role=role, key=f"model.{role}", num_classes=0)
        path = folder / checkpoint_filename(name, role=role)
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        logger.info("wrote %s weights to %s", role, path)
        paths[role] = path
    return paths


# ----------------------------------------------------------------------------- internals


def _load_exact(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, key: str, path: str | Path, what: str
) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise ConfigError(
            f"{key}: {str(path)!r} does not fit {what}: {'; '.join(parts)}. Point {key} at "
            "weights of the configured architecture (e.g. a file from `launch.py weights fetch`)"
        )
    module.load_state_dict(state)


def _cached_file(pcfg: Any) -> Path | None:
    """The locally cached weight file timm would download for ``pcfg``, if there is one."""
    if pcfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        repo, _, revision = pcfg.hf_hub_id.partition("@")
        names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else []
        for filename in names or ["model.safetensors", "pytorch_model.bin"]:
            try:
                return Path(
                    hf_hub_download(
                        repo, filename, revision=revision or None, local_files_only=True
                    )
                )
            except (OSError, ValueError):  # not cached / invalid id
                continue
    if pcfg.url:
        name = os.path.basename(urllib.parse.urlsplit(pcfg.url).path)
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / name
        if candidate.is_file():
            return candidate
    return None


def _offline_reason(pcfg: Any) -> str | None:
    """Why the hub cannot be reached right now, or None if a download may work."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = constants.ENDPOINT if pcfg.hf_hub_id else pcfg.url
    # Probe the proxy if one is configured, else the host itself. huggingface_hub would retry
    # for ~45 s before giving up; a plain TCP connect answers in at most a few seconds.
    proxy = urllib.request.getproxies().get(urllib.parse.urlsplit(url).scheme)
    parts = urllib.parse.urlsplit(proxy or url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{parts.hostname}:{port} is unreachable ({exc})"
    return None


def _unavailable_message(full: str, *, role: str, key: str, reason: str) -> str:
    from huggingface_hub import constants

    file = f"{full}.pth"
    return (
        f"{key}: pretrained weights {full!r} are not available: no copy in the Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}) and {reason}. Either run `launch.py weights fetch "
        f"--to DIR` where internet exists, copy DIR here and set model.{role}_checkpoint="
        f"DIR/{file}; or set HF_HOME to a warm Hugging Face cache; or set model.pretrained=false "
        "(random init)"
    )
