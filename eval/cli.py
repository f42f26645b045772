"""Command line: ``python -m eval {quality,gate,compare,ceiling,loss,runtime} ...`` (see ``eval/README.md``)."""
from __future__ import annotations

import argparse
import functools
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

from lazydiff.schedulers import SCHEDULERS


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _names(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# ``python -m eval runtime``'s other measurements, instead of the mask sweep: flag -> (what it measures,
# {its options: (default, help)}). Each writes to the OUT it names; eval.runtime.run_other_measurement
# parses them and refuses any other option.
RUNTIME_MODES = {
    "flop-ceiling": ("end-to-end FLOP ratio at paper shape for several transformer sizes, nothing timed",
                     {"size": (1024, "canvas side"), "steps": (20, "denoising steps per edit"),
                      "threads": (None, "torch.set_num_threads")}),
    "step-sweep": ("per-step time vs hole tokens at paper shape, decoder calls only",
                   {"width": (384, "transformer width"), "depth": (12, "decoder layers"), "size": (1024, "canvas side"),
                    "onnx-runtime": (False, "the decoder steps in ONNX Runtime"),
                    "threads": (None, "torch.set_num_threads")}),
    "levers": ("each speed lever on and off with the shipped models, interleaved (threads set per lever)",
               {"levers-repeats": (5, "paired rounds"),
                "levers-backends": (False, "only PyTorch vs ONNX Runtime, every other lever on")}),
    "vae-backends": ("the paper-shape VAE in PyTorch vs ONNX Runtime, interleaved",
                     {"repeats": (3, "timed rounds"), "encode-size": (512, "side of the encoded canvas, pixels"),
                      "crop-latent": (52, "side of the decoded crop's latent; 52 is a 10% hole's crop at 1024²"),
                      "threads": (None, "torch.set_num_threads")}),
    "replot": ("redraw a finished mask sweep's plots in its folder OUT with the current code, from its runtime.csv "
               "and fit.json (report.md stays as written); nothing timed", {}),
}


def runtime_mode_options(mode: str) -> str:
    """``--size=1024 --steps=20 --threads=N``: a mode's options with their defaults there (N: none), or
    ``no options``."""
    return " ".join(f"--{name}" + ("" if default is False else f"={'N' if default is None else default}")
                    for name, (default, _) in RUNTIME_MODES[mode][1].items()) or "no options"


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking lines inside ``--option-names`` and ``regenerate-image``."""

    def _split_lines(self, text, width):
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description="LazyDiffusion evaluation workbench",
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    q = add("quality", help="run a suite of edits with each method and score them",
                       description="Run every edit of a suite with each method (fixed seeds), keep every output and "
                                   "a per-sample record, then report FID/KID, local FID, CLIP score, latency and "
                                   "(ShapesWorld) prompt accuracy, background error and the unmasked-pixel check. "
                                   "Rerunning skips finished edits; `accelerate launch -m eval quality ...` shards.")
    q.add_argument("--suite", required=True, help="suite YAML (e.g. data/suites/shapes.yaml)")
    q.add_argument("--methods", type=_names, default=None,
                   help="comma-separated: lazy, regenerate-image, regenerate-crop, tiny-* (tests), a pipeline folder, "
                        "or diffusers-inpaint:PATH (default: the suite's methods)")
    q.add_argument("--out", required=True, help="output folder (reused to resume)")
    q.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N edits of the suite (FID needs N > its feature dimension: at least 129 "
                        "with the shipped ShapesCLIP, 2049 with Inception; the report warns below that)")
    q.add_argument("--steps", type=int, default=None, help="override the suite's denoising steps")
    q.add_argument("--guidance", type=float, default=None, help="override the suite's guidance scale")
    q.add_argument("--scheduler", default=None, choices=list(SCHEDULERS),
                   help="sampler for every method (default: the suite's, else each method's own)")
    q.add_argument("--device", default=None, help="cpu | cuda (default: accelerate's device)")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="(default fp32)")
    q.add_argument("--shapes-clip", default=None, help="ShapesCLIP folder (default data/models/shapes-clip or "
                                                       "$LAZYDIFF_SHAPES_CLIP)")
    q.add_argument("--inception-weights", default=None,
                   help="Inception-v3 FID weights file for fid_backbone: inception ($LAZYDIFF_INCEPTION_WEIGHTS)")
    q.add_argument("--clip-model", default=None, help="open_clip architecture for clip_backbone: openclip")
    q.add_argument("--clip-weights", default=None, help="open_clip weights file or folder ($LAZYDIFF_CLIP_WEIGHTS)")
    q.add_argument("--batch-size", type=int, default=32, help="batch size of metric feature extraction (default 32)")
    q.add_argument("--overwrite", action="store_true", help="regenerate every edit even if records exist")
    q.add_argument("--metrics-only", action="store_true", help="skip generation; score what is on disk")
    q.add_argument("--set", dest="pipeline_set", action="append", default=[], metavar="OPTION=VALUE",
                   help="set a pipeline option on every method that has it (repeatable), e.g. "
                        "reset_outside_hole=false (RegenerateImage/Crop as sampled before it existed) or decode_margin=8 "
                        "(default: none, each pipeline's own)")

    g = add("gate", help="the shipped ShapesWorld models' quality gate, from a quality run",
                       description="Read <run>/summary.csv of `python -m eval quality --suite data/suites/shapes.yaml` "
                                   "and check the targets (prompt accuracy >= 60%, within 10 points of "
                                   "RegenerateImage, background MAE <= 1.25x). Exit code 1 if a target is missed.")
    g.add_argument("run", help="output folder of a quality run")

    k = add("compare", help="compare quality runs of the same suite (a settings sweep, two models)",
                       description="Tables and plots of several `quality` runs of the same edits, with each run's "
                                   "difference from the first and its 95% interval, paired edit by edit.")
    k.add_argument("runs", nargs="+", help="output folders of quality runs; the first is the reference")
    k.add_argument("--out", required=True, help="output folder (compare.md, compare.csv, compare.png)")
    k.add_argument("--labels", type=_names, default=None, help="comma-separated run names (default: the settings "
                                                                 "that differ, e.g. 'guidance 7.5')")

    c = add("ceiling", help="ShapesCLIP's zero-shot accuracy on the ground truth, real and autoencoded",
                       description="The prompt-accuracy ceiling of a ShapesWorld suite: ShapesCLIP on the object edits' "
                                   "ground truth (hole crops, as `quality` scores them), as rendered and after the "
                                   "autoencoder, by object size and mask kind, with the shape confusion matrix.")
    c.add_argument("--suite", required=True, help="ShapesWorld suite YAML (e.g. data/suites/shapes.yaml)")
    c.add_argument("--out", required=True, help="output folder (ceiling.md, ceiling.csv, shape_confusion.png)")
    c.add_argument("--shapes-clip", default=None, help="ShapesCLIP folder (default data/models/shapes-clip)")
    c.add_argument("--autoencoder", default=None, help="autoencoder folder (default data/models/autoencoder)")
    c.add_argument("--limit", type=int, default=None, help="only the first N edits of the suite")

    lo = add("loss", help="held-out denoising error in the hole, on object and background tokens",
                        description="Each method's noise-prediction error on the hole tokens of a ShapesWorld suite's "
                                    "edits at fixed timesteps (the training loss on unseen edits, with each pipeline's "
                                    "own denoiser), split into tokens of the prompted object and background tokens, "
                                    "by mask size and kind; ratios to --reference with paired-bootstrap intervals. "
                                    "No sampling and no classifier: it tracks training progress where prompt accuracy "
                                    "is too noisy.")
    lo.add_argument("--suite", required=True, help="ShapesWorld suite YAML (e.g. data/suites/shapes-val.yaml)")
    lo.add_argument("--out", required=True, help="output folder (report.md, summary.csv, per_edit.csv, loss_ratio.png)")
    lo.add_argument("--methods", type=_names, default=["lazy", "regenerate-image"],
                    help="comma-separated: lazy, regenerate-image, tiny-* (tests) or pipeline folders "
                         "(default lazy,regenerate-image)")
    lo.add_argument("--reference", default="regenerate-image",
                    help="the method the others are divided by (default regenerate-image)")
    lo.add_argument("--timesteps", type=lambda s: [int(v) for v in _floats(s)], default=[200, 400, 600],
                    help="comma-separated diffusion timesteps in [0, 999] (default 200,400,600)")
    lo.add_argument("--limit", type=int, default=None, help="only the first N edits of the suite")
    lo.add_argument("--seed", type=int, default=0, help="seed of the noise, the same for every method (default 0)")
    lo.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")

    r = add("runtime", help="latency and FLOPs vs mask ratio against the full-canvas baselines",
                       description="End-to-end and per-step latency of LazyDiffusion vs RegenerateImage (and "
                                   "RegenerateCrop): warm-up, interleaved repeats, medians and IQR, per-stage "
                                   "breakdown, FLOPs beside times.")
    r.add_argument("--mask-ratios", type=_floats, default=[0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
                   help="comma-separated fractions of the canvas to mask (default 0.01,0.05,0.1,0.2,0.4,0.6,0.8,1)")
    r.add_argument("--steps", type=int, default=20, help="denoising steps per edit (default 20)")
    r.add_argument("--out", required=True, help="output folder (report.md, runtime.csv, plots)")
    r.add_argument("--preset", default="default",
                   help="default (the shipped 128px models; the default) | paper-shape (1024px, SD-VAE shape, random "
                        "weights) | tiny")
    r.add_argument("--methods", type=_names, default=["lazy", "regenerate-image", "regenerate-crop"],
                   help="comma-separated (default lazy,regenerate-image,regenerate-crop)")
    r.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32; bf16 pays on GPUs, not on "
                                                   "CPUs without native bf16)")
    r.add_argument("--repeats", type=int, default=3, help="timed rounds per mask ratio (default 3)")
    r.add_argument("--warmup", type=int, default=1, help="untimed runs per method and ratio (default 1)")
    r.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    r.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    r.add_argument("--width", type=int, default=384,
                   help="paper-shape: transformer width (default 384; PixArt-XL/2: 1152)")
    r.add_argument("--depth", type=int, default=12, help="paper-shape: decoder layers (default 12; PixArt-XL/2: 28)")
    r.add_argument("--heads", type=int, default=None, help="paper-shape: attention heads (default width/64, or /72)")
    r.add_argument("--encoder-depth", type=int, default=None, help="paper-shape: context-encoder layers (default --depth)")
    r.add_argument("--size", type=int, default=None, help="canvas side (default: 128, 1024 paper-shape, 64 tiny)")
    r.add_argument("--guidance", type=float, default=4.5, help="guidance scale (default 4.5)")
    r.add_argument("--seed", type=int, default=0, help="seed of the edits' noise (default 0)")
    r.add_argument("--keep-caches", action="store_true", help="keep text/canvas caches between runs")
    r.add_argument("--crop-resolution", type=int, default=None, help="RegenerateCrop: crop side after resizing")
    r.add_argument("--followup", default="none", choices=["none", "same-mask", "new-mask"],
                   help="also time a follow-up edit on each result (canvas-latent / context caches at work; "
                        "default none)")
    r.add_argument("--canvas-cache", default=None, choices=["off", "exact", "incremental"],
                   help="override every pipeline's canvas-latent cache mode")
    r.add_argument("--cuda-graphs", action="store_true",
                   help="replay every method's denoiser from a CUDA graph (GPU only; for launch-bound steps)")
    r.add_argument("--onnx-runtime", nargs="?", const="all", default=None, choices=["all", "vae", "decoder"],
                   help="run every method's denoising steps, context encoder, VAE and text encoder (all, the default), "
                        "the VAE only, or the steps only in ONNX Runtime (CPU, fp32); faster for both methods at every "
                        "size measured, paper shape included (docs/BENCHMARKS.md sections 3 and 7)")
    r.add_argument("--fit-max-ratio", type=float, default=0.4,
                   help="largest mask ratio in the per-step linear fit (default 0.4)")
    o = r.add_argument_group(
        "other measurements, instead of the mask sweep",
        "Each writes to its OUT (--out is not used) and takes only the options listed with it, shown with their "
        "defaults in that measurement (--threads=N: torch's own unless given); any other option is refused.")
    p.runtime_parser = r   # for eval.runtime.parse_other_measurement's messages
    sweep_flags = {flag for a in r._actions for flag in a.option_strings}
    p.runtime_mode_only = mode_only = {}   # option -> the one mode that takes it
    for mode, (what, options) in RUNTIME_MODES.items():
        o.add_argument("--" + mode, metavar="OUT", help=f"{what}; takes {runtime_mode_options(mode)}")
        for name, (default, text) in options.items():   # the options only this mode has
            if "--" + name not in sweep_flags:
                mode_only[name] = mode
                kind = {"action": "store_true"} if default is False else {"type": type(default), "metavar": "N"}
                o.add_argument("--" + name, default=None, **kind, help=(
                    f"with --{mode}: {text}" + ("" if default is False else f" (default {default})")).replace("%", "%%"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .methods import MethodError
    from .metrics import MetricWeightsError
    from .suites import SuiteError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["runtime"]:
        from .runtime import run_other_measurement

        rc = run_other_measurement(argv[1:])  # --flop-ceiling OUT and the like: their own options, no --out
        if rc is not None:
            return rc
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "runtime":   # the mask sweep: an option of another measurement is a mistake
        for mode in RUNTIME_MODES:     # named in full, run_other_measurement has run it
            if getattr(args, mode.replace("-", "_")) is not None:
                print(f"error: give --{mode} in full: abbreviated, it is not recognised as a measurement of its "
                      f"own", file=sys.stderr)
                return 2
        for name, mode in parser.runtime_mode_only.items():
            if getattr(args, name.replace("-", "_")) not in (None, False):
                print(f"error: --{name} is an option of --{mode} OUT, which is not given; the mask sweep does not "
                      f"take it", file=sys.stderr)
                return 2
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():  # before any work, and nothing touched
        print(f"error: --out {out} is an existing file, not a folder; give a new folder (or an earlier run's folder "
              "to resume it)", file=sys.stderr)
        return 2
    try:
        if args.command == "gate":
            from .gate import main as gate_main

            return gate_main(args.run)
        if args.command == "compare":
            from .compare import compare

            md, _ = compare(args.runs, args.out, args.labels)
            print(md)
            print(f"\nwrote {args.out}/compare.md, compare.csv, compare.png")
            return 0
        if args.command == "loss":
            from .denoising_loss import main as loss_main

            return loss_main(args)
        if args.command == "ceiling":
            from .ceiling import measure, write_report

            report = write_report(measure(args.suite, args.shapes_clip, args.autoencoder, args.limit), Path(args.out),
                                  args.suite, args.limit)
            print(report.read_text())
            return 0
        if args.command == "quality":
            from .quality import QualityOptions, parse_pipeline_set, print_summary, run_quality

            opts = QualityOptions(suite=args.suite, out=args.out, methods=args.methods, limit=args.limit,
                                  steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                  device=args.device, dtype=args.dtype, shapes_clip=args.shapes_clip,
                                  inception_weights=args.inception_weights,
                                  clip_model=args.clip_model, clip_weights=args.clip_weights,
                                  batch_size=args.batch_size, overwrite=args.overwrite, metrics_only=args.metrics_only,
                                  pipeline_set=parse_pipeline_set(args.pipeline_set))
            if opts.limit is not None and opts.limit < 1:
                raise SuiteError("--limit must be >= 1")
            res = run_quality(opts)
            if res.summary is not None:
                print_summary(res.summary)
                for w in res.warnings:
                    print(f"\nWARNING: {w}")
                print(f"\nwrote {res.out}/summary.csv, per_sample.csv, report.md")
        else:
            from .runtime import RuntimeOptions, print_table, run_runtime

            opts = RuntimeOptions(out=args.out, mask_ratios=args.mask_ratios, steps=args.steps, preset=args.preset,
                                  methods=args.methods, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup,
                                  device=args.device, threads=args.threads, width=args.width, depth=args.depth,
                                  heads=args.heads, encoder_depth=args.encoder_depth, size=args.size,
                                  guidance=args.guidance, seed=args.seed, keep_caches=args.keep_caches,
                                  crop_resolution=args.crop_resolution, fit_max_ratio=args.fit_max_ratio,
                                  followup=args.followup, canvas_cache=args.canvas_cache,
                                  cuda_graphs=args.cuda_graphs, onnx_runtime=args.onnx_runtime)
            summary, fit = run_runtime(opts)
            print_table(summary)
            if fit.get("slope_ms_per_token") is not None:
                print(f"\nper-step fit (lazy, ratio <= {fit['max_ratio']:g}): {fit['intercept_ms']:.4g} ms + "
                      f"{fit['slope_ms_per_token'] * 1e3:.4g} us x |H|, R^2 = {fit['r2']:.4f}")
            print(f"wrote {opts.out}/runtime.csv, report.md and plots")
    except (SuiteError, MethodError, MetricWeightsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:   # bad input found while running (e.g. a resumed run with other settings)
        import os

        if os.environ.get("LAZYDIFF_EVAL_DEBUG"):
            raise
        if True:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0
