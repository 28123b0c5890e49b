"""MMR: a frozen CNN teacher, and a masked ViT student that reconstructs its multi-scale features.

The student is an MAE-style ViT encoder (fixed 2-D sin-cos positions, per-sample random token
dropping while training) followed by a ViTDet "simple feature pyramid" decoder with one branch
per teacher stage. Training minimises 1 - cosine similarity to the teacher's features; at test
time the per-stage dissimilarity maps, up-sampled and summed, are the anomaly map.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from mmr.config import ModelConfig
from mmr.device import fp32_math
from mmr.errors import ConfigError
from mmr.weights import create_hub_model, load_encoder_checkpoint, load_teacher_checkpoint

__all__ = [
    "MMR",
    "Decoder",
    "Encoder",
    "Student",
    "Teacher",
    "build_encoder",
    "build_teacher",
    "cosine_loss",
    "gaussian_blur",
    "image_scores",
    "num_visible",
    "param_groups",
    "random_masking",
    "sincos_pos_embed",
]

logger = logging.getLogger(__name__)

# Parameters without weight decay besides biases and 1-D tensors (norms).


# ----------------------------------------------------------------------------- teacher


class Teacher(nn.Module):
    """Frozen timm ``features_only`` CNN; always in eval mode, returns one map per stage.

    Runs channels-last (weights and input), which convolutions prefer on CPUs (oneDNN) and
    on GPUs with bf16; :meth:`set_memory_format` switches it back for comparisons.
    """

    def __init__(self, net: nn.Module, *, stages: Sequence[int]) -> None:
        super().__init__()
        self.net = net.requires_grad_(False)
        self.stages = tuple(stages)
        self.channels = tuple(net.feature_info.channels())
        self.reductions = tuple(net.feature_info.reduction())
        self.train(False)
        self.set_memory_format(torch.channels_last)

    def set_memory_format(self, memory_format: torch.memory_format) -> Teacher:
        """Layout of the weights and of the input (``torch.channels_last`` or
        ``torch.contiguous_format``); the features are the same either way."""
        self.memory_format = memory_format
        self.net.to(memory_format=memory_format)
        return self

    def train(self, mode: bool = True) -> Teacher:
        """Ignores ``mode``: batch-norm statistics of the teacher must never change."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return list(self.net(images.contiguous(memory_format=self.memory_format)))


def build_teacher(cfg: ModelConfig) -> Teacher:
    """Builds the frozen teacher for ``cfg.teacher_layers`` (timm feature levels)."""
    kwargs = {"features_only": True, "out_indices": tuple(cfg.teacher_layers)}
    if cfg.teacher_checkpoint:
        net = _create_cnn(cfg.teacher, **kwargs)
        load_teacher_checkpoint(net, cfg.teacher_checkpoint)
    elif cfg.pretrained:
        net = create_hub_model(cfg.teacher, role="teacher", key="model.teacher", **kwargs)
    elif cfg.teacher_seed is None:
        net = _create_cnn(cfg.teacher, **kwargs)
    else:  # one random teacher whatever the training seed; the global RNG stream is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.teacher_seed)
            net = _create_cnn(cfg.teacher, **kwargs)
    return Teacher(net, stages=cfg.teacher_layers)


def _create_cnn(name: str, **kwargs: object) -> nn.Module:
    # timm ResNets zero-init the last BN of each block, which collapses a random teacher's
    # receptive field; other CNN families do not take the argument.
    try:
        try:
            return timm.create_model(name, pretrained=False, zero_init_last=False, **kwargs)
        except TypeError as exc:
            if "zero_init_last" not in str(exc):
                raise
            return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # unknown model name
        raise ConfigError(f"model.teacher: cannot build {name!r} ({exc})") from exc


