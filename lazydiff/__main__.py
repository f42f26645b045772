"""``python -m lazydiff edit --model DIR --image IN --mask M --prompt "..." --out OUT``"""
from __future__ import annotations

import argparse
import sys

from .schedulers import SCHEDULERS


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lazydiff")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit", help="edit one image inside a mask")
    e.add_argument("--model", default="default", help="pipeline folder (diffusers layout) or 'default' (data/models)")
    e.add_argument("--image", required=True)
    e.add_argument("--mask", required=True, help="white = edit")
    e.add_argument("--prompt", required=True)
    e.add_argument("--negative-prompt", default="")
    e.add_argument("--out", required=True)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=4.5)
    e.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler (default: the model's own, DDIM for the shipped models)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--blend", default="feather", choices=["hard", "feather", "poisson"])
    e.add_argument("--sketch", default=None)
    e.add_argument("--strength", type=float, default=1.0)
    args = ap.parse_args(argv)

    import PIL.Image
    import torch

    from . import LazyDiffusionPipeline, load_default
    from .schedulers import make_scheduler

    try:
        image, mask = PIL.Image.open(args.image), PIL.Image.open(args.mask)
        sketch = PIL.Image.open(args.sketch) if args.sketch else None
        pipe = load_default("lazy") if args.model == "default" else LazyDiffusionPipeline.from_pretrained(args.model)
        if args.scheduler:
            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
        out = pipe(args.prompt, image, mask, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                   blend=args.blend, sketch=sketch, strength=args.strength)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    out.images[0].save(args.out)
    print(f"wrote {args.out}; " + ", ".join(f"{k} {v:.0f} ms" for k, v in out.timings.items())
          + f"; hole tokens {out.stats['hole_tokens']}/{out.stats['total_tokens']}")


if __name__ == "__main__":
    main()
