"""Machinery shared by the context encoder, the lazy decoder and the full-canvas decoder.

All three are DiTs over 2x2 (``patch_size``) patches of a VAE latent. A patch embedding is a
strided convolution, which is the same as a linear layer over flattened patches; we keep the
linear form because the lazy decoder works on an arbitrary *subset* of patches (the hole tokens),
gathered from the full token grid.

Token order everywhere is row-major over the (h, w) patch grid, and the flattened patch layout is
(channel, dy, dx) so that a PixArt ``Conv2d(k=p, s=p)`` weight reshapes exactly onto our linear.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_sincos_pos_embed
from diffusers.models.normalization import AdaLayerNormSingle


# ----------------------------------------------------------------------------- tokens and grids
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), rows of the patch grid first."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int], p: int) -> torch.Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p); inverse of :func:`patchify`."""
    b, n, d = tokens.shape
    gh, gw = grid
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * p, gw * p)


def output_to_patch_layout(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """PixArt's ``proj_out`` lays each token out as (dy, dx, channel); reorder to (channel, dy, dx).

    After this, decoder outputs share :func:`patchify`'s layout, so hole tokens of the noisy latent
    and of the noise prediction can be stepped by a scheduler side by side.
    """
    b, n, d = tokens.shape
    c = d // (p * p)
    return tokens.reshape(b, n, p, p, c).permute(0, 1, 4, 2, 3).reshape(b, n, d)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick rows ``index`` (B, K) of ``tokens`` (B, N, D) -> (B, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``tokens`` (B, N, D) with rows ``index`` (B, K) replaced by ``values``."""
    return tokens.scatter(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), values.to(tokens.dtype))


def token_mask_from_pixels(mask: torch.Tensor, cell: int) -> torch.Tensor:
    """Max-pool a (B, 1, H, W) {0,1} mask to the token grid: any masked pixel makes a hole token.

    Returns (B, H/cell, W/cell) bool.
    """
    return F.max_pool2d(mask.float(), kernel_size=cell, stride=cell)[:, 0] > 0


def hole_indices(token_mask: torch.Tensor) -> torch.Tensor:
    """(B, h, w) bool -> (B, K) long indices of hole tokens; every sample must have the same K."""
    flat = token_mask.flatten(1)
    counts = flat.sum(1)
    if not torch.all(counts == counts[0]):
        raise ValueError("hole_indices needs the same number of hole tokens per sample; pad with token_mask")
    return flat.nonzero()[:, 1].reshape(flat.shape[0], -1)


@functools.lru_cache(maxsize=32)
def _sincos_table(dim: int, gh: int, gw: int, base_size: int, scale: float) -> torch.Tensor:
    pos = get_2d_sincos_pos_embed(dim, (gh, gw), base_size=base_size, interpolation_scale=scale, output_type="pt")
    return pos.float()


@functools.lru_cache(maxsize=8)
def _sincos_on(dim: int, gh: int, gw: int, base_size: int, scale: float, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    return _sincos_table(dim, gh, gw, base_size, scale).to(device, dtype)


def sincos_positions(dim: int, grid: Tuple[int, int], base_size: int, interpolation_scale: float,
                     device, dtype) -> torch.Tensor:
    """The full 2-D sin-cos table (h*w, dim), as PixArt computes it, cached per grid, device and
    dtype: a host-to-device copy at every step would cost a transfer and cannot be recorded in a
    CUDA graph. The result is shared: do not modify it in place."""
    table = _sincos_on(dim, int(grid[0]), int(grid[1]), int(base_size), float(interpolation_scale),
                       torch.device(device), dtype)
    refs = _CAPTURE_REFS.get()
    if refs is not None:  # a CUDA graph being recorded reads it by address: outlive the LRU cache
        refs.append(table)
    return table


_CAPTURE_REFS: ContextVar[Optional[List[torch.Tensor]]] = ContextVar("lazydiff_capture_refs", default=None)


@contextmanager
def capture_refs():
    """While a CUDA graph is recorded: collects the cached tensors the recorded step reads (yielded
    list), for the graph's owner to keep alive as long as the graph."""
    refs: List[torch.Tensor] = []
    token = _CAPTURE_REFS.set(refs)
    try:
        yield refs
    finally:
        _CAPTURE_REFS.reset(token)


# ----------------------------------------------------------------------------- the PixArt-style trunk
class PixArtTrunk(nn.Module):
    """Timestep (adaLN-single) and caption conditioning, the transformer blocks and the final layer.

    Attribute names match ``diffusers.PixArtTransformer2DModel`` so PixArt-α state dicts load
    directly (see :mod:`lazydiff.models.pixart_init`). Shared by :class:`LazyDecoder` and
    :class:`FullCanvasDecoder`: the two differ only in which tokens they feed in.
    """

    def __init__(self, *, num_layers: int, num_attention_heads: int, attention_head_dim: int,
                 caption_channels: int, out_dim: int, use_additional_conditions: bool,
                 dropout: float = 0.0, norm_eps: float = 1e-6, upcast_attention: bool = False):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.inner_dim = inner
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=inner, activation_fn="gelu-approximate", attention_bias=True,
                upcast_attention=upcast_attention, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        ])
        self.norm_out = nn.LayerNorm(inner, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner) / inner ** 0.5)
        self.proj_out = nn.Linear(inner, out_dim)
        self.adaln_single = AdaLayerNormSingle(inner, use_additional_conditions=use_additional_conditions)
        self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channels, hidden_size=inner)
        self.use_additional_conditions = use_additional_conditions
        self.gradient_checkpointing = False
        self.fast_inference = True  # fused no-grad block path (see forward)
        self.max_memoised_timesteps = 64  # timestep constants kept (see _step_constants)

    # -- per-edit constants (inference)
    def prepare_text(self, encoder_hidden_states: torch.Tensor,
                     encoder_attention_mask: Optional[torch.Tensor] = None) -> "TextConditioning":
        """Everything the text contributes that does not change between denoising steps: the caption
        projection, each block's cross-attention keys and values (head-split) and the additive
        cross-attention bias. Compute it once per edit and pass it to :meth:`forward` as
        ``text_conditioning``; the result equals recomputing it at every step."""
        b = encoder_hidden_states.shape[0]
        ctx, bias = self._project_text(encoder_hidden_states, encoder_attention_mask)
        bias = None if bias is None else bias[:, None]  # (B, 1, 1, L): SDPA's layout
        kv = []
        for block in self.transformer_blocks:
            a = block.attn2
            hd = a.to_k.out_features // a.heads
            k = a.to_k(ctx).view(b, -1, a.heads, hd).transpose(1, 2)
            v = a.to_v(ctx).view(b, -1, a.heads, hd).transpose(1, 2)
            kv.append((k, v))
        return TextConditioning(context=ctx, bias=bias, keys_values=kv)

    def _project_text(self, encoder_hidden_states, encoder_attention_mask):
        """-> (projected caption (B, L, inner), additive cross-attention bias (B, 1, L) or None)."""
        b = encoder_hidden_states.shape[0]
        ctx = self.caption_projection(encoder_hidden_states.to(self.proj_out.weight.dtype)).view(b, -1, self.inner_dim)
        if encoder_attention_mask is None:
            return ctx, None
        # Additive biases, as PixArt builds them: 0 keeps a key, -10000 drops it.
        return ctx, ((1 - encoder_attention_mask.to(ctx.dtype)) * -10000.0).unsqueeze(1)

    def _fast_ok(self) -> bool:
        """The fused inference path replaces diffusers' default attention processor only."""
        if not self.fast_inference or torch.is_grad_enabled() or self.training:
            return False
        return all(_plain_block(block) for block in self.transformer_blocks)

    # -- inference constants derived from the weights (memoised, keyed on the weights' versions)
    def clear_inference_cache(self) -> None:
        """Forget the memoised timestep constants. Not needed after ``load_state_dict``, an optimizer
        step or ``.to()`` (the memo is keyed on each parameter's storage and version counter); needed
        only after writing weights through ``param.data``, which bypasses the version counter."""
        self.__dict__.pop("_step_memo", None)

    def _step_constants(self, timestep: torch.Tensor, added_cond_kwargs, b: int, dtype) -> "_StepConstants":
        """adaLN-single for ``timestep`` and everything derived from it alone: each block's six
        modulation vectors (scale as ``1 + scale``) and the final layer's shift / ``1 + scale``.

        Computed with the same operations as the per-step path (bit-identical), and memoised per
        timestep value on CPU: every edit with the same schedule reuses them (a 20-step edit
        evaluates 20 timesteps, the same ones each time). The memo is keyed on the weights it
        depends on (storage and version counter of each parameter), so it follows weight updates."""
        memo_key = None
        if timestep.device.type == "cpu" and (not self.use_additional_conditions or added_cond_kwargs is None
                                              or all(v is None or v.device.type == "cpu" for v in added_cond_kwargs.values())):
            extra = () if not self.use_additional_conditions or added_cond_kwargs is None else tuple(
                None if v is None else (v.dtype, tuple(v.flatten().tolist())) for v in added_cond_kwargs.values())
            params = self.__dict__.get("_memo_params")
            if params is None:  # the Parameter objects (their values are read at every call, below)
                params = self.__dict__["_memo_params"] = [*self.adaln_single.parameters(), self.scale_shift_table,
                                                          *(blk.scale_shift_table for blk in self.transformer_blocks)]
            memo_key = (tuple(timestep.tolist()), b, dtype, extra, once_per_edit(self, "params", lambda: _param_key(params)))
            memo = self.__dict__.setdefault("_step_memo", OrderedDict())
            hit = memo.get(memo_key)
            if hit is not None:
                memo.move_to_end(memo_key)
                return hit
        added = added_cond_kwargs or {"resolution": None, "aspect_ratio": None}
        t_mod, embedded_t = self.adaln_single(timestep, added, batch_size=b, hidden_dtype=dtype)
        tables = torch.stack([blk.scale_shift_table for blk in self.transformer_blocks])   # (L, 6, D)
        # Per block, as BasicTransformerBlock computes it: table[None] + t_mod.reshape(b, 6, D), then
        # chunk into (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) and 1 + scale.
        mod = tables[None] + t_mod.reshape(b, 1, 6, -1)                                    # (b, L, 6, D)
        mod[:, :, 1::3] += 1
        mod = mod.unsqueeze(3)                                                             # (b, L, 6, 1, D)
        blocks = [tuple(mod[:, i].unbind(1)) for i in range(len(self.transformer_blocks))]
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None].to(self.scale_shift_table.device)).chunk(2, dim=1)
        out = _StepConstants(blocks=blocks, final_shift=shift, final_scale1=1 + scale)
        if memo_key is not None:
            memo[memo_key] = out
            while len(memo) > self.max_memoised_timesteps:
                memo.popitem(last=False)
        return out

    def _fast_constants(self, timestep: torch.Tensor, b: int, dtype, encoder_hidden_states, encoder_attention_mask,
                        added_cond_kwargs, text_conditioning) -> Optional[Tuple["TextConditioning", "_StepConstants"]]:
        """Checks the conditioning, then -> (text constants, timestep constants) for the fused inference
        path, or None where that path does not apply. Shared by :meth:`forward` and :meth:`step_inputs`."""
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("this decoder was configured with additional (resolution, aspect ratio) conditions; "
                             "pass added_cond_kwargs={'resolution': ..., 'aspect_ratio': ...}")
        if text_conditioning is not None and text_conditioning.batch != b:
            raise ValueError(f"text_conditioning was prepared for batch {text_conditioning.batch}, got {b}")
        if not once_per_edit(self, "fast_ok", self._fast_ok):
            return None
        if text_conditioning is None:
            text_conditioning = self.prepare_text(encoder_hidden_states, encoder_attention_mask)
        return text_conditioning, self._step_constants(timestep, added_cond_kwargs, b, dtype)

    def step_inputs(self, timestep: torch.Tensor, b: int, dtype, encoder_hidden_states: Optional[torch.Tensor],
                    encoder_attention_mask: Optional[torch.Tensor] = None,
                    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
                    text_conditioning: Optional["TextConditioning"] = None) -> Optional[Dict[str, torch.Tensor]]:
        """What one step's blocks need besides the tokens, as the stacked tensors
        :class:`~lazydiff.models.onnx_backend.DecoderStep` takes (timestep constants memoised, text
        constants once per edit); None where the fused inference path does not apply."""
        timestep = timestep.expand(b) if timestep.ndim <= 1 else timestep
        fast = self._fast_constants(timestep, b, dtype, encoder_hidden_states, encoder_attention_mask,
                                    added_cond_kwargs, text_conditioning)
        if fast is None:
            return None
        text_conditioning, consts = fast
        mods = consts.stacked()
        return None if mods is None else {**mods, **text_conditioning.stacked(dtype)}

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                encoder_attention_mask: Optional[torch.Tensor] = None,
                token_mask: Optional[torch.Tensor] = None,
                added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
                text_conditioning: Optional["TextConditioning"] = None) -> torch.Tensor:
        """x: (B, N, inner) embedded tokens -> (B, N, out_dim).

        ``text_conditioning`` (from :meth:`prepare_text`) replaces ``encoder_hidden_states`` /
        ``encoder_attention_mask``: the caption projection and cross-attention keys/values are then
        not recomputed. Under ``torch.no_grad`` the blocks run a fused path (same arithmetic as
        diffusers' ``BasicTransformerBlock`` with ``AttnProcessor2_0``, bit-identical, fewer
        dispatches: timestep constants memoised per timestep value, in-place modulation and
        residuals); set ``fast_inference = False`` for the plain diffusers path.
        """
        b = x.shape[0]
        timestep = timestep.to(x.device).expand(b) if timestep.ndim <= 1 else timestep
        # Additive biases, as PixArt builds them: 0 keeps a key, -10000 drops it.
        self_bias = None if token_mask is None else ((1 - token_mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        fast = self._fast_constants(timestep, b, x.dtype, encoder_hidden_states, encoder_attention_mask,
                                    added_cond_kwargs, text_conditioning)
        if fast is not None:
            text_conditioning, consts = fast
            sbias = None if self_bias is None else self_bias[:, None]            # (B, 1, 1, N)
            for block, (k, v), mod in zip(self.transformer_blocks, text_conditioning.keys_values, consts.blocks):
                x = _fast_block(block, x, sbias, k, v, text_conditioning.bias, mod)
            x = self.norm_out(x).mul_(consts.final_scale1.to(x.device)).add_(consts.final_shift.to(x.device))
            return self.proj_out(x)
        added_cond_kwargs = added_cond_kwargs or {"resolution": None, "aspect_ratio": None}
        t_mod, embedded_t = self.adaln_single(timestep, added_cond_kwargs, batch_size=b, hidden_dtype=x.dtype)
        if text_conditioning is not None:
            ctx, cross_bias = text_conditioning.context, text_conditioning.bias
            cross_bias = None if cross_bias is None else cross_bias[:, 0]     # (B, 1, L), diffusers' layout
        else:
            ctx, cross_bias = self._project_text(encoder_hidden_states, encoder_attention_mask)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, self_bias, ctx, cross_bias, t_mod,
                                                      None, None, use_reentrant=False)
            else:
                x = block(x, attention_mask=self_bias, encoder_hidden_states=ctx,
                          encoder_attention_mask=cross_bias, timestep=t_mod)
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None].to(self.scale_shift_table.device)).chunk(2, dim=1)
        x = self.norm_out(x)
        x = x * (1 + scale.to(x.device)) + shift.to(x.device)
        return self.proj_out(x)


