"""Do CUDA-graph replays give the same edits as eager runs? One seeded edit per method and mask size,
with ``pipe.cuda_graphs`` off and on, on the runtime benchmark's paper-shape pipelines (random weights).
With graphs on, the edit runs three times: first (the graph is recorded), after an edit of another
canvas with another prompt and seed on the same mask (which replays that graph from the cache with
its own constants), and then again (replayed from the cache at every step). Each is compared with
the eager edit. Prints the largest pixel difference of each; exits 1 if any exceeds --tolerance
(grey levels) or if the cache was not hit.

    python scripts/check_cuda_graphs.py --width 1152 --depth 28 --out runs/check_cuda_graphs.json

Needs a CUDA device (graphs exist only there).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.runtime import canvas_image, centred_mask, paper_shape_pipelines  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1152)
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--ratios", default="0.01,0.1,0.4")
    ap.add_argument("--methods", default="lazy,regenerate-image")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tolerance", type=int, default=1, help="largest allowed pixel difference (0-255)")
    ap.add_argument("--out", default="runs/check_cuda_graphs.json")
    ap.add_argument("--cpu-stand-in", action="store_true",
                    help="run on the CPU in float32 with lazydiff.testing.FakeCUDA as the CUDA runtime: checks "
                         "this script and the graph cache's logic, not a GPU (the tests use it)")
    args = ap.parse_args(argv)
    if not args.cpu_stand_in and not torch.cuda.is_available():
        print("check_cuda_graphs: no CUDA device here; CUDA graphs exist only on a GPU. Run it on one.",
              file=sys.stderr)
        return 2
    methods = args.methods.split(",")
    pipes, _ = paper_shape_pipelines(methods, size=args.size, width=args.width, depth=args.depth)
    image = Image.fromarray(canvas_image(args.size))
    other = Image.fromarray(np.ascontiguousarray(canvas_image(args.size)[::-1, ::-1]))
    rows, worst, failed = [], 0, []
    jobs = [(m, float(r)) for m in methods for r in args.ratios.split(",")]
    for m, ratio in tqdm(jobs, desc="graphs vs eager", unit="method x mask"):
        pipe = pipes[m]
        if args.cpu_stand_in:
            from lazydiff.testing import FakeCUDA, use_fake_cuda_graphs
            use_fake_cuda_graphs(pipe, FakeCUDA())
        else:
            pipe.to("cuda")
            pipe.to(dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        mask = Image.fromarray(centred_mask(args.size, ratio))

        def edit(img, prompt, seed):
            out = pipe(prompt, img, mask, num_inference_steps=args.steps, guidance_scale=4.5,
                       generator=torch.Generator(device="cpu").manual_seed(seed))
            return np.asarray(out.images[0], dtype=np.int16)

        pipe.cuda_graphs = False
        pipe.clear_caches()
        eager = edit(image, "a red star", 0)
        pipe.cuda_graphs = True
        pipe.clear_caches()
        recorded = edit(image, "a red star", 0)      # records the graph (steps 1-2 run the decoder's code)
        edit(other, "a blue star", 7)                # replays it with another canvas, prompt and seed
        carried = edit(image, "a red star", 0)       # replays it again, with this edit's constants
        cache = pipe.__dict__["_graph_cache"]
        row = {"method": m, "mask_ratio": ratio, "cache_hits": cache.hits, "cache_misses": cache.misses}
        for name, out in (("recorded", recorded), ("carried_over", carried)):
            diff = int(np.abs(eager - out).max())
            worst = max(worst, diff)
            row[f"max_pixel_diff_{name}"] = diff
            row[f"pixels_differing_{name}"] = float((eager != out).any(-1).mean())
        if cache.hits < 1:
            failed.append(f"{m} @ {ratio:g}: no edit replayed a cached graph (hits {cache.hits}, misses {cache.misses})")
        pipe.cuda_graphs = False
        pipe.clear_caches()
        rows.append(row)
        tqdm.write(str(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tolerance": args.tolerance, "rows": rows}, indent=1))
    ok = worst <= args.tolerance and not failed
    for line in failed:
        print("FAIL:", line)
    print(f"largest difference {worst} grey levels (tolerance {args.tolerance}): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
