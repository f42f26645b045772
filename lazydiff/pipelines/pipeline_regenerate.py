"""The paper's full-canvas baselines, with the lazy pipeline's call signature and outputs.

- :class:`RegenerateImagePipeline` ("RegenerateImage"): a PixArt-α style inpainting DiT that
  processes ALL tokens of the canvas at every step, conditioned on the masked-canvas latent and the
  mask; only the masked pixels are kept.
- :class:`RegenerateCropPipeline` ("RegenerateCrop"): the same model run on a square crop around
  the mask, resized to the model's resolution. Fast for small masks, blind to the rest of the canvas.

Both reuse :class:`EditPipelineMixin` (cached text, crop-only VAE decode, blending), so every
difference in cost comes from the denoiser.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from ..models import FullCanvasDecoder
from .blending import blend as blend_pixels
from .editing import (CALL_DOC, EditDiffusionPipeline, EditPipelineOutput, ImageInput, StepFunction,
                      check_output_type, check_sampling_args, prepare_edit,
                      with_output_type)
from .working_size import resize_mask


class RegenerateImagePipeline(EditDiffusionPipeline):
    """Full-canvas inpainting: the denoiser sees every token at every step.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``decoder`` (:class:`FullCanvasDecoder`),
    ``scheduler``.
    """

    model_cpu_offload_seq = "text_encoder->decoder->vae"
    _callback_tensor_inputs = ["latents", "pred_x0"]
    # After every step, tokens outside the hole are reset to the masked-canvas latent noised to the next
    # timestep (RePaint-style; diffusers does the same for 4-channel inpainting). The shipped model is
    # trained with the loss on hole tokens only (as LazyDiffusion), so its predictions outside the hole
    # are untrained; left alone they drift and the hole sees a drifting context. False: every token
    # evolves from the model's own predictions (how the quality reports before 2026-11-27 sampled it).
    reset_outside_hole: bool = True

    def __init__(self, vae, text_encoder, tokenizer, decoder: FullCanvasDecoder, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, decoder=decoder,
                              scheduler=scheduler)

    def make_denoiser(self, enc, edit, text, text_mask, batch, device, timer):
        masked = enc["masked_latents"].expand(batch, -1, -1, -1)
        mask = enc["mask_latent"].expand(batch, -1, -1, -1)
        added = self.added_cond_kwargs(edit, batch, device)
        with timer("text"):  # per-edit text constants count as text work
            cond = self.text_conditioning(text, text_mask)

        denoise = StepFunction(self._decoder_step, dict(masked=masked, mask=mask, text=text, text_mask=text_mask,
                                                        added=added, text_conditioning=cond))
        return (lambda full: full), denoise, (lambda x: self.hole_tokens_of(x, enc["hole_index"]))

    def after_step_fn(self, enc, noise, timesteps):
        if not self.reset_outside_hole:
            return None
        p = self.patch_size
        outside = ~enc["token_mask"].repeat_interleave(p, -2).repeat_interleave(p, -1)[:, None]  # latent cells
        known = enc["masked_latents"].float()

        def reset(i: int, latents: torch.Tensor) -> torch.Tensor:
            # after the last step the tokens outside the hole are never read (decode_hole uses
            # masked_latents there), so clean latents are as good as any
            ref = known if i + 1 >= len(timesteps) else self.scheduler.add_noise(known, noise, timesteps[i + 1:i + 2])
            return torch.where(outside, ref.to(latents.dtype), latents)

        return reset

    def _decoder_step(self, latents, t, c):
        """Every step: the whole canvas (per-edit tensors in ``c``)."""
        out = self.decoder(latents, c["masked"], c["mask"], t.expand(latents.shape[0]), c["text"], c["text_mask"],
                           added_cond_kwargs=c["added"], text_conditioning=c["text_conditioning"]).sample
        return out[:, : latents.shape[1]]

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


def crop_box(mask: np.ndarray, margin: float, min_side: int = 16) -> Tuple[int, int, int, int]:
    """A square (where the canvas allows) around the mask's bounding box, ``margin`` x its side on
    each side, shifted to stay inside the canvas. -> (y0, y1, x0, x1)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    side = int(round(max(side * (1 + 2 * margin), min_side)))
    sh, sw = min(side, h), min(side, w)
    y0 = int(np.clip(round(cy - sh / 2), 0, h - sh))
    x0 = int(np.clip(round(cx - sw / 2), 0, w - sw))
    return y0, y0 + sh, x0, x0 + sw


