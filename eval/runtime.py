"""``python -m eval runtime``: end-to-end edit latency and per-step denoiser latency of LazyDiffusion
vs RegenerateImage (and RegenerateCrop) on the same backbone, dtype, device and threads.

Protocol: for each mask ratio, ``--warmup`` untimed runs per method, then ``--repeats`` rounds of
interleaved runs (lazy, full, crop, lazy, full, crop, ...); medians and interquartile ranges.
Each run is a fresh edit: the pipelines' caches (text embeddings, canvas latents, context tokens:
``clear_caches()``) are emptied before every run unless ``--keep-caches``, so text encoding, VAE
encoding, the context encoder, every step, the decode and the blend are all counted (from the
pipelines' ``out.timings``).

Follow-up edits (``followup``; ``python -m eval.runtime --followup same-mask ...``), as an editor makes
them on its previous output:

* ``same-mask``: every round, each method makes the fresh edit (caches emptied, recorded as
  ``<method>``) and then, timed too, a follow-up edit of that result with the same mask and another
  seed (recorded as ``followup/<method>``): a re-roll, or a new prompt for the same region. The
  masked canvas is unchanged, so the canvas-latent cache hits (no VAE encode) for every method, and
  the lazy pipeline's context cache hits; the prompt embedding is cached. Speed-ups of
  ``followup/*`` rows are against ``followup/regenerate-image``. With ``cuda_graphs`` the follow-up
  replays, from its first step, the graph the fresh edit recorded (graphs are kept across edits;
  ``clear_caches()`` drops them, so every fresh edit records its own).
* ``new-mask``: the caches are emptied and an untimed 1-step priming edit touches a 1% square at
  (0.25, 0.25); the timed edit (recorded as ``<method>``) then edits the primed result with the
  centred mask, so the VAE re-encodes crops around both regions (``canvas_cache="incremental"``)
  or, when those would cover more than half the canvas, the whole canvas. Masks are centred rectangles (the canvas' aspect) of the requested
area. FLOPs of each run are counted from the shapes each component saw (:mod:`eval.flops`).

Presets:

* ``default``: the shipped ShapesWorld models (``lazydiff.load_default``), 128x128 canvas.
* ``paper-shape``: the paper's geometry with random weights (timing needs no trained weights):
  1024x1024 canvas, SD-VAE architecture (AutoencoderKL 128/256/512/512, 4 latent channels, 8x
  down), 64x64 = 4,096 tokens of patch 2, encoder and decoders with PixArt-XL/2's layout (adaLN-
  single DiT blocks, 4096-d T5-XXL-sized captions padded to 120 tokens) scaled to ``--width`` x
  ``--depth`` (default 384 x 12 for a CPU; 1152 x 28 is PixArt-XL/2). The text encoder is a
  1-layer random T5 with 4096-d outputs: its time is counted but is far below T5-XXL's.
* ``tiny``: the random test pipelines of :mod:`lazydiff.testing` (64x64), for tests.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lazydiff.pipelines.editing import CANVAS_CACHE_MODES, EditPipelineMixin

from .flops import CallRecorder
from .suites import atomic_write_text

PRESETS = ("default", "paper-shape", "tiny")
METHODS = ("lazy", "regenerate-image", "regenerate-crop")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = ("text", "vae_encode", "context_encoder", "denoise", "vae_decode", "blend")
FOLLOWUPS = ("none", "same-mask", "new-mask")
PROMPT = "a small red star"


@dataclass
class RuntimeOptions:
    out: str
    mask_ratios: List[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    steps: int = 20
    preset: str = "default"
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    dtype: str = "fp32"
    repeats: int = 3
    warmup: int = 1
    device: Optional[str] = None
    threads: Optional[int] = None
    width: int = 384
    depth: int = 12
    heads: Optional[int] = None
    encoder_depth: Optional[int] = None
    size: Optional[int] = None
    guidance: float = 4.5
    seed: int = 0
    keep_caches: bool = False
    crop_resolution: Optional[int] = None
    fit_max_ratio: float = 0.4
    prompt: str = PROMPT
    followup: str = "none"
    canvas_cache: Optional[str] = None   # override every pipeline's canvas_cache ("off" | "exact" | "incremental")
    cuda_graphs: bool = False            # every pipeline replays its denoiser from a CUDA graph (GPU only)
    # ONNX Runtime for every pipeline alike (CPU, fp32): "all" (every part of EditPipelineMixin.ONNX_PARTS;
    # True means the same), "vae" (the VAE only), "decoder" (the denoising steps only)
    onnx_runtime: Union[bool, str, None] = None

    @property
    def onnx_parts(self) -> Tuple[str, ...]:
        """The parts ``enable_onnx_runtime`` gets; () when off."""
        v = self.onnx_runtime
        if v in (None, False, "off", ""):
            return ()
        every = EditPipelineMixin.ONNX_PARTS
        return {True: every, "all": every, "vae": ("vae",), "decoder": ("decoder",)}.get(v, (str(v),))


class RuntimeError_(ValueError):
    pass


# ----------------------------------------------------------------------------- presets
def _paper_text_encoder(caption_channels: int, max_length: int, seed: int):
    """A tiny random T5 encoder with ``caption_channels``-wide outputs and a tokenizer that pads to
    ``max_length`` tokens (PixArt always attends over 120 T5 tokens)."""
    from transformers import BertTokenizer, T5Config, T5EncoderModel

    from lazydiff.testing import tiny_tokenizer

    base = tiny_tokenizer(max_length=max_length)

    class PaddedTokenizer(BertTokenizer):
        def __call__(self, *args, **kwargs):
            if kwargs.get("return_tensors") is not None:   # the model input (not the length check)
                kwargs.setdefault("padding", "max_length")
            return super().__call__(*args, **kwargs)

    import tempfile

    vocab = base.get_vocab()
    vocab_file = os.path.join(tempfile.mkdtemp(prefix="lazydiff-paper-tok-"), "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    tok = PaddedTokenizer(vocab_file, model_max_length=max_length)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=caption_channels, d_kv=32, d_ff=256, num_layers=1, num_heads=2,
                   dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(cfg).eval(), tok


def paper_shape_vae(size: int = 1024):
    """SD-VAE's architecture (AutoencoderKL 128/256/512/512, 8x down, 4 channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=size,
                         scaling_factor=0.18215).eval()


