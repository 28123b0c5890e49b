"""Smoke tests of the benchmark suite: every module's code path at a minimal size.

They check the structure of the results (rows with positive times and ratios), never speed:
the machines that run tests are shared and their timings mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"benchmark", "section", "figure", "project_s", "reference_s", "ratio", "unit", "note"}


def check_rows(rows: list[dict], *, sections: set[str], allow_zero: tuple[str, ...] = ()) -> None:
    assert rows, "a benchmark returned no rows"
    for r in rows:
        assert KEYS <= set(r), r
        assert r["section"] in sections, r
        assert r["figure"] and r["note"]
        for key in ("project_s", "reference_s", "ratio"):
            assert math.isfinite(r[key]), r
            assert r[key] > 0 or (r["benchmark"] in allow_zero), r
        assert r.get("met") in (True, False, None)


def test_data_and_metrics_benchmarks():
    from benchmarks import bench_data, bench_metrics

    rows = bench_data.run(smoke=True)
    check_rows(rows, sections={"data"})
    assert [r["benchmark"] for r in rows] == [
        "train_epoch",
        "eval_epoch",
        "crop_fidelity",
        "cache_build",
        "cache_hit",
    ]
    fidelity = rows[2]
    # crops from the training cache are closer to the official full-resolution crops
    assert fidelity["unit"] == "grey levels" and fidelity["ratio"] > 1.0
    rows = bench_metrics.run(smoke=True)
    check_rows(rows, sections={"metrics"})
    by_name = {r["benchmark"]: r for r in rows}
    assert set(by_name) == {"aupro", "pixel_auroc", "pixel_f1_max", "evaluate"}
    assert by_name["pixel_auroc"]["diff"] < 1e-9  # exact against sklearn at any size


def test_train_benchmark_runs_both_sides_in_child_processes():
    from benchmarks import bench_train

    rows = bench_train.run(smoke=True)
    check_rows(rows, sections={"train", "memory"})
    by_name = {r["benchmark"]: r for r in rows}
    assert set(by_name) == {"train_tiny", "peak_rss_tiny"}
    assert by_name["train_tiny"]["unit"] == "img/s"
    assert by_name["peak_rss_tiny"]["unit"] == "MB"
    assert by_name["peak_rss_tiny"]["project_s"] > 50  # a process holding torch and a model


def test_asha_bound_by_hand():
    from benchmarks.bench_search import asha_bound

    # 4 rounds of 6 epochs, rungs at rounds 1 and 3: 2/3 stop at 6 epochs, 2/9 at 18, 1/9 run 24.
    assert asha_bound(epochs=24, eval_every=6, grace=1, rf=3) == pytest.approx(32 / 3)
    # 6 rounds of 2 epochs, rungs at 1 and 3: 2/3 * 2 + 2/9 * 6 + 1/9 * 12 = 4.
    assert asha_bound(epochs=12, eval_every=2, grace=1, rf=3) == pytest.approx(4.0)
    assert asha_bound(epochs=5, eval_every=5, grace=1, rf=3) == 5  # one round: no rung


@pytest.mark.slow
def test_search_benchmark_runs_both_methods_on_a_local_ray():
    from benchmarks import bench_search

    rows = bench_search.run(smoke=True)
    # Best AUROC may be 0 on 2 validation images of a 2-trial smoke sweep.
    check_rows(rows, sections={"search", "overhead"}, allow_zero=("search_best_auroc",))
    by_name = {r["benchmark"]: r for r in rows}
    assert {"search_epochs", "search_best_auroc", "search_wall"} <= set(by_name)
    # Two trials of 2 epochs each: FIFO runs all 4, ASHA the same or fewer.
    assert 0 < by_name["search_epochs"]["project_s"] <= by_name["search_epochs"]["reference_s"]
    assert by_name["search_epochs"]["reference_s"] == 4
    overhead = [r for r in rows if r["section"] == "overhead"]
    assert len(overhead) == 1 and 0 < overhead[0]["ratio"] < 1


@pytest.mark.slow
def test_reuse_benchmark_runs_the_same_sweep_with_and_without_actor_reuse():
    from benchmarks import bench_reuse

    (r,) = bench_reuse.run(smoke=True)
    check_rows([r], sections={"overhead"})
    assert r["epochs"]["actor_per_trial"] == r["epochs"]["reused_actors"] == [6]
    # 3 trials, 2 at a time: one actor per trial, or the third trial in a reused one.
    assert r["actors"] == {"actor_per_trial": [3], "reused_actors": [2]}


def test_gpu_script_dry_run_on_cpu_without_ray_or_optuna(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu.py",
            "--dry-run",
            "--parts",
            "peak,memory,run200",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only: three training children on a loaded machine
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DRY RUN" in proc.stdout
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu" and not result["errors"]
    assert result["imported_ray_or_optuna"] == []  # the GPU machine has neither
    assert result["peak_bf16_tflops"] > 0
    check_rows(result["rows"], sections={"gpu"})
    # Memory per trial with one category and with several (a dry run: 2) in one trial.
    names = {r["benchmark"] for r in result["rows"]}
    assert names == {"gpu_memory_tiny", "gpu_memory_tiny_2cat", "gpu_run200"}
    assert all("DRY RUN" in r["note"] and r["met"] is None for r in result["rows"])


def test_gpu_datasheet_peaks_match_the_most_specific_name():
    from benchmarks.gpu import datasheet_peak

    assert datasheet_peak("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_peak("NVIDIA H200") == 989.0
    assert datasheet_peak("NVIDIA L40S") == 362.0 and datasheet_peak("NVIDIA L4") == 121.0
    assert datasheet_peak("Tesla T4") is None


def test_gpu_step_pieces_flops_and_what_ifs(tmp_path):
    from benchmarks import gpu
    from benchmarks.common import synthetic_data

    cfg = gpu._cfg(
        "paper",
        tmp_path / "data",
        tmp_path / "cache",
        device="cpu",
        dry=True,
        **{"train.batch_size": 4},
    )
    synthetic_data(
        tmp_path / "data", categories=[cfg.data.categories[0]], size=64, n_train=8, n_test=2
    )
    assert gpu.count_flops_per_image(cfg) > 1e6
    for channels_last, backend in ((True, None), (False, "eager")):
        ips = gpu.custom_steps(cfg, channels_last=channels_last, compile_backend=backend, steps=1)
        assert ips > 0


def test_report_marks_quick_runs_and_targets(tmp_path, monkeypatch):
    from benchmarks import run
    from benchmarks.common import row

    rows = [
        row("a", "fig", 1.0, 12.0, note="n", section="data", target=">= 10x", met=True),
        row(
            "b",
            "fig|x",
            2.0,
            1.0,
            note="n",
            section="train",
            unit="img/s",
            higher_is_better=True,
            target=">= 1.0x",
            met=True,
        ),
        row("c", "fig", 10.0, 5.0, note="n", section="overhead", target="<= 15%", met=False),
    ]
    result = {
        "rows": rows,
        "errors": {"search": "RuntimeError: boom"},
        "timings": {"data": 1.0},
        "seconds": 60.0,
        "load_start": (1.0, 1.0, 1.0),
        "load_end": (2.0, 2.0, 2.0),
        "date": "today",
    }
    (tmp_path / "gpu_results.json").write_text(json.dumps({"dry_run": True, "rows": []}))
    gpu_row = row(
        "gpu_run200", "fig", 100.0, 180.0, note="n", section="gpu", target="<= 180 s", met=True
    )
    (tmp_path / "gpu_results_2.json").write_text(
        json.dumps(
            {
                "dry_run": False,
                "device": "NVIDIA H200",
                "date": "d",
                "command": "python gpu.py",
                "peak_bf16_tflops": 700.0,
                "machine": {"versions": {"torch": "2.11"}},
                "errors": [],
                "rows": [gpu_row],
            }
        )
    )
    monkeypatch.setattr(run, "GPU_DIR", tmp_path)
    text = run.render(result, quick=True, smoke=False, command="python benchmarks/run.py --quick")
    assert "QUICK run" in text and "`python benchmarks/run.py --quick`" in text
    for title, _ in run.SECTIONS.values():
        assert f"## {title}" in text
    assert "| 1. Data pipeline per epoch | `a` | >= 10x | 12.00x |  | met |" in text
    assert "**not met**" in text and "**Failed**: RuntimeError: boom" in text
    assert "fig\\|x" in text  # a | inside a cell does not break the table
    assert "--dry-run" in text and "not GPU figures" in text
    assert "measured on NVIDIA H200" in text and "| `gpu_run200` | 100 s | 180 s |" in text
    assert "ray " in text and "optuna " in text and "nproc" in text
    replay_md = run.ROOT / "benchmarks" / "data" / "replay.md"
    if replay_md.is_file():  # the replay section is copied verbatim from the replay's summary
        assert replay_md.read_text().strip() in text
    else:
        assert "Not measured yet: `python -m benchmarks.replay --markdown" in text


def test_run_script_writes_markdown_and_rerenders_it_from_json(tmp_path):
    out, saved = tmp_path / "B.md", tmp_path / "results.json"
    cmd = [sys.executable, "benchmarks/run.py", "--smoke", "--only", "metrics"]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--json", str(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "SMOKE run" in text and "`aupro`" in text and "## 4. Search efficiency" in text
    again = tmp_path / "again.md"
    from benchmarks.run import KEPT_MARKER

    kept = f"{KEPT_MARKER}\n## Checkpoints\nfrom python -m benchmarks.bench_checkpoint\n"
    again.write_text("an older run\n" + kept)  # hand-measured sections survive a rerun
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--from-json", str(saved), "--out", str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert again.read_text() == text + "\n" + kept


# The step profile at CI sizes: the same code paths as the shipped configs (their teacher,
# encoder, augmentation and precision), smaller images, batches and depth.
TINY_PROFILE = ["data.image_size=32", "data.resize=40", "model.encoder_depth=1",
                "train.batch_size=2", "train.threads=1"]  # fmt: skip


def test_step_profile_finds_no_sync_in_the_training_step():
    from benchmarks.step_profile import profile_config

    for config in ("tiny.yaml", "mvtec.yaml"):  # the paper config: wide_resnet50_2 + ViT-B/16
        result = profile_config(ROOT / "configs" / config, TINY_PROFILE, steps=2,
                                warmup_epochs=1)  # fmt: skip
        # Host reads counted in Python: also what the profiler cannot see on a CPU
        # (.tolist(), .numpy(), .cpu() of a CPU tensor).
        assert result["host_reads"] == {}, (config, result["host_read_sites"])
        assert result["host_reads_per_step"] == 0
        assert result["syncs_by_op"] == {}, config
        assert result["syncs_per_step"] == 0 and result["ops_per_step"] > 100, config
        assert result["precision"] == "bf16"  # "auto" profiles what CUDA runs


def test_step_profile_sees_a_sync_put_back_into_the_step(monkeypatch):
    from benchmarks.step_profile import profile_config
    from mmr import model as model_module

    loss_fn = model_module.cosine_loss

    def logging_loss(t, s):  # the per-step loss.item() the loop used to make
        loss = loss_fn(t, s)
        loss.item()
        return loss

    monkeypatch.setattr(model_module, "cosine_loss", logging_loss)
    result = profile_config(ROOT / "configs" / "tiny.yaml", TINY_PROFILE, steps=2,
                            warmup_epochs=1)  # fmt: skip
    assert result["syncs_per_step"] == 1 and result["syncs_by_op"] == {"aten::item": 2}


def test_step_profile_sees_a_host_read_the_cpu_profiler_cannot(monkeypatch):
    from benchmarks.step_profile import profile_config
    from mmr import model as model_module

    loss_fn = model_module.cosine_loss

    def logging_loss(t, s):  # a per-step loss read as a list: no aten op on a CPU tensor
        loss = loss_fn(t, s)
        loss.detach().reshape(1).tolist()
        return loss

    monkeypatch.setattr(model_module, "cosine_loss", logging_loss)
    result = profile_config(ROOT / "configs" / "tiny.yaml", TINY_PROFILE, steps=2,
                            warmup_epochs=1)  # fmt: skip
    assert result["syncs_per_step"] == 0  # invisible to the profiler ...
    assert result["host_reads"] == {"Tensor.tolist": 2}  # ... but not to the host-read count
    assert result["host_reads_per_step"] == 1
    assert [site.rsplit(" in ", 1)[1] for site in result["host_read_sites"]] == ["logging_loss"]


def test_host_read_counter_rules():
    import torch

    from benchmarks.step_profile import HOST_READS, count_host_reads

    before = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    x = torch.rand(4)
    with count_host_reads(host_scopes=("host",)) as reads:
        x.tolist(), x.numpy(), x.cpu(), x.sum().item()
        float(x.sum()), int(x.sum()), complex(x.sum())
        if x.sum() > 0:  # bool() of a tensor
            pass
        [0, 1, 2][torch.tensor(1)]  # operator.index()
        x + 1, len(x), x.shape, x[1:], x.to(torch.float64)  # no value reaches Python
        with torch.profiler.record_function("host"):
            x.tolist(), int(x.sum())  # in a host-only range: not counted
        x.tolist()  # counted again after the range
    assert reads == {"Tensor.tolist": 2, "Tensor.numpy": 1, "Tensor.cpu": 1, "Tensor.item": 1,
                     "Tensor.__float__": 1, "Tensor.__int__": 1, "Tensor.__complex__": 1,
                     "Tensor.__bool__": 1, "Tensor.__index__": 1}  # fmt: skip
    assert all(__file__ in site for site in reads.sites), reads.sites
    # Everything restored: the methods are torch's own again.
    assert {name: getattr(torch.Tensor, name) for name in HOST_READS} == before
    assert not set(HOST_READS) & set(vars(torch.Tensor))
    with pytest.raises(KeyError), count_host_reads() as reads:
        raise KeyError  # restored on errors too
    assert not set(HOST_READS) & set(vars(torch.Tensor))
    x.tolist()
    assert reads == {}


def test_sync_counter_rules():
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.step_profile import count_syncs

    x = torch.rand(4, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x.sum().item()  # reads device memory
        torch.nonzero(x > 0.5)  # output size from the data
        if x.sum() > 0:  # bool() of a tensor
            pass
        torch.tensor([1.0, 2.0], device=x.device)  # a blocking host-to-device copy on CUDA
        x.to(x.device)  # strict: a device argument without non_blocking
        x.to(x.device, non_blocking=True)  # pinned + non_blocking: not counted
        x.to(torch.float64)  # a dtype change on the device: not counted
        x[None, None].to(memory_format=torch.channels_last)  # a layout change: not counted
        with record_function("host"):
            torch.nonzero(x)  # in a host-only range: not counted
    counts = count_syncs(prof.events(), host_scopes=("host",))
    assert counts["syncs"] == 5, counts
    assert counts["by_name"] == {"aten::item": 1, "aten::nonzero": 1, "aten::is_nonzero": 1,
                                 "aten::to": 2}  # fmt: skip


def test_crop_fidelity_is_zero_for_a_full_resolution_cache(synthetic_root, cache_dir):
    from benchmarks.bench_data import crop_fidelity
    from mmr.data import load_images

    paths = sorted((synthetic_root / "disk/train/good").glob("*.png"))[:3]
    full, small = load_images(paths, size=96), load_images(paths, size=64)
    same, lower = crop_fidelity(paths, [full, small], crops_per_image=2)
    assert same < 0.05  # same boxes on the same pixels: PIL's crops to rounding
    assert lower > 10 * same


def test_bench_predict_smoke() -> None:
    from benchmarks import bench_predict

    (r,) = bench_predict.run(smoke=True)
    assert r["section"] == "predict" and r["unit"] == "img/s"
    assert r["project_s"] > 0 and r["reference_s"] > 0
    assert r["ratio"] == pytest.approx(r["project_s"] / r["reference_s"])
