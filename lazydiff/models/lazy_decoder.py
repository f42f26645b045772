"""Stage 2 of LazyDiffusion: the lazy diffusion decoder.

A PixArt-α DiT that runs at every denoising step on the |H| hole tokens ONLY. Each noisy hole token
is concatenated, channel-wise, with the context token the encoder produced at the same position,
then projected to the transformer width. The context columns of that projection start at zero, so
a decoder initialised from PixArt-α is exactly PixArt-α until training teaches it to use context.
Positions: the full 2-D sin-cos table, rows gathered at the hole indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .onnx_backend import OnnxRuntimeMixin
from .dit import PixArtTrunk, output_to_patch_layout, default_interpolation_scale, dit_init, gather_tokens, sincos_positions


@dataclass
class LazyDecoderOutput(BaseOutput):
    sample: torch.Tensor  # (B, |H|, out_channels * p * p) predictions for the hole tokens


class LazyDecoder(ModelMixin, ConfigMixin, OnnxRuntimeMixin):
    """PixArt-α style decoder over hole tokens.

    Config mirrors ``PixArtTransformer2DModel`` (``in_channels``, ``out_channels``, ``patch_size``,
    ``num_layers``, ``num_attention_heads``, ``attention_head_dim``, ``caption_channels``,
    ``sample_size``, ``interpolation_scale``, ``use_additional_conditions``) plus ``context_dim``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: Optional[int] = None, patch_size: int = 2,
                 num_layers: int = 28, num_attention_heads: int = 16, attention_head_dim: int = 72,
                 caption_channels: int = 4096, context_dim: int = 1152, sample_size: int = 128,
                 interpolation_scale: Optional[float] = None, use_additional_conditions: Optional[bool] = None,
                 dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128  # PixArt's rule for its 1024-px model
        self.register_to_config(out_channels=out_channels, use_additional_conditions=use_additional_conditions)
        self.patch_dim = in_channels * patch_size ** 2
        self.trunk = PixArtTrunk(num_layers=num_layers, num_attention_heads=num_attention_heads,
                                 attention_head_dim=attention_head_dim, caption_channels=caption_channels,
                                 out_dim=out_channels * patch_size ** 2,
                                 use_additional_conditions=use_additional_conditions,
                                 dropout=dropout, norm_eps=norm_eps)
        self.inner_dim = self.trunk.inner_dim
        # Projection of [noisy patch ; context token]; the context columns start at zero.
        self.proj_in = nn.Linear(self.patch_dim + context_dim, self.inner_dim)
        dit_init(self.trunk)
        nn.init.xavier_uniform_(self.proj_in.weight[:, : self.patch_dim])
        nn.init.zeros_(self.proj_in.weight[:, self.patch_dim:])
        nn.init.zeros_(self.proj_in.bias)

    def prepare_text(self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: Optional[torch.Tensor] = None):
        """Per-edit text constants (caption projection, cross-attention keys/values); pass the result
        to ``forward(..., text_conditioning=...)`` at every step. See :meth:`PixArtTrunk.prepare_text`."""
        return self.trunk.prepare_text(encoder_hidden_states, encoder_attention_mask)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        self.trunk.gradient_checkpointing = enable

    def positions(self, hole_index: torch.Tensor, grid: Tuple[int, int], dtype) -> torch.Tensor:
        """Sin-cos positions of the hole tokens (B, |H|, inner). The last result is kept for the same
        ``hole_index`` tensor (a pipeline passes one per edit, at every step) while it is unchanged."""
        key = (tuple(grid), dtype, hole_index.device, hole_index._version)
        hit = self.__dict__.get("_positions_memo")
        if hit is not None and hit[0] is hole_index and hit[1] == key:
            return hit[2]
        cfg = self.config
        table = sincos_positions(self.inner_dim, grid, cfg.sample_size // cfg.patch_size,
                                 default_interpolation_scale(cfg.sample_size, cfg.interpolation_scale),
                                 hole_index.device, dtype)
        pos = gather_tokens(table.unsqueeze(0).expand(hole_index.shape[0], -1, -1), hole_index)
        if not torch.is_grad_enabled():
            self.__dict__["_positions_memo"] = (hole_index, key, pos)
        return pos

    def forward(self, hole_latents: torch.Tensor, context: torch.Tensor, hole_index: torch.Tensor,
                grid_size: Tuple[int, int], timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None, token_mask: Optional[torch.Tensor] = None,
                added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None, return_dict: bool = True,
                text_conditioning=None):
        """
        Args:
            hole_latents: (B, |H|, C*p*p) noisy latent patches at the hole (see ``dit.patchify``).
            context: (B, |H|, context_dim) context-encoder tokens at the same positions.
            hole_index: (B, |H|) their row-major indices in the (h, w) token grid.
            grid_size: (h, w) of the full canvas token grid (for positions).
            timestep: (B,) or scalar diffusion timestep.
            encoder_hidden_states: (B, L, caption_channels) text tokens; encoder_attention_mask (B, L).
            token_mask: optional (B, |H|) 1 = real token, 0 = padding (batches of unequal holes).
        """
        x_in = torch.cat([hole_latents, context.to(hole_latents.dtype)], dim=-1)
        out = self._onnx_step(x_in, lambda: self.positions(hole_index, grid_size, x_in.dtype), timestep,
                              encoder_hidden_states, encoder_attention_mask, token_mask, added_cond_kwargs,
                              text_conditioning)
        if out is None:  # PyTorch
            x = self.proj_in(x_in)
            x = x + self.positions(hole_index, grid_size, x.dtype)
            out = self.trunk(x, timestep, encoder_hidden_states, encoder_attention_mask, token_mask, added_cond_kwargs,
                             text_conditioning=text_conditioning)
        out = output_to_patch_layout(out, self.config.patch_size)
        return LazyDecoderOutput(sample=out) if return_dict else (out,)
