"""Initialise the lazy and full-canvas decoders from a PixArt-α transformer.

Real training starts from PixArt-α (the paper initialises its decoder from PixArt-XL/2). The trunk
(timestep/caption conditioning, blocks, final layer) copies over key for key; PixArt's patch
embedding ``Conv2d(k=p, s=p)`` becomes the noisy-latent columns of our ``proj_in``. Every input
PixArt never had (the context token, the masked latent and mask of the full-canvas model) gets
zero columns, so each decoder starts out computing exactly PixArt's function.
"""
from __future__ import annotations

from typing import Union

import torch

from .full_canvas_decoder import FullCanvasDecoder
from .lazy_decoder import LazyDecoder

_SHARED_CONFIG_KEYS = ("in_channels", "out_channels", "patch_size", "num_layers", "num_attention_heads",
                       "attention_head_dim", "caption_channels", "sample_size", "interpolation_scale",
                       "use_additional_conditions", "dropout", "norm_eps")


def _pixart(pixart_or_path):
    from diffusers import PixArtTransformer2DModel

    if isinstance(pixart_or_path, PixArtTransformer2DModel):
        return pixart_or_path
    try:
        return PixArtTransformer2DModel.from_pretrained(pixart_or_path, subfolder=None, local_files_only=True)
    except (OSError, EnvironmentError) as err:
        raise OSError(
            f"could not load a PixArt-α transformer from {pixart_or_path!r}: {err}. Pass a local folder in the "
            "diffusers layout (config.json + diffusion_pytorch_model.safetensors), e.g. the 'transformer' "
            "subfolder of a downloaded PixArt-alpha/PixArt-XL-2-1024-MS snapshot.") from err


def _config_from_pixart(pixart) -> dict:
    pc = pixart.config
    if pc.norm_type != "ada_norm_single":
        raise ValueError(f"expected a PixArt-α transformer (norm_type='ada_norm_single'), got {pc.norm_type!r}")
    inner = pc.num_attention_heads * pc.attention_head_dim
    if pc.cross_attention_dim not in (None, inner):
        raise ValueError("PixArt transformers with cross_attention_dim != inner dim are not supported")
    use_extra = pc.use_additional_conditions
    if use_extra is None:
        use_extra = pc.sample_size == 128
    return dict(in_channels=pc.in_channels, out_channels=pc.out_channels, patch_size=pc.patch_size,
                num_layers=pc.num_layers, num_attention_heads=pc.num_attention_heads,
                attention_head_dim=pc.attention_head_dim, caption_channels=pc.caption_channels,
                sample_size=pc.sample_size, interpolation_scale=pc.interpolation_scale,
                use_additional_conditions=use_extra, dropout=pc.dropout, norm_eps=pc.norm_eps)


def _copy_trunk(decoder, pixart) -> None:
    state = {k: v for k, v in pixart.state_dict().items() if not k.startswith("pos_embed.")}
    missing, unexpected = decoder.trunk.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"PixArt weights do not match the decoder trunk: missing={missing[:5]} "
                         f"unexpected={unexpected[:5]}")
    conv = pixart.pos_embed.proj
    patch_dim = conv.weight[0].numel()
    with torch.no_grad():
        decoder.proj_in.weight.zero_()
        decoder.proj_in.weight[:, :patch_dim].copy_(conv.weight.flatten(1))
        decoder.proj_in.bias.copy_(conv.bias)


def lazy_decoder_from_pixart(pixart_or_path, context_dim: int) -> LazyDecoder:
    """A :class:`LazyDecoder` that equals ``pixart`` while its context columns are zero."""
    pixart = _pixart(pixart_or_path)
    decoder = LazyDecoder(**_config_from_pixart(pixart), context_dim=context_dim)
    _copy_trunk(decoder, pixart)
    return decoder if pixart.dtype == torch.float32 else decoder.to(pixart.dtype)


def full_canvas_decoder_from_pixart(pixart_or_path) -> FullCanvasDecoder:
    """A :class:`FullCanvasDecoder` that equals ``pixart`` while its inpainting columns are zero."""
    pixart = _pixart(pixart_or_path)
    decoder = FullCanvasDecoder(**_config_from_pixart(pixart))
    _copy_trunk(decoder, pixart)
    return decoder if pixart.dtype == torch.float32 else decoder.to(pixart.dtype)


def decoder_from_pixart(kind: str, pixart_or_path, context_dim: int = 0) -> Union[LazyDecoder, FullCanvasDecoder]:
    if kind == "lazy":
        return lazy_decoder_from_pixart(pixart_or_path, context_dim)
    if kind == "full":
        return full_canvas_decoder_from_pixart(pixart_or_path)
    raise ValueError(f"unknown decoder kind {kind!r}; use 'lazy' or 'full'")
