"""Tests of mmr.model and mmr.weights on tiny CPU models (random init, no network)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from timm.layers import resample_patch_embed
from torch import nn

from mmr import weights
from mmr.config import ModelConfig
from mmr.errors import ConfigError
from mmr.model import (
    MMR,
    build_teacher,
    cosine_loss,
    gaussian_blur,
    image_scores,
    num_visible,
    param_groups,
    random_masking,
    sincos_pos_embed,
)

SIZE = 64


def tiny(**changes: object) -> ModelConfig:
    base = ModelConfig(
        teacher="resnet18",
        teacher_layers=(1, 2, 3),
        encoder="vit_tiny_patch16_224",
        encoder_depth=2,
        patch_size=8,
        pretrained=False,
    )
    return dataclasses.replace(base, **changes)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(cfg: ModelConfig | None = None, seed: int = 0, **kwargs: object) -> MMR:
    torch.manual_seed(seed)
    return MMR(cfg or tiny(), image_size=SIZE, **kwargs)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("teacher", "stages", "patch"),
    [
        ("resnet18", (1, 2, 3), 8),
        ("resnet18", (2, 3), 16),
        ("resnet18", (1, 2, 3, 4), 32),
        ("resnet18", (1, 2, 3, 4), 8),
        ("wide_resnet50_2", (2, 3), 16),
        ("efficientnet_b0", (1, 2, 3), 16),
    ],
)
def test_feature_shapes_follow_feature_info(teacher, stages, patch):
    model = build(tiny(teacher=teacher, teacher_layers=stages, patch_size=patch))
    with torch.device("meta"):  # timm's own stage description, without weights
        info = timm.create_model(teacher, features_only=True, out_indices=stages).feature_info
    t_feats, s_feats = model.features(images(), mask_ratio=0.4)
    assert len(t_feats) == len(s_feats) == len(stages)
    for t, s, ch, red in zip(t_feats, s_feats, info.channels(), info.reduction(), strict=True):
        assert t.shape == s.shape == (2, ch, SIZE // red, SIZE // red)
    for branch, red in zip(model.student.decoder.branches, info.reduction(), strict=True):
        ups = [m for m in branch if isinstance(m, nn.ConvTranspose2d)]
        pools = [m for m in branch if isinstance(m, nn.MaxPool2d)]
        factor = patch / red
        assert len(ups) == max(0, int(np.log2(factor)))
        assert (pools[0].kernel_size if pools else 1) == max(1, int(1 / factor))
        assert all(m.bias is None for m in branch if isinstance(m, nn.Conv2d))


def test_branch_layout_matches_official_widths():
    model = build(tiny(patch_size=16))  # factors 4, 2, 1 as in the paper; ViT-Ti dim 192
    x4, x2, x1 = model.student.decoder.branches
    kinds = [type(m).__name__ for m in x4]
    assert kinds == [
        "ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d",
        "Conv2d", "LayerNorm2d", "Conv2d", "LayerNorm2d",
    ]  # fmt: skip
    assert (x4[0].in_channels, x4[0].out_channels, x4[3].out_channels) == (192, 96, 48)
    assert (x4[4].in_channels, x4[4].out_channels, x4[4].kernel_size) == (48, 64, (1, 1))
    assert (x4[6].kernel_size, x4[6].padding) == ((3, 3), (1, 1))
    assert [type(m).__name__ for m in x2][:2] == ["ConvTranspose2d", "Conv2d"]
    assert x2[0].out_channels == 96 and x1[0].in_channels == 192


def test_sincos_matches_mae_reference_and_is_fixed():
    dim, grid = 16, (3, 3)

    def mae_1d(d, pos):  # MAE's get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(3.0), np.arange(3.0))  # MAE: w goes first
    ref = np.concatenate([mae_1d(dim // 2, gw), mae_1d(dim // 2, gh)], axis=1)
    got = sincos_pos_embed(dim, grid, cls_token=True)
    assert torch.equal(got[0], torch.zeros(dim))
    np.testing.assert_allclose(got[1:].numpy(), ref, atol=1e-6)
    model = build()
    names = [n for n, _ in model.student.named_parameters()]
    assert not any("pos_embed" in n for n in names)
    assert not any("pos_embed" in k for k in model.student.state_dict())
    assert model.student.encoder.pos_embed.shape == (1, 1 + 64, 192)


# ----------------------------------------------------------------------------- masking


def test_num_visible_rule():
    assert num_visible(16, 0.4) == 9  # int(16 * 0.6): 7 dropped
    assert num_visible(64, 0.4) == 38
    assert num_visible(49, 0.75) == 12
    assert num_visible(64, 0.0) == 64
    assert num_visible(4, 0.9) == 1  # never zero visible tokens


def test_random_masking_keeps_a_random_subset_per_sample():
    torch.manual_seed(0)
    tokens = torch.arange(64.0)[None, :, None].expand(8, 64, 3)
    kept, ids_restore = random_masking(tokens, 0.4)
    assert kept.shape == (8, 38, 3)
    ids = kept[:, :, 0].long()
    assert all(len(set(row.tolist())) == 38 for row in ids)  # no repeats
    assert len({tuple(sorted(row.tolist())) for row in ids}) == 8  # differs per sample
    shuffle = ids_restore.argsort(dim=1)  # inverse permutation = ids_shuffle
    assert torch.equal(shuffle[:, :38], ids)


def test_encoder_sees_only_visible_tokens_and_decoder_fills_mask_tokens():
    model = build()
    enc, dec = model.student.encoder, model.student.decoder
    x = images()
    seen = {}
    enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    ids_shuffle = torch.stack([torch.randperm(64) for _ in range(2)])
    latent, ids_restore = enc(x, mask_ratio=0.4, ids_shuffle=ids_shuffle)
    expected = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    keep = ids_shuffle[:, :38]
    visible = expected.gather(1, keep[..., None].expand(-1, -1, 192))
    assert seen["in"].shape == (2, 39, 192)
    torch.testing.assert_close(seen["in"][:, 1:], visible)
    torch.testing.assert_close(seen["in"][:, 0], enc.cls_token[0].expand(2, -1))

    model.train()
    model(x)
    assert seen["in"].shape == (2, 39, 192)  # train mode masks at cfg.mask_ratio
    model.eval()
    model(x)
    assert seen["in"].shape == (2, 65, 192)
    model.train()
    model.anomaly_map(x, blur_sigma=4.0)
    assert seen["in"].shape == (2, 65, 192)  # never masked at test time

    dec.branches = nn.ModuleList([nn.Identity()])  # expose the B x D x 8 x 8 grid
    grid = dec(latent, ids_restore)[0].flatten(2).transpose(1, 2)
    pos = dec.pos_embed[0]
    for b in range(2):
        masked = ids_shuffle[b, 38:]
        torch.testing.assert_close(grid[b, masked], dec.mask_token[0].expand(26, -1) + pos[masked])
        torch.testing.assert_close(grid[b, keep[b]], latent[b, 1:] + pos[keep[b]])


# ----------------------------------------------------------------------------- maps, loss


@pytest.mark.parametrize(
    ("shape", "sigma"), [((2, 40, 50), 4.0), ((1, 10, 12), 4.0), ((1, 9, 9), 1.3)]
)
def test_gaussian_blur_matches_scipy(shape, sigma):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    got = gaussian_blur(maps, sigma)
    for b in range(shape[0]):
        ref = gaussian_filter(maps[b].double().numpy(), sigma=sigma)
        np.testing.assert_allclose(got[b].numpy(), ref, atol=1e-5)
    assert gaussian_blur(maps, 0.0) is maps


def test_anomaly_map_definition_and_determinism():
    model = build()
    model.train()  # anomaly_map must not depend on the mode
    x = images(3)
    amap = model.anomaly_map(x, blur_sigma=4.0)
    assert amap.shape == (3, SIZE, SIZE) and amap.dtype == torch.float32
    assert torch.equal(amap, model.anomaly_map(x, blur_sigma=4.0))
    t_feats, s_feats = model.features(x, mask_ratio=0.0)
    raw = sum(
        F.interpolate(
            (1 - F.cosine_similarity(t, s, dim=1))[:, None],
            size=(SIZE, SIZE),
            mode="bilinear",
            align_corners=True,
        )[:, 0]
        for t, s in zip(t_feats, s_feats, strict=True)
    )
    torch.testing.assert_close(model.anomaly_map(x, blur_sigma=0.0), raw.detach())
    ref = np.stack([gaussian_filter(m.detach().double().numpy(), sigma=4) for m in raw])
    np.testing.assert_allclose(amap.numpy(), ref, atol=1e-5)
    assert torch.equal(image_scores(amap), amap.flatten(1).max(dim=1).values)


def test_cosine_loss_definition():
    a = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 2, 2)]
    b = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 2, 2)]
    expected = sum(
        (1 - F.cosine_similarity(x, y, dim=1)).mean() for x, y in zip(a, b, strict=True)
    )
    torch.testing.assert_close(cosine_loss(a, b), expected)
    assert cosine_loss(a, a).abs().item() < 1e-6


def test_training_reduces_loss_and_only_updates_the_student():
    model = build()
    model.train()
    assert not model.teacher.training and model.student.training
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    x = images(4)
    torch.manual_seed(0)
    losses = []
    for step in range(6):
        loss = model(x)
        assert torch.isfinite(loss) and loss.ndim == 0
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in model.student.parameters())
            assert all(p.grad is None for p in model.teacher.parameters())
            assert not any(p.requires_grad for p in model.teacher.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in model.teacher.state_dict().items():  # BN statistics included
        assert torch.equal(v, teacher_state[k]), k


def test_param_groups_exclude_biases_and_norms_only():
    model = build()
    groups = param_groups(model, weight_decay=0.05)
    assert [len(g["params"]) for g in groups] == [
        len(g["params"]) for g in model.param_groups(0.05)
    ]
    names = {id(p): n for n, p in model.student.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert not no_decay & decay and no_decay | decay == set(names.values())
    # As the official optimiser: only biases and 1-D params go undecayed; tokens are 3-D.
    assert {"encoder.cls_token", "decoder.mask_token"} <= decay
    assert "encoder.blocks.0.attn.qkv.bias" in no_decay
    assert "encoder.blocks.0.norm1.weight" in no_decay
    norms = [n for n, m in model.student.named_modules() if isinstance(m, nn.LayerNorm)]
    assert any(".branches." in n for n in norms)  # channel LayerNorm2d of the decoder
    assert {f"{n}.weight" for n in norms} <= no_decay
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight"} <= decay
    assert "decoder.branches.0.0.weight" in decay


def test_bf16_autocast_and_channels_last():
    model = build()
    x = images()
    reference = model.anomaly_map(x, blur_sigma=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x)
        amap = model.anomaly_map(x, blur_sigma=4.0)
    assert torch.isfinite(loss) and amap.dtype == torch.float32 and torch.isfinite(amap).all()
    model = model.to(memory_format=torch.channels_last)
    cl = model.anomaly_map(x.contiguous(memory_format=torch.channels_last), blur_sigma=4.0)
    torch.testing.assert_close(cl, reference, atol=1e-4, rtol=1e-4)


def test_teacher_runs_channels_last_with_the_same_features():
    teacher = build_teacher(tiny())
    conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = images()
    fast = teacher(x)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in fast)
    plain = teacher.set_memory_format(torch.contiguous_format)(x)
    assert conv.weight.is_contiguous() and all(f.is_contiguous() for f in plain)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_shared_teacher():
    cfg = tiny()
    teacher = build_teacher(cfg)
    a, b = build(cfg, teacher=teacher), build(cfg, seed=1, teacher=teacher)
    assert a.teacher is b.teacher is teacher
    with pytest.raises(ValueError, match="stages"):
        build(tiny(teacher_layers=(2, 3)), teacher=teacher)


def test_teacher_seed_fixes_the_random_teacher_whatever_the_training_seed(tmp_path):
    def weights_of(model: MMR) -> list[torch.Tensor]:
        return list(model.teacher.net.state_dict().values())

    def same(a: MMR, b: MMR) -> bool:
        return all(torch.equal(x, y) for x, y in zip(weights_of(a), weights_of(b), strict=True))

    def embed(model: MMR) -> torch.Tensor:  # a student weight, drawn from the global stream
        return model.student.encoder.patch_embed.proj.weight

    fixed = tiny(teacher_seed=13)
    a, b = build(fixed, seed=0), build(fixed, seed=1)
    assert same(a, b)  # one teacher for both training seeds ...
    assert not torch.equal(embed(a), embed(b))
    assert not same(build(tiny(), seed=0), build(tiny(), seed=1))  # ... unlike teacher_seed null
    assert not same(a, build(tiny(teacher_seed=14), seed=0))
    # Building it leaves the global stream alone: the student draws what it draws without it.
    torch.manual_seed(5)
    build_teacher(fixed)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)
    # Weights from a file win over the seed, and draw from the stream as they always did.
    file = tmp_path / "t.pth"
    torch.save(build(tiny(), seed=7).teacher.net.state_dict(), file)
    loaded = build(tiny(teacher_checkpoint=str(file), teacher_seed=13), seed=3)
    plain = build(tiny(teacher_checkpoint=str(file)), seed=3)
    assert not same(loaded, a) and same(loaded, plain)
    assert torch.equal(embed(loaded), embed(plain))


# ----------------------------------------------------------------------------- bad geometry


def test_bad_geometry_gives_config_errors():
    with pytest.raises(ConfigError, match="model.teacher_layers.*stride 32"):
        MMR(tiny(teacher_layers=(3, 4)), image_size=48)
    with pytest.raises(ConfigError, match="model.patch_size.*power of two"):
        MMR(tiny(patch_size=12), image_size=48)
    with pytest.raises(ConfigError, match="model.patch_size"):
        MMR(tiny(patch_size=24), image_size=SIZE)
    with pytest.raises(ConfigError, match="model.encoder"):
        build(tiny(encoder="resnet18"))
    with pytest.raises(ConfigError, match="model.teacher"):
        build(tiny(teacher="no_such_net"))


# ----------------------------------------------------------------------------- weight files


def test_local_weight_files_round_trip(tmp_path):
    source = build()
    teacher_file, encoder_file = tmp_path / "t.pth", tmp_path / "e.pth"
    torch.save(source.teacher.net.state_dict(), teacher_file)
    torch.save(source.student.encoder.state_dict(), encoder_file)
    cfg = tiny(teacher_checkpoint=str(teacher_file), encoder_checkpoint=str(encoder_file))
    copy = build(cfg, seed=1)
    copy.student.decoder.load_state_dict(source.student.decoder.state_dict())
    x = images()
    assert torch.equal(copy.anomaly_map(x, blur_sigma=4.0), source.anomaly_map(x, blur_sigma=4.0))


def test_torchvision_resnet_state_dict_loads_into_teacher(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18().eval()  # carries fc.* and layer4.*, both unused here
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    teacher = build_teacher(
        tiny(teacher_layers=(1, 2), teacher_checkpoint=str(tmp_path / "tv.pth"))
    )
    x = images()
    with torch.no_grad():
        l1 = tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))
        expected = [l1, tv.layer2(l1)]
    for got, ref in zip(teacher(x), expected, strict=True):
        torch.testing.assert_close(got, ref)


def test_mae_format_and_patch_resampling(tmp_path):
    torch.manual_seed(0)
    mae16 = MMR(tiny(patch_size=16, encoder_depth=3), image_size=SIZE).student.encoder
    state = {k: v.clone() for k, v in mae16.state_dict().items()}
    mae = {
        "model": {
            **state,
            "pos_embed": torch.zeros(1, 17, 192),
            "mask_token": torch.zeros(1, 1, 192),
            "decoder_embed.weight": torch.zeros(128, 192),
            "decoder_blocks.0.norm1.weight": torch.ones(128),
            "decoder_pred.weight": torch.zeros(768, 128),
        }
    }
    torch.save(mae, tmp_path / "mae.pth")
    cfg = tiny(patch_size=16, encoder_checkpoint=str(tmp_path / "mae.pth"))  # depth 2 of 3
    enc = build(cfg, seed=1).student.encoder
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k

    enc8 = build(dataclasses.replace(cfg, patch_size=8), seed=1).student.encoder
    w16 = state["patch_embed.proj.weight"]
    assert enc8.patch_embed.proj.weight.shape == (192, 3, 8, 8)
    torch.testing.assert_close(enc8.patch_embed.proj.weight, resample_patch_embed(w16, [8, 8]))
    assert torch.equal(enc8.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_bad_weight_files(tmp_path):
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint.*nope.pth.*does not exist"):
        build(tiny(teacher_checkpoint=str(tmp_path / "nope.pth")))
    vit_file, cnn_file = tmp_path / "vit.pth", tmp_path / "cnn.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), vit_file)
    torch.save(timm.create_model("resnet34").state_dict(), cnn_file)
    with pytest.raises(ConfigError, match=r"model.teacher_checkpoint.*missing \(e.g. "):
        build(tiny(teacher_checkpoint=str(vit_file)))
    with pytest.raises(ConfigError, match=r"teacher_checkpoint.*unexpected \(e.g. layer1.2"):
        build(tiny(teacher_checkpoint=str(cnn_file)))  # resnet34 weights, resnet18 teacher
    with pytest.raises(ConfigError, match=r"model.encoder_checkpoint.*unexpected \(e.g. bn1"):
        build(tiny(encoder_checkpoint=str(cnn_file)))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="encoder_checkpoint.*junk.pth.*is not a weights file"):
        build(tiny(encoder_checkpoint=str(tmp_path / "junk.pth")))


# ----------------------------------------------------------------------------- hub weights


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """No cached hub weights, no proxies; returns the (empty) Hugging Face cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return cache


