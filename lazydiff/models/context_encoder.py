"""Stage 1 of LazyDiffusion: the context encoder.

Runs ONCE per canvas + mask, outside the diffusion loop. A ViT over the whole canvas sees the
masked-canvas latent ``E(I * (1 - M))`` and the mask at latent resolution, and emits one token per
latent patch. Only the tokens at hole positions are kept: self-attention over the full canvas
forces the encoder to pack what the hole needs to know into those |H| tokens (the paper's
"compact global context").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .dit import PlainViTBlocks, default_interpolation_scale, gather_tokens, init_linear_like_vit, patchify, sincos_positions


@dataclass
class ContextEncoderOutput(BaseOutput):
    context: torch.Tensor  # (B, |H|, context_dim), or (B, N, context_dim) when no hole index is given


class ContextEncoder(ModelMixin, ConfigMixin):
    """Whole-canvas ViT; output gathered at hole tokens.

    Args:
        latent_channels: channels of the VAE latent (4 for SD's VAE).
        patch_size: latent pixels per token side (2, as in PixArt-α).
        num_layers, num_attention_heads, attention_head_dim: transformer size.
        context_dim: width of each emitted context token (defaults to the transformer width).
        sample_size: the latent size the model is trained at (sets the positional-table scale).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, latent_channels: int = 4, patch_size: int = 2, num_layers: int = 12,
                 num_attention_heads: int = 6, attention_head_dim: int = 64, context_dim: Optional[int] = None,
                 sample_size: int = 64, interpolation_scale: Optional[float] = None, dropout: float = 0.0):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.inner_dim = inner
        self.context_dim = context_dim or inner
        # Input per token: the masked latent patch and the latent-resolution mask patch.
        self.proj_in = nn.Linear((latent_channels + 1) * patch_size ** 2, inner)
        self.vit = PlainViTBlocks(num_layers=num_layers, num_attention_heads=num_attention_heads,
                                  attention_head_dim=attention_head_dim, dropout=dropout)
        self.proj_out = nn.Linear(inner, self.context_dim)
        init_linear_like_vit(self)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.vit.gradient_checkpointing = enable

    def embed(self, masked_latents: torch.Tensor, mask: torch.Tensor):
        """-> (patches (B, N, (C+1)*p*p) of the masked latent and the mask, positions (N, D)): what the
        transformer takes, before ``proj_in`` (also the inputs of its ONNX graph,
        :func:`~lazydiff.models.onnx_backend.export_context_encoder`)."""
        cfg = self.config
        p = cfg.patch_size
        grid = (masked_latents.shape[-2] // p, masked_latents.shape[-1] // p)
        x = patchify(torch.cat([masked_latents, mask.to(masked_latents.dtype)], dim=1), p)
        pos = sincos_positions(self.inner_dim, grid, cfg.sample_size // p,
                               default_interpolation_scale(cfg.sample_size, cfg.interpolation_scale), x.device, x.dtype)
        return x, pos

    def forward(self, masked_latents: torch.Tensor, mask: torch.Tensor,
                hole_index: Optional[torch.Tensor] = None, return_dict: bool = True):
        """
        Args:
            masked_latents: (B, C, h, w) latent of the canvas with the hole zeroed.
            mask: (B, 1, h, w) hole mask at latent resolution (1 = hole).
            hole_index: (B, |H|) indices of hole tokens in the row-major token grid; None keeps all.
        """
        x, pos = self.embed(masked_latents, mask)
        x = self.proj_out(self.vit(self.proj_in(x) + pos))
        if hole_index is not None:
            x = gather_tokens(x, hole_index)
        return ContextEncoderOutput(context=x) if return_dict else (x,)
