"""ONNX Runtime for a decoder's per-step work (CPU inference), the same for both decoders.

The lazy decoder and the full-canvas baseline run the same PixArt trunk at every denoising step. For
the small shipped models that step is a few hundred small ops, and PyTorch's per-op dispatch is a
large share of it; ONNX Runtime runs the same graph with less overhead per op. What it runs is the
*per-step* work only: input projection, positions, the transformer blocks and the final layer. The
tokens each decoder feeds in (hole tokens + context, or the whole canvas) are gathered by PyTorch,
and everything that does not change between steps is computed by PyTorch and passed in: the
timestep's modulation vectors (memoised per timestep, ``PixArtTrunk._step_constants``) and the
text's cross-attention keys / values (once per edit, ``PixArtTrunk.prepare_text``).

The input projection is in the graph on purpose: a PyTorch matmul between two ONNX Runtime calls
wakes PyTorch's OpenMP threads, which then spin on the same cores as ONNX Runtime's (2-core CPU,
shipped model: 9.4 ms per call back to back, 15.8 ms with a 72x208x192 torch linear in between).

The graph is built with the weights in it, from the decoder itself, node by node
(:func:`export_decoder_step`: ONNX Runtime's fused attention instead of the ~95 nodes per block that
``torch.onnx.export`` leaves; nothing is downloaded or unpickled), and rebuilt when the weights change
(keyed on each parameter's storage and version, as the timestep memo is; checked once per edit inside
a pipeline, ``dit.edit_scope``). Outputs match PyTorch's to float32 rounding (max ~2e-6 per forward on
the shipped model; ``tests/test_onnx_backend.py``).

    pipe.enable_onnx_runtime()          # or decoder.use_onnx_runtime()

The pipelines also run the lazy pipeline's context encoder (:func:`export_context_encoder`, written the
same way), the VAE (:class:`VaeCall`: the hole's crop decode and whole-canvas encodes; every method
alike) and the text encoder
(:class:`TextEncoderCall`: a new prompt's embedding). Encodes that the canvas-latent cache hooks into
(recording the encoder's statistics, partial re-encodes of large canvases) stay in PyTorch.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

INSTALL_HINT = "pip install onnxruntime==1.32.0 onnx==1.23.2 (both in requirements.txt)"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


class DecoderStep(nn.Module):
    """A decoder's per-step arithmetic as a plain function of tensors: the decoder's ``proj_in`` +
    positions, then the trunk's fused blocks (``dit._fast_block``, the code the PyTorch path runs)
    and final layer. :func:`export_decoder_step` builds the ONNX graph of exactly this function
    (the tests hold the two against each other).

    Inputs (the layouts :meth:`PixArtTrunk.step_inputs` produces): ``x_in`` (B, N, Din) the decoder's
    input features; ``pos`` (1 or B, N, D) positions; ``mods`` (L*6*D,), shared by the batch: block i's
    six modulation vectors (shift_msa, 1+scale_msa, gate_msa, shift_mlp, 1+scale_mlp, gate_mlp) at
    offsets (6i..6i+5)*D; ``final_shift`` / ``final_scale1`` (D,); ``keys`` / ``values`` (B, heads, T,
    L*head_dim) cross-attention, block i at offset i*head_dim; ``key_padding_mask`` (B, T) int32,
    1 = attend. Returns (B, N, out_dim) in PixArt's output layout.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.proj_in, self.trunk = decoder.proj_in, decoder.trunk

    def forward(self, x_in, pos, mods, final_shift, final_scale1, keys, values, key_padding_mask):
        from .dit import _fast_block

        tr = self.trunk
        n_blocks = len(tr.transformer_blocks)
        mods = mods.chunk(6 * n_blocks, dim=-1)
        keys, values = keys.chunk(n_blocks, dim=-1), values.chunk(n_blocks, dim=-1)
        cross_bias = ((1 - key_padding_mask.to(x_in.dtype)) * -10000.0)[:, None, None]  # PixArt's additive bias
        x = self.proj_in(x_in) + pos
        for i, block in enumerate(tr.transformer_blocks):
            x = _fast_block(block, x, None, keys[i], values[i], cross_bias, mods[6 * i:6 * i + 6])
        return tr.proj_out(tr.norm_out(x) * final_scale1 + final_shift)


