"""LazyDiffusionPipeline: the paper's two stages behind one diffusers-style ``__call__``.

    text (cached) -> VAE-encode E(I * (1 - M)) -> context encoder, ONCE, whole canvas, keep |H| tokens
    -> for each step: lazy decoder on the |H| hole tokens only (batched CFG)
    -> scatter, VAE-decode the hole's region, paste inside the pixel mask
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ..models import ContextEncoder, LazyDecoder
from ..models.dit import gather_tokens
from .editing import (CALL_DOC, EditDiffusionPipeline, ImageInput, StepFunction, check_output_type,
                      with_output_type)


class LazyDiffusionPipeline(EditDiffusionPipeline):
    """Edit a canvas inside a mask; cost scales with the mask, not the canvas.

    Components: ``vae`` (any diffusers autoencoder), ``text_encoder`` + ``tokenizer`` (any
    transformers text encoder), ``context_encoder`` (:class:`ContextEncoder`), ``decoder``
    (:class:`LazyDecoder`), ``scheduler`` (any diffusers scheduler).
    """

    model_cpu_offload_seq = "text_encoder->context_encoder->decoder->vae"
    _callback_tensor_inputs = ["latents", "pred_x0"]

    def __init__(self, vae, text_encoder, tokenizer, context_encoder: ContextEncoder, decoder: LazyDecoder, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              context_encoder=context_encoder, decoder=decoder, scheduler=scheduler)

    context_cache: bool = True  # reuse the context tokens when the masked canvas and mask repeat

    def encode_context(self, enc):
        """Stage 1, once per canvas + mask: the whole canvas in, |H| context tokens out.

        With ``context_cache`` on, the result is kept and reused while the masked-canvas latents are
        the same cached ones (same masked canvas and mask: a repeated edit or a re-roll)."""
        version = enc.get("canvas_version")
        key = None
        if self.context_cache and version is not None:
            key = (version, id(self.context_encoder), self._dtype_of("context_encoder"))
            hit = self.__dict__.get("_context_cache")
            if hit is not None and hit[0] == key:
                return hit[1]
        context = self._context_in_onnx(enc)
        if context is None:
            dt = self._dtype_of("context_encoder")  # the latents come in the decoder's dtype, which may differ
            context = self.context_encoder(enc["masked_latents"].to(dt), enc["mask_latent"].to(dt), enc["hole_index"]).context
        if key is not None:
            self.__dict__["_context_cache"] = (key, context)
        return context

    def make_denoiser(self, enc, edit, text, text_mask, batch, device, timer):
        with timer("context_encoder"):
            context = self.encode_context(enc)
        ctx, idx = context.expand(batch, -1, -1), enc["hole_index"].expand(batch, -1)
        grid = tuple(enc["token_mask"].shape[-2:])
        added = self.added_cond_kwargs(edit, batch, device)
        with timer("text"):  # per-edit text constants count as text work
            cond = self.text_conditioning(text, text_mask)

        denoise = StepFunction(self._decoder_step, dict(context=ctx, hole_index=idx, grid=grid, text=text,
                                                        text_mask=text_mask, added=added, text_conditioning=cond))
        # The sampler only ever holds the hole tokens.
        return (lambda full: self.hole_tokens_of(full, enc["hole_index"])), denoise, (lambda x: x)

    def _decoder_step(self, tokens, t, c):
        """Stage 2, every step: the decoder sees exactly |H| tokens per image (per-edit tensors in ``c``)."""
        out = self.decoder(tokens, c["context"], c["hole_index"], c["grid"], t.expand(tokens.shape[0]), c["text"],
                           c["text_mask"], added_cond_kwargs=c["added"], text_conditioning=c["text_conditioning"]).sample
        return out[..., : tokens.shape[-1]]  # drop learned-variance channels, if any

    def _context_in_onnx(self, enc) -> Optional[torch.Tensor]:
        """The context tokens from ONNX Runtime (``enable_onnx_runtime(parts=(..., "context_encoder"))``),
        or None where that does not apply (GPU, other dtypes, blocks the graph does not cover)."""
        from ..models.onnx_backend import context_encoder_supported

        ce, latents = self.context_encoder, enc["masked_latents"]
        if not self._in_onnx(self.context_encoder_runner, latents.device, latents.dtype) \
                or self._dtype_of("context_encoder") != torch.float32 or not context_encoder_supported(ce):
            return None
        x, pos = ce.embed(latents, enc["mask_latent"])
        return gather_tokens(self.context_encoder_runner(ce, {"x": x, "pos": pos[None]}), enc["hole_index"])

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: ImageInput, mask_image: ImageInput,
                 negative_prompt: Union[str, List[str], None] = "",
                 num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 generator: Optional[torch.Generator] = None, num_images_per_prompt: int = 1,
                 latents: Optional[torch.Tensor] = None, sketch: Optional[ImageInput] = None, strength: float = 1.0,
                 blend: str = "feather", feather_radius: Optional[float] = None, max_sequence_length: int = 120,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True,
                 output_type: str = "pil"):
        check_output_type(output_type)
        out = self.run_edit(prompt, image, mask_image, negative_prompt, num_inference_steps, guidance_scale, generator,
                            num_images_per_prompt, latents, sketch, strength, blend, feather_radius,
                            max_sequence_length, callback_on_step_end, callback_on_step_end_tensor_inputs)
        out = with_output_type(out, output_type)
        return out if return_dict else (out.images,)

    __call__.__doc__ = CALL_DOC