@dataclass
class TextConditioning:
    """Per-edit text constants of a :class:`PixArtTrunk` (see :meth:`PixArtTrunk.prepare_text`)."""

    context: torch.Tensor                      # (B, L, inner) projected caption
    bias: Optional[torch.Tensor]               # (B, 1, 1, L) additive cross-attention bias, or None
    keys_values: List[Tuple[torch.Tensor, torch.Tensor]]  # per block: (B, heads, L, head_dim) each

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def stacked(self, dtype) -> Dict[str, torch.Tensor]:
        """All blocks' keys / values side by side as (B, heads, T, L*head_dim) tensors and the key
        padding mask (B, T) int32, as :class:`~lazydiff.models.onnx_backend.DecoderStep` takes them;
        once per edit."""
        memo = self.__dict__.get("_stacked")
        if memo is None:
            k, _ = self.keys_values[0]
            keep = torch.ones(k.shape[0], k.shape[2], dtype=torch.int32, device=k.device) if self.bias is None \
                else (self.bias[:, 0, 0] == 0).to(torch.int32)  # the bias is 0 (keep) or -10000 (drop)
            memo = self.__dict__["_stacked"] = {
                "keys": torch.cat([k for k, _ in self.keys_values], dim=-1).to(dtype).contiguous(),
                "values": torch.cat([v for _, v in self.keys_values], dim=-1).to(dtype).contiguous(),
                "key_padding_mask": keep.contiguous()}
        return memo


