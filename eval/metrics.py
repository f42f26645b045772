"""Metrics on standard libraries: torchmetrics FID / KID (custom feature extractors) and open_clip.

Backbones:

* **ShapesCLIP** (``data/models/shapes-clip``): a small open_clip model trained on ShapesWorld. On
  ShapesWorld it is the CLIP-score model, the zero-shot classifier for prompt accuracy and the
  feature extractor for FID / KID (its image embedding).
* **Inception-v3** (real images): torchmetrics' FID network, loaded from a local weights file
  (``--inception-weights`` or ``$LAZYDIFF_INCEPTION_WEIGHTS``); never random.
* **OpenCLIP** (real images): any open_clip architecture with local weights (``--clip-model``,
  ``--clip-weights`` or ``$LAZYDIFF_CLIP_MODEL`` / ``$LAZYDIFF_CLIP_WEIGHTS``).

Missing weights raise :class:`MetricWeightsError` *before* any generation starts.

CLIP-score conventions (both reported): ``clip_cosine`` = mean raw cosine similarity of the image
and prompt embeddings (the paper's 0.19-0.21 numbers); ``clip_score_x100`` = mean of
``100 * max(cos, 0)`` (torchmetrics' ``CLIPScore`` convention; that class itself crashes with
transformers 5, torchmetrics#3407, so we compute it on open_clip embeddings).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPES_CLIP_DIR = REPO_ROOT / "data" / "models" / "shapes-clip"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_ANTIALIAS = True   # torchmetrics >= 1.8 default; changes scores vs older papers (recorded in reports)


class MetricWeightsError(FileNotFoundError):
    """Weights a metric needs are missing; the message says where to put them."""


# ----------------------------------------------------------------------------- open_clip loading
@dataclass
class ClipBundle:
    """An open_clip model with its tokenizer and preprocessing constants."""

    name: str
    model: nn.Module
    tokenizer: object
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    source: str
    note: str = ""                 # e.g. "random weights" for test models
    device: str = "cpu"
    _text_cache: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[-1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode_texts(["a"]).shape[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> normalised float at the model's resolution (bicubic, antialiased)."""
        x = images.to(self.device, torch.float32) / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images), normalize=normalize).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], normalize: bool = False) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            tokens = self.tokenizer(todo).to(self.device)
            emb = self.model.encode_text(tokens, normalize=False).float()
            for t, e in zip(todo, emb):
                self._text_cache[t] = e
        out = torch.stack([self._text_cache[t] for t in texts])
        return F.normalize(out, dim=-1) if normalize else out


def _register_config(model_cfg: dict, tag: str) -> str:
    """Register an open_clip model config under a unique name; returns the name."""
    import open_clip

    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{tag}-{digest}"
    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="lazydiff-openclip-cfg-"))
        (folder / f"{name}.json").write_text(json.dumps(model_cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return name


def load_clip_folder(folder: os.PathLike, device: str = "cpu", what: str = "ShapesCLIP") -> ClipBundle:
    """Load an open_clip model shipped as ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    The config is registered with open_clip (``add_model_config``) and the model is created with
    ``open_clip.create_model_and_transforms(name, pretrained=<safetensors>)`` and
    ``open_clip.get_tokenizer(name)``.
    """
    import open_clip

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [str(p) for p in (cfg_path, weights) if not p.exists()]
    if missing:
        raise MetricWeightsError(
            f"{what} not found: missing {', '.join(missing)}. It ships in data/models/shapes-clip "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}, trained with `python -m lazydiff.train configs/train/shapes_clip.yaml`); "
            "or pass --shapes-clip FOLDER / set LAZYDIFF_SHAPES_CLIP. No numbers are computed without it.")
    cfg = json.loads(cfg_path.read_text())
    model_cfg = cfg.get("model_cfg", cfg)
    pre = cfg.get("preprocess_cfg", {})
    if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise MetricWeightsError(f"{cfg_path}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    name = _register_config(model_cfg, "lazydiff-clip")
    mean = tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(weights), image_mean=mean,
                                                            image_std=std, device=device)
    except Exception as err:  # wrong / truncated weights
        raise MetricWeightsError(f"could not load {what} from {folder} ({type(err).__name__}: {err})") from err
    tokenizer = open_clip.get_tokenizer(name)
    vis = model_cfg["vision_cfg"]
    size = vis.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    return ClipBundle(name=what, model=model.eval(), tokenizer=tokenizer, image_size=int(size), mean=mean, std=std,
                      source=str(folder), note=str(cfg.get("note", "")), device=device)


