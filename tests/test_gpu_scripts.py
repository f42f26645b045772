"""The GPU benchmark helpers run (and say what they need) on a machine without a GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_check_cuda_graphs_says_it_needs_a_gpu():
    r = subprocess.run([sys.executable, "scripts/check_cuda_graphs.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "no CUDA device" in r.stderr


@pytest.mark.slow  # ~30 s: building the paper-shape pipelines (SD-VAE, text encoder) dominates
def test_check_cuda_graphs_logic_with_a_cpu_stand_in(tmp_path):
    """The script's three graphed edits per method (recorded, after another edit, again) match the
    eager edit, and the later two replay the cached graph (FakeCUDA on the CPU: logic, not the GPU)."""
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, "scripts/check_cuda_graphs.py", "--cpu-stand-in", "--width", "64", "--depth", "2",
                        "--size", "64", "--steps", "3", "--ratios", "0.1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["method"] for row in rows} == {"lazy", "regenerate-image"}
    for row in rows:
        assert (row["cache_hits"], row["cache_misses"]) == (2, 1)
        assert row["max_pixel_diff_recorded"] == row["max_pixel_diff_carried_over"] == 0


@pytest.mark.slow  # two inductor compiles, ~1 min on 2 cores
def test_probe_compile_on_cpu(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_compile.py", "--device", "cpu", "--dtype", "fp32",
                        "--size", "128", "--width", "64", "--depth", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    # 128² canvas -> 16x16 latent -> 8x8 = 64 tokens; a 10% centred hole has fewer, the full canvas all
    assert res["regenerate-image"]["tokens"] == 64
    assert 0 < res["lazy"]["tokens"] < 64
    for m in ("lazy", "regenerate-image"):
        assert res[m]["batch"] == 2  # batched CFG
        assert res[m]["eager_ms"] > 0 and res[m]["compiled_ms"] > 0
        assert res[m]["compiled_max_abs_diff"] < 1e-3  # fp32: the compiled decoder computes the same


@pytest.mark.slow  # ~3 min: prompt features; training steps, runtime benchmark and graph check in miniature, twice
def test_gpu_kit_and_the_stage5_script_run_on_the_cpu(tmp_path):
    """scripts/gpu_kit.py writes a kit that fits a device call, and scripts/gpu_stage5.sh trains both models
    with it under a python that has no diffusers (as on the GPU machine), time-boxed, and packs the exports."""
    import os
    import tarfile

    kit = tmp_path / "kit"
    r = subprocess.run([sys.executable, "scripts/gpu_kit.py", "--out", str(kit)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "MiB of the 64 MiB limit" in r.stdout
    assert sorted(p.name for p in kit.iterdir()) == ["diffusers-min.zip", "text_features.safetensors.xz"]

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_kit
        site = gpu_kit.site_without(gpu_kit.ABSENT_THERE, tmp_path)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(site), PYTHON=f"{sys.executable} -S", KIT=str(kit), OUT=str(out),
               RUNS=str(tmp_path / "runs"), MODELS=str(tmp_path / "models"), MINUTES="2", WORKERS="0",
               EXTRA="--set batch_size=2 --set data_echo=1 --set steps=3 --set checkpoint_every=2")
    r = subprocess.run(["bash", "scripts/gpu_stage5.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("lazy", "regenerate-image"):
        with tarfile.open(out / f"{name}.tar") as tar:
            members = tar.getnames()
            info = json.load(tar.extractfile(f"{name}/training/stage5/train_info.json"))
            components = json.load(tar.extractfile(f"{name}/components.json"))
        assert components["autoencoder"]["path"] == "data/models/autoencoder"   # not the machine's temporary copy
        assert f"{name}/decoder/diffusion_pytorch_model.safetensors" in members
        assert info["steps"] == 3 and (out / f"{name}.tar").stat().st_size < 16 * 2**20  # the device's per-file limit
        with tarfile.open(out / f"{name}-raw.tar") as tar:  # export_raw: the weights without the EMA
            assert f"{name}/decoder/diffusion_pytorch_model.safetensors" in tar.getnames()
    returned = [p for p in out.rglob("*") if p.is_file()]  # what a device call sends back: <= 8 files, 64 MiB
    assert len(returned) <= 8 and sum(p.stat().st_size for p in returned) < 64 * 2**20
    assert "lazy steps 3 of 3" in (out / "train.log").read_text() and "steps/s" in (out / "train.log").read_text()
