"""Device settings: transfers, float32 precision scopes, cuDNN autotuning, GPU memory caps."""

from __future__ import annotations

import pytest
import torch

from mmr import device


def test_fp32_math_sets_and_restores_the_precision():
    before = device.fp32_precision()
    with device.fp32_math("tf32"):
        assert device.fp32_precision() == ("tf32", "tf32")
        with device.fp32_math("ieee"):
            assert device.fp32_precision() == ("ieee", "ieee")
        assert device.fp32_precision() == ("tf32", "tf32")
    assert device.fp32_precision() == before
    with pytest.raises(KeyError), device.fp32_math("tf32"):
        raise KeyError  # restored on errors too
    assert device.fp32_precision() == before
    with pytest.raises(ValueError, match="'tf32' or 'ieee'"), device.fp32_math("fast"):
        pass


def test_cudnn_benchmark_only_for_cuda_and_restored():
    before = torch.backends.cudnn.benchmark
    with device.cudnn_benchmark(torch.device("cuda")):  # a device object needs no GPU
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with device.cudnn_benchmark(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before


def test_to_device_is_free_on_cpu():
    t = torch.arange(4)
    assert device.to_device(t, torch.device("cpu")) is t


def test_limit_memory_caps_a_shared_gpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d))
    )
    dev = torch.device("cuda", 0)
    assert device.limit_memory(0.5, dev) == pytest.approx(0.475)
    assert calls == [(pytest.approx(0.475), dev)]
    assert device.limit_memory(1.0, dev) is None and device.limit_memory(0, dev) is None
    assert len(calls) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.limit_memory(0.5, dev) is None


def test_allocator_env_keeps_the_users_setting():
    assert device.allocator_env({}) == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert device.allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == {}
    assert device.allocator_env({"PYTORCH_ALLOC_CONF": "backend:native"}) == {}