class _GraphBuilder:
    """A few helpers to write an ONNX graph by hand, with a module's weights as initializers."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        arr = value.detach().float().cpu().numpy() if torch.is_tensor(value) else value
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list, outputs, domain: str = "", **attrs):
        from onnx import helper

        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, lin: nn.Linear, name: str) -> str:
        y = self.op("MatMul", [x, self.const(name + ".weight_t", lin.weight.t())], name + ".mm")
        return y if lin.bias is None else self.op("Add", [y, self.const(name + ".bias", lin.bias)], name)

    def layer_norm(self, x: str, norm: nn.LayerNorm, name: str) -> str:
        weight = norm.weight if norm.weight is not None else torch.ones(norm.normalized_shape)
        params = [self.const(name + ".weight", weight)] + ([self.const(name + ".bias", norm.bias)] if norm.bias is not None else [])
        return self.op("LayerNormalization", [x] + params, name, axis=-1, epsilon=float(norm.eps))

    def modulated_norm(self, x: str, norm: nn.LayerNorm, scale1: str, shift: str, name: str) -> str:
        """``norm(x) * scale1 + shift`` (adaLN's modulation; ``scale1`` and ``shift`` (D,) vectors). A norm
        without its own affine (PixArt's) takes them as its scale and bias: one kernel, not three."""
        if norm.weight is None and norm.bias is None:
            return self.op("LayerNormalization", [x, scale1, shift], name, axis=-1, epsilon=float(norm.eps))
        h = self.layer_norm(x, norm, name + ".norm")
        return self.op("Add", [self.op("Mul", [h, scale1], name + ".scaled"), shift], name)

    def self_attention(self, h: str, attn: nn.Module, name: str) -> str:
        """diffusers ``Attention`` (AttnProcessor2_0, no mask) on ``h``: one packed QKV matmul, ONNX
        Runtime's ``MultiHeadAttention`` (heads split inside the kernel, q/k/v biases added there), the
        output projection."""
        d = attn.to_q.out_features
        qkv = self.op("MatMul", [h, self.const(name + ".qkv.weight_t", torch.cat([attn.to_q.weight, attn.to_k.weight,
                                                                                attn.to_v.weight]).t())], name + ".qkv")
        q, k, v = self.op("Split", [qkv, self.const(name + ".split", np.full(3, d, np.int64))],
                          [name + ".q", name + ".k", name + ".v"], axis=-1)
        bias = torch.cat([torch.zeros(d) if lin.bias is None else lin.bias for lin in (attn.to_q, attn.to_k, attn.to_v)])
        o = self.op("MultiHeadAttention", [q, k, v, self.const(name + ".qkv.bias", bias)], name, domain="com.microsoft",
                    num_heads=attn.heads, scale=float(attn.scale))
        return self.linear(o, attn.to_out[0], name + ".out")

    def feed_forward(self, h: str, ff: nn.Module, name: str) -> str:
        """diffusers ``FeedForward`` with a GELU (``FastGelu`` with its bias for the tanh approximation)."""
        net = ff.net
        h = self.op("MatMul", [h, self.const(name + ".ff1.weight_t", net[0].proj.weight.t())], name + ".ff1")
        bias = [] if net[0].proj.bias is None else [self.const(name + ".ff1.bias", net[0].proj.bias)]
        if net[0].approximate == "tanh":
            h = self.op("FastGelu", [h] + bias, name + ".gelu", domain="com.microsoft")
        else:
            h = self.op("Gelu", [self.op("Add", [h] + bias, name + ".ff1.b") if bias else h], name + ".gelu")
        return self.linear(h, net[2], name + ".ff2")

    def model(self, name: str, inputs: list, outputs: list) -> bytes:
        import onnx
        from onnx import helper

        model = helper.make_model(helper.make_graph(self.nodes, name, inputs, outputs, self.inits),
                                  opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
        onnx.checker.check_model(model)
        return model.SerializeToString()


def export_decoder_step(decoder: nn.Module, example: Optional[dict] = None) -> bytes:
    """The ONNX graph of :class:`DecoderStep` for ``decoder``'s current weights, written node by node
    (batch, token count and text length dynamic): per block one packed QKV matmul, ONNX Runtime's
    ``MultiHeadAttention`` for self- and cross-attention (heads split inside the kernel), ``FastGelu``
    with its bias, one ``Split`` for the six modulation vectors, and adaLN's scale and shift as the
    LayerNorms' own (one vector for the batch, :meth:`_StepConstants.stacked`); 23 nodes per block where
    ``torch.onnx.export`` of the same function left ~95 after ONNX Runtime's own optimisations (shape
    arithmetic for the dynamic head reshapes, per-vector gathers, the attention scale from shapes).
    Shipped lazy decoder, 36 hole tokens, CFG batch 2, the two graphs interleaved: 9.2 / 8.2 ms per call
    instead of 10.3 / 9.1 ms (two runs), max difference 7e-7; folding the modulation into the norms
    (27 -> 23 nodes per block) took 1-4% more off (three interleaved runs). At paper shape ONNX Runtime's
    attention kernel also makes the 4,096-token step faster than PyTorch's (docs/BENCHMARKS.md §7).
    ``SkipLayerNormalization`` for the residual adds was slower here (9.7 / 8.6 ms). ``example`` is
    unused; it keeps :class:`OnnxRunner`'s export signature."""
    from onnx import TensorProto, helper

    tr = decoder.trunk
    blocks = tr.transformer_blocks
    n_blocks, d, din, dout = len(blocks), tr.inner_dim, decoder.proj_in.in_features, tr.proj_out.out_features
    heads = blocks[0].attn2.heads  # cross-attention: the keys / values arrive head-split
    head_dim = blocks[0].attn2.to_k.out_features // heads
    g = _GraphBuilder()
    split_d = g.const("split.mods", np.full(6, d, np.int64))
    split_hd = g.const("split.kv", np.full(n_blocks, head_dim, np.int64))
    mods = g.op("Split", ["mods", g.const("split.blocks", np.full(n_blocks, 6 * d, np.int64))],
                [f"mods.{i}" for i in range(n_blocks)], axis=-1)
    keys = g.op("Split", ["keys", split_hd], [f"keys.{i}" for i in range(n_blocks)], axis=-1)
    values = g.op("Split", ["values", split_hd], [f"values.{i}" for i in range(n_blocks)], axis=-1)
    x = g.op("Add", [g.linear("x_in", decoder.proj_in, "proj_in"), "pos"], "x.0")

    for i, blk in enumerate(blocks):
        p = f"block{i}"
        shift_msa, scale_msa1, gate_msa, shift_mlp, scale_mlp1, gate_mlp = g.op(
            "Split", [mods[i], split_d], [f"{p}.mod{j}" for j in range(6)], axis=-1)
        h = g.modulated_norm(x, blk.norm1, scale_msa1, shift_msa, p + ".h1")
        o = g.op("Mul", [g.self_attention(h, blk.attn1, p + ".attn1"), gate_msa], p + ".attn1.gated")
        x = g.op("Add", [o, x], p + ".x1")
        a2 = blk.attn2
        o = g.op("MultiHeadAttention", [g.linear(x, a2.to_q, p + ".attn2.q"), keys[i], values[i], "",
                                        "key_padding_mask"], p + ".attn2", domain="com.microsoft",
                 num_heads=heads, scale=float(a2.scale), mask_filter_value=-10000.0)
        x = g.op("Add", [g.linear(o, a2.to_out[0], p + ".attn2.out"), x], p + ".x2")
        h = g.modulated_norm(x, blk.norm2, scale_mlp1, shift_mlp, p + ".h2")
        x = g.op("Add", [g.op("Mul", [g.feed_forward(h, blk.ff, p), gate_mlp], p + ".ff.gated"), x], p + ".x3")
    h = g.modulated_norm(x, tr.norm_out, "final_scale1", "final_shift", "final")
    g.op("Identity", [g.linear(h, tr.proj_out, "proj_out")], "out")
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x_in", f, ["B", "N", din]),
              helper.make_tensor_value_info("pos", f, ["P", "N", d]),
              helper.make_tensor_value_info("mods", f, [n_blocks * 6 * d]),
              helper.make_tensor_value_info("final_shift", f, [d]),
              helper.make_tensor_value_info("final_scale1", f, [d]),
              helper.make_tensor_value_info("keys", f, ["B", heads, "T", n_blocks * head_dim]),
              helper.make_tensor_value_info("values", f, ["B", heads, "T", n_blocks * head_dim]),
              helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, ["B", "T"])]
    return g.model("decoder_step", inputs, [helper.make_tensor_value_info("out", f, ["B", "N", dout])])


def context_encoder_supported(encoder: nn.Module) -> bool:
    """Whether :func:`export_context_encoder` covers ``encoder``'s ViT blocks: pre-LN
    ``BasicTransformerBlock``s with self-attention only that the fused path would take
    (``dit._plain_block``), in inference."""
    from .dit import _plain_block

    if encoder.training or torch.is_grad_enabled():
        return False
    return all(block.norm_type == "layer_norm" and block.attn2 is None and block.norm3 is not None
               and not block.only_cross_attention and _plain_block(block) for block in encoder.vit.blocks)


def export_context_encoder(encoder: nn.Module, example: Optional[dict] = None) -> bytes:
    """The ONNX graph of the context encoder's whole-canvas pass after patchifying
    (``ContextEncoder.embed``): input projection + positions, the ViT blocks (``x + attn(norm1(x))``,
    ``x + ff(norm3(x))``, as ``BasicTransformerBlock`` runs them), the final norm and the output
    projection. Inputs ``x`` (B, N, (C+1)*p*p) and ``pos`` (1 or B, N, D); output (B, N, context_dim);
    batch and token count dynamic. Written node by node like :func:`export_decoder_step`."""
    from onnx import TensorProto, helper

    g = _GraphBuilder()
    x = g.op("Add", [g.linear("x", encoder.proj_in, "proj_in"), "pos"], "x.0")
    for i, blk in enumerate(encoder.vit.blocks):
        p = f"block{i}"
        x = g.op("Add", [g.self_attention(g.layer_norm(x, blk.norm1, p + ".norm1"), blk.attn1, p + ".attn1"), x], p + ".x1")
        x = g.op("Add", [g.feed_forward(g.layer_norm(x, blk.norm3, p + ".norm3"), blk.ff, p), x], p + ".x2")
    g.op("Identity", [g.linear(g.layer_norm(x, encoder.vit.norm, "norm"), encoder.proj_out, "proj_out")], "out")
    f = TensorProto.FLOAT
    return g.model("context_encoder", [helper.make_tensor_value_info("x", f, ["B", "N", encoder.proj_in.in_features]),
                                       helper.make_tensor_value_info("pos", f, ["P", "N", encoder.inner_dim])],
                   [helper.make_tensor_value_info("out", f, ["B", "N", encoder.context_dim])])


def _export(module: nn.Module, args: tuple, names: list, dynamic: dict, dynamo_shapes) -> bytes:
    """ONNX bytes of ``module(*args)`` with the given dynamic axes. Uses the TorchScript-based
    exporter (about 1 s for the shipped decoder; the dynamo exporter took ~18 s) and falls back to the
    dynamo one (which needs ``onnxscript``) where the former fails."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # opset 20: GELU is one op (17 spells it out); 9.1-11.9 vs 9.7-12.3 ms per shipped-decoder call
            torch.onnx.export(module, args, buf, input_names=names, output_names=["out"],
                              dynamic_axes=dynamic, opset_version=20, dynamo=False)
        except Exception as legacy_err:  # noqa: BLE001 - try the other exporter before giving up
            buf = io.BytesIO()
            try:
                program = torch.onnx.export(module, args, input_names=names, output_names=["out"],
                                            dynamic_shapes=dynamo_shapes(), dynamo=True, optimize=True)
                program.save(buf)
            except Exception as err:
                raise RuntimeError(f"exporting {type(module).__name__} to ONNX failed ({legacy_err}; then {err}); "
                                   "use the PyTorch backend (pipe.enable_onnx_runtime(False))") from err
    return buf.getvalue()


class VaeCall(nn.Module):
    """One direction of a diffusers VAE as a plain function of a tensor (what is exported):
    ``"decode"`` -> ``vae.decode(z).sample``; ``"encode"`` -> the latent the pipelines use (the
    posterior's mode, or an ``AutoencoderTiny``'s latents)."""

    def __init__(self, vae: nn.Module, direction: str):
        super().__init__()
        self.vae, self.direction = vae, direction

    def forward(self, t):
        if self.direction == "decode":
            return self.vae.decode(t).sample
        out = self.vae.encode(t)
        return out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents


def _export_vae(vae: nn.Module, example: dict, direction: str) -> bytes:
    """ONNX bytes of :class:`VaeCall` for ``vae``'s current weights; batch and spatial size dynamic."""
    (name, t), = example.items()

    def dynamo_shapes():
        return {name: {0: torch.export.Dim("B", min=1), 2: torch.export.Dim("H", min=2),
                       3: torch.export.Dim("W", min=2)}}

    return _export(VaeCall(vae, direction).eval(), (t,), [name],
                   {name: {0: "B", 2: "H", 3: "W"}, "out": {0: "B", 2: "OH", 3: "OW"}}, dynamo_shapes)


def export_vae_encode(vae: nn.Module, example: dict) -> bytes:
    return _export_vae(vae, example, "encode")


def export_vae_decode(vae: nn.Module, example: dict) -> bytes:
    return _export_vae(vae, example, "decode")


class TextEncoderCall(nn.Module):
    """A text encoder's last hidden state as a plain function of token ids and attention mask."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids, attn):
        return self.text_encoder(ids, attention_mask=attn)[0]


def export_text_encoder(text_encoder: nn.Module, example: dict) -> bytes:
    """ONNX bytes of :class:`TextEncoderCall`; batch and prompt length dynamic."""
    def dynamo_shapes():
        b, t = torch.export.Dim("B", min=1), torch.export.Dim("T", min=2)
        return {"ids": {0: b, 1: t}, "attn": {0: b, 1: t}}

    return _export(TextEncoderCall(text_encoder).eval(), (example["ids"], example["attn"]), ["ids", "attn"],
                   {"ids": {0: "B", 1: "T"}, "attn": {0: "B", 1: "T"}, "out": {0: "B", 1: "T"}}, dynamo_shapes)


# An ONNX graph with its weights inside is one protobuf message, which is limited to 2 GiB.
MAX_GRAPH_WEIGHT_BYTES = 2 ** 31 - 2 ** 26


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def graph_fits(module: nn.Module) -> bool:
    """Whether ``module``'s weights fit one ONNX graph (T5-XXL or a real-size PixArt-XL/2 in fp32 do not)."""
    return weight_bytes(module) <= MAX_GRAPH_WEIGHT_BYTES


# Callables ``(export, module, inputs)`` told of every OnnxRunner call: what ran in ONNX Runtime
# bypasses the modules' forward, so a FLOP counter (eval.flops.CallRecorder) listens here too.
CALL_OBSERVERS: list = []
_exports_running = 0  # graph exports in progress: their tracing runs the modules' forward, not an edit's work


def exporting() -> bool:
    """Whether a graph export is tracing a module now (a FLOP counter must not count those calls)."""
    return _exports_running > 0


class OnnxRunner:
    """An ONNX Runtime session for one module (``export(module, example) -> bytes``), rebuilt when the
    module's weights change."""

    spin_duration_us = 200

    def __init__(self, threads: Optional[int] = None, export=export_decoder_step):
        if not onnxruntime_available():
            raise ImportError(f"the ONNX Runtime backend needs onnxruntime and onnx: {INSTALL_HINT}")
        self.export = export
        self.threads = int(threads or torch.get_num_threads())
        self.session = None
        self.key = None
        self.params = None
        self.exports = 0  # how many times the graph was (re)built: tests and the benchmark read it

    def __getstate__(self):  # copies (deepcopy, pickling) rebuild their session at first use
        return {"threads": self.threads, "export": self.export, "session": None, "key": None, "params": None,
                "exports": 0}

    def _session(self, module: nn.Module, example: dict):
        from .dit import _param_key, once_per_edit

        if self.params is None or self.params[0] is not module:  # the Parameter objects; values are keyed below
            self.params = (module, list(module.parameters()))
        params = self.params[1]
        key = (once_per_edit(module, "params", lambda: _param_key(params)), tuple(v.dtype for v in example.values()))
        if self.session is None or key != self.key:
            import onnxruntime as ort

            if not graph_fits(module):
                size = weight_bytes(module)
                raise RuntimeError(f"{type(module).__name__} has {size / 2 ** 30:.1f} GiB of weights, more than an "
                                   "ONNX graph can hold (2 GiB): keep it in PyTorch by leaving its part out of "
                                   "pipe.enable_onnx_runtime(parts=...), e.g. parts=(\"decoder\", \"vae\") without "
                                   "\"text_encoder\" for T5-XXL")

            global _exports_running
            _exports_running += 1
            try:
                model = self.export(module, example)
            finally:
                _exports_running -= 1
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            # Spin between calls (a denoising loop's torch work in between is short), but stop soon
            # after the last one: by default the idle workers kept spinning into the torch VAE decode
            # that follows and doubled it (46 vs 24 ms); 200 us keeps the step speed (~10 ms).
            opts.add_session_config_entry("session.intra_op.spin_duration_us", str(self.spin_duration_us))
            self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            self.key = key
            self.exports += 1
        return self.session

    def __call__(self, module: nn.Module, inputs: dict) -> torch.Tensor:
        for observer in CALL_OBSERVERS:
            observer(self.export, module, inputs)
        session = self._session(module, inputs)
        feed = {k: v.detach().contiguous().numpy() for k, v in inputs.items()}
        return torch.from_numpy(session.run(None, feed)[0])


class OnnxRuntimeMixin:
    """``use_onnx_runtime()`` for a decoder with ``proj_in`` and a :class:`~lazydiff.models.dit.PixArtTrunk`."""

    onnx_runner: Optional[OnnxRunner] = None

    def use_onnx_runtime(self, enable: bool = True, threads: Optional[int] = None) -> None:
        """Run each inference step (input projection to output projection) in ONNX Runtime on CPU:
        the same arithmetic with less per-op overhead; outputs equal PyTorch's to float32 rounding,
        not bit for bit. The graph is exported at the first step and again whenever the weights
        change. CUDA tensors, other dtypes, padded batches (``token_mask``), gradients, training mode
        and ``trunk.fast_inference = False`` keep the PyTorch path. ``threads`` defaults to torch's
        thread count now."""
        self.onnx_runner = OnnxRunner(threads) if enable else None

    def _onnx_step(self, x_in: torch.Tensor, positions, timestep, encoder_hidden_states, encoder_attention_mask,
                   token_mask, added_cond_kwargs, text_conditioning) -> Optional[torch.Tensor]:
        """The step's output (B, N, out_dim) from ONNX Runtime, or None where it does not apply.
        ``positions()`` -> (1 or B, N, D) is called only when it does."""
        if self.onnx_runner is None or token_mask is not None or x_in.device.type != "cpu" \
                or x_in.dtype != torch.float32 or self.proj_in.weight.dtype != torch.float32:
            return None
        consts = self.trunk.step_inputs(timestep.to(x_in.device), x_in.shape[0], x_in.dtype, encoder_hidden_states,
                                        encoder_attention_mask, added_cond_kwargs, text_conditioning)
        if consts is None:
            return None
        return self.onnx_runner(self, {"x_in": x_in, "pos": positions(), **consts})


__all__ = ["DecoderStep", "VaeCall", "TextEncoderCall", "OnnxRunner", "OnnxRuntimeMixin", "export_decoder_step",
           "export_context_encoder", "context_encoder_supported", "export_vae_encode", "export_vae_decode",
           "export_text_encoder", "graph_fits", "onnxruntime_available"]