@dataclass
class _StepConstants:
    """What one timestep contributes to a forward (see :meth:`PixArtTrunk._step_constants`)."""

    blocks: List[Tuple[torch.Tensor, ...]]   # per block: shift_msa, 1+scale_msa, gate_msa, shift_mlp, 1+scale_mlp, gate_mlp
    final_shift: torch.Tensor
    final_scale1: torch.Tensor

    def stacked(self) -> Optional[Dict[str, torch.Tensor]]:
        """The same for ONNX Runtime, shared by the batch: one (L*6*D,) vector (every block's six side by
        side) and the final layer's two (D,), memoised with the constants themselves. None when the
        batch's rows differ (per-sample timesteps; the pipelines never make them): the graph folds the
        modulation into its LayerNorms, which takes one vector for the whole batch."""
        memo = self.__dict__.get("_stacked", False)
        if memo is False:
            mods = torch.cat([v for m in self.blocks for v in m], dim=-1)
            rows = (mods, self.final_shift, self.final_scale1)
            shared = all(bool((t == t[:1]).all()) for t in rows)
            memo = self.__dict__["_stacked"] = None if not shared else {
                "mods": mods[0, 0].contiguous(), "final_shift": self.final_shift[0, 0].contiguous(),
                "final_scale1": self.final_scale1[0, 0].contiguous()}
        return memo