def load_openclip(model_name: Optional[str], weights: Optional[str], device: str = "cpu") -> ClipBundle:
    """A real-image open_clip model from local weights (a folder in the shipped layout, or a
    checkpoint file plus the architecture name)."""
    import open_clip

    model_name = model_name or os.environ.get("LAZYDIFF_CLIP_MODEL")
    weights = weights or os.environ.get("LAZYDIFF_CLIP_WEIGHTS")
    if not weights:
        raise MetricWeightsError(
            "CLIP score on real images needs OpenCLIP weights on disk (nothing is downloaded): pass "
            "--clip-weights FILE --clip-model ARCH (e.g. --clip-model ViT-B-32 --clip-weights "
            "~/weights/open_clip_vit_b_32.safetensors) or set LAZYDIFF_CLIP_WEIGHTS / LAZYDIFF_CLIP_MODEL; "
            "a folder with open_clip_config.json + open_clip_model.safetensors also works")
    p = Path(weights).expanduser()
    if p.is_dir():
        return load_clip_folder(p, device, what=f"OpenCLIP ({p.name})")
    if not p.exists():
        raise MetricWeightsError(f"OpenCLIP weights file {p} does not exist; pass --clip-weights with a local file")
    if not model_name:
        raise MetricWeightsError(f"--clip-weights {p} needs the architecture name: pass --clip-model (e.g. ViT-B-32; "
                                 "see open_clip.list_models())")
    if model_name not in open_clip.list_models():
        import difflib

        hint = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        raise MetricWeightsError(f"unknown open_clip architecture {model_name!r}" + (f"; did you mean {hint}?" if hint else ""))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(p), device=device)
    except Exception as err:
        raise MetricWeightsError(f"could not load open_clip {model_name} weights from {p} ({type(err).__name__}: "
                                 f"{err}); check --clip-model matches the checkpoint") from err
    cfg = open_clip.get_model_config(model_name)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    pre = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
    std = tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
    return ClipBundle(name=f"OpenCLIP {model_name}", model=model.eval(), tokenizer=open_clip.get_tokenizer(model_name),
                      image_size=int(size), mean=mean, std=std, source=str(p), device=device)


def resolve_shapes_clip(path: Optional[str]) -> Path:
    return Path(path or os.environ.get("LAZYDIFF_SHAPES_CLIP") or SHAPES_CLIP_DIR).expanduser()


def tiny_clip_config() -> dict:
    """A tiny open_clip config (random weights) for plumbing tests. Never report its numbers."""
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def write_tiny_clip(folder: os.PathLike, seed: int = 0) -> Path:
    """Write a tiny RANDOM open_clip model in the shipped layout (tests only; the config is marked)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_clip_config()
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    (folder / CONFIG_NAME).write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        "note": "tiny random weights: plumbing tests only, numbers are meaningless"}, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    return folder


# ----------------------------------------------------------------------------- feature extractors for FID / KID
class ClipImageFeatures(nn.Module):
    """torchmetrics feature extractor: uint8 (B, 3, H, W) images -> CLIP image embeddings
    (un-normalised, float64-safe). A float (B, F) input is taken as precomputed features and passed
    through, so one extraction can feed both FID and KID."""

    def __init__(self, bundle: ClipBundle):
        super().__init__()
        self.bundle = bundle
        self.num_features = int(bundle.encode_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.is_floating_point():
            return x
        return self.bundle.encode_images(x)


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 (2048-d pool features) from a LOCAL weights file.

    ``antialias`` is torchmetrics' resize setting (default True since 1.8): record it with scores.
    """

    def __init__(self, weights_path: Optional[str], antialias: bool = FID_ANTIALIAS):
        super().__init__()
        path = check_inception_weights(weights_path)
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path), antialias=antialias)
        except Exception as err:  # a truncated / wrong file
            raise MetricWeightsError(f"could not load the Inception-v3 FID weights from {path} ({type(err).__name__}: "
                                     f"{err}); pass the original {INCEPTION_FILE}") from err
        self.num_features = 2048
        self.antialias = antialias
        self.source = str(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2 and x.is_floating_point():
            return x
        dev = next(self.net.parameters()).device
        return self.net(x.to(dev, torch.uint8)).float()


def check_inception_weights(weights_path: Optional[str]) -> Path:
    p = weights_path or os.environ.get("LAZYDIFF_INCEPTION_WEIGHTS")
    if not p:
        raise MetricWeightsError(
            "FID/KID on real images needs the Inception-v3 FID weights on disk (a random network gives FID ~ 0 for "
            f"anything, so no number is computed without them). Download {INCEPTION_FILE} (torch-fidelity's "
            "release: github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE + ") on a "
            "machine with internet, then pass --inception-weights PATH or set LAZYDIFF_INCEPTION_WEIGHTS=PATH. "
            "On ShapesWorld-like images use `fid_backbone: shapes-clip` in the suite instead.")
    path = Path(p).expanduser()
    if not path.is_file():
        raise MetricWeightsError(f"Inception-v3 FID weights not found at {path}; pass --inception-weights with the "
                                 f"path of {INCEPTION_FILE} (or set LAZYDIFF_INCEPTION_WEIGHTS)")
    return path


