"""The trial's device set-up through the trainable's own code path (``train_trial``), with a
fake CUDA device where none is present: the GPU-memory cap from the trial's GPU share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

from search.resolve import resolve_sweep


def _run_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gpu: float, gpu_ids: Sequence[Any] = (0,)
) -> dict[str, Any]:
    """Runs ``train_trial`` as a Ray worker would start it (Tune's session, Ray's context and
    ``mmr.train.fit`` faked); returns the memory caps set and what ``fit`` saw."""
    import mmr.train
    from search import trainable

    spec = resolve_sweep(
        None,
        [f"resources.gpu={gpu}", "search.num_trials=1"],
        name="cap",
        storage=str(tmp_path / "runs"),
    )
    caps: list[tuple[float, torch.device]] = []
    seen: dict[str, Any] = {}
    # A CUDA device that is not there: limit_memory sees one, and records the cap it sets.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.__setitem__(0, i))
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d=None: caps.append((f, d))
    )
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(var, "")  # train_trial sets the allocator; restored after the test
    # Tune's session and Ray's context, as a trial's worker has them.
    trial_dir = tmp_path / "trial"
    storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(),
                              trial_fs_path=str(trial_dir))  # fmt: skip
    monkeypatch.setattr(trainable.tune, "get_context",
                        lambda: SimpleNamespace(get_storage=lambda: storage))  # fmt: skip
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: list(gpu_ids))
    monkeypatch.setattr(trainable.ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda: "node"))  # fmt: skip

    def fit(cfg: Any, **kwargs: Any) -> dict[str, Any]:
        seen["caps_at_fit"] = list(caps)  # the cap is in place before training allocates
        seen["categories"] = list(cfg.data.categories)
        return {}

    monkeypatch.setattr(mmr.train, "fit", fit)
    trainable.train_trial({"category": None}, spec=spec.to_dict())
    assert (trial_dir / "worker.json").is_file()  # train_trial ran its start-up for real
    return {"caps": caps, **seen}


def test_a_trial_sharing_a_gpu_caps_its_memory_at_its_share(tmp_path, monkeypatch):
    from mmr.device import MEMORY_HEADROOM

    run = _run_trial(tmp_path, monkeypatch, gpu=0.5)
    assert run["caps"] == [(pytest.approx(0.5 * MEMORY_HEADROOM), torch.device("cuda", 0))]
    assert run["caps_at_fit"] == run["caps"]


def test_a_trial_with_a_whole_gpu_is_not_capped(tmp_path, monkeypatch):
    run = _run_trial(tmp_path, monkeypatch, gpu=1)
    assert "caps_at_fit" in run and run["caps"] == []


def test_the_cap_is_set_on_the_trials_own_gpu_when_ray_leaves_all_visible(tmp_path, monkeypatch):
    from search.trainable import NOSET_CUDA_VAR

    monkeypatch.setenv(NOSET_CUDA_VAR, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    run = _run_trial(tmp_path, monkeypatch, gpu=0.25, gpu_ids=["5"])
    assert run["caps"] == [(pytest.approx(0.25 * 0.95), torch.device("cuda", 1))]
