"""Machinery shared by every editing pipeline (the lazy one and the full-canvas baselines).

An edit goes through the same stages whatever the denoiser:

    validate -> text (cached per prompt) -> VAE-encode the masked canvas -> [stage-specific]
    -> denoise (shared sampling loop, batched CFG) -> VAE-decode only the region around the hole
    -> paste inside the pixel mask (hard / feather / Poisson)

so the pipelines differ only in what their denoiser sees: the hole tokens plus context (lazy) or
every token of the canvas (RegenerateImage). Timings of every stage are reported in milliseconds.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.dit import (_param_key, edit_scope, gather_tokens, hole_indices, once_per_edit, patchify,
                          scatter_tokens, token_mask_from_pixels, unpatchify)
from . import canvas_cache
from .canvas_cache import Box, crop_cells, refresh_boxes
from .cuda_graphs import CUDAGraphCache, CUDAGraphDenoiser, StepFunction  # noqa: F401 (re-exported)
from .blending import BLEND_MODES, blend, mask_bbox, paste_masked
from .working_size import MAX_SIDE_FACTOR, default_max_side

ImageInput = Union[PIL.Image.Image, np.ndarray]
_CANVAS_VERSIONS = itertools.count()  # unique ids of cached canvas latents (keys of the context cache)
SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA")


@dataclass
class EditPipelineOutput(BaseOutput):
    """``images``: edited canvases (PIL, the input's size and mode); ``timings``: ms per stage;
    ``stats``: hole_tokens, total_tokens, mask_ratio, steps and notes on how inputs were handled."""

    images: Union[List[PIL.Image.Image], np.ndarray]
    timings: Dict[str, float]
    stats: Dict[str, Any]


def check_pipeline_folder(cls, path) -> None:
    """Before diffusers' ``from_pretrained``: a folder in data/models' layout (no model_index.json) or a
    pipeline of the other kind gets an error that names the loader to use, not a failure at the first call."""
    import json
    from pathlib import Path

    folder = Path(str(path))
    if not folder.is_dir():
        return  # diffusers' own message
    index = folder / "model_index.json"
    if not index.exists():
        if (folder / "decoder").is_dir():
            raise ValueError(f"{folder} is a model folder in data/models' layout (no model_index.json): load it with "
                             f"lazydiff.load_pipeline({str(folder)!r}), which adds the autoencoder and text encoder")
        return
    saved = json.loads(index.read_text()).get("_class_name", "")
    lazy = {"LazyDiffusionPipeline"}
    full = {"RegenerateImagePipeline", "RegenerateCropPipeline"}  # one model, two ways to run it
    if (cls.__name__ in lazy and saved in full) or (cls.__name__ in full and saved in lazy):
        raise ValueError(f"{folder} holds a {saved}, not a {cls.__name__} (different models): load it with "
                         f"{saved}.from_pretrained or lazydiff.load_pipeline({str(folder)!r})")


OUTPUT_TYPES = ("pil", "np")


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil' (PIL images, the input's size and mode) or 'np' (a float32 array "
                         f"(B, H, W, C) in [0, 1]), got {output_type!r}")


def with_output_type(out: "EditPipelineOutput", output_type: str) -> "EditPipelineOutput":
    """``images`` as diffusers' ``output_type`` asks: PIL images, or one (B, H, W, C) float32 array in [0, 1]
    (C = the input mode's channels)."""
    if output_type == "np":
        arrays = [np.asarray(img, dtype=np.float32) / 255.0 for img in out.images]
        out.images = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
    return out


@dataclass
class PreparedEdit:
    """A validated edit: the canvas and mask as arrays, padded to the token grid."""

    mode: str
    original: np.ndarray            # the input image as an array in its own mode (H, W[, C])
    rgb: np.ndarray                 # (H, W, 3) uint8
    mask: np.ndarray                # (H, W) bool, True = regenerate
    sketch_rgb: Optional[np.ndarray]  # (H, W, 3) uint8 canvas with the sketch strokes, or None
    padded_size: Tuple[int, int]    # (Hp, Wp), multiples of the token cell
    notes: Dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> Tuple[int, int]:
        return self.mask.shape


class StageTimer:
    """Wall-clock time per stage in ms; synchronises CUDA so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.ms: Dict[str, float] = OrderedDict()
        self._start = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def finish(self) -> Dict[str, float]:
        self._sync()
        self.ms["total"] = (time.perf_counter() - self._start) * 1e3
        return dict(self.ms)


# ----------------------------------------------------------------------------- input validation
def to_supported_mode(img: PIL.Image.Image) -> PIL.Image.Image:
    """A PIL image in one of :data:`SUPPORTED_MODES`, the nearest to its own: palette images (P / PA) as RGB
    or RGBA (with transparency), CMYK and other colour spaces as RGB, premultiplied as straight alpha,
    1-bit as L, 16-bit and 32-bit grey as 8-bit L (scaled: PIL's own conversion clips above 255)."""
    mode = img.mode
    if mode in SUPPORTED_MODES:
        return img
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    if mode in ("La", "RGBa"):
        return img.convert("LA" if mode == "La" else "RGBA")
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or (mode == "I" and arr.max() > 255) else (
            1.0 if mode == "F" and arr.max() <= 1.0 else 255.0)
        return PIL.Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _to_array(img: ImageInput, what: str) -> Tuple[np.ndarray, str]:
    if isinstance(img, PIL.Image.Image):
        img.load()
        img = to_supported_mode(img)
        return np.asarray(img), img.mode
    if isinstance(img, np.ndarray):
        if img.dtype.kind == "f":
            if not np.isfinite(img).all():
                raise ValueError(f"{what} contains NaN or infinite values; pass a finite image")
            if img.max() <= 1.0 + 1e-6 and img.min() >= 0:
                img = img * 255.0
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        elif img.dtype == bool:
            img = img.astype(np.uint8) * 255
        elif img.dtype != np.uint8:
            raise ValueError(f"{what} has dtype {img.dtype}; pass uint8 (0-255) or float (0-1) arrays")
        if img.ndim == 2:
            return img, "L"
        if img.ndim == 3 and img.shape[2] in (3, 4):
            return img, "RGB" if img.shape[2] == 3 else "RGBA"
        raise ValueError(f"{what} must be (H, W), (H, W, 3) or (H, W, 4); got shape {img.shape}")
    raise ValueError(f"{what} must be a PIL image or a numpy array, got {type(img).__name__}")


def _rgb(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "RGB":
        return arr
    return np.asarray(PIL.Image.fromarray(arr, mode).convert("RGB"))


def prepare_mask(mask_image: ImageInput, size: Tuple[int, int], notes: Dict[str, Any]) -> np.ndarray:
    """-> (H, W) bool. White (or True) = edit. Non-binary masks are thresholded at 50%, with a warning."""
    if mask_image is None:
        raise ValueError("mask_image is required: paint the region to regenerate in white on black")
    if isinstance(mask_image, PIL.Image.Image) and mask_image.mode not in SUPPORTED_MODES:
        mask_image = mask_image.convert("L")  # "1", "P", "I", ...: let PIL map them to grey levels
    arr, mode = _to_array(mask_image, "mask_image")
    if mode in ("RGBA", "LA") and arr[..., -1].min() < 255:
        # A painted layer (transparent background): any opaque pixel counts as painted, whatever its colour.
        arr = arr[..., -1]
    elif mode != "L":
        # Opaque RGB(A)/LA masks: white = edit (an opaque alpha channel must not mark everything).
        arr = np.asarray(PIL.Image.fromarray(arr, mode).convert("L"))
    if arr.shape[:2] != tuple(size):
        raise ValueError(f"mask_image is {arr.shape[1]}x{arr.shape[0]} but image is {size[1]}x{size[0]} "
                         "(width x height); resize the mask to the image size")
    hi = 1 if arr.max() <= 1 else 255
    values = np.unique(arr)
    if not np.all(np.isin(values, (0, hi))):
        notes["mask_thresholded"] = f"non-binary mask: pixels >= {hi / 2:g} of {hi} were taken as the hole"
        warnings.warn(notes["mask_thresholded"] + "; pass a binary (0/255) mask to silence this", stacklevel=3)
    mask = arr >= (hi / 2 if hi > 1 else 1)
    if not mask.any():
        raise ValueError("mask_image is empty: paint the region to regenerate in white (255) on black (0)")
    return mask


def prepare_edit(image: ImageInput, mask_image: ImageInput, cell: int, sketch: Optional[ImageInput] = None) -> PreparedEdit:
    """Validate and normalise an edit. ``cell`` = VAE downsampling x patch size (pixels per token)."""
    if image is None:
        raise ValueError("image is required: pass the canvas to edit as a PIL image")
    arr, mode = _to_array(image, "image")
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"image mode {mode!r} is not supported; convert it first, e.g. image.convert('RGB')")
    h, w = arr.shape[:2]
    if h < 1 or w < 1:
        raise ValueError("image is empty")
    notes: Dict[str, Any] = {}
    mask = prepare_mask(mask_image, (h, w), notes)
    rgb = _rgb(arr, mode)
    sketch_rgb = None
    if sketch is not None:
        sarr, smode = _to_array(sketch, "sketch")
        if sarr.shape[:2] != (h, w):
            raise ValueError(f"sketch is {sarr.shape[1]}x{sarr.shape[0]} but image is {w}x{h}; draw it on the canvas size")
        strokes = np.ones((h, w), bool)
        if smode in ("RGBA", "LA"):
            strokes = sarr[..., -1] > 0   # transparent = no stroke
        srgb = _rgb(sarr, smode) if smode != "RGBA" else sarr[..., :3]
        strokes &= mask                   # only strokes inside the hole are used
        if not strokes.any():  # would silently be SDEdit of the canvas's own pixels
            raise ValueError("sketch has no strokes inside the mask (its pixels there are transparent, or it was "
                             "drawn outside the mask): draw inside the mask, or pass sketch=None for a text-only edit")
        sketch_rgb = rgb.copy()
        sketch_rgb[strokes] = srgb[strokes]
        notes["sketch_pixels"] = int(strokes.sum())
    hp, wp = -(-h // cell) * cell, -(-w // cell) * cell
    return PreparedEdit(mode=mode, original=arr, rgb=rgb, mask=mask, sketch_rgb=sketch_rgb,
                        padded_size=(hp, wp), notes=notes)


def check_prompts(prompt, negative_prompt) -> Tuple[List[str], List[Optional[str]]]:
    """-> (prompts, one negative prompt per prompt). A prompt is a string or a non-empty list of them; a
    negative prompt is None, one string for all, or a list as long as the prompts."""
    many = isinstance(prompt, (list, tuple))
    prompts = list(prompt) if many else [prompt]
    if not prompts:
        raise ValueError("prompt is an empty list: give a string, or a list with at least one string")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompt must be a string or a list of strings, got {'a list holding ' if many else ''}"
                         f"{bad[0]}")
    if isinstance(negative_prompt, (list, tuple)):
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt is a list of {len(negative_prompt)} for {len(prompts)} prompt(s): give "
                             "one per prompt, or one string for all")
        negatives = list(negative_prompt)
    else:
        negatives = [negative_prompt] * len(prompts)
    bad = [type(n).__name__ for n in negatives if n is not None and not isinstance(n, str)]
    if bad:
        raise ValueError(f"negative_prompt must be a string, a list of strings, or None; got {bad[0]}")
    return prompts, negatives


def check_sampling_args(num_inference_steps: int, guidance_scale: float, strength: float,
                        num_images_per_prompt: int, blend_mode: str) -> None:
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
    if not np.isfinite(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1 = ignore the sketch's colours entirely), got {strength!r}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt!r}")
    if blend_mode not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend_mode!r}")


def _pad(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    h, w = rgb.shape[:2]
    pad = ((0, size[0] - h), (0, size[1] - w)) + ((0, 0),) * (rgb.ndim - 2)
    return np.pad(rgb, pad, mode="edge") if rgb.ndim == 3 else np.pad(rgb, pad)


def to_tensor(rgb: np.ndarray, device, dtype) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None]
    return (t.to(dtype) / 127.5 - 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def decode_crop_box(token_mask, patch_size: int, margin: int) -> Tuple[int, int, int, int]:
    """The latent box (y0, y1, x0, x1) the VAE decodes for a hole: the hole tokens' bounding box plus
    ``margin`` latent pixels of context, clipped to the canvas. ``token_mask`` (h, w) over the token
    grid (torch or numpy, true = hole)."""
    ys, xs = np.nonzero(np.asarray(token_mask.cpu() if torch.is_tensor(token_mask) else token_mask))
    h, w = (int(v) * patch_size for v in token_mask.shape[-2:])
    return (max(int(ys.min()) * patch_size - margin, 0), min((int(ys.max()) + 1) * patch_size + margin, h),
            max(int(xs.min()) * patch_size - margin, 0), min((int(xs.max()) + 1) * patch_size + margin, w))


# ----------------------------------------------------------------------------- the shared pipeline part
CANVAS_CACHE_MODES = ("off", "exact", "incremental")  # EditPipelineMixin.canvas_cache


class EditPipelineMixin:
    """Stages common to the lazy pipeline and the full-canvas baselines.

    Subclasses are ``DiffusionPipeline`` s with components ``vae``, ``text_encoder``, ``tokenizer``,
    ``decoder`` and ``scheduler``.
    """

    decode_margin: int = 4  # latent pixels around the hole given to the VAE decoder as context
    max_cached_prompts: int = 64
    # Canvas-latent cache (see masked_canvas_latents): "off" | "exact" | "incremental".
    canvas_cache: str = "incremental"
    encode_paste_margin: int = 4     # latent cells around changed pixels whose latents are refreshed
    encode_context_margin: int = 8   # further latent cells of context given to the encoder around them
    max_partial_encode: float = 0.5  # above this fraction of the canvas, encode the whole canvas
    precompute_text: bool = True     # caption projection + cross-attention K/V once per edit, not per step
    fast_scheduler_step: bool = True  # inlined DDIM update (bit-identical) instead of DDIMScheduler.step
    # On a CUDA device, replay the denoiser from CUDA graphs (.cuda_graphs): for small steps that are
    # bound by kernel launches, not arithmetic. The last max_cached_graphs graphs are kept across
    # edits: an edit of the same shapes replays from its first step. Graphed edits equal eager ones
    # (scripts/check_cuda_graphs.py on an H200); off by default because the graphs hold GPU memory
    # (each records its own pool) that a library caller should opt into. The demo turns it on.
    cuda_graphs: bool = False
    max_cached_graphs: int = 4  # 0: a graph per edit, as before graphs were kept
    graph_replay_hook: Optional[Callable[[CUDAGraphDenoiser], None]] = None  # its on_replay (eval.flops)
    cuda_runtime = None  # torch.cuda; lazydiff.testing.FakeCUDA in tests without a GPU

    vae_decode_runner = None  # set by enable_onnx_runtime
    vae_encode_runner = None
    text_encoder_runner = None
    context_encoder_runner = None

    ONNX_PARTS = ("decoder", "context_encoder", "vae", "text_encoder")

    def enable_onnx_runtime(self, enable: bool = True, threads: Optional[int] = None,
                            parts: Sequence[str] = ONNX_PARTS) -> None:
        """Run the decoder's denoising steps (``"decoder"``), the lazy pipeline's context encoder
        (``"context_encoder"``; ignored by pipelines without one), the crop's VAE decode and whole-canvas
        VAE encodes (``"vae"``) and new prompts' text encoding (``"text_encoder"``) in ONNX Runtime on
        CPU, fp32 (``decoder.use_onnx_runtime``; :mod:`lazydiff.models.onnx_backend`). The same switch
        for every pipeline: the lazy decoder and the full-canvas one share the step's graph, and all
        encode and decode alike. ``parts=("vae",)`` keeps the transformers in PyTorch. Leave out
        ``"text_encoder"`` for text encoders over 2 GiB (T5-XXL): an ONNX graph cannot hold them."""
        from ..models.onnx_backend import (OnnxRunner, export_context_encoder, export_text_encoder, export_vae_decode,
                                           export_vae_encode)

        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        unknown = sorted(set(parts) - set(self.ONNX_PARTS))
        if unknown or not parts:
            raise ValueError(f"enable_onnx_runtime(parts=...) takes a non-empty subset of {self.ONNX_PARTS}, "
                             f"got {parts!r}")
        on = {part: enable and part in parts for part in self.ONNX_PARTS}
        self.decoder.use_onnx_runtime(on["decoder"], threads)
        self.context_encoder_runner = OnnxRunner(threads, export=export_context_encoder) \
            if on["context_encoder"] and getattr(self, "context_encoder", None) is not None else None
        self.vae_decode_runner = OnnxRunner(threads, export=export_vae_decode) if on["vae"] else None
        self.vae_encode_runner = OnnxRunner(threads, export=export_vae_encode) if on["vae"] else None
        self.text_encoder_runner = OnnxRunner(threads, export=export_text_encoder) if on["text_encoder"] else None

    _RUNNER_ATTRS = ("context_encoder_runner", "vae_decode_runner", "vae_encode_runner", "text_encoder_runner")

    @property
    def onnx_runners(self) -> Dict[str, Any]:
        """The ONNX Runtime runners ``enable_onnx_runtime`` set, by attribute (None: PyTorch runs that
        part). Assigning such a dict back swaps them (missing keys: PyTorch), e.g. to time both
        backends on one pipeline without rebuilding graphs (``eval runtime --levers``)."""
        return {"decoder.onnx_runner": self.decoder.onnx_runner, **{a: getattr(self, a) for a in self._RUNNER_ATTRS}}

    @onnx_runners.setter
    def onnx_runners(self, runners: Dict[str, Any]) -> None:
        unknown = set(runners) - set(self.onnx_runners)
        if unknown:
            raise ValueError(f"unknown runner attributes {sorted(unknown)}; known: {sorted(self.onnx_runners)}")
        self.decoder.onnx_runner = runners.get("decoder.onnx_runner")
        for a in self._RUNNER_ATTRS:
            setattr(self, a, runners.get(a))

    def warm_up(self, num_inference_steps: int = 20, prompt: str = "") -> None:
        """One edit on a small blank canvas, then the caches it filled emptied again: load-time work that
        would otherwise land in the first real edit (building the ONNX Runtime graphs, ~40 s for the
        SD-VAE; the trunk's per-timestep constants, memoised per process: with a 1-step warm-up the
        shipped model's first 20-step edit denoised in 255-303 ms, with a 20-step one in 151-222 ms)."""
        side = 4 * self.token_cell
        mask = np.zeros((side, side), np.uint8)
        mask[: side // 2, : side // 2] = 255
        with torch.no_grad():
            self(prompt, PIL.Image.new("RGB", (side, side), (128, 128, 128)), PIL.Image.fromarray(mask),
                 num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(0))
        self.clear_caches()

    # -- geometry
    @property
    def vae_scale_factor(self) -> int:
        cfg = self.vae.config
        blocks = getattr(cfg, "block_out_channels", None) or getattr(cfg, "encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def patch_size(self) -> int:
        return self.decoder.config.patch_size

    @property
    def token_cell(self) -> int:
        """Pixels per token side: VAE downsampling x patch size (16 for SD's VAE and PixArt)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def model_dtype(self) -> torch.dtype:
        return self._dtype_of("decoder")

    def _dtype_of(self, component: str) -> torch.dtype:
        """``getattr(self, component).dtype``, once per edit: diffusers' ``ModelMixin.dtype`` walks every
        submodule for hooks (~1 ms for the shipped decoder), and an edit asks ~10 times."""
        return once_per_edit(self, "dtype:" + component, lambda: getattr(self, component).dtype)

    # -- text
    def _encode_one(self, prompt: str, max_length: int, device) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        cache = self.__dict__.setdefault("_prompt_cache", OrderedDict())
        key = (prompt, max_length, str(device), self.text_encoder.dtype, id(self.text_encoder))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        full = self.tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        truncated = len(full) > max_length
        tok = self.tokenizer(prompt, truncation=True, max_length=max_length, return_tensors="pt")
        ids, attn = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        if self._in_onnx(self.text_encoder_runner, ids.device, self.text_encoder.dtype) and bool(attn.all()):
            # (exported unpadded; the prompts here never are)
            emb = self.text_encoder_runner(self.text_encoder, {"ids": ids, "attn": attn})
        else:
            emb = self.text_encoder(ids, attention_mask=attn)[0]
        cache[key] = (emb, attn, truncated)
        while len(cache) > self.max_cached_prompts:
            cache.popitem(last=False)
        return cache[key]

    def encode_prompt(self, prompt: Union[str, Sequence[str]], negative_prompt: Union[str, Sequence[str], None],
                      do_cfg: bool, batch: int, device, max_sequence_length: int = 120,
                      notes: Optional[Dict[str, Any]] = None):
        """-> (embeds (B', L, D), mask (B', L)); B' = len(prompts) * batch, doubled with CFG (uncond first).
        ``prompt``: one string or a list (one per image group, diffusers' order: each prompt's ``batch``
        images together); ``negative_prompt``: one for all, or a list as long. Cached per prompt."""
        prompts, negatives = check_prompts(prompt, negative_prompt)
        max_length = min(max_sequence_length, getattr(self.tokenizer, "model_max_length", max_sequence_length) or max_sequence_length)
        encoded = [self._encode_one(p, max_length, device) for p in prompts]
        if any(t for _, _, t in encoded) and notes is not None:
            notes["prompt_truncated"] = f"prompt was longer than {max_length} tokens and was truncated"
            warnings.warn(notes["prompt_truncated"] + "; shorten it to keep every word", stacklevel=3)
        embs = [e for e, _, _ in encoded for _ in range(batch)]
        masks = [m for _, m, _ in encoded for _ in range(batch)]
        if do_cfg:
            uncond = [self._encode_one(n or "", max_length, device) for n in negatives]
            embs = [e for e, _, _ in uncond for _ in range(batch)] + embs
            masks = [m for _, m, _ in uncond for _ in range(batch)] + masks
        length = max(e.shape[1] for e in embs)  # every row padded to one length, masked
        embs = [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e in embs]
        masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
        return torch.cat(embs).to(self.model_dtype), torch.cat(masks)

    # -- VAE
    def vae_encode(self, pixels: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """Scaled latents of ``pixels``. ``plain``: no hooks are on the encoder's modules (no canvas-cache
        recording or crop encode), so ONNX Runtime may run it when enabled."""
        x = pixels.to(self._dtype_of("vae"))
        if plain and self._in_onnx(self.vae_encode_runner, x.device, x.dtype):
            z = self.vae_encode_runner(self.vae, {"x": x})
        else:
            out = self.vae.encode(x)
            z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).to(self.model_dtype)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self._dtype_of("vae")) / self.vae.config.scaling_factor + shift
        if self._in_onnx(self.vae_decode_runner, z.device, z.dtype):
            return self.vae_decode_runner(self.vae, {"z": z})
        return self.vae.decode(z).sample

    @staticmethod
    def _in_onnx(runner, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a call runs in ``runner`` (set by enable_onnx_runtime): a CPU fp32 backend."""
        return runner is not None and device.type == "cpu" and dtype == torch.float32

    # -- canvas caches
    def clear_caches(self) -> None:
        """Forget cached prompt embeddings, canvas latents, (lazy pipeline) context tokens and CUDA graphs. Call it
        after changing weights in place; every cache is keyed on inputs, not on parameters. (The
        decoder trunk's memoised timestep constants are keyed on the parameters themselves and stay;
        after writing weights through ``param.data`` call ``decoder.trunk.clear_inference_cache()``.)"""
        for k in ("_prompt_cache", "_canvas_state", "_context_cache", "_graph_cache"):
            self.__dict__.pop(k, None)

    @staticmethod
    def _changed_pixels(rgb: np.ndarray, mask: np.ndarray, prev_rgb: np.ndarray, prev_mask: np.ndarray) -> np.ndarray:
        """(Hp, Wp) bool: where the VAE input ``I * (1 - M)`` or the hole ``M`` differs from the cached
        canvas's: the hole changed, or the pixel is outside the hole and its colour changed. No all-False
        result can come from two different VAE inputs. Whole-array compares first, then per-channel
        ORs: ~5 ms at 1024², not the ~40 ms of building and comparing a masked copy."""
        changed = mask != prev_mask
        if not np.array_equal(rgb, prev_rgb):
            ne = rgb != prev_rgb
            changed |= (ne[..., 0] | ne[..., 1] | ne[..., 2]) & ~mask
        return changed

    def _refresh_boxes(self, changed: np.ndarray) -> List[Tuple[Box, Box]]:
        """:func:`refresh_boxes` with this pipeline's VAE scale and margins."""
        return refresh_boxes(changed, self.vae_scale_factor, self.encode_paste_margin, self.encode_context_margin)

    def masked_canvas_latents(self, rgb: np.ndarray, mask: np.ndarray,
                              masked_pixels: Callable[[], torch.Tensor], device) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """``E(I * (1 - M))`` for the padded masked canvas ``masked_pixels()`` (1, 3, Hp, Wp), made from the
        padded canvas ``rgb`` (Hp, Wp, 3) uint8 and hole ``mask`` (Hp, Wp) bool, using the canvas cache.
        ``masked_pixels`` is called only if something must be encoded (not on a cache hit); ``device`` is
        where it puts them.

        ``canvas_cache``:
          * ``"off"``: always encode the whole canvas (no state kept).
          * ``"exact"``: reuse the last latents when the masked canvas and mask are bit-identical
            (a repeated edit, or a re-roll on the result of an edit with the same mask); otherwise
            encode the whole canvas. Outputs are bit-identical to ``"off"``.
          * ``"incremental"`` (default): as ``"exact"``, and when only part of the masked canvas
            changed (a new mask, or the previous result as the new canvas), VAE-encode only crops
            around the changed pixels (``encode_paste_margin`` + ``encode_context_margin`` latent
            cells) and paste them into the cached latents. The crops are encoded as part of the whole
            canvas (whole-canvas GroupNorm statistics and attention keys/values recorded at the last
            full encode and kept up to date: :mod:`.canvas_cache`); what remains approximate is the
            influence of the changed pixels on latents beyond the paste margin and the crops'
            boundary effects (docs/BENCHMARKS.md: max |error| ~4%, mean ~0.06% of the mean |latent|
            for the shipped VAE). Falls back to a full encode when the crops would cover more than
            ``max_partial_encode`` of the canvas.
        """
        mode = self.canvas_cache
        if mode not in CANVAS_CACHE_MODES:
            raise ValueError(f"canvas_cache must be 'off', 'exact' or 'incremental', got {mode!r}")
        if mode == "off":
            return self.vae_encode(masked_pixels(), plain=True), {"vae_encode": "full", "encoded_fraction": 1.0}
        ident = (rgb.shape, str(torch.device(device)), self._dtype_of("vae"), self.model_dtype, id(self.vae))
        state = self.__dict__.get("_canvas_state")
        if state is not None and state["ident"] == ident:
            changed = self._changed_pixels(rgb, mask, state["rgb"], state["mask"])
            if not changed.any():
                return state["latents"], {"vae_encode": "reused", "encoded_fraction": 0.0,
                                          "canvas_version": state["version"]}
            if mode == "incremental" and state.get("record") is not None:
                boxes = self._refresh_boxes(changed)
                h, w = state["latents"].shape[-2:]
                area = crop_cells(boxes)
                if area <= self.max_partial_encode * h * w:
                    s = self.vae_scale_factor
                    lat = state["latents"].clone()
                    rec = state["record"]
                    pixels = masked_pixels()
                    for paste, crop in boxes:
                        (py0, py1, px0, px1), (cy0, cy1, cx0, cx1) = paste, crop
                        with canvas_cache.crop_as_part_of_canvas(self.vae, rec, crop, paste):
                            z = self.vae_encode(pixels[..., cy0 * s:cy1 * s, cx0 * s:cx1 * s])
                        lat[..., py0:py1, px0:px1] = z[..., py0 - cy0:py1 - cy0, px0 - cx0:px1 - cx0]
                    version = next(_CANVAS_VERSIONS)
                    self.__dict__["_canvas_state"] = dict(ident=ident, rgb=rgb.copy(), mask=mask.copy(), latents=lat,
                                                          version=version, record=rec)
                    return lat, {"vae_encode": "partial", "encoded_fraction": area / (h * w), "canvas_version": version,
                                 "encoded_boxes": len(boxes)}
        s = self.vae_scale_factor
        latent_size = (rgb.shape[0] // s, rgb.shape[1] // s)
        pixels = masked_pixels()
        rec = None
        # Record what the encoder saw only if a partial re-encode can ever pay at this canvas size
        # (the smallest crop: one cell plus both margins on each side).
        smallest = (1 + 2 * (self.encode_paste_margin + self.encode_context_margin)) ** 2
        if mode == "incremental" and canvas_cache.supported(self.vae) and \
                smallest <= self.max_partial_encode * latent_size[0] * latent_size[1]:
            with canvas_cache.record_encoder(self.vae, latent_size) as rec:
                lat = self.vae_encode(pixels)
        else:
            lat = self.vae_encode(pixels, plain=True)
        version = next(_CANVAS_VERSIONS)
        self.__dict__["_canvas_state"] = dict(ident=ident, rgb=rgb.copy(), mask=mask.copy(), latents=lat,
                                              version=version, record=rec)
        return lat, {"vae_encode": "full", "encoded_fraction": 1.0, "canvas_version": version}

    def encode_canvas(self, edit: PreparedEdit, device) -> Dict[str, torch.Tensor]:
        """VAE latents of the masked canvas ``E(I * (1 - M))`` (and of the sketch), plus the masks.
        The masked-canvas latents go through the canvas cache (:meth:`masked_canvas_latents`)."""
        rgb, mask = _pad(edit.rgb, edit.padded_size), _pad(edit.mask, edit.padded_size)
        mask_px = torch.from_numpy(mask).to(device)[None, None]
        # hole -> 0, i.e. mid-grey in [-1, 1]; made only if the canvas cache must encode something
        masked = lambda: to_tensor(rgb, device, torch.float32) * (~mask_px)  # noqa: E731
        latents, info = self.masked_canvas_latents(rgb, mask, masked, device)
        edit.notes.update(info)
        out = {"mask_px": mask_px, "masked_latents": latents}
        if "canvas_version" in info:
            out["canvas_version"] = info["canvas_version"]
        if edit.sketch_rgb is not None:
            out["sketch_latents"] = self.vae_encode(to_tensor(_pad(edit.sketch_rgb, edit.padded_size), device, torch.float32),
                                                    plain=True)
        s = self.vae_scale_factor
        cells = token_mask_from_pixels(mask_px, s)[:, None]  # pooled once at full resolution, then per patch
        out["mask_latent"] = cells.to(self.model_dtype)
        out["token_mask"] = token_mask_from_pixels(cells, self.patch_size)
        out["hole_index"] = hole_indices(out["token_mask"])
        return out

    # -- sampling
    def prepare_timesteps(self, num_inference_steps: int, strength: float, device, has_init: bool):
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if has_init and strength < 1.0:
            # SDEdit: start part-way down the schedule from the noised sketch.
            n = min(max(int(round(num_inference_steps * strength)), 1), num_inference_steps)
            start = (len(timesteps) - n * self.scheduler.order)
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start)
        return timesteps

    def initial_latents(self, shape, generator, device, latents: Optional[torch.Tensor],
                        init: Optional[torch.Tensor], timesteps: torch.Tensor,
                        strength: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-canvas starting latents (B, C, h, w): pure noise, or the noised sketch (SDEdit).
        -> (starting latents, the noise they were made from)."""
        if latents is not None:
            if not torch.is_tensor(latents) or latents.shape[1:] != torch.Size(shape[1:]) or latents.shape[0] not in (1, shape[0]):
                raise ValueError(f"latents must be a tensor of shape {tuple(shape)} (or batch 1), "
                                 f"got {tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values")
            noise = latents.to(device, torch.float32).expand(shape).clone()
        else:
            noise = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)
        if init is not None and strength < 1.0:
            t0 = timesteps[:1].repeat(shape[0])
            return self.scheduler.add_noise(init.float().expand(shape), noise, t0), noise
        return noise * self.scheduler.init_noise_sigma, noise

    def after_step_fn(self, enc: Dict[str, torch.Tensor], noise: torch.Tensor,
                      timesteps: torch.Tensor) -> Optional[Callable[[int, torch.Tensor], torch.Tensor]]:
        """``after_step(i, latents) -> latents``, applied to what the sampler holds after step ``i``
        (before the callback), or None. LazyDiffusion needs none: it holds the hole's tokens only."""
        return None

    def sample(self, latents: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               timesteps: torch.Tensor, guidance_scale: float, generator,
               callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
               preview: Optional[Callable[[torch.Tensor], PIL.Image.Image]] = None,
               timer: Optional[StageTimer] = None, notes: Optional[Dict[str, Any]] = None,
               after_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """The sampling loop every pipeline shares (k-diffusion style: the denoiser is a function).

        ``denoise(model_input, t)`` returns the noise prediction for a batch; with CFG the batch is
        [uncond; cond] in one forward pass. Works on any latent shape (hole tokens or full canvas).
        ``after_step(i, latents)`` (:meth:`after_step_fn`) may replace the latents after each step.
        """
        do_cfg = guidance_scale > 1.0
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        fast_step = self._ddim_step_fn() if self.fast_scheduler_step else None
        model_dtype = self.model_dtype  # once: diffusers' ``dtype`` walks every parameter
        if self.cuda_graphs and self._graphs_apply(latents):
            denoise = self._graphed(denoise, notes)
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents] * 2) if do_cfg else latents
                x = self.scheduler.scale_model_input(x, t)
                eps = denoise(x.to(model_dtype), t).float()
                if do_cfg:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance_scale * (cond - uncond)
                if fast_step is not None:
                    latents, pred_x0 = fast_step(eps, t, latents)
                else:
                    step = self.scheduler.step(eps, t, latents, **extra, return_dict=True)
                    latents, pred_x0 = step.prev_sample, getattr(step, "pred_original_sample", None)
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback_on_step_end is not None:
                    cb_t0 = time.perf_counter()
                    kwargs = {"latents": latents, "pred_x0": pred_x0 if pred_x0 is not None else latents}
                    kwargs = {k: kwargs[k] for k in callback_on_step_end_tensor_inputs if k in kwargs}
                    if preview is not None:
                        x0 = pred_x0 if pred_x0 is not None else latents
                        kwargs["decode_preview"] = lambda x0=x0: preview(x0)
                    result = callback_on_step_end(self, i, t, kwargs) or {}
                    latents = result.get("latents", latents)
                    if timer is not None:  # preview work is the caller's, not the method's
                        timer.ms["callback"] = timer.ms.get("callback", 0.0) + (time.perf_counter() - cb_t0) * 1e3
                bar.update()
        return latents

    @staticmethod
    def _graphs_apply(latents: torch.Tensor) -> bool:
        return latents.is_cuda  # CUDA graphs exist only there

    def _graphed(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 notes: Optional[Dict[str, Any]] = None):
        """``denoise`` replayed from a CUDA graph of the pipeline's graph cache (see :mod:`.cuda_graphs`);
        ``notes["cuda_graph"]`` says whether the edit recorded its graph or replayed a cached one."""
        cache = self.__dict__.get("_graph_cache")
        if cache is None or cache.size != self.max_cached_graphs or cache.cuda is not self.cuda_runtime:
            cache = self.__dict__["_graph_cache"] = CUDAGraphCache(self.max_cached_graphs, self.cuda_runtime)
        # a graph reads the weights by address: a new storage or an in-place update needs a new graph
        weights = once_per_edit(self.decoder, "graph weights", lambda: _param_key(list(self.decoder.parameters())))
        return cache.denoiser(denoise, self.graph_replay_hook, weights, notes)

    def _ddim_step_fn(self):
        """``DDIMScheduler.step`` for the configuration our models ship with (epsilon prediction, no
        clipping or thresholding, eta = 0), inlined: the same tensor operations in the same order on
        the same 0-d coefficients (so bit-identical), with the coefficients computed once per
        timestep of the schedule (kept across edits) instead of ~15 small tensor ops per step. None when the scheduler is anything else.
        -> step(eps, t, sample) -> (prev_sample, pred_original_sample)."""
        from diffusers import DDIMScheduler

        s = self.scheduler
        cfg = s.config
        if type(s) is not DDIMScheduler or cfg.prediction_type != "epsilon" or cfg.thresholding \
                or cfg.clip_sample or s.num_inference_steps is None or "step" in s.__dict__:
            return None
        # Kept across edits for this scheduler's schedule (they are a function of it alone).
        memo = self.__dict__.setdefault("_ddim_coeffs", {})
        schedule = (id(s), id(s.alphas_cumprod), s.alphas_cumprod._version, float(s.final_alpha_cumprod),
                    cfg.num_train_timesteps, s.num_inference_steps)
        if memo.get("schedule") != schedule:
            memo.clear()
            memo["schedule"] = schedule
        coeffs: Dict[int, Tuple[torch.Tensor, ...]] = memo.setdefault("coeffs", {})
        eta = 0.0  # DDIMScheduler.step's default, which sample() uses

        def step(eps: torch.Tensor, t: torch.Tensor, sample: torch.Tensor):
            key = int(t)
            c = coeffs.get(key)
            if c is None:  # DDIMScheduler.step, steps 1, 2, 5 and 6, on its 0-d tensors
                prev_t = key - cfg.num_train_timesteps // s.num_inference_steps
                alpha_prod_t = s.alphas_cumprod[key]
                alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
                beta_prod_t = 1 - alpha_prod_t
                std_dev_t = eta * s._get_variance(key, prev_t) ** (0.5)
                c = coeffs[key] = (beta_prod_t ** (0.5), alpha_prod_t ** (0.5),
                                   (1 - alpha_prod_t_prev - std_dev_t ** 2) ** (0.5), alpha_prod_t_prev ** (0.5))
            sqrt_beta, sqrt_alpha, dir_coeff, sqrt_alpha_prev = c
            pred_original_sample = (sample - sqrt_beta * eps) / sqrt_alpha
            return sqrt_alpha_prev * pred_original_sample + dir_coeff * eps, pred_original_sample

        return step

    # -- decoding and compositing
    def decode_hole(self, canvas_latents: torch.Tensor, hole_tokens: torch.Tensor, hole_index: torch.Tensor,
                    token_mask: torch.Tensor) -> Tuple[np.ndarray, Tuple[int, int]]:
        """Scatter hole tokens into the masked-canvas latent and VAE-decode only the hole's bounding box
        plus ``decode_margin`` latent pixels. (The masked canvas's latent, already encoded, stands in for the
        canvas's around the hole: it saves a second encode, and only pixels inside the mask are kept.) -> ((B, h, w, 3) uint8 region, (y0, x0) pixel offset)."""
        p, s = self.patch_size, self.vae_scale_factor
        b = hole_tokens.shape[0]
        grid = token_mask.shape[-2:]
        tokens = patchify(canvas_latents.expand(b, -1, -1, -1).to(hole_tokens.dtype), p)
        full = unpatchify(scatter_tokens(tokens, hole_index.expand(b, -1), hole_tokens), tuple(grid), p)
        y0, y1, x0, x1 = decode_crop_box(token_mask[0], p, self.decode_margin)
        pixels = self.vae_decode(full[:, :, y0:y1, x0:x1])
        return to_uint8(pixels), (y0 * s, x0 * s)

    def compose(self, edit: PreparedEdit, region: np.ndarray, offset: Tuple[int, int], blend_mode: str,
                feather_radius: Optional[float]) -> List[PIL.Image.Image]:
        """Paste each decoded region into the canvas inside the pixel mask; keep size and mode."""
        h, w = edit.size
        y0, x0 = offset
        images = []
        for reg in region:
            gen = edit.rgb.copy()
            ry, rx = min(reg.shape[0], h - y0), min(reg.shape[1], w - x0)
            gen[y0:y0 + ry, x0:x0 + rx] = reg[:ry, :rx]
            out_rgb = blend(edit.rgb, gen, edit.mask, blend_mode, feather_radius)
            images.append(self._to_mode(edit, out_rgb))
        return images

    @staticmethod
    def _to_mode(edit: PreparedEdit, out_rgb: np.ndarray) -> PIL.Image.Image:
        """The blended RGB canvas (``blend``'s output: every pixel outside the mask is ``edit.rgb``'s) in
        the original mode, the edited pixels written into a copy of the original array."""
        if edit.mode == "RGB":  # edit.rgb is the original array: out_rgb already is the answer
            return PIL.Image.fromarray(out_rgb, "RGB")
        out = edit.original.copy()
        m = edit.mask
        y0, y1, x0, x1 = box = mask_bbox(m)
        if edit.mode == "RGBA":
            paste_masked(out[..., :3], out_rgb, m, box)
        else:  # L, LA
            lum = np.asarray(PIL.Image.fromarray(out_rgb).convert("L"))
            paste_masked(out if edit.mode == "L" else out[..., 0], lum, m, box)
        if edit.mode in ("RGBA", "LA"):  # generated content is opaque
            out[y0:y1, x0:x1, -1][m[y0:y1, x0:x1]] = 255
        return PIL.Image.fromarray(out, edit.mode)

    def stats(self, edit: PreparedEdit, enc: Dict[str, torch.Tensor], steps: int) -> Dict[str, Any]:
        tm = enc["token_mask"]
        return {"hole_tokens": int(tm[0].sum()), "total_tokens": int(tm[0].numel()),
                "mask_ratio": float(edit.mask.mean()), "steps": int(steps),
                "token_grid": tuple(int(v) for v in tm.shape[-2:]), **edit.notes}

    def hole_tokens_of(self, full_latents: torch.Tensor, hole_index: torch.Tensor) -> torch.Tensor:
        return gather_tokens(patchify(full_latents, self.patch_size), hole_index.expand(full_latents.shape[0], -1))

    def added_cond_kwargs(self, edit: PreparedEdit, batch: int, device) -> Optional[Dict[str, torch.Tensor]]:
        """PixArt-α 1024's resolution / aspect-ratio conditioning, when the decoder uses it."""
        if not self.decoder.config.use_additional_conditions:
            return None
        h, w = edit.padded_size
        return {"resolution": torch.tensor([[h, w]], device=device, dtype=self.model_dtype).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[h / w]], device=device, dtype=self.model_dtype).repeat(batch, 1)}

    def text_conditioning(self, text: torch.Tensor, text_mask: torch.Tensor):
        """Per-edit text constants of the decoder (caption projection, cross-attention keys/values),
        computed once instead of at every step; None when the decoder cannot precompute them or
        ``precompute_text`` is off."""
        prep = getattr(self.decoder, "prepare_text", None)
        if not self.precompute_text or prep is None:
            return None
        return prep(text, text_mask)

    # -- the whole edit, with the denoiser left to the subclass
    def make_denoiser(self, enc: Dict[str, torch.Tensor], edit: PreparedEdit, text: torch.Tensor,
                      text_mask: torch.Tensor, batch: int, device, timer: StageTimer):
        """-> (to_working, denoise, to_hole_tokens).

        ``to_working`` maps full-canvas latents (B, C, h, w) to what the sampler holds,
        ``denoise(x, t)`` predicts noise for a (CFG-doubled) batch of those, and ``to_hole_tokens``
        maps the sampler's final latents to hole tokens (B, |H|, C*p*p) for decoding.
        """
        raise NotImplementedError

    def run_edit(self, *args, **kwargs) -> EditPipelineOutput:
        """One edit (the pipelines' ``__call__``; arguments as :meth:`_run_edit`) in an
        :func:`~lazydiff.models.dit.edit_scope`: what depends on the weights alone is checked once."""
        with edit_scope():
            return self._run_edit(*args, **kwargs)

    def _run_edit(self, prompt: Union[str, List[str]], image: ImageInput, mask_image: ImageInput,
                 negative_prompt: Union[str, List[str], None] = "",
                 num_inference_steps: int = 20, guidance_scale: float = 4.5, generator=None,
                 num_images_per_prompt: int = 1, latents: Optional[torch.Tensor] = None,
                 sketch: Optional[ImageInput] = None, strength: float = 1.0, blend: str = "feather",
                 feather_radius: Optional[float] = None, max_sequence_length: int = 120,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)) -> EditPipelineOutput:
        check_sampling_args(num_inference_steps, guidance_scale, strength, num_images_per_prompt, blend)
        device = self._execution_device
        timer = StageTimer(device)
        prompts, _ = check_prompts(prompt, negative_prompt)
        b = len(prompts) * num_images_per_prompt   # images: each prompt's num_images_per_prompt together
        if isinstance(generator, (list, tuple)) and len(generator) != b:
            raise ValueError(f"generator is a list of {len(generator)} generators for {b} image(s) "
                             f"({len(prompts)} prompt(s) x num_images_per_prompt={num_images_per_prompt}): pass one "
                             "generator per image, or a single generator")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: {unknown} not available; this pipeline passes "
                             f"{' and '.join(map(repr, self._callback_tensor_inputs))} (and decode_preview) to the callback")
        if generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
            raise ValueError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), a list of "
                             f"them (one per image), or None; got {type(generator).__name__}")
        edit = prepare_edit(image, mask_image, self.token_cell, sketch)
        if sketch is None and strength != 1.0:
            warnings.warn(f"strength={strength} is ignored without a sketch: it sets how far sketch guidance starts "
                          "from the strokes; pass sketch=... (or leave strength at 1.0)", stacklevel=3)
        limit = default_max_side(self)
        h, w = edit.mask.shape
        if limit and max(h, w) > limit:
            whole = "context encoder" if hasattr(self, "context_encoder") else "decoder"
            warnings.warn(f"the canvas is {w}x{h}, over {MAX_SIDE_FACTOR}x the {limit // MAX_SIDE_FACTOR}-px side this "
                          f"model was trained at: the VAE and {whole} run over the whole canvas, so an edit is slow "
                          "and the model works out of its range; downscale the canvas first, or edit through "
                          "lazydiff.pipelines.working_size (downscale_edit / paste_back: what the demo and the CLI's "
                          "--max-side do)", stacklevel=3)
        do_cfg = guidance_scale > 1.0
        with timer("text"):
            text, text_mask = self.encode_prompt(prompt, negative_prompt, do_cfg, num_images_per_prompt, device,
                                                 max_sequence_length, edit.notes)
        with timer("vae_encode"):
            enc = self.encode_canvas(edit, device)
        to_working, denoise, to_hole_tokens = self.make_denoiser(enc, edit, text, text_mask, 2 * b if do_cfg else b,
                                                                 device, timer)
        timesteps = self.prepare_timesteps(num_inference_steps, strength, device, sketch is not None)
        c, (h, w) = enc["masked_latents"].shape[1], enc["masked_latents"].shape[-2:]
        full, noise = self.initial_latents((b, c, h, w), generator, device, latents, enc.get("sketch_latents"),
                                           timesteps, strength)

        def preview(x0):
            region, offset = self.decode_hole(enc["masked_latents"], to_hole_tokens(x0[:1]), enc["hole_index"], enc["token_mask"])
            return self.compose(edit, region, offset, "hard", None)[0]

        with timer("denoise"):
            x = self.sample(to_working(full), denoise, timesteps, guidance_scale, generator, callback_on_step_end,
                            callback_on_step_end_tensor_inputs, preview, timer, edit.notes,
                            self.after_step_fn(enc, noise, timesteps))
        if "callback" in timer.ms:
            timer.ms["denoise"] -= timer.ms["callback"]
        with timer("vae_decode"):
            region, offset = self.decode_hole(enc["masked_latents"], to_hole_tokens(x), enc["hole_index"], enc["token_mask"])
        with timer("blend"):
            images = self.compose(edit, region, offset, blend, feather_radius)
        return EditPipelineOutput(images=images, timings=timer.finish(), stats=self.stats(edit, enc, len(timesteps)))


