"""FLOP counts (1 multiply-add = 2 FLOPs, as ``torch.utils.flop_counter`` counts them).

* Transformers (context encoder, lazy decoder, full-canvas decoder): counted analytically from the
  config, the number of tokens N, text tokens L and batch B. Per layer and image:

      self-attention   8·N·d² (q, k, v, out projections) + 4·N²·d (scores and weighted sum)
      cross-attention  4·N·d² (q, out) + 4·L·d² (k, v of the text) + 4·N·L·d
      MLP (4x, GELU)   16·N·d²

  plus patch embedding / output projections, the caption projection and the timestep (adaLN-single)
  embedding. When the pipelines precompute the text constants once per edit (``prepare_text``: the
  caption projection and the 4·L·d² keys/values), those are counted once, not per step.
  :func:`count_with_torch` checks these against ``FlopCounterMode`` in the tests.
* Anything else (VAE encode/decode, text encoder): ``FlopCounterMode`` on the real call, or on a
  meta-device copy of the module so counting costs no compute.

Elementwise work (norms, activations, softmax, the scheduler) is not counted, as usual.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from lazydiff.pipelines.cuda_graphs import capturing


def _block_flops(n: int, d: int, l: int = 0, cross: bool = True) -> float:
    f = 8 * n * d * d + 4 * n * n * d + 16 * n * d * d
    if cross:
        f += 4 * n * d * d + 4 * l * d * d + 4 * n * l * d
    return float(f)


def _cfg(model) -> Dict[str, Any]:
    return dict(model.config) if hasattr(model, "config") else dict(model)


def _adaln_flops(d: int, additional: bool) -> float:
    f = 2 * (256 * d + d * d) + 2 * d * 6 * d          # timestep embedder + the 6 modulation vectors
    if additional:
        s = d // 3
        f += 3 * 2 * (256 * s + s * s)                  # resolution (2 values) and aspect-ratio embedders
    return float(f)


def decoder_text_flops(model, text_tokens: int, batch: int = 1) -> float:
    """The per-edit text constants of a decoder (``prepare_text``): caption projection and every
    block's cross-attention keys and values."""
    c = _cfg(model)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    l = int(text_tokens)
    return float(batch * (2 * l * (c["caption_channels"] * d + d * d) + c["num_layers"] * 4 * l * d * d))


def decoder_flops(model, tokens: int, text_tokens: int, batch: int = 1, text_prepared: bool = False) -> float:
    """One forward of a :class:`LazyDecoder` (``tokens`` = hole tokens) or :class:`FullCanvasDecoder`
    (``tokens`` = all tokens), for ``batch`` images (2x with batched classifier-free guidance).
    ``text_prepared``: the text constants were computed once per edit (``prepare_text``) and are
    not part of this forward; count them with :func:`decoder_text_flops`."""
    c = _cfg(model)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    p2 = c["patch_size"] ** 2
    cin = c["in_channels"]
    out_dim = (c.get("out_channels") or cin) * p2
    if "context_dim" in c:                               # lazy: [noisy patch ; context token]
        in_dim = cin * p2 + c["context_dim"]
    else:                                                # full canvas: noisy, masked latent, mask
        in_dim = (2 * cin + 1) * p2
    n, l = int(tokens), int(text_tokens)
    f = 2 * n * in_dim * d + c["num_layers"] * _block_flops(n, d, l, True) + 2 * n * d * out_dim
    f += 2 * l * (c["caption_channels"] * d + d * d)      # caption projection (per forward)
    f += _adaln_flops(d, bool(c.get("use_additional_conditions")))
    f = float(batch * f)
    if text_prepared:
        f -= decoder_text_flops(c, l, batch)
    return f


def context_encoder_flops(model, tokens: int, batch: int = 1) -> float:
    """One forward of the :class:`ContextEncoder` over the whole canvas (``tokens`` = all tokens)."""
    c = _cfg(model)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    p2 = c["patch_size"] ** 2
    n = int(tokens)
    ctx = c.get("context_dim") or d
    f = 2 * n * (c["latent_channels"] + 1) * p2 * d + c["num_layers"] * _block_flops(n, d, 0, False) + 2 * n * d * ctx
    return float(batch * f)