def _stage_in_hf_cache(cache: Path, repo: str, state: dict) -> None:
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.save(state, folder / "snapshots" / ("0" * 40) / "pytorch_model.bin")


def test_hub_names_prefer_official_weights():
    assert weights.hub_name("wide_resnet50_2", role="teacher") == "wide_resnet50_2.tv_in1k"
    assert weights.hub_name("vit_base_patch16_224", role="encoder") == "vit_base_patch16_224.mae"
    assert weights.hub_name("wide_resnet50_2.racm_in1k", role="teacher").endswith("racm_in1k")


def test_hub_weights_from_warm_cache_offline(empty_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    cnn = timm.create_model("resnet18").state_dict()
    vit = timm.create_model("vit_tiny_patch16_224").state_dict()  # patch 16, 224 px, head
    _stage_in_hf_cache(empty_hub, "timm/resnet18.tv_in1k", cnn)
    _stage_in_hf_cache(empty_hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", vit)
    model = build(tiny(pretrained=True))  # patch 8: timm's filter resamples the patch embed
    for k, v in model.teacher.net.state_dict().items():
        assert torch.equal(v, cnn[k]), k
    enc = model.student.encoder
    w8 = resample_patch_embed(vit["patch_embed.proj.weight"], [8, 8])
    torch.testing.assert_close(enc.patch_embed.proj.weight, w8)
    assert len(enc.blocks) == 2
    assert torch.equal(enc.blocks[1].attn.qkv.weight, vit["blocks.1.attn.qkv.weight"])


def test_unavailable_hub_weights_fail_fast(empty_hub, monkeypatch):
    import socket

    import timm.models._hub as timm_hub

    # Fast = timm's hub download, which retries for ~45 s, is never entered, and every
    # network contact (the hub probe, huggingface_hub's own) is a TCP connect with a time-out.
    downloads: list[tuple] = []
    connects: list[tuple] = []
    real_connect = socket.create_connection

    def download(*args, **kwargs):
        downloads.append(args)
        raise AssertionError("the hub download was attempted")

    def connect(address, timeout=None, *args, **kwargs):
        connects.append((tuple(address), timeout))
        return real_connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(timm_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        build(tiny(pretrained=True))
    message = str(err.value)
    assert "model.teacher" in message and "HF_HUB_OFFLINE" in message
    assert "weights fetch --to DIR" in message and "model.teacher_checkpoint" in message
    assert "resnet18.tv_in1k.pth" in message and "pretrained=false" in message
    assert downloads == []

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match="unreachable"):
        build(tiny(pretrained=True))
    assert [a for a, _ in connects].count(("127.0.0.1", 9)) == 1  # probed once, no retries
    assert all(t is not None and t <= 10 for _, t in connects), connects
    assert downloads == []


def test_fetch_weights_writes_files_the_checkpoint_keys_load(tmp_path, monkeypatch):
    made: dict[str, nn.Module] = {}

    def fake_hub_model(name, *, role, key, **kwargs):  # timm without the download
        torch.manual_seed(len(made))
        made[role] = timm.create_model(name, pretrained=False, **kwargs)
        return made[role]

    monkeypatch.setattr(weights, "create_hub_model", fake_hub_model)
    cfg = tiny(encoder_depth=None)
    paths = weights.fetch_weights(cfg, tmp_path / "w")
    assert paths == {
        "teacher": tmp_path / "w" / "resnet18.tv_in1k.pth",
        "encoder": tmp_path / "w" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    }
    staged = tiny(
        teacher_checkpoint=str(paths["teacher"]), encoder_checkpoint=str(paths["encoder"])
    )
    model = build(staged)  # depth 2 of the 12 fetched blocks, patch 8 from 16
    full_teacher = made["teacher"].state_dict()
    for k, v in model.teacher.net.state_dict().items():
        assert torch.equal(v, full_teacher[k]), k
    vit = made["encoder"].state_dict()
    assert torch.equal(model.student.encoder.blocks[1].norm2.weight, vit["blocks.1.norm2.weight"])
    w8 = resample_patch_embed(vit["patch_embed.proj.weight"], [8, 8])
    torch.testing.assert_close(model.student.encoder.patch_embed.proj.weight, w8)


def test_import_model_does_not_import_ray_or_optuna():
    code = (
        "import sys, mmr.model, mmr.weights; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_position_embeddings_are_recomputed_sin_cos_at_any_image_size(tmp_path):
    # The documented choice: at an image size other than the checkpoint's, the encoder and
    # decoder use the sin-cos table of the new grid; the checkpoint's (14 x 14 at 224 px) table
    # is not interpolated (the official code interpolates it bicubically).
    cfg = tiny(patch_size=16)
    torch.manual_seed(0)
    at_224 = MMR(cfg, image_size=224).student.encoder
    state = {k: v.clone() for k, v in at_224.state_dict().items()}
    state["pos_embed"] = torch.randn(1, 1 + 14 * 14, 192)  # a table unlike any sin-cos
    torch.save({"model": state}, tmp_path / "mae.pth")
    torch.manual_seed(0)
    model = MMR(
        dataclasses.replace(cfg, encoder_checkpoint=str(tmp_path / "mae.pth")), image_size=320
    )
    enc, dec = model.student.encoder, model.student.decoder
    assert enc.grid == (20, 20)
    torch.testing.assert_close(enc.pos_embed[0], sincos_pos_embed(192, (20, 20), cls_token=True))
    torch.testing.assert_close(dec.pos_embed[0], sincos_pos_embed(192, (20, 20)))
    # the checkpoint's other weights did load
    torch.testing.assert_close(enc.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # and the choice matters: a bicubic interpolation of the 14 x 14 sin-cos table is another
    # table (the issue measured up to 2.0 apart for ViT-B at 320 px)
    from timm.layers import resample_abs_pos_embed

    table = sincos_pos_embed(192, (14, 14))[None]
    bicubic = resample_abs_pos_embed(table, [20, 20], [14, 14], num_prefix_tokens=0)
    assert (bicubic[0] - enc.pos_embed[0, 1:]).abs().max() > 0.5
