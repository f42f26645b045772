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


def _check_device(device):
    """A one-line error for a device this machine cannot use (torch's own is a traceback)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device; use cpu or cuda (cuda:N for another GPU)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu (or leave --device out)")


def _save(img, path: str) -> str:
    """Save the edit; formats without transparency (JPEG) get an RGB copy, with a note, instead of failing
    after the whole edit has run."""
    from PIL import Image

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    note = ""
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        note = f" (its {img.mode} transparency dropped: JPEG has none; write .png to keep it)"
        img = img.convert("RGB")
    img.save(path)
    return note


def _open_image(path: str, flag: str):
    from PIL import UnidentifiedImageError

    from .manifest import open_image

    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    try:
        return open_image(path)   # upright by its EXIF orientation, as viewers show it
    except UnidentifiedImageError:
        raise ValueError(f"{flag}: {path!r} is not an image PIL can read (use PNG, JPEG or WebP)") from None


def _to_working_size(image, mask, sketch, max_side: int):
    """-> (image, mask, sketch, full): the edit's inputs at the working size, and ``full(result)`` giving the
    full-resolution result (None when the canvas is small enough to edit as it is)."""
    import numpy as np
    from PIL import Image

    from .pipelines.editing import prepare_mask, to_supported_mode
    from .pipelines.working_size import downscale_edit, paste_back, working_size

    image = to_supported_mode(image)
    if working_size(image.height, image.width, max_side) == (image.height, image.width):
        return image, mask, sketch, None
    arr = np.asarray(image)
    hole = prepare_mask(mask, arr.shape[:2], {})   # the library's reading of the mask (threshold, alpha)
    strokes = None
    if sketch is not None:
        strokes = np.asarray(to_supported_mode(sketch).convert("RGBA"))
        if strokes.shape[:2] != arr.shape[:2]:
            raise ValueError(f"--sketch is {sketch.width}x{sketch.height} but --image is {image.width}x{image.height}; "
                             "draw it on the image size")
    small, small_hole, small_strokes, scale = downscale_edit(arr, hole, strokes, max_side)

    def full(result):
        return Image.fromarray(paste_back(arr, hole, np.asarray(result.convert(image.mode)), scale), image.mode)

    return (Image.fromarray(small, image.mode), Image.fromarray(small_hole.astype(np.uint8) * 255),
            Image.fromarray(small_strokes, "RGBA") if small_strokes is not None else None, full)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults appended to the help, except where there is none or the help already states it."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lazydiff", description="LazyDiffusion image editing from the command line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("edit", help="edit one image inside a mask", formatter_class=_Help,
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
    e.add_argument("--num-images", type=int, default=1,
                   help="variations in one batch (the canvas is encoded once); with N > 1, OUT's name gets -0 ... "
                        "-(N-1), and image i is the one --seed SEED+i gives alone")
    e.add_argument("--blend", default="feather", choices=["hard", "feather", "poisson"],
                   help="how the result is pasted into the mask")
    e.add_argument("--sketch", default=None, help="coloured strokes (same size as the image) to follow inside the mask")
    e.add_argument("--strength", type=float, default=None,
                   help="with --sketch: how far from the sketch the result may move, in (0, 1] (default 1.0)")
    e.add_argument("--max-side", type=int, default=None,
                   help="edit canvases larger than this many pixels on a side downscaled, and paste only the masked "
                        "region back at full resolution (default: 4x the model's training side, 512 for the shipped "
                        "models; 0: edit at full size)")
    e.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available, else cpu)")
    e.add_argument("--onnx-runtime", action="store_true",
                   help="run the model in ONNX Runtime (CPU, fp32): faster per step, but the graphs take a few "
                        "seconds to build, so it pays for a server or a demo, not for one edit")
    e.add_argument("--cuda-graphs", action="store_true",
                   help="replay the denoising steps from a CUDA graph (CUDA only; same pixels as eager steps, "
                        "fewer kernel launches: it pays from the first edit for small holes)")
    args = ap.parse_args(argv)

    try:
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        if args.max_side is not None and (args.max_side < 0 or 0 < args.max_side < 32):
            raise ValueError(f"--max-side must be 0 (edit at full size) or at least 32 pixels, got {args.max_side}")
        _check_output(args.out)
        stem, ext = os.path.splitext(args.out)
        outs = [args.out] if args.num_images == 1 else [f"{stem}-{i}{ext}" for i in range(args.num_images)]
        for path in outs:
            if os.path.exists(path) and os.path.samefile(path, args.image):
                raise ValueError(f"--out {path!r} is the input canvas: writing there would replace your original; "
                                 "write the edit to another file")
        if args.strength is not None and not args.sketch:
            raise ValueError("--strength applies to sketch guidance only: add --sketch STROKES.png, or drop --strength")
        _check_device(args.device)
        if args.cuda_graphs:
            import torch

            if not (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
                raise ValueError("--cuda-graphs needs a CUDA device: drop it, or pass --device cuda on a machine with a GPU")
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
        pipe.cuda_graphs = args.cuda_graphs
        from .pipelines.working_size import default_max_side

        max_side = default_max_side(pipe) if args.max_side is None else args.max_side
        image, mask, sketch, full = _to_working_size(image, mask, sketch, max_side)
        out = pipe(args.prompt, image, mask, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                   generator=[torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
                   if args.num_images > 1 else torch.Generator().manual_seed(args.seed),
                   blend=args.blend, sketch=sketch, strength=1.0 if args.strength is None else args.strength)
        images = out.images if full is None else [full(im) for im in out.images]
        notes = [_save(img, path) for img, path in zip(images, outs)]
    except (ValueError, OSError, ImportError) as err:
        sys.exit(f"error: {err}")
    scaled = "" if full is None else f" (edited at {image.width}x{image.height}, the hole pasted back at full size)"
    print(f"wrote {', '.join(outs)}{notes[0]}{scaled}; " + ", ".join(f"{k} {v:.0f} ms" for k, v in out.timings.items())
          + f"; hole tokens {out.stats['hole_tokens']}/{out.stats['total_tokens']}")


if __name__ == "__main__":
    main()