# ----------------------------------------------------------------------------- Frechet / kernel distances
def frechet_and_kernel(feature: nn.Module, real: torch.Tensor, fakes: Dict[str, torch.Tensor],
                       kid_subsets: int = 100, kid_subset_size: int = 1000) -> Dict[str, Dict[str, float]]:
    """FID and KID (torchmetrics) of each fake feature set against one real feature set.

    ``real``/``fakes`` are precomputed features (N, F) from ``feature`` (which passes them through),
    so every image goes through the backbone once. The caller holds every feature (the main process
    scores everything from disk), so no cross-process sync happens here (``sync_on_compute=False``).
    KID uses subsets of min(1000, N) samples and a fixed seed, so it is deterministic. Sets with
    fewer than 2 samples give NaN.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out: Dict[str, Dict[str, float]] = {}
    n_real = real.shape[0]
    fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, sync_on_compute=False)
    if n_real >= 2:
        fid.update(real.double(), real=True)
    for name, fake in fakes.items():
        res = {"fid": float("nan"), "kid": float("nan"), "kid_std": float("nan"), "n": int(fake.shape[0])}
        if n_real >= 2 and fake.shape[0] >= 2:
            fid.reset()
            fid.update(fake.double(), real=False)
            res["fid"] = float(fid.compute())
            size = int(min(kid_subset_size, n_real, fake.shape[0]))
            with warnings.catch_warnings():   # "will save all extracted features": expected here
                warnings.simplefilter("ignore", UserWarning)
                kid = KernelInceptionDistance(feature=feature, subsets=kid_subsets, subset_size=size,
                                              sync_on_compute=False)
            kid.update(real.double(), real=True)
            kid.update(fake.double(), real=False)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                mean, std = kid.compute()
            res["kid"], res["kid_std"] = float(mean), float(std)
        out[name] = res
    return out


# ----------------------------------------------------------------------------- crops and per-sample metrics
def hole_crop_box(mask: np.ndarray, margin: float) -> Tuple[int, int, int, int]:
    """Square box (y0, y1, x0, x1) around the mask's bounding box with ``margin`` x its side each way
    (the same geometry RegenerateCrop uses), shifted to stay inside the canvas."""
    from lazydiff.pipelines.pipeline_regenerate import crop_box

    return crop_box(mask, margin, min_side=8)


def crop_resize(img: np.ndarray, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    import PIL.Image

    y0, y1, x0, x1 = box
    return np.asarray(PIL.Image.fromarray(img[y0:y1, x0:x1]).resize((size, size), PIL.Image.BICUBIC))


def to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """list of (H, W, 3) uint8 (same size) -> (B, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def unmasked_violations(edited: np.ndarray, original: np.ndarray, mask: np.ndarray) -> int:
    """Pixels outside the mask that differ from the input (must be 0)."""
    diff = np.any(edited.astype(np.int16) != original.astype(np.int16), axis=-1)
    return int((diff & ~mask).sum())


def hole_mae(edited: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error (0-255 scale, over channels) inside the mask."""
    d = np.abs(edited.astype(np.float32) - truth.astype(np.float32))[mask]
    return float(d.mean()) if d.size else float("nan")


def clip_cosines(bundle: ClipBundle, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
    """Raw cosine similarity of each image with its prompt."""
    img = bundle.encode_images(images, normalize=True)
    txt = bundle.encode_texts(list(prompts), normalize=True)
    return (img * txt).sum(-1).cpu().numpy()


class ShapesZeroShot:
    """ShapesCLIP zero-shot classifier over every (shape, colour) pair; class text embeddings are
    the mean of "a {colour} {shape}", "a small ..." and "a large ..." (prompt ensembling)."""

    def __init__(self, bundle: ClipBundle):
        from lazydiff.shapesworld import all_classes, object_caption

        self.bundle = bundle
        self.classes = all_classes()
        embs = []
        for shape, color in self.classes:
            prompts = [object_caption(shape, color, size) for size in (None, "small", "large")]
            embs.append(F.normalize(bundle.encode_texts(prompts, normalize=True).mean(0), dim=-1))
        self.text = torch.stack(embs)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> List[Tuple[str, str]]:
        img = self.bundle.encode_images(images, normalize=True)
        idx = (img @ self.text.T).argmax(-1).tolist()
        return [self.classes[i] for i in idx]


def batched(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]
