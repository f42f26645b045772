"""``python -m lazydiff edit --image IN --mask M --prompt "..." --out OUT [--model MODEL]``"""
from __future__ import annotations

import argparse
import os
import sys

from .defaults import PIPELINE_HELP
from .schedulers import SCHEDULERS


def _check_output(path: str) -> None:
    """Fail before any model loads: an edit takes seconds, a bad --out would throw it away."""
    from PIL import Image

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--out: folder {parent!r} does not exist; create it or write elsewhere")
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise ValueError(f"--out: {path!r} needs an image file extension such as .png, .jpg or .webp")


def _open_image(path: str, flag: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"{flag}: {path!r} is not an image PIL can read (use PNG, JPEG or WebP)") from None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lazydiff", description="LazyDiffusion image editing from the command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit", help="edit one image inside a mask", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Regenerate the masked region of an image from a prompt (or a sketch); every pixel "
                                   "outside the mask stays as it was.")
    e.add_argument("--model", default="default", help=PIPELINE_HELP)
    e.add_argument("--image", required=True, help="the canvas (PNG, JPEG, ...)")
    e.add_argument("--mask", required=True, help="same size as the image; white = edit, black = keep")
    e.add_argument("--prompt", required=True, help="what to put in the masked region, e.g. 'a small green star'")
    e.add_argument("--negative-prompt", default="", help="what to steer away from")
    e.add_argument("--out", required=True, help="output image file")
    e.add_argument("--steps", type=int, default=20, help="denoising steps")
    e.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale")
    e.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler (default: the model's own, DDIM for the shipped models)")
    e.add_argument("--seed", type=int, default=0, help="noise seed")
    e.add_argument("--blend", default="feather", choices=["hard", "feather", "poisson"],
                   help="how the result is pasted into the mask")
    e.add_argument("--sketch", default=None, help="coloured strokes (same size as the image) to follow inside the mask")
    e.add_argument("--strength", type=float, default=1.0,
                   help="with --sketch: how far from the sketch the result may move, in (0, 1]")
    e.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    e.add_argument("--onnx-runtime", action="store_true",
                   help="run the model in ONNX Runtime (CPU, fp32): faster per step, but the graphs take a few "
                        "seconds to build, so it pays for a server or a demo, not for one edit")
    args = ap.parse_args(argv)

    try:
        _check_output(args.out)
        image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
        sketch = _open_image(args.sketch, "--sketch") if args.sketch else None

        import torch

        from .defaults import load_pipeline
        from .schedulers import make_scheduler

        pipe = load_pipeline(args.model, device=args.device)
        if args.scheduler:
            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
        if args.onnx_runtime:
            if pipe.device.type != "cpu":
                raise ValueError("--onnx-runtime is a CPU backend; drop it or pass --device cpu")
            pipe.enable_onnx_runtime()
        out = pipe(args.prompt, image, mask, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                   blend=args.blend, sketch=sketch, strength=args.strength)
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
    out.images[0].save(args.out)
    print(f"wrote {args.out}; " + ", ".join(f"{k} {v:.0f} ms" for k, v in out.timings.items())
          + f"; hole tokens {out.stats['hole_tokens']}/{out.stats['total_tokens']}")


if __name__ == "__main__":
    main()
