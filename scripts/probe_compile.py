"""Per-call time of one denoiser forward (batched CFG) at the paper shape: eager, CUDA-graph replay,
torch.compile (inductor), and torch.compile replayed from a CUDA graph, for LazyDiffusion's decoder at
one hole size and for the full-canvas decoder. The question it answers: how much of the gap between the
lazy step and its FLOP share is kernel count (which fusion removes) rather than launches (which graphs
remove). Random weights, timing only.

    python scripts/probe_compile.py --device cuda --width 1152 --depth 28 --ratio 0.1 --out runs/probe.json

The decoder's inputs are taken from a real 1-step edit of the runtime benchmark's pipelines (a forward
pre-hook records them), so the shapes are exactly those the pipeline runs.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.runtime import canvas_image, centred_mask, paper_shape_pipelines  # noqa: E402


def captured_inputs(pipe, size: int, ratio: float):
    """Args/kwargs of the decoder's first call in a 1-step edit."""
    seen = []
    handle = pipe.decoder.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                                    with_kwargs=True)
    try:
        pipe("a red star", Image.fromarray(canvas_image(size)), Image.fromarray(centred_mask(size, ratio)),
             num_inference_steps=1, guidance_scale=4.5)
    finally:
        handle.remove()
    return seen[0]


def per_call_ms(fn, device: str, calls: int = 10, blocks: int = 7) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    for _ in range(3):
        fn()
    times = []
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def graphed(fn):
    """fn replayed from a CUDA graph (inputs are fixed; that is all a timing needs)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def first(out):
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    return out.float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--methods", default="lazy,regenerate-image")
    ap.add_argument("--out", default="runs/probe_compile.json")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    methods = args.methods.split(",")
    pipes, info = paper_shape_pipelines(methods, size=args.size, width=args.width, depth=args.depth)
    results = {"setup": {**info, **vars(args), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(methods) * 4, desc="probe", unit="variant")
    for m in methods:
        pipe = pipes[m].to(args.device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        a, k = captured_inputs(pipe, args.size, args.ratio)
        dec = pipe.decoder
        with torch.no_grad():
            eager = lambda: dec(*a, **k)  # noqa: E731
            ref = first(eager())
            x = a[0] if a else next(iter(k.values()))
            # lazy: (B, |H|, C*p*p) hole patches; full canvas: (B, C, h, w) latents, patch 2
            tokens = x.shape[1] if x.dim() == 3 else (x.shape[2] // 2) * (x.shape[3] // 2)
            row = {"tokens": int(tokens), "batch": int(x.shape[0])}
            row["eager_ms"] = per_call_ms(eager, args.device); bar.update()
            if args.device.startswith("cuda"):
                row["graph_ms"] = per_call_ms(graphed(eager), args.device)
            bar.update()
            t0 = time.perf_counter()
            compiled_dec = torch.compile(dec)
            comp = lambda: compiled_dec(*a, **k)  # noqa: E731
            got = first(comp())
            row["compile_s"] = time.perf_counter() - t0
            row["compiled_max_abs_diff"] = float((got - ref).abs().max())
            row["compiled_ms"] = per_call_ms(comp, args.device); bar.update()
            if args.device.startswith("cuda"):
                try:
                    row["compiled_graph_ms"] = per_call_ms(graphed(comp), args.device)
                except Exception as err:  # report, keep the other numbers
                    row["compiled_graph_error"] = f"{type(err).__name__}: {err}"
            bar.update()
        results[m] = row
        out.write_text(json.dumps(results, indent=1))  # after each method: a timeout keeps what ran
        tqdm.write(f"{m}: {row}")
        del compiled_dec
        torch._dynamo.reset()
    bar.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