def paper_shape_decoder_config(size: int = 1024, width: int = 384, depth: int = 12,
                               heads: Optional[int] = None) -> Dict[str, Any]:
    """The keyword arguments both paper-shape decoders share (PixArt's layout at ``width`` x ``depth``):
    heads of 72 (PixArt-XL/2) where the width allows, else 64; 4096-d captions (T5-XXL)."""
    if size % 16:
        raise RuntimeError_(f"--size must be a multiple of 16 (VAE 8x, patch 2), got {size}")
    head_dim = 72 if width % 72 == 0 else 64
    heads = heads or max(1, width // head_dim)
    if width % heads:
        raise RuntimeError_(f"--width {width} is not divisible by --heads {heads}")
    return dict(in_channels=4, patch_size=2, num_layers=depth, num_attention_heads=heads,
                attention_head_dim=width // heads, caption_channels=4096, sample_size=size // 8)


def paper_shape_pipelines(methods: Sequence[str], size: int = 1024, width: int = 384, depth: int = 12,
                          heads: Optional[int] = None, encoder_depth: Optional[int] = None, seed: int = 0):
    """Random-weight pipelines with the paper's geometry; shared VAE and text encoder."""
    from diffusers import DDIMScheduler

    from lazydiff.models import ContextEncoder, FullCanvasDecoder, LazyDecoder
    from lazydiff.defaults import default_scheduler
    from lazydiff.pipelines import LazyDiffusionPipeline, RegenerateCropPipeline, RegenerateImagePipeline

    common = paper_shape_decoder_config(size, width, depth, heads)
    heads, head_dim, caption, latent = (common[k] for k in ("num_attention_heads", "attention_head_dim",
                                                             "caption_channels", "sample_size"))
    torch.manual_seed(seed)
    vae = paper_shape_vae(size)
    text, tok = _paper_text_encoder(caption, 120, seed)
    sched = default_scheduler()
    pipes = {}
    full = None
    if "regenerate-image" in methods or "regenerate-crop" in methods:
        full = FullCanvasDecoder(**common).eval()
        with torch.no_grad():
            full.trunk.proj_out.weight.normal_(0, 0.02)
    for m in methods:
        if m == "lazy":
            enc = ContextEncoder(latent_channels=4, patch_size=2, num_layers=encoder_depth or depth,
                                 num_attention_heads=heads, attention_head_dim=head_dim, context_dim=width,
                                 sample_size=latent).eval()
            dec = LazyDecoder(context_dim=width, **common).eval()
            with torch.no_grad():
                dec.trunk.proj_out.weight.normal_(0, 0.02)
                dec.proj_in.weight.normal_(0, 0.02)
            pipes[m] = LazyDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, context_encoder=enc,
                                             decoder=dec, scheduler=DDIMScheduler.from_config(sched.config))
        else:
            cls = RegenerateImagePipeline if m == "regenerate-image" else RegenerateCropPipeline
            pipes[m] = cls(vae=vae, text_encoder=text, tokenizer=tok, decoder=full,
                           scheduler=DDIMScheduler.from_config(sched.config))
    info = {"canvas": f"{size}x{size}", "vae": "SD-VAE architecture (AutoencoderKL 128/256/512/512, 8x down, 4 ch), random",
            "tokens": f"{(latent // 2) ** 2} ({latent // 2}x{latent // 2}, patch 2)",
            "decoder": f"PixArt-style DiT {depth} layers x {width} wide, {heads} heads x {head_dim}, cross-attention to "
                       f"{caption}-d captions (120 tokens), random",
            "context_encoder": f"ViT {encoder_depth or depth} layers x {width} wide, random",
            "text_encoder": f"1-layer random T5 with {caption}-d outputs (T5-XXL-sized outputs, far cheaper than T5-XXL)",
            "weights": "random (timing only)"}
    return pipes, info


def build_pipelines(opts: RuntimeOptions, device: str, dtype: torch.dtype):
    if opts.preset == "tiny":
        from lazydiff.testing import tiny_lazy_pipeline, tiny_regenerate_pipeline

        make = {"lazy": lambda: tiny_lazy_pipeline(), "regenerate-image": lambda: tiny_regenerate_pipeline(),
                "regenerate-crop": lambda: tiny_regenerate_pipeline(crop=True)}
        pipes = {m: make[m]() for m in opts.methods}
        info = {"weights": "tiny random test pipelines (lazydiff.testing): numbers are meaningless for the paper",
                "canvas": f"{opts.size or 64}x{opts.size or 64}"}
        size = opts.size or 64
    elif opts.preset == "default":
        from lazydiff import load_default

        pipes = {}
        for m in opts.methods:
            try:
                pipes[m] = load_default(m, device=device, torch_dtype=dtype)
            except FileNotFoundError as err:
                raise RuntimeError_(f"--preset default needs the shipped ShapesWorld models: {str(err).rstrip('.')}. Use --preset "
                                    "paper-shape (random weights) to time the architecture without them") from None
        size = opts.size or 128
        info = {"weights": "shipped ShapesWorld models (data/models)", "canvas": f"{size}x{size}"}
    else:
        size = opts.size or 1024
        pipes, info = paper_shape_pipelines(opts.methods, size, opts.width, opts.depth, opts.heads, opts.encoder_depth,
                                            opts.seed)
    vae_runners: Dict[int, tuple] = {}
    for m, p in pipes.items():
        p.to(device)
        if dtype != torch.float32:
            p.to(dtype=dtype)
        p.set_progress_bar_config(disable=True)
        if opts.canvas_cache is not None and hasattr(p, "canvas_cache"):
            p.canvas_cache = opts.canvas_cache
        if hasattr(p, "cuda_graphs"):  # a lever for every method alike
            p.cuda_graphs = opts.cuda_graphs
        if opts.onnx_parts:  # likewise
            p.enable_onnx_runtime(parts=opts.onnx_parts)
            export_onnx_graphs(p, vae_runners)
    return pipes, info, size


def export_onnx_graphs(pipe, shared: Dict[int, tuple]) -> None:
    """Build ``pipe``'s ONNX Runtime graphs now, untimed (``pipe.warm_up(1)``), which a paper-shape run
    without warm-up would otherwise count in its first edits. Pipelines that share one VAE share its
    runners (one export)."""
    if id(pipe.vae) in shared:
        pipe.vae_encode_runner, pipe.vae_decode_runner = shared[id(pipe.vae)]
    pipe.warm_up(1)
    if pipe.vae_encode_runner is not None:
        shared[id(pipe.vae)] = (pipe.vae_encode_runner, pipe.vae_decode_runner)


# ----------------------------------------------------------------------------- inputs
def centred_mask(size: int, ratio: float) -> np.ndarray:
    """A centred square (rectangle when it would not fit) covering ``ratio`` of a size x size canvas."""
    if not 0 < ratio <= 1:
        raise RuntimeError_(f"mask ratios must be in (0, 1], got {ratio}")
    area = ratio * size * size
    side = int(round(math.sqrt(area)))
    h, w = min(side, size), 0
    w = int(round(area / max(h, 1)))
    if w > size:
        w = size
        h = int(round(area / size))
    h, w = max(h, 1), max(min(w, size), 1)
    m = np.zeros((size, size), bool)
    y0, x0 = (size - h) // 2, (size - w) // 2
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def canvas_image(size: int) -> np.ndarray:
    try:
        from lazydiff.shapesworld import render_scene

        return render_scene(0, (size, size)).image
    except Exception:  # pragma: no cover - ShapesWorld missing: a smooth gradient
        y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        return (np.stack([x, y, 1 - x], -1) * 255).astype(np.uint8)


def token_grid(mask: np.ndarray, cell: int) -> np.ndarray:
    """The tokens (cell x cell pixels; the canvas padded to whole cells) that a pixel mask touches."""
    h, w = mask.shape
    hp, wp = -(-h // cell) * cell, -(-w // cell) * cell
    m = np.zeros((hp, wp), bool)
    m[:h, :w] = mask
    return m.reshape(hp // cell, cell, wp // cell, cell).any(axis=(1, 3))


def token_count(mask: np.ndarray, cell: int) -> int:
    return int(token_grid(mask, cell).sum())


def clear_caches(pipe) -> None:
    pipe.__dict__.pop("_prompt_cache", None)
    fn = getattr(pipe, "clear_caches", None)
    if callable(fn):
        fn()


def corner_mask(size: int, ratio: float = 0.01) -> np.ndarray:
    """A square of ``ratio`` of the canvas centred at (0.25, 0.25): the region a previous edit touched."""
    side = max(int(round(math.sqrt(ratio) * size)), 1)
    m = np.zeros((size, size), bool)
    y0 = max(int(round(size * 0.25 - side / 2)), 0)
    m[y0:y0 + side, y0:y0 + side] = True
    return m


def prime(pipe, method: str, image, mask_img, opts: "RuntimeOptions"):
    """Untimed 1-step edit whose result becomes the canvas of a follow-up edit (caches emptied first)."""
    clear_caches(pipe)
    kw = {"resolution": opts.crop_resolution} if method == "regenerate-crop" and opts.crop_resolution else {}
    out = pipe(opts.prompt, image, mask_img, num_inference_steps=1, guidance_scale=opts.guidance,
               generator=torch.Generator(device="cpu").manual_seed(opts.seed + 1), **kw)
    return out.images[0]


# ----------------------------------------------------------------------------- one run
def timed_edit(pipe, method: str, image, mask_img, opts: RuntimeOptions, device: str, primed: bool = False,
               seed_offset: int = 0) -> Dict:
    if not opts.keep_caches and not primed:
        clear_caches(pipe)
    kw = {}
    if method == "regenerate-crop" and opts.crop_resolution:
        kw["resolution"] = opts.crop_resolution
    gen = torch.Generator(device="cpu").manual_seed(opts.seed + seed_offset)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(opts.prompt, image, mask_img, num_inference_steps=opts.steps, guidance_scale=opts.guidance,
               generator=gen, **kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    return {"timings": dict(out.timings), "stats": dict(out.stats), "wall_ms": wall, "image": out.images[0]}


def one_edit(pipe, method: str, image, mask_img, prime_mask_img, opts: RuntimeOptions, device: str,
             recorder=None, primed: bool = False, seed_offset: int = 0) -> Dict:
    """A timed edit (after an untimed priming edit in ``new-mask`` mode); FLOPs recorded for the timed one only."""
    if opts.followup == "new-mask" and not primed:
        image = prime(pipe, method, image, prime_mask_img, opts)
        primed = True
    if recorder is not None:
        recorder.start()
    try:
        return timed_edit(pipe, method, image, mask_img, opts, device, primed=primed, seed_offset=seed_offset)
    finally:
        if recorder is not None:
            recorder.stop()


# ----------------------------------------------------------------------------- aggregate
def _q(v, q):
    v = np.asarray([x for x in v if x is not None and np.isfinite(x)], float)
    return float(np.quantile(v, q)) if len(v) else float("nan")


def aggregate(runs, flops: Dict, canvas_holes: Dict[float, int]):
    import pandas as pd

    df = pd.DataFrame(runs)
    rows = []
    for (m, r), d in df.groupby(["method", "mask_ratio"], sort=False):
        f = flops[(m, r)]
        row = {"method": m, "mask_ratio": r, "mask_ratio_actual": float(d.mask_ratio_actual.iloc[0]),
               "canvas_hole_tokens": canvas_holes[r],
               "hole_tokens": int(d.hole_tokens.iloc[0]), "total_tokens": int(d.total_tokens.iloc[0]),
               "denoiser_tokens": f.get("denoiser_tokens"), "steps": int(d.steps.iloc[0]), "repeats": int(len(d)),
               "total_ms": _q(d.total_ms, 0.5), "total_ms_q1": _q(d.total_ms, 0.25), "total_ms_q3": _q(d.total_ms, 0.75),
               "denoise_ms_per_step": _q(d.denoise_ms_per_step, 0.5),
               "denoise_ms_per_step_q1": _q(d.denoise_ms_per_step, 0.25),
               "denoise_ms_per_step_q3": _q(d.denoise_ms_per_step, 0.75), "wall_ms": _q(d.wall_ms, 0.5)}
        if "vae_encode_mode" in d:
            modes = [v for v in d.vae_encode_mode if isinstance(v, str)]
            row["vae_encode_mode"] = ",".join(sorted(set(modes))) if modes else None
        row["total_ms_iqr"] = row["total_ms_q3"] - row["total_ms_q1"]
        row["denoise_ms_per_step_iqr"] = row["denoise_ms_per_step_q3"] - row["denoise_ms_per_step_q1"]
        for s in STAGES + ("crop_resize",):
            c = f"stage_{s}_ms"
            row[c] = _q(d[c], 0.5) if c in d else float("nan")
        known = sum(v for k, v in row.items() if k.startswith("stage_") and np.isfinite(v))
        row["stage_other_ms"] = max(row["total_ms"] - known, 0.0)
        for k in ("text", "vae_encode", "context_encoder", "denoise", "vae_decode"):
            row[f"flops_{k}"] = f[k]
        row["flops"] = f["total"]
        row["flops_denoise_per_step"] = f["denoise_per_step"]
        row["gflops_per_s"] = f["total"] / (row["total_ms"] * 1e6) if row["total_ms"] > 0 else float("nan")
        rows.append(row)
    out = pd.DataFrame(rows)
    for col in ("speedup_vs_full", "speedup_vs_full_paired", "denoise_speedup_vs_full", "flops_ratio_vs_full",
                "denoise_flops_ratio_vs_full"):
        out[col] = float("nan")
    for i, row in out.iterrows():
        prefix = row.method.rsplit("/", 1)[0] + "/" if "/" in row.method else ""   # followup/<m> vs followup/full
        ref_name = prefix + "regenerate-image"
        ref = out[(out.method == ref_name) & (out.mask_ratio == row.mask_ratio)]
        if not len(ref):
            continue
        ref = ref.iloc[0]
        out.loc[i, "speedup_vs_full"] = ref.total_ms / row.total_ms
        out.loc[i, "denoise_speedup_vs_full"] = ref.denoise_ms_per_step / row.denoise_ms_per_step
        out.loc[i, "flops_ratio_vs_full"] = ref.flops / row.flops
        out.loc[i, "denoise_flops_ratio_vs_full"] = ref.flops_denoise_per_step / row.flops_denoise_per_step
        a = df[(df.method == row.method) & (df.mask_ratio == row.mask_ratio)].set_index("repeat").total_ms
        b = df[(df.method == ref_name) & (df.mask_ratio == row.mask_ratio)].set_index("repeat").total_ms
        common = a.index.intersection(b.index)
        if len(common):   # ratio within each interleaved round, then the median: robust to drift
            out.loc[i, "speedup_vs_full_paired"] = float(np.median(b[common].to_numpy() / a[common].to_numpy()))
    return out, df


def linear_fit(df, method: str = "lazy", max_ratio: float = 0.4) -> Dict:
    d = df[(df.method == method) & (df.mask_ratio <= max_ratio + 1e-12)]
    res = {"method": method, "max_ratio": max_ratio, "points": int(len(d)), "slope_ms_per_token": None,
           "intercept_ms": None, "r2": None}
    if len(d) < 2 or d.hole_tokens.nunique() < 2:
        return res
    x, y = d.hole_tokens.to_numpy(float), d.denoise_ms_per_step.to_numpy(float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    res.update(slope_ms_per_token=float(b), intercept_ms=float(a),
               r2=float(1 - ((y - pred) ** 2).sum() / ss) if ss > 0 else 1.0,
               max_rel_residual=float(np.max(np.abs(y - pred) / np.maximum(y, 1e-9))))
    return res


# ----------------------------------------------------------------------------- report
TABLE_COLS = ["method", "mask_ratio", "hole_tokens", "total_tokens", "total_ms", "total_ms_iqr", "denoise_ms_per_step",
              "speedup_vs_full", "speedup_vs_full_paired", "denoise_speedup_vs_full", "flops", "flops_ratio_vs_full",
              "denoise_flops_ratio_vs_full"]


def write_report(out: Path, summary, fit: Dict, plots: Dict[str, Path], opts: RuntimeOptions, info: Dict, env: Dict) -> Path:
    from .report import PAPER_RUNTIME_MS, df_table

    L = ["# Runtime report", ""]
    if opts.preset != "default":
        L += [f"**Preset `{opts.preset}`: {info.get('weights')}.**", ""]
    busy = [x for x in (env.get("load_avg_start"), env.get("load_avg_end")) if x]
    # The load at the end includes this run's own threads: judge other work by the start (and by the
    # end only beyond what this run itself accounts for).
    own = env.get("threads") or 1
    if env["device"].startswith("cpu") and busy and (busy[0][0] > (os.cpu_count() or 1) * 0.75
                                                      or busy[-1][0] - own > (os.cpu_count() or 1) * 0.75):
        L += [f"**The CPU was shared while measuring (1-min load average {busy[0][0]:.1f} at the start, "
              f"{busy[-1][0]:.1f} at the end, {os.cpu_count()} CPUs): absolute times are inflated and noisy; the "
              "interleaved ratios (`speedup_vs_full_paired`) are the robust numbers.**", ""]
    L += ["## Set-up", ""]
    L += [f"- {k}: {v}" for k, v in info.items()]
    L += [f"- steps {opts.steps}, guidance {opts.guidance} (batched CFG), dtype {opts.dtype}, device {env['device']}, "
          f"torch threads {env['threads']}, {env['cpu']}",
          f"- protocol: {opts.warmup} warm-up run(s) per method and ratio, then {opts.repeats} interleaved rounds "
          f"({', '.join(opts.methods)}); medians and IQR; caches "
          + ("kept between runs (--keep-caches)" if opts.keep_caches else
             "cleared before every run (each run is a fresh edit: text, VAE, encoder all counted)"
             if opts.followup == "none" else
             f"cleared, then an untimed 1-step priming edit ({opts.followup}); the timed run is the follow-up edit "
             "on the primed result (canvas-latent, context and prompt caches as an editor would have them)"),
          f"- CUDA graphs: {'on (every method)' if opts.cuda_graphs else 'off'}; ONNX Runtime: "
          + (", ".join({"decoder": "denoising steps", "context_encoder": "context encoder", "vae": "VAE",
                        "text_encoder": "text encoder"}[x]
                       for x in opts.onnx_parts) + " (every method)" if opts.onnx_parts else "off"),
          f"- canvas-latent cache: {opts.canvas_cache or 'pipeline default'}; VAE encode per timed run: "
          + ", ".join(f"{m} {v}" for m, v in summary.drop_duplicates("method")[["method", "vae_encode_mode"]]
                      .itertuples(index=False)) if "vae_encode_mode" in summary else "",
          "- masks: centred rectangles of the given area; `hole_tokens` / `total_tokens` are those of the grid the "
          "method's denoiser works on (RegenerateCrop: the resized crop), `canvas_hole_tokens` those of the canvas",
          "- `speedup_vs_full` = median RegenerateImage latency / median latency; `_paired` = median of per-round "
          "ratios; FLOPs: 1 multiply-add = 2 FLOPs, transformers counted analytically, VAE by torch's FlopCounterMode",
          f"- torch {env['torch']}, {env['platform']}", ""]
    L += ["## Results", "", df_table(summary, TABLE_COLS,
                                     ["method", "mask", "hole tok", "tokens", "total ms", "IQR", "ms/step", "speed-up",
                                      "paired", "step speed-up", "FLOPs", "FLOP ratio", "step FLOP ratio"]), ""]
    stage_cols = ["method", "mask_ratio"] + [c for c in summary.columns if c.startswith("stage_")]
    L += ["### Per-stage medians (ms)", "", df_table(summary, stage_cols), ""]
    flop_cols = ["method", "mask_ratio"] + [c for c in summary.columns if c.startswith("flops_")] + ["gflops_per_s"]
    L += ["### FLOPs per stage", "", df_table(summary, flop_cols), ""]
    if fit.get("slope_ms_per_token") is not None:
        L += ["### Per-step time vs hole tokens (LazyDiffusion)", "",
              f"Linear fit over mask ratios ≤ {fit['max_ratio']:g} ({fit['points']} points): "
              f"t ≈ {fit['intercept_ms']:.4g} ms + {fit['slope_ms_per_token'] * 1e3:.4g} µs × |H|, "
              f"R² = {fit['r2']:.4f}, largest relative residual {fit['max_rel_residual']:.1%}."
              + (" A line through 2 points fits them exactly: R² and the residual say nothing here; time more mask "
                 f"ratios ≤ {fit['max_ratio']:g} to test the linearity." if fit["points"] < 3 else ""), ""]
    for k, title in (("latency", "Latency vs mask ratio"), ("speedup", "Speed-up vs mask ratio"),
                     ("per_step", "Per-step time vs hole tokens"), ("stages", "Per-stage breakdown")):
        if k in plots:
            L += [f"![{title}]({plots[k].name})", ""]
    L += ["## The paper, for reference (one A100, 1024², their implementation)", "",
          f"Context encoder {PAPER_RUNTIME_MS['context_encoder']:g} ms (once), VAE encode {PAPER_RUNTIME_MS['vae_encode']:g} ms, "
          f"VAE decode {PAPER_RUNTIME_MS['vae_decode']:g} ms, T5 {PAPER_RUNTIME_MS['text']:g} ms; decoder step at a 10% mask "
          f"{PAPER_RUNTIME_MS['decoder_step_10pct']:g} ms vs {PAPER_RUNTIME_MS['decoder_step_full']:g} ms full-canvas "
          "(13.4×); ~10× end-to-end at 10%. An independent re-measurement found ~2.3× at 6% and a slow-down at 25%. "
          "Different hardware, widths and implementation: compare ratios, not milliseconds.", "",
          "Files: `runtime.csv` (one row per method × ratio), `runtime_runs.csv` (every timed run), `fit.json`, "
          "`config.json`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def print_table(summary) -> None:
    from .report import fmt

    cols = ["method", "mask_ratio", "hole_tokens", "total_tokens", "total_ms", "total_ms_iqr", "denoise_ms_per_step",
            "speedup_vs_full", "denoise_speedup_vs_full", "flops", "flops_ratio_vs_full"]
    cols = [c for c in cols if c in summary.columns]
    cells = [[fmt(v) for v in r] for r in summary[cols].itertuples(index=False)]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


# ----------------------------------------------------------------------------- entry point
def validate(opts: RuntimeOptions) -> None:
    if opts.preset not in PRESETS:
        hint = difflib.get_close_matches(opts.preset, PRESETS, n=1)
        raise RuntimeError_(f"unknown --preset {opts.preset!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                            + f" Choose from {list(PRESETS)}")
    for m in opts.methods:
        if m not in METHODS:
            hint = difflib.get_close_matches(m, METHODS, n=1)
            raise RuntimeError_(f"unknown runtime method {m!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                                + f" Choose from {list(METHODS)}")
    if not opts.methods:
        raise RuntimeError_("no methods given")
    if opts.dtype not in DTYPES:
        raise RuntimeError_(f"--dtype must be one of {list(DTYPES)}, got {opts.dtype!r}")
    if not opts.mask_ratios:
        raise RuntimeError_("--mask-ratios is empty")
    for r in opts.mask_ratios:
        if not 0 < r <= 1:
            raise RuntimeError_(f"mask ratios must be in (0, 1], got {r}")
    if opts.followup not in FOLLOWUPS:
        raise RuntimeError_(f"--followup must be one of {list(FOLLOWUPS)}, got {opts.followup!r}")
    if opts.canvas_cache is not None and opts.canvas_cache not in CANVAS_CACHE_MODES:
        raise RuntimeError_(f"--canvas-cache must be off, exact or incremental, got {opts.canvas_cache!r}")
    if opts.steps < 1 or opts.repeats < 1 or opts.warmup < 0:
        raise RuntimeError_("--steps and --repeats must be >= 1 and --warmup >= 0")
    if opts.device and opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError_("--device cuda requested but no CUDA device is available")
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.cuda_graphs and not device.startswith("cuda"):
        raise RuntimeError_("--cuda-graphs needs a CUDA device (--device cuda); drop it on the CPU")
    if opts.onnx_parts:
        from lazydiff.models.onnx_backend import INSTALL_HINT, onnxruntime_available

        if not set(opts.onnx_parts) <= set(EditPipelineMixin.ONNX_PARTS):
            raise RuntimeError_(f"--onnx-runtime takes all, vae or decoder, got {opts.onnx_runtime!r}")

        if device != "cpu" or opts.dtype != "fp32":
            raise RuntimeError_("--onnx-runtime is a CPU fp32 backend: use it with --device cpu --dtype fp32")
        if not onnxruntime_available():
            raise RuntimeError_(f"--onnx-runtime needs onnxruntime: {INSTALL_HINT}")


def run_runtime(opts: RuntimeOptions):
    import PIL.Image
    from tqdm.auto import tqdm

    from .report import runtime_plots

    validate(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[opts.dtype]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_build = time.perf_counter()
    pipes, info, size = build_pipelines(opts, device, dtype)
    info["build_s"] = round(time.perf_counter() - t_build, 1)
    recorders = {m: CallRecorder(p) for m, p in pipes.items()}
    cell = next(iter(pipes.values())).token_cell
    image = PIL.Image.fromarray(canvas_image(size), "RGB")
    ratios = list(dict.fromkeys(float(r) for r in opts.mask_ratios))
    runs, flops, canvas_holes = [], {}, {}
    bar = tqdm(total=len(ratios) * len(opts.methods) * (opts.warmup + opts.repeats), desc="runtime", unit="edit",
               dynamic_ncols=True)
    for ratio in ratios:
        mask = centred_mask(size, ratio)
        canvas_holes[ratio] = token_count(mask, cell)
        mask_img = PIL.Image.fromarray(mask.astype(np.uint8) * 255, "L")
        prime_mask = mask_img if opts.followup == "same-mask" else \
            PIL.Image.fromarray(corner_mask(size).astype(np.uint8) * 255, "L")
        def edits(m):
            """(label, result) of one round of method m: the edit, and its same-mask follow-up."""
            first = (m, ratio) not in flops
            res = one_edit(pipes[m], m, image, mask_img, prime_mask, opts, device, recorders[m] if first else None)
            if first:
                flops[(m, ratio)] = recorders[m].flops()
            yield m, res
            if opts.followup == "same-mask":
                f = f"followup/{m}"
                first = (f, ratio) not in flops
                res = one_edit(pipes[m], m, res["image"], mask_img, prime_mask, opts, device,
                               recorders[m] if first else None, primed=True, seed_offset=1)
                if first:
                    flops[(f, ratio)] = recorders[m].flops()
                yield f, res

        for w in range(opts.warmup):
            for m in opts.methods:
                bar.set_postfix_str(f"{m} @ {ratio:g} (warm-up)")
                for _ in edits(m):
                    pass
                bar.update()
        for r in range(opts.repeats):
            for m0 in opts.methods:   # interleaved: lazy, full, crop, lazy, full, crop, ...
                bar.set_postfix_str(f"{m0} @ {ratio:g}")
                for m, res in edits(m0):
                    t, st = res["timings"], res["stats"]
                    row = {"method": m, "mask_ratio": ratio, "repeat": r, "mask_ratio_actual": float(mask.mean()),
                           "hole_tokens": st.get("hole_tokens"), "total_tokens": st.get("total_tokens"),
                           "steps": st.get("steps", opts.steps), "total_ms": t["total"], "wall_ms": res["wall_ms"],
                           "denoise_ms_per_step": t.get("denoise", float("nan")) / max(st.get("steps", opts.steps), 1),
                           "vae_encode_mode": st.get("vae_encode"), "vae_encoded_fraction": st.get("encoded_fraction"),
                           "cuda_graph": st.get("cuda_graph")}
                    for s in STAGES + ("crop_resize",):
                        row[f"stage_{s}_ms"] = t.get(s, float("nan"))
                    runs.append(row)
                bar.update()
    bar.close()
    summary, run_df = aggregate(runs, flops, canvas_holes)
    fit = linear_fit(summary, "lazy", opts.fit_max_ratio) if "lazy" in opts.methods else {}
    summary.to_csv(out / ".runtime.csv.tmp", index=False)
    os.replace(out / ".runtime.csv.tmp", out / "runtime.csv")
    run_df.to_csv(out / ".runtime_runs.csv.tmp", index=False)
    os.replace(out / ".runtime_runs.csv.tmp", out / "runtime_runs.csv")
    env = {"device": device if not device.startswith("cuda") else f"{device} ({torch.cuda.get_device_name()})",
           "threads": torch.get_num_threads(), "cpu": f"{os.cpu_count()} CPUs visible", "torch": torch.__version__,
           "platform": platform.platform(),
           "load_avg_start": load_start, "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    atomic_write_text(out / "fit.json", json.dumps(fit, indent=2))
    atomic_write_text(out / "config.json", json.dumps({"options": asdict(opts), "info": info, "env": env}, indent=2))
    plots = runtime_plots(summary, out, fit)
    write_report(out, summary, fit, plots, opts, info, env)
    return summary, fit


def replot(run: str) -> Path:
    """Redraw a finished mask sweep's plots in place from its ``runtime.csv`` (and ``fit.json``) with the
    current plotting code: after a change to it, or for a run made on a machine that is gone (a GPU run),
    without timing anything again. ``report.md`` is left as written: its set-up lines describe the
    options as they meant at the time (``onnx_runtime: true`` covered fewer parts in early runs)."""
    import pandas as pd

    from .report import runtime_plots

    out = Path(run)
    if not (out / "runtime.csv").is_file():
        raise RuntimeError_(f"{out} is not a finished mask sweep of `python -m eval runtime` (no runtime.csv); give "
                            "the --out folder of such a run")
    summary = pd.read_csv(out / "runtime.csv")
    if not {"method", "mask_ratio", "total_ms"} <= set(summary.columns):
        raise RuntimeError_(f"{out / 'runtime.csv'} is not a mask sweep's table (no method / mask_ratio / total_ms "
                            "columns)")
    fit = (json.loads((out / "fit.json").read_text()) if (out / "fit.json").is_file() else
           linear_fit(summary, "lazy") if "lazy" in set(summary.method) else {})
    plots = runtime_plots(summary, out, fit)
    print(f"redrew {', '.join(p.name for p in plots.values())} in {out}")
    return out


# ----------------------------------------------------------------------------- lever ablation
LEVER_CONFIGS = [  # label, method, threads, fused blocks, text constants once, inlined DDIM step, canvas/context caches, follow-up,
    # ONNX Runtime steps
    ("before: diffusers blocks, no caches", "lazy", 2, False, False, False, "off", False, False),
    ("+ fused no-grad blocks (+ timestep memo)", "lazy", 2, True, False, False, "off", False, False),
    ("+ text constants once per edit", "lazy", 2, True, True, False, "off", False, False),
    ("+ inlined DDIM step", "lazy", 2, True, True, True, "off", False, False),
    ("all levers, fresh edit (caches emptied)", "lazy", 2, True, True, True, "incremental", False, False),
    ("all levers, follow-up edit, same mask", "lazy", 2, True, True, True, "incremental", True, False),
    ("all levers, fresh edit, 1 thread", "lazy", 1, True, True, True, "incremental", False, False),
    ("all levers, follow-up edit, 1 thread", "lazy", 1, True, True, True, "incremental", True, False),
    ("all levers + ONNX Runtime (every part), fresh edit", "lazy", 2, True, True, True, "incremental", False, True),
    ("all levers + ONNX Runtime (every part), follow-up edit", "lazy", 2, True, True, True, "incremental", True, True),
    ("RegenerateImage before", "regenerate-image", 2, False, False, False, "off", False, False),
    ("RegenerateImage all levers, fresh edit", "regenerate-image", 2, True, True, True, "incremental", False, False),
    ("RegenerateImage all levers, follow-up edit", "regenerate-image", 2, True, True, True, "incremental", True, False),
    ("RegenerateImage all levers + ONNX Runtime (every part), fresh edit", "regenerate-image", 2, True, True, True, "incremental", False, True),
    ("RegenerateImage all levers + ONNX Runtime (every part), follow-up edit", "regenerate-image", 2, True, True, True, "incremental", True, True),
]


ONNX_PAIRS = {  # ONNX Runtime configuration -> the same edit on PyTorch
    "all levers + ONNX Runtime (every part), fresh edit": "all levers, fresh edit (caches emptied)",
    "all levers + ONNX Runtime (every part), follow-up edit": "all levers, follow-up edit, same mask",
    "RegenerateImage all levers + ONNX Runtime (every part), fresh edit": "RegenerateImage all levers, fresh edit",
    "RegenerateImage all levers + ONNX Runtime (every part), follow-up edit": "RegenerateImage all levers, follow-up edit",
}


def run_levers(out: str, repeats: int = 5, ratio: float = 0.1, steps: int = 20, prompt: str = PROMPT,
               backends_only: bool = False) -> Dict:
    """What each engineering lever gives on the shipped models (128x128, centred mask of ``ratio``):
    interleaved rounds over :data:`LEVER_CONFIGS` (the first round is a warm-up), medians of the
    pipelines' stage timings. ``backends_only``: just PyTorch vs ONNX Runtime with every other lever on
    (2 threads, both methods, fresh and follow-up edits). Writes ``levers.json`` and ``levers.md`` to ``out``."""
    import PIL.Image

    from lazydiff import load_default
    from lazydiff.models.onnx_backend import onnxruntime_available

    img = PIL.Image.fromarray(canvas_image(128))
    mask = PIL.Image.fromarray(centred_mask(128, ratio).astype(np.uint8) * 255)
    pipes = {k: load_default(k, device="cpu") for k in ("lazy", "regenerate-image")}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    rows = {c[0]: [] for c in LEVER_CONFIGS}
    images = {}
    use_onnx = onnxruntime_available()
    runners = {}
    for k, p in pipes.items():
        if use_onnx:
            p.enable_onnx_runtime()
            runners[k] = p.onnx_runners
    configs = [c for c in LEVER_CONFIGS if use_onnx or not c[8]]
    if backends_only:
        configs = [c for c in configs if c[2] == 2 and all(c[3:6]) and c[6] == "incremental"]
    before = torch.get_num_threads()
    try:
        for r in range(repeats + 1):
            for label, meth, threads, fused, text_once, fast_step, cache, follow, onnx in configs:
                p = pipes[meth]
                p.onnx_runners = runners[meth] if onnx else {}
                torch.set_num_threads(threads)
                p.decoder.trunk.fast_inference, p.precompute_text, p.canvas_cache = fused, text_once, cache
                p.fast_scheduler_step = fast_step
                if hasattr(p, "context_cache"):
                    p.context_cache = cache != "off"
                clear_caches(p)
                canvas = img
                if follow:  # the previous edit of this region; its result is the canvas
                    canvas = p(prompt, img, mask, num_inference_steps=steps,
                               generator=torch.Generator().manual_seed(0)).images[0]
                res = p(prompt, canvas, mask, num_inference_steps=steps, generator=torch.Generator().manual_seed(1))
                if r:
                    rows[label].append(dict(res.timings, vae_mode=res.stats.get("vae_encode")))
                images[label] = np.asarray(res.images[0]).astype(int)
    finally:
        torch.set_num_threads(before)
    summary: Dict = {"ratio": ratio, "steps": steps, "repeats": repeats,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levers": {}}
    for label, rs in rows.items():
        if not rs:  # a configuration that could not run here (no onnxruntime)
            continue
        med = {k: float(np.median([x.get(k, 0.0) for x in rs])) for k in ("text", "vae_encode", "context_encoder",
                                                                          "denoise", "vae_decode", "blend", "total")}
        med["ms_per_step"] = med["denoise"] / steps
        med["vae_encode_mode"] = rs[0]["vae_mode"]
        summary["levers"][label] = med
    if "before: diffusers blocks, no caches" in images:
        summary["max_abs_pixel_diff_all_levers_vs_before"] = int(np.abs(
            images["all levers, fresh edit (caches emptied)"] - images["before: diffusers blocks, no caches"]).max())
    if use_onnx:
        # Per round, PyTorch total / ONNX Runtime total of the same edit: robust to the machine's drift.
        summary["onnx_runtime_paired_speedup"] = {
            onnx_label: float(np.median([a["total"] / b["total"] for a, b in zip(rows[torch_label], rows[onnx_label])]))
            for onnx_label, torch_label in ONNX_PAIRS.items() if rows.get(onnx_label) and rows.get(torch_label)}
        summary["max_abs_pixel_diff_onnx_runtime_vs_all_levers"] = int(np.abs(
            images["all levers + ONNX Runtime (every part), fresh edit"] - images["all levers, fresh edit (caches emptied)"]).max())
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "levers.json", json.dumps(summary, indent=1))
    L = [f"| lever ({int(ratio * 100)}% mask, {steps} steps) | total ms | ms/step | text | VAE enc | context enc | VAE dec |",
         "|---|---|---|---|---|---|---|"]
    for label, m in summary["levers"].items():
        L.append(f"| {label} | {m['total']:.0f} | {m['ms_per_step']:.1f} | {m['text']:.1f} | {m['vae_encode']:.1f} "
                 f"({m['vae_encode_mode']}) | {m['context_encoder']:.1f} | {m['vae_decode']:.1f} |")
    for label, r in summary.get("onnx_runtime_paired_speedup", {}).items():
        L.append(f"\nPaired speed-up (median over rounds of PyTorch / ONNX Runtime), {label}: {r:.2f}x")
    atomic_write_text(Path(out) / "levers.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return summary


# ----------------------------------------------------------------------------- per-step sweep
def run_step_sweep(out: str, ratios: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6), size: int = 1024,
                   width: int = 384, depth: int = 12, repeats: int = 5, fit_max_ratio: float = 0.4,
                   onnx_runtime: bool = False) -> Dict:
    """Per-step denoiser time vs hole tokens at paper shape without the rest of the edit: exactly the
    decoder calls the pipelines make (CFG batch 2, text constants prepared once per edit, centred
    masks), plus the full-canvas step; medians of ``repeats``. Cheap enough to cover many ratios on a
    CPU where whole paper-shape edits take minutes. Writes ``step_sweep.json`` and ``.png`` to ``out``."""
    pipes, _ = paper_shape_pipelines(["lazy", "regenerate-image"], size, width, depth)
    lazy, full = pipes["lazy"].decoder, pipes["regenerate-image"].decoder
    if onnx_runtime:  # both decoders alike; each graph is exported at its first (untimed) call
        lazy.use_onnx_runtime()
        full.use_onnx_runtime()
    from .flops import decoder_flops

    b, cell, lat = 2, 16, size // 8
    text, tm = torch.randn(b, 120, lazy.config.caption_channels), torch.ones(b, 120)
    add = {"resolution": torch.tensor([[float(size)] * 2] * b), "aspect_ratio": torch.tensor([[1.0]] * b)}
    t = torch.tensor([500] * b)

    def med(f, n):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    rows = []
    with torch.no_grad():
        cl, cf = lazy.prepare_text(text, tm), full.prepare_text(text, tm)
        for r in ratios:
            k = token_count(centred_mask(size, r), cell)
            x, ctx = torch.randn(b, k, 16), torch.randn(b, k, lazy.config.context_dim)
            idx = torch.arange(k)[None].repeat(b, 1)
            ms = med(lambda: lazy(x, ctx, idx, (lat // 2, lat // 2), t, text, tm, added_cond_kwargs=add,
                                  text_conditioning=cl), repeats)
            rows.append({"ratio": r, "hole_tokens": k, "ms_per_step": ms,
                         "flops": decoder_flops(lazy, k, 120, b, text_prepared=True)})
            print(rows[-1], flush=True)
        z = torch.randn(b, 4, lat, lat)
        fms = med(lambda: full(z, z, z[:, :1], t, text, tm, added_cond_kwargs=add, text_conditioning=cf),
                  max(2, repeats // 2))
    ffl = decoder_flops(full, (lat // 2) ** 2, 120, b, text_prepared=True)
    for row in rows:
        row["speedup_vs_full"] = fms / row["ms_per_step"]
        row["flop_ratio_vs_full"] = ffl / row["flops"]
    sel = [x for x in rows if x["ratio"] <= fit_max_ratio + 1e-12]
    xs, ys = np.array([x["hole_tokens"] for x in sel], float), np.array([x["ms_per_step"] for x in sel])
    slope, icpt = np.polyfit(xs, ys, 1)
    pred = icpt + slope * xs
    fit = {"intercept_ms": float(icpt), "slope_ms_per_token": float(slope),
           "r2": float(1 - ((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()),
           "max_rel_residual": float(np.max(np.abs(ys - pred) / ys)), "max_ratio": fit_max_ratio}
    res = {"size": size, "width": width, "depth": depth, "threads": torch.get_num_threads(),
           "backend": "onnxruntime" if onnx_runtime else "torch", "rows": rows,
           "full": {"tokens": (lat // 2) ** 2, "ms_per_step": fms, "flops": ffl}, "fit": fit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "step_sweep.json", json.dumps(res, indent=1))
    try:
        from .report import _plt, _save

        fig, ax = _plt().subplots(figsize=(6, 3.6))
        ax.plot([x["hole_tokens"] for x in rows], [x["ms_per_step"] for x in rows], "o", label="LazyDiffusion step (median)")
        xx = np.linspace(0, max(x["hole_tokens"] for x in rows), 50)
        ax.plot(xx, icpt + slope * xx, "k--", label=f"fit (ratio <= {fit_max_ratio:g}): {icpt:.0f} ms + "
                                                   f"{slope * 1e3:.0f} us x |H|, R2 = {fit['r2']:.3f}")
        ax.axhline(fms, color="C1", ls=":", label=f"RegenerateImage step ({(lat // 2) ** 2} tokens): {fms:.0f} ms")
        ax.set_xlabel("hole tokens |H| (CFG: batch 2)")
        ax.set_ylabel("ms per denoising step")
        ax.set_title(f"paper shape ({depth} x {width}, {size}^2), {torch.get_num_threads()} threads, fp32"
                     + (", ONNX Runtime" if onnx_runtime else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, Path(out) / "step_sweep.png")
    except Exception as err:  # pragma: no cover - plotting is optional
        print(f"plot skipped: {err}")
    print(json.dumps(fit))
    return res


# (depth, width): this preset's default, a step towards the paper, PixArt-XL/2 itself
FLOP_CEILING_MODELS = ((12, 384), (12, 576), (16, 768), (20, 960), (28, 1152))


def edit_flops(size: int, width: int, depth: int, ratio: float, steps: int = 20) -> Dict[str, float]:
    """FLOPs of one paper-shape edit at a centred ``ratio`` mask, counted with the formulas the runtime
    report uses (:mod:`eval.flops`) on meta-device models (nothing is allocated), CFG batch 2, text
    constants once per edit, the crop decode of :func:`decode_crop_box`. Keys: ``vae_encode`` (the
    whole canvas), ``vae_encode_new_mask`` (what a ``new-mask`` follow-up re-encodes: the crops the
    incremental canvas cache picks around the primed corner and the new hole), ``context_encoder``,
    ``lazy_steps``, ``full_steps``, ``vae_decode``, ``text_constants``; the text encoder itself (the same
    for both methods, 1-layer here) is left out."""
    from lazydiff.models import ContextEncoder, FullCanvasDecoder, LazyDecoder
    from lazydiff.pipelines.editing import EditPipelineMixin, decode_crop_box

    from .flops import context_encoder_flops, decoder_flops, decoder_text_flops, vae_flops

    cfg = paper_shape_decoder_config(size, width, depth)
    with torch.device("meta"):
        lazy, full = LazyDecoder(context_dim=width, **cfg), FullCanvasDecoder(**cfg)
        enc = ContextEncoder(latent_channels=4, patch_size=2, num_layers=depth, num_attention_heads=cfg["num_attention_heads"],
                             attention_head_dim=cfg["attention_head_dim"], context_dim=width, sample_size=cfg["sample_size"])
        vae = paper_shape_vae(size)
    hole = centred_mask(size, ratio)
    token_mask = token_grid(hole, 16)
    y0, y1, x0, x1 = decode_crop_box(token_mask, 2, EditPipelineMixin.decode_margin)
    full_encode = vae_flops(vae, (1, 3, size, size), "encode")
    return {"hole_tokens": int(token_mask.sum()), "total_tokens": token_mask.size,
            "vae_encode": full_encode,
            "vae_encode_new_mask": new_mask_encode_flops(vae, hole, full_encode),
            "context_encoder": context_encoder_flops(enc, token_mask.size),
            "lazy_steps": steps * decoder_flops(lazy, int(token_mask.sum()), 120, 2, text_prepared=True),
            "full_steps": steps * decoder_flops(full, token_mask.size, 120, 2, text_prepared=True),
            "vae_decode": vae_flops(vae, (1, 4, y1 - y0, x1 - x0), "decode"),
            "text_constants": decoder_text_flops(lazy, 120, 2)}


def new_mask_encode_flops(vae, hole: np.ndarray, full_encode: float) -> float:
    """VAE-encode FLOPs of a ``new-mask`` follow-up: after the priming edit in :func:`corner_mask`, the
    pixels that changed are that corner (its result) and both holes; the crops the incremental cache
    re-encodes for them (:func:`~lazydiff.pipelines.canvas_cache.refresh_boxes`, the pipelines' margins), or
    the whole canvas past ``max_partial_encode``. The whole-canvas statistics the crops are normalised
    with add no FLOPs worth counting."""
    from lazydiff.pipelines.canvas_cache import crop_cells, refresh_boxes
    from lazydiff.pipelines.editing import EditPipelineMixin as Edit

    from .flops import vae_flops

    s = 2 ** (len(vae.config.block_out_channels) - 1)
    boxes = refresh_boxes(hole | corner_mask(hole.shape[0]), s, Edit.encode_paste_margin, Edit.encode_context_margin)
    if crop_cells(boxes) > Edit.max_partial_encode * (hole.shape[0] // s) * (hole.shape[1] // s):
        return full_encode
    return sum(vae_flops(vae, (1, 3, (c[1] - c[0]) * s, (c[3] - c[2]) * s), "encode") for _, c in boxes)


def run_flop_ceiling(out: str, size: int = 1024, ratios: Sequence[float] = (0.1, 0.25), steps: int = 20,
                     models: Sequence[Tuple[int, int]] = FLOP_CEILING_MODELS) -> List[Dict[str, Any]]:
    """The end-to-end FLOP ratio of RegenerateImage over LazyDiffusion at paper shape for several
    transformer sizes (the VAE stays SD-VAE): what the speed-up would be if every FLOP cost the same.
    The VAE's share is fixed while the transformers grow, so the ratio a CPU-sized preset can reach
    is lower than at PixArt-XL/2's size. Writes ``flop_ceiling.json`` / ``.md`` / ``.png`` to ``out``."""
    rows = []
    for depth, width in models:
        for r in ratios:
            f = edit_flops(size, width, depth, r, steps)
            shared = f["vae_decode"] + f["text_constants"]
            lazy_follow, full_follow = f["lazy_steps"] + shared, f["full_steps"] + shared
            lazy_first, full_first = lazy_follow + f["vae_encode"] + f["context_encoder"], full_follow + f["vae_encode"]
            # a new mask on an encoded canvas: crops re-encoded, the context encoder runs again
            lazy_new = lazy_follow + f["vae_encode_new_mask"] + f["context_encoder"]
            full_new = full_follow + f["vae_encode_new_mask"]
            rows.append({"depth": depth, "width": width, "mask_ratio": r, **f,
                         "step_ratio": f["full_steps"] / f["lazy_steps"],
                         "first_edit_ratio": full_first / lazy_first, "followup_ratio": full_follow / lazy_follow,
                         "new_mask_ratio": full_new / lazy_new,
                         "vae_share_of_lazy_followup": f["vae_decode"] / lazy_follow})
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "flop_ceiling.json", json.dumps(rows, indent=1))
    lines = [f"# End-to-end FLOP ratio, RegenerateImage / LazyDiffusion ({size}², SD-VAE, {steps} steps, CFG)", "",
             "| decoder (layers x width) | mask | hole tokens | TFLOP: VAE encode / context enc / lazy steps / full steps / "
             "crop decode | VAE encode, new mask (TFLOP) | step ratio | first edit | follow-up, new mask | "
             "follow-up, same mask |", "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        tf = " / ".join(f"{x[k] / 1e12:.2f}" for k in ("vae_encode", "context_encoder", "lazy_steps", "full_steps", "vae_decode"))
        lines.append(f"| {x['depth']} x {x['width']} | {x['mask_ratio']:g} | {x['hole_tokens']} / {x['total_tokens']} | {tf} | "
                     f"{x['vae_encode_new_mask'] / 1e12:.2f} | {x['step_ratio']:.1f}x | {x['first_edit_ratio']:.1f}x | "
                     f"{x['new_mask_ratio']:.1f}x | {x['followup_ratio']:.1f}x |")
    atomic_write_text(Path(out) / "flop_ceiling.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        from .report import _plt, _save

        fig, ax = _plt().subplots(figsize=(8.4, 3.6))
        names = [f"{d}x{w}" for d, w in models]
        for i, r in enumerate(ratios):
            sel = [x for x in rows if x["mask_ratio"] == r]
            ax.plot(names, [x["followup_ratio"] for x in sel], "o-", color=f"C{i}", label=f"{r:.0%} mask, follow-up, same mask")
            ax.plot(names, [x["new_mask_ratio"] for x in sel], "^-.", color=f"C{i}", label=f"{r:.0%} mask, new mask on an encoded canvas")
            ax.plot(names, [x["first_edit_ratio"] for x in sel], "s--", color=f"C{i}", label=f"{r:.0%} mask, first edit")
        ax.axhline(10, color="k", lw=0.8, ls=":")
        ax.set_xlabel("decoder and context encoder (layers x width); PixArt-XL/2 = 28x1152")
        ax.set_ylabel("FLOP ratio, whole edit")
        ax.set_title(f"end-to-end FLOP ratio at {size}² (the SD-VAE's cost is fixed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
        _save(fig, Path(out) / "flop_ceiling.png")
    except Exception as err:  # pragma: no cover - plotting is optional
        print(f"plot skipped: {err}")
    return rows


def run_vae_backends(out: str, size: int = 1024, crop_latent: int = 52, encode_size: int = 512,
                     repeats: int = 3) -> Dict:
    """The paper-shape VAE (SD-VAE architecture, random weights) in PyTorch and in ONNX Runtime,
    interleaved: a crop decode (``crop_latent``² latent: the 10% hole's crop at 1024²) and a canvas
    encode (``encode_size``²; the 1024² encode takes ~4x as long). Medians of ``repeats`` rounds after
    the exports; writes ``vae_backends.json`` to ``out``."""
    from tqdm.auto import tqdm

    from lazydiff.models.onnx_backend import OnnxRunner, export_vae_decode, export_vae_encode

    torch.manual_seed(0)
    vae = paper_shape_vae(size)
    dec, enc = OnnxRunner(export=export_vae_decode), OnnxRunner(export=export_vae_encode)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, crop_latent, crop_latent, generator=g)
    x = torch.rand(1, 3, encode_size, encode_size, generator=g) * 2 - 1
    calls = {("decode", "torch"): lambda: vae.decode(z).sample,
             ("decode", "onnxruntime"): lambda: dec(vae, {"z": z}),
             ("encode", "torch"): lambda: vae.encode(x).latent_dist.mode(),
             ("encode", "onnxruntime"): lambda: enc(vae, {"x": x})}
    times = {k: [] for k in calls}
    with torch.no_grad():
        t0 = time.perf_counter()
        diff = {d: float((calls[(d, "onnxruntime")]() - calls[(d, "torch")]()).abs().max()) for d in ("decode", "encode")}
        export_s = time.perf_counter() - t0
        for _ in tqdm(range(repeats), desc="VAE backends", unit="round"):
            for k, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    result = {"vae": "SD-VAE architecture, random weights", "threads": torch.get_num_threads(),
              "decode_latent": [crop_latent, crop_latent], "encode_pixels": [encode_size, encode_size],
              "repeats": repeats, "exports_and_first_calls_s": export_s, "max_abs_diff": diff,
              "ms": {f"{d}/{b}": times[(d, b)] for d, b in calls},
              "median_ms": {f"{d}/{b}": float(np.median(times[(d, b)])) * 1e3 for d, b in calls},
              "load_avg": os.getloadavg()}
    for d in ("decode", "encode"):
        result[f"{d}_speedup_paired"] = float(np.median([a / b for a, b in zip(times[(d, "torch")],
                                                                               times[(d, "onnxruntime")])]))
        print(f"{d}: PyTorch {result['median_ms'][d + '/torch']:,.0f} ms, ONNX Runtime "
              f"{result['median_ms'][d + '/onnxruntime']:,.0f} ms ({result[d + '_speedup_paired']:.2f}x paired), "
              f"max diff {diff[d]:.1e}")
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "vae_backends.json", json.dumps(result, indent=2))
    return result


class ModeOptionError(ValueError):
    """An option that the named measurement does not take (misspelt, or one of the mask sweep's)."""


def parse_other_measurement(argv) -> Optional[Tuple[str, str, Dict[str, Any]]]:
    """``(mode, OUT, {option: value})`` for the runtime command's measurement other than the mask sweep
    that ``argv`` names (``--flop-ceiling OUT`` and the others of :data:`eval.cli.RUNTIME_MODES`), with
    that mode's own options and their defaults there; None when ``argv`` names none of them or asks for
    ``--help``. Anything else in ``argv`` (a misspelt option, one of the mask sweep's, a second mode, a
    stray value) raises :class:`ModeOptionError` naming the closest valid option."""
    import argparse

    from .cli import RUNTIME_MODES, runtime_mode_options

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        return None
    named = list(dict.fromkeys(m for m in RUNTIME_MODES for a in argv if a == f"--{m}" or a.startswith(f"--{m}=")))
    if not named:
        return None
    if len(named) > 1:
        raise ModeOptionError(f"{' and '.join('--' + m for m in named)} are separate measurements; run one at a time")
    mode = named[0]
    options = RUNTIME_MODES[mode][1]
    p = argparse.ArgumentParser(prog="python -m eval runtime", add_help=False, allow_abbrev=False)
    p.add_argument("--" + mode, dest="out", metavar="OUT", required=True)
    for name, (default, _) in options.items():
        p.add_argument("--" + name, **({"action": "store_true"} if default is False else
                                       {"type": int if default is None else type(default), "default": default,
                                        "metavar": "N"}))
    ns, rest = p.parse_known_args(argv)   # a bad value (--repeats x): argparse's message, SystemExit(2)
    if rest:
        bad = rest[0]
        takes = f"--{mode} takes {runtime_mode_options(mode)}"
        if not bad.startswith("-"):
            raise ModeOptionError(f"unexpected argument {bad!r}; {takes}")
        flag = bad.split("=", 1)[0]
        valid = ["--" + n for n in options]
        from .cli import build_parser

        sweep = {f for a in build_parser().runtime_parser._actions for f in a.option_strings}
        if flag in sweep:   # the mask sweep's, or another mode's
            raise ModeOptionError(f"{flag} is not an option of --{mode}" + (
                f" (it writes to the OUT given after --{mode})" if flag == "--out" else "") + f"; {takes}")
        hint = difflib.get_close_matches(flag, valid, n=1, cutoff=0.5)
        raise ModeOptionError(f"unknown option {flag} for --{mode}"
                              + (f"; did you mean {hint[0]}?" if hint else "") + f" ({takes})")
    values = {n.replace("-", "_"): getattr(ns, n.replace("-", "_")) for n in options}
    return mode, ns.out, values


def run_other_measurement(argv) -> Optional[int]:
    """The runtime command's measurements other than the mask sweep (``--flop-ceiling OUT``, ``--step-sweep
    OUT``, ``--levers OUT``, ``--vae-backends OUT``, each with its own options) and ``--replot RUN``: runs the one named in
    ``argv`` and returns 0, returns 2 (with the reason on stderr) when ``argv`` holds an option it does not
    take, or returns None when ``argv`` names none of them."""
    import sys

    try:
        parsed = parse_other_measurement(argv)
    except ModeOptionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as err:   # argparse has printed why (a bad value)
        return err.code if isinstance(err.code, int) else 2
    if parsed is None:
        return None
    mode, out, a = parsed
    if a.get("threads"):
        torch.set_num_threads(a["threads"])
    if mode == "flop-ceiling":
        run_flop_ceiling(out, size=a["size"], steps=a["steps"])
    elif mode == "vae-backends":
        run_vae_backends(out, crop_latent=a["crop_latent"], encode_size=a["encode_size"], repeats=a["repeats"])
    elif mode == "replot":
        try:
            replot(out)
        except RuntimeError_ as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif mode == "levers":
        run_levers(out, a["levers_repeats"], backends_only=a["levers_backends"])
    else:
        run_step_sweep(out, size=a["size"], width=a["width"], depth=a["depth"], onnx_runtime=a["onnx_runtime"])
    return 0


def main(argv=None) -> int:
    """``python -m eval.runtime ...``: the same as ``python -m eval runtime ...``."""
    import sys

    from .cli import main as cli_main

    return cli_main(["runtime"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
