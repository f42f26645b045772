"""Do CUDA-graph replays give the same edits as eager runs? One seeded edit per method and mask size,
with ``pipe.cuda_graphs`` off and on, on the runtime benchmark's paper-shape pipelines (random weights).
Prints the largest pixel difference of each pair; exits 1 if any exceeds --tolerance (grey levels).

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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_cuda_graphs: no CUDA device here; CUDA graphs exist only on a GPU. Run it on one.",
              file=sys.stderr)
        return 2
    methods = args.methods.split(",")
    pipes, _ = paper_shape_pipelines(methods, size=args.size, width=args.width, depth=args.depth)
    image = Image.fromarray(canvas_image(args.size))
    rows, worst = [], 0
    jobs = [(m, float(r)) for m in methods for r in args.ratios.split(",")]
    for m, ratio in tqdm(jobs, desc="graphs vs eager", unit="edit pair"):
        pipe = pipes[m].to("cuda")
        pipe.to(dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        mask = Image.fromarray(centred_mask(args.size, ratio))
        outs = []
        for graphs in (False, True):
            pipe.cuda_graphs = graphs
            if hasattr(pipe, "clear_caches"):
                pipe.clear_caches()
            out = pipe("a red star", image, mask, num_inference_steps=args.steps, guidance_scale=4.5,
                       generator=torch.Generator(device="cpu").manual_seed(0))
            outs.append(np.asarray(out.images[0], dtype=np.int16))
        diff = int(np.abs(outs[0] - outs[1]).max())
        worst = max(worst, diff)
        rows.append({"method": m, "mask_ratio": ratio, "max_pixel_diff": diff,
                     "pixels_differing": float((outs[0] != outs[1]).any(-1).mean())})
        tqdm.write(str(rows[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tolerance": args.tolerance, "rows": rows}, indent=1))
    print(f"largest difference {worst} grey levels (tolerance {args.tolerance}): "
          f"{'OK' if worst <= args.tolerance else 'FAIL'}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