CALL_DOC = """Regenerate ``image`` inside ``mask_image`` (white = edit) following ``prompt``.

        Args:
            prompt, negative_prompt: text; the prompt is truncated (with a warning) past
                ``max_sequence_length`` tokens. A list of prompts edits the same region once per prompt
                in one batch (the canvas is encoded once); ``negative_prompt`` is then one string for
                all or a list as long. Images come prompt by prompt, ``num_images_per_prompt`` each.
            image: the canvas (PIL RGB / RGBA / L / LA, or a uint8 array), any size. Other PIL modes are
                edited in the nearest of these (palette -> RGB / RGBA, CMYK -> RGB, 1-bit and 16-bit grey
                -> 8-bit L), which the result then has.
            mask_image: same size; white (or True) = regenerate. Non-binary masks are thresholded at 50%.
            num_inference_steps, guidance_scale, generator, num_images_per_prompt: as in diffusers.
            latents: optional starting noise for the whole canvas, (B, C, h, w) at the padded latent size
                (RegenerateCrop: at the resized crop's latent size).
            sketch, strength: SDEdit-style guidance. Strokes of ``sketch`` (opaque pixels of an RGBA
                image, or all pixels of an RGB one) inside the mask are encoded and noised to a
                timestep set by ``strength`` in (0, 1], then denoised. Hole pixels without strokes start
                from the canvas's own content there. A sketch without strokes inside the mask is an error.
            blend: seam handling, "hard", "feather" or "poisson"; ``feather_radius`` in pixels.
            callback_on_step_end(pipe, step, t, kwargs): called after each step; ``kwargs`` holds the
                tensors named in ``callback_on_step_end_tensor_inputs`` ("latents", "pred_x0": what the
                sampler holds, i.e. hole tokens (B, |H|, C*p*p) for LazyDiffusion, (B, C, h, w) latents for
                the full-canvas baselines) and
                ``decode_preview()``, which renders the current estimate as a PIL canvas. Return a dict
                (possibly with new "latents") or None.

            output_type: "pil" (default) or "np": one float32 array (B, H, W, C) in [0, 1].

        Returns:
            :class:`EditPipelineOutput` with ``images`` (same size and mode as ``image``; every pixel
            outside the mask bit-identical; inside the mask an RGBA / LA canvas gets opaque pixels), ``timings`` (ms: text, vae_encode, [context_encoder],
            denoise, vae_decode, blend, total) and ``stats`` (hole_tokens, total_tokens, mask_ratio, steps).
        """


class EditDiffusionPipeline(DiffusionPipeline, EditPipelineMixin):
    """Base of the editing pipelines: diffusers' ``DiffusionPipeline`` plus the shared edit stages."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        check_pipeline_folder(cls, pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
