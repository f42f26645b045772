"""ShapesWorld command line.

    python -m lazydiff.shapesworld preview --out DIR [--n 16] [--size 128] [--seed 0 | --split test]
        writes DIR/scenes.png (scenes with captions) and DIR/tasks.png
        (canvas | mask over the canvas | ground truth, with kind, intent, ratio and prompt)
    python -m lazydiff.shapesworld bench [--n 2000] [--size 128]
        prints scenes/s and tasks/s on one core
"""

from __future__ import annotations

import argparse
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from .scenes import as_size, iter_scenes, render_scene
from .tasks import make_split, make_task


def _parse_size(text: str):
    """"128" -> (128, 128); "96x160" -> (96, 160) (height x width)."""
    parts = text.lower().split("x")
    return as_size(int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1])))


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType support for the default font
        return ImageFont.load_default()


def _labelled(image: np.ndarray, text: str, scale: int, font_px: int = 11, lines: int = 4):
    """Upscale an image (nearest) and put wrapped text under it."""
    from PIL import Image, ImageDraw

    tile = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    chars = max(10, int(tile.width / (font_px * 0.55)))
    wrapped = textwrap.wrap(text, chars)[:lines]
    out = Image.new("RGB", (tile.width, tile.height + lines * (font_px + 2) + 4), "white")
    out.paste(tile, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.multiline_text((2, tile.height + 2), "\n".join(wrapped), fill="black", font=_font(font_px), spacing=2)
    return out


def _sheet(tiles, columns: int, pad: int = 4):
    from PIL import Image

    rows = math.ceil(len(tiles) / columns)
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + pad) + pad), (200, 200, 200))
    for i, t in enumerate(tiles):
        sheet.paste(t, (pad + (i % columns) * (tw + pad), pad + (i // columns) * (th + pad)))
    return sheet


def _mask_overlay(canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The canvas with the hole tinted magenta and outside darkened."""
    out = canvas.astype(np.float32)
    out[~mask] *= 0.45
    out[mask] = 0.4 * out[mask] + 0.6 * np.array([255, 0, 255], np.float32)
    return out.astype(np.uint8)


def preview(out: Path, n: int, size, seed: int, split: str | None, scale: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    scenes = [render_scene(seed + i, size) for i in range(n)]
    tiles = [_labelled(s.image, f"{s.seed}: {s.caption}", scale) for s in scenes]
    _sheet(tiles, columns=min(4, n)).save(out / "scenes.png")

    seeds = list(make_split(split)[:n]) if split else [seed + i for i in range(n)]
    rows = []
    for s in seeds:
        t = make_task(s, size)
        label = f"{s}: {t.intent}/{t.kind} {t.mask_ratio:.0%} \"{t.prompt}\""
        row = [
            _labelled(t.canvas, label, scale, lines=2),
            _labelled(_mask_overlay(t.canvas, t.mask), "mask", scale, lines=2),
            _labelled(t.target, "ground truth", scale, lines=2),
        ]
        rows.extend(row)
    _sheet(rows, columns=6 if n > 1 else 3).save(out / "tasks.png")
    print(f"wrote {out / 'scenes.png'} and {out / 'tasks.png'}")


def bench(n: int, size, n_tasks: int) -> None:
    """Generation speed, by wall clock and by this process' CPU time (robust to busy machines)."""
    list(iter_scenes(0, 50, size))  # warm caches

    def report(what, count, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        print(
            f"{what}: {count / wall:.0f}/s wall, {count / cpu:.0f}/s CPU time at {size[0]}x{size[1]} "
            f"({1e3 * wall / count:.2f} ms each, {count} {what})"
        )

    report("scenes", n, lambda: [None for _ in iter_scenes(0, n, size)])
    report("tasks", n_tasks, lambda: [make_task(s, size) for s in range(n_tasks)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lazydiff.shapesworld", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preview", help="write contact sheets of scenes and edit tasks")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--size", type=_parse_size, default=(128, 128), help="128 or HxW, e.g. 96x160")
    p.add_argument("--seed", type=int, default=0, help="first scene/task seed")
    p.add_argument("--split", choices=["train", "val", "test"], default=None, help="take task seeds from a split")
    p.add_argument("--scale", type=int, default=2, help="upscaling factor of the tiles")
    b = sub.add_parser("bench", help="measure generation speed (one process, numpy only)")
    b.add_argument("--n", type=int, default=2000)
    b.add_argument("--size", type=_parse_size, default=(128, 128))
    b.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "preview":
        preview(args.out, args.n, args.size, args.seed, args.split, args.scale)
    else:
        bench(args.n, args.size, args.tasks)


if __name__ == "__main__":
    main()
