"""Run any diffusers inpainting pipeline (SD / SDXL inpainting, ...) behind the lazy pipeline's interface.

For users who have those weights locally: the adapter validates inputs the same way, pads/rounds
the canvas to what the pipeline accepts, pastes the result back inside the pixel mask only (so
unmasked pixels stay bit-identical), and reports the same ``timings`` / ``stats``.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Union

import numpy as np
import PIL.Image
import torch

from .blending import blend as blend_pixels
from .editing import EditPipelineMixin, EditPipelineOutput, ImageInput, check_sampling_args, prepare_edit


class DiffusersInpaintAdapter:
    """Wrap a diffusers inpainting pipeline (e.g. from ``AutoPipelineForInpainting``)."""

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "DiffusersInpaintAdapter":
        from diffusers import AutoPipelineForInpainting

        try:
            pipe = AutoPipelineForInpainting.from_pretrained(path, local_files_only=True, **kwargs)
        except (OSError, EnvironmentError, ValueError) as err:
            raise OSError(f"could not load a diffusers inpainting pipeline from {path!r}: {err}. Pass a local "
                          "folder in the diffusers layout (model_index.json + component folders), e.g. a "
                          "downloaded stable-diffusion-2-inpainting or sdxl-1.0-inpainting snapshot; nothing "
                          "is downloaded at run time.") from err
        return cls(pipe)

    def to(self, device):
        self.pipe.to(device)
        return self

    @property
    def scheduler(self):
        """The wrapped pipeline's sampler; assign to swap it, as on our pipelines."""
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, value) -> None:
        self.pipe.scheduler = value

    @property
    def vae_scale_factor(self) -> int:
        return getattr(self.pipe, "vae_scale_factor", 8)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], image: ImageInput, mask_image: ImageInput,
                 negative_prompt: Union[str, List[str], None] = "",
                 num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 generator: Optional[torch.Generator] = None, num_images_per_prompt: int = 1,
                 blend: str = "feather", feather_radius: Optional[float] = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True, **kwargs):
        t_start = time.perf_counter()
        check_sampling_args(num_inference_steps, guidance_scale, 1.0, num_images_per_prompt, blend)
        cell = self.vae_scale_factor
        edit = prepare_edit(image, mask_image, cell)
        hp, wp = edit.padded_size
        # diffusers resizes to (height, width); pad instead so the canvas is never resampled.
        canvas = np.pad(edit.rgb, ((0, hp - edit.size[0]), (0, wp - edit.size[1]), (0, 0)), mode="edge")
        mask = np.pad(edit.mask, ((0, hp - edit.size[0]), (0, wp - edit.size[1])))
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        callback = callback_on_step_end
        if callback is not None and not isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            # Our interface lets a callback return None; diffusers pipelines need a dict back.
            def callback(pipe, step, timestep, tensors):
                return callback_on_step_end(pipe, step, timestep, tensors) or {}
        t0 = time.perf_counter()
        result = self.pipe(prompt=prompt, image=PIL.Image.fromarray(canvas),
                           mask_image=PIL.Image.fromarray(mask.astype(np.uint8) * 255),
                           negative_prompt=negative_prompt or None, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, generator=generator,
                           num_images_per_prompt=num_images_per_prompt, height=hp, width=wp,
                           callback_on_step_end=callback, output_type="np", **kwargs)
        gen_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        images = []
        for arr in result.images:
            gen = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)[: edit.size[0], : edit.size[1]]
            images.append(EditPipelineMixin._to_mode(edit, blend_pixels(edit.rgb, gen, edit.mask, blend, feather_radius)))
        timings = {"pipeline": gen_ms, "blend": (time.perf_counter() - t0) * 1e3,
                   "total": (time.perf_counter() - t_start) * 1e3}
        stats = {"mask_ratio": float(edit.mask.mean()), "steps": int(num_inference_steps),
                 "hole_tokens": None, "total_tokens": None, **edit.notes}
        out = EditPipelineOutput(images=images, timings=timings, stats=stats)
        return out if return_dict else (out.images,)