_EDIT_SCOPE: ContextVar[Optional[Dict[Any, Any]]] = ContextVar("lazydiff_edit_scope", default=None)


@contextmanager
def edit_scope():
    """One edit, inside which the weights do not change: what is derived from them alone (the memo
    keys of the timestep constants and of the ONNX Runtime graphs, whether the fused path applies,
    the components' dtypes) is worked out once per module instead of at every step (:func:`once_per_edit`).
    The pipelines run each edit in one; weights changed from a step callback take effect at the next
    edit."""
    token = _EDIT_SCOPE.set({})
    try:
        yield
    finally:
        _EDIT_SCOPE.reset(token)


def once_per_edit(owner: object, what: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, reused for the same ``owner`` and ``what`` while an :func:`edit_scope` lasts;
    computed at every call outside one."""
    scope = _EDIT_SCOPE.get()
    if scope is None:
        return compute()
    key = (id(owner), what)
    if key not in scope:
        scope[key] = (owner, compute())  # the owner is kept so that its id is not reused meanwhile
    return scope[key][1]


def _param_key(params) -> tuple:
    """Identifies the current values of ``params``: storage, dtype and in-place version of each
    (``load_state_dict``, optimizer steps and ``.to()`` all change one of them)."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in params)


def _plain_block(block) -> bool:
    """A ``BasicTransformerBlock`` whose attentions use diffusers' default processor (AttnProcessor2_0,
    no q/k norm, no residual or output rescaling inside the attention), unchunked, without positional
    embedding, with a plain GELU MLP: what the fused path and the hand-written ONNX graphs cover."""
    for attn in (block.attn1, block.attn2):
        if attn is not None and (type(attn.processor).__name__ != "AttnProcessor2_0" or attn.norm_q is not None
                                 or attn.residual_connection or attn.rescale_output_factor != 1.0):
            return False
    return block._chunk_size is None and block.pos_embed is None and _plain_ff(block.ff)


def _plain_ff(ff) -> bool:
    """diffusers' FeedForward as BasicTransformerBlock builds it for activation "gelu-approximate":
    GELU(proj) -> Dropout -> Linear [-> Dropout]."""
    net = getattr(ff, "net", None)
    if net is None or len(net) not in (3, 4) or type(net[0]).__name__ != "GELU" or not isinstance(net[2], nn.Linear):
        return False
    return all(isinstance(m, nn.Dropout) for m in list(net)[1::2])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


def _fast_block(block, x, self_bias, k2, v2, cross_bias, mod):
    """``BasicTransformerBlock.forward`` for norm_type="ada_norm_single" with AttnProcessor2_0, inlined,
    with the cross-attention keys/values and the timestep's modulation vectors given.

    The same arithmetic in the same order, so the result is bit-identical: ``norm(x) * (1 + scale)
    + shift`` and ``gate * out + x`` become in-place ``mul_`` / ``add_`` on fresh tensors (IEEE
    products and sums commute exactly; ``addcmul`` would fuse them and round differently). A fused
    QKV matmul was measured too: no faster here, and not bit-identical for every dtype / shape."""
    shift_msa, scale_msa1, gate_msa, shift_mlp, scale_mlp1, gate_mlp = mod
    a1 = block.attn1
    h = block.norm1(x).mul_(scale_msa1).add_(shift_msa)
    o = F.scaled_dot_product_attention(_heads(a1.to_q(h), a1.heads), _heads(a1.to_k(h), a1.heads),
                                       _heads(a1.to_v(h), a1.heads), attn_mask=self_bias)
    x = a1.to_out[0](_merge(o).to(h.dtype)).mul_(gate_msa).add_(x)
    a2 = block.attn2
    o = F.scaled_dot_product_attention(_heads(a2.to_q(x), a2.heads), k2, v2, attn_mask=cross_bias)
    x = a2.to_out[0](_merge(o).to(x.dtype)).add_(x)
    h = block.norm2(x).mul_(scale_mlp1).add_(shift_mlp)
    net = block.ff.net
    h = F.gelu(net[0].proj(h), approximate=net[0].approximate)
    return net[2](h).mul_(gate_mlp).add_(x)


class PlainViTBlocks(nn.Module):
    """Pre-LN ViT blocks (self-attention + MLP, no conditioning) used by the context encoder."""

    def __init__(self, *, num_layers: int, num_attention_heads: int, attention_head_dim: int,
                 dropout: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, dropout=dropout,
                                  activation_fn="gelu-approximate", attention_bias=True,
                                  norm_type="layer_norm", norm_elementwise_affine=True, norm_eps=norm_eps)
            for _ in range(num_layers)
        ])
        self.norm = nn.LayerNorm(inner, eps=norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def default_interpolation_scale(sample_size: int, interpolation_scale: Optional[float]) -> float:
    """PixArt's rule: positions are scaled so a 64-latent model sees the 512-px table."""
    return float(interpolation_scale) if interpolation_scale is not None else float(max(sample_size // 64, 1))


def init_linear_like_vit(module: nn.Module) -> None:
    """Xavier-uniform linears, zero biases (DiT's initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def dit_init(trunk: PixArtTrunk) -> None:
    """DiT-style init for a trunk trained from scratch: xavier linears, small embeddings."""
    init_linear_like_vit(trunk)
    nn.init.normal_(trunk.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(trunk.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
    nn.init.normal_(trunk.caption_projection.linear_1.weight, std=0.02)
    nn.init.normal_(trunk.caption_projection.linear_2.weight, std=0.02)
    # The output layer starts at zero, so an untrained decoder predicts no noise rather than garbage.
    nn.init.zeros_(trunk.proj_out.weight)
    nn.init.zeros_(trunk.proj_out.bias)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "patchify", "unpatchify", "output_to_patch_layout", "gather_tokens", "scatter_tokens", "token_mask_from_pixels", "hole_indices",
    "sincos_positions", "PixArtTrunk", "TextConditioning", "PlainViTBlocks", "default_interpolation_scale", "dit_init",
    "init_linear_like_vit", "count_params",
]
