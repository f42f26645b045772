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

The graph is exported with the weights in it, from the decoder itself (``torch.onnx.export``; nothing
is downloaded or unpickled), and rebuilt when the weights change (keyed on each parameter's storage
and version, as the timestep memo is). Outputs match PyTorch's to float32 rounding (max ~2e-6 per
forward on the shipped model; ``tests/test_onnx_backend.py``).

    pipe.enable_onnx_runtime()          # or decoder.use_onnx_runtime()

The pipelines also run the VAE through ONNX Runtime when it is enabled (:class:`VaeCall`: the hole's
crop decode and whole-canvas encodes; every method alike), and the text encoder
(:class:`TextEncoderCall`: a new prompt's embedding). Encodes that the canvas-latent cache hooks into
(recording the encoder's statistics, partial re-encodes of large canvases) stay in PyTorch.
"""
from __future__ import annotations

import io
import warnings
from typing import Optional

import torch
import torch.nn as nn

INPUT_NAMES = ["x_in", "pos", "mods", "final_shift", "final_scale1", "keys", "values", "cross_bias"]
INSTALL_HINT = "pip install onnxruntime==1.32.0 onnx==1.23.2 (both in requirements.txt)"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


class DecoderStep(nn.Module):
    """A decoder's per-step arithmetic as a plain function of tensors (what is exported): the
    decoder's ``proj_in`` + positions, then the trunk's fused blocks (``dit._fast_block``, the code
    the PyTorch path runs) and final layer.

    Inputs: ``x_in`` (B, N, Din) the decoder's input features; ``pos`` (1 or B, N, D) positions;
    ``mods`` (L, B, 6, 1, D) per block (shift_msa, 1+scale_msa, gate_msa, shift_mlp, 1+scale_mlp,
    gate_mlp); ``final_shift`` / ``final_scale1`` (B, 1, D); ``keys`` / ``values`` (L, B, heads, T,
    head_dim) cross-attention; ``cross_bias`` (B, 1, 1, T) additive. Returns (B, N, out_dim) in
    PixArt's output layout.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.proj_in, self.trunk = decoder.proj_in, decoder.trunk

    def forward(self, x_in, pos, mods, final_shift, final_scale1, keys, values, cross_bias):
        from .dit import _fast_block

        tr = self.trunk
        x = self.proj_in(x_in) + pos
        for i, block in enumerate(tr.transformer_blocks):
            x = _fast_block(block, x, None, keys[i], values[i], cross_bias, mods[i].unbind(1))
        return tr.proj_out(tr.norm_out(x) * final_scale1 + final_shift)


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


def export_decoder_step(decoder: nn.Module, example: dict) -> bytes:
    """ONNX bytes of :class:`DecoderStep` for ``decoder``'s current weights; batch, token count and
    text length are dynamic."""
    dynamic = {"x_in": {0: "B", 1: "N"}, "pos": {0: "P", 1: "N"}, "mods": {1: "B"}, "final_shift": {0: "B"},
               "final_scale1": {0: "B"}, "keys": {1: "B", 3: "T"}, "values": {1: "B", 3: "T"},
               "cross_bias": {0: "B", 3: "T"}, "out": {0: "B", 1: "N"}}

    def dynamo_shapes():
        b, n, t = torch.export.Dim("B", min=1), torch.export.Dim("N", min=1), torch.export.Dim("T", min=1)
        return {"x_in": {0: b, 1: n}, "pos": {0: torch.export.Dim("P", min=1), 1: n}, "mods": {1: b},
                "final_shift": {0: b}, "final_scale1": {0: b}, "keys": {1: b, 3: t}, "values": {1: b, 3: t},
                "cross_bias": {0: b, 3: t}}

    return _export(DecoderStep(decoder).eval(), tuple(example[k] for k in INPUT_NAMES), INPUT_NAMES, dynamic,
                   dynamo_shapes)


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
        from .dit import _param_key

        if self.params is None or self.params[0] is not module:  # the Parameter objects; values are keyed below
            self.params = (module, list(module.parameters()))
        key = (_param_key(self.params[1]), tuple(v.dtype for v in example.values()))
        if self.session is None or key != self.key:
            import onnxruntime as ort

            size = sum(p.numel() * p.element_size() for p in self.params[1])
            if size > MAX_GRAPH_WEIGHT_BYTES:
                raise RuntimeError(f"{type(module).__name__} has {size / 2 ** 30:.1f} GiB of weights, more than an "
                                   "ONNX graph can hold (2 GiB): keep it in PyTorch, e.g. "
                                   "pipe.enable_onnx_runtime(parts=(\"decoder\", \"vae\")) without \"text_encoder\"")

            model = self.export(module, example)
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
           "export_vae_encode", "export_vae_decode", "export_text_encoder", "onnxruntime_available"]