class RegenerateCropPipeline(RegenerateImagePipeline):
    """RegenerateImage on a crop around the mask, resized to the model's resolution.

    ``resolution`` (pixels of the crop's longer side after resizing) defaults to the decoder's
    training size; ``crop_margin`` is the context kept around the mask, as a fraction of its size.
    """

    def default_resolution(self) -> int:
        return int(self.decoder.config.sample_size * self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: ImageInput, mask_image: ImageInput,
                 negative_prompt: Union[str, List[str], None] = "",
                 num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 generator: Optional[torch.Generator] = None, num_images_per_prompt: int = 1,
                 latents: Optional[torch.Tensor] = None, sketch: Optional[ImageInput] = None, strength: float = 1.0,
                 blend: str = "feather", feather_radius: Optional[float] = None, max_sequence_length: int = 120,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), return_dict: bool = True,
                 output_type: str = "pil", resolution: Optional[int] = None, crop_margin: float = 0.25):
        t_start = time.perf_counter()
        check_sampling_args(num_inference_steps, guidance_scale, strength, num_images_per_prompt, blend)
        check_output_type(output_type)
        edit = prepare_edit(image, mask_image, 1, sketch)
        t0 = time.perf_counter()
        y0, y1, x0, x1 = crop_box(edit.mask, crop_margin, self.token_cell)
        ch, cw = y1 - y0, x1 - x0
        res = resolution or self.default_resolution()
        cell = self.token_cell
        scale = res / max(ch, cw)
        th, tw = (max(cell, int(round(v * scale / cell)) * cell) for v in (ch, cw))
        crop_rgb = PIL.Image.fromarray(edit.rgb[y0:y1, x0:x1]).resize((tw, th), PIL.Image.BICUBIC)
        if th < ch or tw < cw:  # shrinking: a pixel touched by the mask stays masked, so thin strokes survive
            crop_mask = PIL.Image.fromarray(resize_mask(edit.mask[y0:y1, x0:x1], th, tw).astype(np.uint8) * 255)
        else:  # growing: nearest neighbour loses nothing and adds nothing
            crop_mask = PIL.Image.fromarray(edit.mask[y0:y1, x0:x1].astype(np.uint8) * 255).resize((tw, th),
                                                                                                 PIL.Image.NEAREST)
        crop_sketch = None
        if edit.sketch_rgb is not None:
            crop_sketch = PIL.Image.fromarray(edit.sketch_rgb[y0:y1, x0:x1]).resize((tw, th), PIL.Image.BICUBIC)
        resize_ms = (time.perf_counter() - t0) * 1e3

        def to_canvas(gen_crop: PIL.Image.Image, mode: str, radius: Optional[float]) -> PIL.Image.Image:
            gen = edit.rgb.copy()
            gen[y0:y1, x0:x1] = np.asarray(gen_crop.convert("RGB").resize((cw, ch), PIL.Image.BICUBIC))
            return self._to_mode(edit, blend_pixels(edit.rgb, gen, edit.mask, mode, radius))

        callback = callback_on_step_end
        if callback_on_step_end is not None:
            def callback(pipe, step, timestep, kwargs):
                if "decode_preview" in kwargs:  # previews show the whole canvas, as in the other pipelines
                    crop_preview = kwargs["decode_preview"]
                    kwargs = dict(kwargs, decode_preview=lambda: to_canvas(crop_preview(), "hard", None))
                return callback_on_step_end(pipe, step, timestep, kwargs)

        inner = self.run_edit(prompt, crop_rgb, crop_mask, negative_prompt, num_inference_steps, guidance_scale,
                              generator, num_images_per_prompt, latents, crop_sketch, strength, "hard", None,
                              max_sequence_length, callback, callback_on_step_end_tensor_inputs)
        t0 = time.perf_counter()
        images = [to_canvas(gen_crop, blend, feather_radius) for gen_crop in inner.images]
        timings = {k: v for k, v in inner.timings.items() if k != "total"}
        timings["blend"] = timings.get("blend", 0.0) + (time.perf_counter() - t0) * 1e3
        timings["crop_resize"] = resize_ms
        timings["total"] = (time.perf_counter() - t_start) * 1e3
        stats = dict(inner.stats, mask_ratio=float(edit.mask.mean()), crop_box=(y0, y1, x0, x1),
                     crop_resized_to=(th, tw), **edit.notes)
        out = with_output_type(EditPipelineOutput(images=images, timings=timings, stats=stats), output_type)
        return out if return_dict else (out.images,)

    __call__.__doc__ = CALL_DOC + """
        RegenerateCrop extras: ``resolution`` (crop's longer side after resizing; default: the
        model's training size) and ``crop_margin`` (context around the mask, fraction of its size).
        """