def _teacher_geometry(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels, reductions) of the teacher stages, from a weightless (meta) instance."""
    try:
        with torch.device("meta"):
            net = _create_cnn(cfg.teacher, features_only=True, out_indices=cfg.teacher_layers)
    except (RuntimeError, IndexError, AssertionError) as exc:
        raise ConfigError(
            f"model.teacher / model.teacher_layers: {cfg.teacher!r} has no feature stages "
            f"{list(cfg.teacher_layers)} ({exc})"
        ) from exc
    return tuple(net.feature_info.channels()), tuple(net.feature_info.reduction())


# ----------------------------------------------------------------------------- student


def sincos_pos_embed(dim: int, grid: tuple[int, int], *, cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos position embedding in MAE's layout, (1 + cls) * H * W x ``dim``.

    First half encodes the column (x), second half the row (y), each as [sin, cos]; this is the
    layout MAE checkpoints were trained with. The cls slot, if any, is zero.
    """
    if dim % 4:
        raise ConfigError(f"model.encoder: embedding dim {dim} must be divisible by 4 (sin-cos)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1).float()
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])
    return emb


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept at ``mask_ratio``: ``int(N * (1 - ratio))`` as in MAE, at least one."""
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def random_masking(
    tokens: Tensor, mask_ratio: float, *, ids_shuffle: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample random token dropping (MAE): returns (visible tokens, ids_restore).

    Visible tokens are ``tokens`` at ``ids_shuffle[:, :num_visible]`` (random per sample unless
    given); ``ids_restore`` puts the shuffled sequence back into the original order.
    """
    batch, length, dim = tokens.shape
    if ids_shuffle is None:
        ids_shuffle = torch.rand(batch, length, device=tokens.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    keep = ids_shuffle[:, : num_visible(length, mask_ratio)]
    return tokens.gather(1, keep[..., None].expand(-1, -1, dim)), ids_restore


class Encoder(nn.Module):
    """ViT encoder (timm patch embedding, cls token, blocks, final norm) with MAE masking.

    Position embeddings are the fixed 2-D sin-cos table of the encoder's own patch grid,
    recomputed for every image size; a checkpoint's table is never loaded. At 224 px with
    16-px patches this is exactly the MAE checkpoint's table (MAE's positions are fixed sin-cos
    too). At other sizes the official code bicubic-interpolates the checkpoint's 14 x 14 table
    instead; the project keeps sin-cos of the new grid, which puts the encoder and the decoder
    (also sin-cos) on the same positions and keeps the frequencies the weights were trained
    with. The two differ (up to ~2.0 per entry for ViT-B at 320 px), so runs at other sizes
    are not bit-comparable with the official code.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.grid = tuple(self.patch_embed.grid_size)
        dim = self.cls_token.shape[-1]
        pos = sincos_pos_embed(dim, self.grid, cls_token=True)[None]
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed, not learned

    def forward(
        self, images: Tensor, *, mask_ratio: float = 0.0, ids_shuffle: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Returns (latent B x (1 + visible) x D with cls first, ids_restore or None)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        ids_restore = None
        if mask_ratio > 0 or ids_shuffle is not None:
            x, ids_restore = random_masking(x, mask_ratio, ids_shuffle=ids_shuffle)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self.norm_pre(torch.cat([cls.to(x.dtype), x], dim=1))
        return self.norm(self.blocks(x)), ids_restore

    def init_mae(self) -> None:
        """MAE's from-scratch initialisation (xavier linear/patch embed, cls ~ N(0, 0.02))."""
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def build_encoder(cfg: ModelConfig, *, image_size: int) -> Encoder:
    """Builds the student encoder (hub, local-file or random weights) for ``image_size``."""
    kwargs = {"img_size": image_size, "patch_size": cfg.patch_size, "num_classes": 0}
    if cfg.pretrained and not cfg.encoder_checkpoint:
        vit = create_hub_model(cfg.encoder, role="encoder", key="model.encoder", **kwargs)
        _check_vit(vit, cfg.encoder)
        depth = cfg.encoder_depth or len(vit.blocks)
        if depth > len(vit.blocks):
            raise ConfigError(
                f"model.encoder_depth {depth} exceeds the {len(vit.blocks)} pretrained blocks"
            )
        vit.blocks = vit.blocks[:depth]
        return Encoder(vit)
    if cfg.encoder_depth:
        kwargs["depth"] = cfg.encoder_depth
    try:
        vit = timm.create_model(cfg.encoder, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"model.encoder: cannot build {cfg.encoder!r} ({exc})") from exc
    _check_vit(vit, cfg.encoder)
    encoder = Encoder(vit)
    encoder.init_mae()
    if cfg.encoder_checkpoint:
        load_encoder_checkpoint(encoder, cfg.encoder_checkpoint)
    return encoder


def _check_vit(vit: nn.Module, name: str) -> None:
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.num_reg_tokens:
        raise ConfigError(
            f"model.encoder: {name!r} is not a plain timm VisionTransformer with a class token "
            "(e.g. vit_base_patch16_224, vit_small_patch16_224, vit_tiny_patch16_224)"
        )


def _branch(dim: int, log2_scale: int, channels: int) -> nn.Sequential:
    """One simple-feature-pyramid branch: rescale by 2**log2_scale, then project to channels.

    Up-sampling halves the width per ConvTranspose(k2, s2) step (LN + GELU between steps), as
    the official code does for x4 (768 -> 384 -> 192) and x2 (768 -> 384).
    """
    layers: list[nn.Module] = []
    width = dim
    for step in range(max(log2_scale, 0)):
        if step:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2))
        width //= 2
    if log2_scale < 0:
        layers.append(nn.MaxPool2d(kernel_size=2**-log2_scale, stride=2**-log2_scale))
    layers += [
        nn.Conv2d(width, channels, kernel_size=1, bias=False),
        LayerNorm2d(channels),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(channels),
    ]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """Simple feature pyramid: mask tokens + unshuffle + sin-cos, then one branch per stage."""

    def __init__(
        self,
        *,
        embed_dim: int,
        grid: tuple[int, int],
        log2_scales: Sequence[int],
        channels: Sequence[int],
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pos = sincos_pos_embed(embed_dim, self.grid)[None]
        self.register_buffer("pos_embed", pos, persistent=False)
        self.branches = nn.ModuleList(
            _branch(embed_dim, s, c) for s, c in zip(log2_scales, channels, strict=True)
        )

    def forward(self, latent: Tensor, ids_restore: Tensor | None) -> list[Tensor]:
        x = latent[:, 1:]  # drop cls
        if ids_restore is not None:
            batch, length = ids_restore.shape
            fill = self.mask_token.to(x.dtype).expand(batch, length - x.shape[1], -1)
            x = torch.cat([x, fill], dim=1)
            x = x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = x + self.pos_embed
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)
        return [branch(x) for branch in self.branches]


