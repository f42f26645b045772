"""Scale-out: `accelerate launch` with 2 CPU processes gives the same metrics as 1 process.

`accelerate launch --cpu --num_processes 2` starts a single process (accelerate only runs several
CPU processes through MPI); `--multi_gpu --num_processes 2` starts 2 processes through torchrun on
any machine, and `--device cpu` makes them a gloo (MULTI_CPU) group.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from eval.metrics import write_tiny_clip

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_processes_match_one(tmp_path):
    clip = write_tiny_clip(tmp_path / "clip")
    suite = tmp_path / "s.yaml"
    suite.write_text("dataset: shapesworld\nsize: 64\nsteps: 2\nexamples: 0\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    common = ["-m", "eval", "quality", "--suite", str(suite), "--methods", "tiny-lazy", "--limit", "4",
              "--shapes-clip", str(clip), "--device", "cpu"]
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    two = subprocess.run([launcher, "launch", "--num_processes", "2", "--multi_gpu", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
                         + common + ["--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable] + common + ["--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    per_two = pd.read_csv(tmp_path / "two" / "per_sample.csv")
    assert sorted(per_two["rank"].unique()) == [0, 1]          # really sharded: i % 2 == rank
    assert all(per_two["rank"] == per_two["index"] % 2)
    a, b = pd.read_csv(tmp_path / "one" / "summary.csv"), pd.read_csv(tmp_path / "two" / "summary.csv")
    for col in ("fid", "kid", "fid_local", "kid_local", "clip_cosine", "clip_score_x100", "prompt_acc",
                "unmasked_violating_pixels"):
        assert np.allclose(a[col], b[col], rtol=1e-3, atol=1e-6, equal_nan=True), col
    for sid in per_two.sample_id:
        x = np.asarray(PIL.Image.open(tmp_path / "one" / "images" / "tiny-lazy" / f"{sid}.png"), np.int16)
        y = np.asarray(PIL.Image.open(tmp_path / "two" / "images" / "tiny-lazy" / f"{sid}.png"), np.int16)
        assert np.abs(x - y).max() <= 1