def _extra_formulas() -> Dict[Any, Callable]:
    """PyTorch's counter has no formula for the CPU flash-attention kernel; add it (same as SDPA's)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = sdpa_cpu
    return ops


def count_with_torch(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        with torch.no_grad():
            fn()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=8)
def _meta_vae(config_items: Tuple) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(config_items)).eval()


def _freeze(cfg: Dict[str, Any]) -> Tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if not k.startswith("_")))


def vae_flops(vae, shape: Tuple[int, ...], op: str) -> float:
    """FLOPs of ``vae.encode`` (``shape`` = pixel batch) or ``vae.decode`` (``shape`` = latent batch),
    counted on a meta-device copy (no compute). Falls back to NaN for VAEs that are not AutoencoderKL."""
    try:
        meta = _meta_vae(_freeze(dict(vae.config)))
        x = torch.empty(*shape, device="meta")
        if op == "encode":
            return count_with_torch(lambda: meta.encode(x))
        return count_with_torch(lambda: meta.decode(x))
    except Exception:  # other VAE classes: not counted
        return float("nan")


class CallRecorder:
    """Records the input shapes of a pipeline's components while it runs (cheap), so the FLOPs of
    the edit can be counted afterwards: decoder calls (tokens, batch, text tokens), context-encoder
    calls, VAE encode / decode shapes and text-encoder FLOPs (counted once per input shape)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls: list = []
        self.enabled = False
        self._text_cache: Dict[Tuple, float] = {}
        self._patch()

    def _patch(self):
        pipe = self.pipe
        dec = pipe.decoder
        orig_dec = dec.forward

        def dec_forward(x, *args, **kw):
            live, graph = self._live(), capturing()
            if live or graph is not None:
                if x.ndim == 4:   # full canvas: (B, C, h, w)
                    p = dec.config.patch_size
                    tokens = (x.shape[-2] // p) * (x.shape[-1] // p)
                    text = args[3] if len(args) > 3 else kw.get("encoder_hidden_states")
                else:             # lazy: (B, |H|, D)
                    tokens = x.shape[1]
                    text = args[4] if len(args) > 4 else kw.get("encoder_hidden_states")
                call = ("decoder", int(x.shape[0]), int(tokens), int(text.shape[1]),
                        kw.get("text_conditioning") is not None)
                if live:
                    self.calls.append(call)
                if graph is not None:  # what every replay of this graph repeats, in this edit or a later one
                    graph.notes["decoder_call"] = call
            return orig_dec(x, *args, **kw)

        dec.forward = dec_forward

        def replayed(graph):  # a step replayed from a CUDA graph: the decoder call made while it was recorded
            if self._live():
                call = graph.notes.get("decoder_call")
                if call is not None:
                    self.calls.append(call)

        pipe.graph_replay_hook = replayed
        orig_prep = getattr(dec, "prepare_text", None)
        if orig_prep is not None:
            def prepare_text(text, *args, **kw):
                if self._live():
                    self.calls.append(("decoder_text", int(text.shape[0]), int(text.shape[1])))
                return orig_prep(text, *args, **kw)

            dec.prepare_text = prepare_text
        enc = getattr(pipe, "context_encoder", None)
        if enc is not None:
            orig_enc = enc.forward

            def enc_forward(masked, *args, **kw):
                if self._live():
                    p = enc.config.patch_size
                    self.calls.append(("context_encoder", int(masked.shape[0]),
                                       int((masked.shape[-2] // p) * (masked.shape[-1] // p))))
                return orig_enc(masked, *args, **kw)

            enc.forward = enc_forward
        vae = pipe.vae
        orig_encode, orig_decode = vae.encode, vae.decode

        def encode(x, *a, **kw):
            if self._live():
                self.calls.append(("vae_encode", tuple(x.shape)))
            return orig_encode(x, *a, **kw)

        def decode(z, *a, **kw):
            if self._live():
                self.calls.append(("vae_decode", tuple(z.shape)))
            return orig_decode(z, *a, **kw)

        vae.encode, vae.decode = encode, decode
        te = pipe.text_encoder
        orig_text = te.forward
        self._orig_text = orig_text

        def text_forward(ids, *a, **kw):
            if self._live():   # counted later (outside any timed region), once per input shape
                self.calls.append(("text", ids.detach().clone(), a, dict(kw)))
            return orig_text(ids, *a, **kw)

        te.forward = text_forward

    def _live(self) -> bool:
        """Recording, and not inside an ONNX graph export (whose tracing calls the modules)."""
        from lazydiff.models.onnx_backend import exporting

        return self.enabled and not exporting()

    def _onnx_call(self, export, module, inputs) -> None:
        """A call that ran in ONNX Runtime (``pipe.enable_onnx_runtime``), recorded as its module's call
        would have been. Decoder steps go through the decoder's forward anyway and are recorded there."""
        from lazydiff.models import onnx_backend as ob

        pipe = self.pipe
        if not self.enabled:
            return
        if module is pipe.vae and export is ob.export_vae_decode:
            self.calls.append(("vae_decode", tuple(inputs["z"].shape)))
        elif module is pipe.vae and export is ob.export_vae_encode:
            self.calls.append(("vae_encode", tuple(inputs["x"].shape)))
        elif module is getattr(pipe, "context_encoder", None) and export is ob.export_context_encoder:
            self.calls.append(("context_encoder", int(inputs["x"].shape[0]), int(inputs["x"].shape[1])))
        elif module is pipe.text_encoder and export is ob.export_text_encoder:
            self.calls.append(("text", inputs["ids"].detach().clone(), (), {"attention_mask": inputs["attn"]}))

    def _text_flops(self, ids, a, kw) -> float:
        key = tuple(ids.shape)
        if key not in self._text_cache:
            self._text_cache[key] = count_with_torch(lambda: self._orig_text(ids, *a, **kw))
        return self._text_cache[key]

    def start(self):
        from lazydiff.models.onnx_backend import CALL_OBSERVERS

        self.calls = []
        self.enabled = True
        if self._onnx_call not in CALL_OBSERVERS:
            CALL_OBSERVERS.append(self._onnx_call)

    def stop(self):
        from lazydiff.models.onnx_backend import CALL_OBSERVERS

        self.enabled = False
        if self._onnx_call in CALL_OBSERVERS:
            CALL_OBSERVERS.remove(self._onnx_call)
        return list(self.calls)

    def flops(self, calls: Optional[list] = None) -> Dict[str, float]:
        """FLOPs per stage for the recorded calls: text, vae_encode, context_encoder, denoise,
        denoise_per_step, vae_decode, total; plus denoiser_tokens (per image, last call)."""
        calls = self.calls if calls is None else calls
        out = {"text": 0.0, "vae_encode": 0.0, "context_encoder": 0.0, "denoise": 0.0, "vae_decode": 0.0}
        steps, tokens = 0, None
        for c in calls:
            if c[0] == "decoder":
                out["denoise"] += decoder_flops(self.pipe.decoder, c[2], c[3], c[1], text_prepared=c[4])
                steps += 1
                tokens = c[2]
            elif c[0] == "decoder_text":
                out["text"] += decoder_text_flops(self.pipe.decoder, c[2], c[1])
            elif c[0] == "context_encoder":
                out["context_encoder"] += context_encoder_flops(self.pipe.context_encoder, c[2], c[1])
            elif c[0] == "vae_encode":
                out["vae_encode"] += vae_flops(self.pipe.vae, c[1], "encode")
            elif c[0] == "vae_decode":
                out["vae_decode"] += vae_flops(self.pipe.vae, c[1], "decode")
            elif c[0] == "text":
                out["text"] += self._text_flops(c[1], c[2], c[3])
        out["total"] = float(sum(out.values()))
        out["denoise_per_step"] = out["denoise"] / steps if steps else float("nan")
        out["denoiser_tokens"] = tokens
        return out