class Student(nn.Module):
    """Encoder + decoder: the trained and checkpointed part of MMR."""

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(
        self, images: Tensor, *, mask_ratio: float = 0.0, ids_shuffle: Tensor | None = None
    ) -> list[Tensor]:
        latent, ids_restore = self.encoder(images, mask_ratio=mask_ratio, ids_shuffle=ids_shuffle)
        return self.decoder(latent, ids_restore)


# ----------------------------------------------------------------------------- MMR


class MMR(nn.Module):
    """Masked multi-scale reconstruction of a frozen teacher's features by a ViT student.

    Args:
        cfg: model section of the config.
        image_size: side of the square input images.
        teacher: a :class:`Teacher` to share between several models (built when None).
    """

    def __init__(
        self, cfg: ModelConfig, *, image_size: int, teacher: Teacher | None = None
    ) -> None:
        super().__init__()
        if teacher is None:
            channels, reductions = _teacher_geometry(cfg)
        elif teacher.stages == tuple(cfg.teacher_layers):
            channels, reductions = teacher.channels, teacher.reductions
        else:
            raise ValueError(
                f"shared teacher has stages {list(teacher.stages)}, the config asks for "
                f"{list(cfg.teacher_layers)}"
            )
        log2_scales = _check_geometry(cfg, image_size=image_size, reductions=reductions)
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        encoder = build_encoder(cfg, image_size=image_size)
        decoder = Decoder(
            embed_dim=encoder.cls_token.shape[-1],
            grid=encoder.grid,
            log2_scales=log2_scales,
            channels=channels,
        )
        self.student = Student(encoder, decoder)
        self.image_size = image_size
        self.mask_ratio = cfg.mask_ratio

    def features(self, images: Tensor, *, mask_ratio: float) -> tuple[list[Tensor], list[Tensor]]:
        """(teacher, student) feature maps per stage; teacher without grad, same input."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape)}"
            )
        return self.teacher(images), self.student(images, mask_ratio=mask_ratio)

    def forward(self, images: Tensor) -> Tensor:
        """Training loss (scalar): masking at ``cfg.mask_ratio`` in train mode, none in eval."""
        ratio = self.mask_ratio if self.training else 0.0
        return cosine_loss(*self.features(images, mask_ratio=ratio))

    @torch.no_grad()
    def anomaly_map(self, images: Tensor, *, blur_sigma: float) -> Tensor:
        """B x H x W float32 map: sum over stages of up-sampled 1 - cos, Gaussian-blurred.

        Never masks, and runs the student in eval mode (restored after), so it is deterministic.
        """
        was_training = self.student.training
        self.student.eval()
        try:
            teacher, student = self.features(images, mask_ratio=0.0)
        finally:
            self.student.train(was_training)
        size = tuple(images.shape[-2:])
        with torch.autocast(device_type=images.device.type, enabled=False):
            total = torch.zeros(images.shape[0], 1, *size, device=images.device)
            for t, s in zip(teacher, student, strict=True):
                dissim = 1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)
                total += F.interpolate(
                    dissim[:, None], size=size, mode="bilinear", align_corners=True
                )
            return gaussian_blur(total[:, 0], blur_sigma)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups over the student (see :func:`param_groups`)."""
        return param_groups(self, weight_decay=weight_decay)


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: no decay for biases and 1-D params (norms), as official.

    The cls and mask tokens are 3-D and decayed, like the official (MAE-derived) optimiser.
    For an :class:`MMR` only its student is optimised (the teacher is frozen).
    """
    module = model.student if isinstance(model, MMR) else model
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=())


def _check_geometry(cfg: ModelConfig, *, image_size: int, reductions: Sequence[int]) -> list[int]:
    """log2 of each branch's scale factor (patch_size / stage stride); ConfigError if unfit."""
    if image_size % cfg.patch_size:
        raise ConfigError(
            f"model.patch_size {cfg.patch_size} must divide the image size {image_size}"
        )
    scales = []
    for stage, stride in zip(cfg.teacher_layers, reductions, strict=True):
        if image_size % stride:
            raise ConfigError(
                f"model.teacher_layers: stage {stage} of {cfg.teacher} has stride {stride}, "
                f"which does not divide the image size {image_size}; drop the stage or use an "
                f"image size that is a multiple of {stride}"
            )
        log2 = math.log2(cfg.patch_size / stride)
        if not log2.is_integer():
            raise ConfigError(
                f"model.patch_size {cfg.patch_size}: the decoder rescales by patch_size / stage "
                f"stride, which must be a power of two (stage {stage} has stride {stride}); "
                "use a power-of-two patch size such as 8, 16 or 32"
            )
        scales.append(int(log2))
    return scales


def cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """Sum over stages of the mean over all positions of 1 - cos(teacher, student)."""
    losses = []
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise RuntimeError(f"teacher {tuple(t.shape)} vs student {tuple(s.shape)} features")
        losses.append((1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)).mean())
    return torch.stack(losses).sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of B x H x W maps, as scipy.ndimage.gaussian_filter.

    Kernel radius ``int(4 * sigma + 0.5)`` and half-sample symmetric ("reflect") borders, like
    the official ``gaussian_filter(map, sigma=4)``; ``sigma == 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    x = maps[:, None]
    # Exact float32: cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa
    # products), which scipy's filter, the reference, does not.
    with fp32_math("ieee"):
        for dim in (2, 3):
            size = x.shape[dim]
            idx = torch.arange(-radius, size + radius, device=maps.device) % (2 * size)
            idx = torch.where(idx >= size, 2 * size - 1 - idx, idx)
            shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
            x = F.conv2d(x.index_select(dim, idx), kernel.view(shape))
    return x[:, 0]


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly score: the maximum of each map (B x H x W -> B)."""
    return maps.flatten(1).amax(dim=1)
