"""The RegenerateImage backbone: the same PixArt-α block design, run on ALL tokens at every step.

Classic latent inpainting conditioning: the noisy latent, the masked-canvas latent and the
latent-resolution mask are stacked on channels, patchified and projected. This is the paper's
full-canvas inpainting baseline; it shares the trunk with :class:`LazyDecoder` so the two differ
only in which tokens they process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .onnx_backend import OnnxRuntimeMixin
from .dit import PixArtTrunk, output_to_patch_layout, default_interpolation_scale, dit_init, patchify, sincos_positions, unpatchify


@dataclass
class FullCanvasDecoderOutput(BaseOutput):
    sample: torch.Tensor  # (B, out_channels, h, w)


class FullCanvasDecoder(ModelMixin, ConfigMixin, OnnxRuntimeMixin):
    """PixArt-α style inpainting DiT over every token of the canvas (RegenerateImage)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: Optional[int] = None, patch_size: int = 2,
                 num_layers: int = 28, num_attention_heads: int = 16, attention_head_dim: int = 72,
                 caption_channels: int = 4096, sample_size: int = 128,
                 interpolation_scale: Optional[float] = None, use_additional_conditions: Optional[bool] = None,
                 dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128
        self.register_to_config(out_channels=out_channels, use_additional_conditions=use_additional_conditions)
        # Per token: noisy latent, masked-canvas latent, mask -> (2C + 1) * p * p inputs.
        self.patch_dim = in_channels * patch_size ** 2
        self.trunk = PixArtTrunk(num_layers=num_layers, num_attention_heads=num_attention_heads,
                                 attention_head_dim=attention_head_dim, caption_channels=caption_channels,
                                 out_dim=out_channels * patch_size ** 2,
                                 use_additional_conditions=use_additional_conditions,
                                 dropout=dropout, norm_eps=norm_eps)
        self.inner_dim = self.trunk.inner_dim
        self.proj_in = nn.Linear((2 * in_channels + 1) * patch_size ** 2, self.inner_dim)
        dit_init(self.trunk)
        nn.init.xavier_uniform_(self.proj_in.weight)
        nn.init.zeros_(self.proj_in.bias)

    def prepare_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: Optional[torch.Tensor] = None):
        """Per-edit text constants (caption projection, cross-attention keys/values); pass the result
        to ``forward(..., text_conditioning=...)`` at every step. See :meth:`PixArtTrunk.prepare_text`."""
        return self.trunk.prepare_text(encoder_hidden_states, encoder_attention_mask)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.trunk.gradient_checkpointing = enable

    def forward(self, latents: torch.Tensor, masked_latents: torch.Tensor, mask: torch.Tensor,
                timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None, return_dict: bool = True,
                text_conditioning=None):
        """
        Args:
            latents: (B, C, h, w) noisy latent of the whole canvas.
            masked_latents: (B, C, h, w) latent of the canvas with the hole zeroed.
            mask: (B, 1, h, w) hole mask at latent resolution.
        """
        cfg = self.config
        p = cfg.patch_size
        grid = (latents.shape[-2] // p, latents.shape[-1] // p)
        # Channel order (noisy, masked, mask) keeps the first C*p*p inputs identical to PixArt's.
        noisy = patchify(latents, p)
        cond = patchify(torch.cat([masked_latents.to(latents.dtype), mask.to(latents.dtype)], dim=1), p)
        x_in = torch.cat([noisy, cond], dim=-1)

        def positions(dtype):
            return sincos_positions(self.inner_dim, grid, cfg.sample_size // p,
                                    default_interpolation_scale(cfg.sample_size, cfg.interpolation_scale),
                                    x_in.device, dtype)

        out = self._onnx_step(x_in, lambda: positions(x_in.dtype)[None], timestep, encoder_hidden_states,
                              encoder_attention_mask, None, added_cond_kwargs, text_conditioning)
        if out is None:  # PyTorch
            x = self.proj_in(x_in)
            x = x + positions(x.dtype)
            out = self.trunk(x, timestep, encoder_hidden_states, encoder_attention_mask, None, added_cond_kwargs,
                             text_conditioning=text_conditioning)
        out = unpatchify(output_to_patch_layout(out, p), grid, p)
        return FullCanvasDecoderOutput(sample=out) if return_dict else (out,)
