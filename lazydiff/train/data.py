"""Training streams (ShapesWorld, or your own images): deterministic by (seed, step), so a resumed run sees the
same data.

Sample ``i`` of the stream is generated from seed ``base + i``; process ``r`` of ``n`` takes the
samples ``i = (step * n + r) * batch + j``. Worker processes of a DataLoader split each batch.
Images travel as uint8 (a quarter of float32's bytes between processes) and become floats on the
training device (:func:`to_unit`).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

TRAIN_SEED_BASE = 1_000_000_000  # far from the held-out test split's seeds


def _images(arr: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) uint8, contiguous."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 images of a batch -> float32 in [-1, 1] on ``device`` (the values the models train on).
    Asynchronous from the loader's pinned memory on a GPU."""
    return images.to(device, non_blocking=True).float() / 127.5 - 1.0


def edit_batch(seeds, size: int) -> Dict[str, object]:
    from ..shapesworld.tasks import make_task

    tasks = [make_task(int(s), size=(size, size)) for s in seeds]
    return {"canvas": _images(np.stack([t.canvas for t in tasks])),
            "target": _images(np.stack([t.target for t in tasks])),
            "mask": torch.from_numpy(np.stack([t.mask for t in tasks]))[:, None],  # bool
            "prompt": [t.prompt for t in tasks]}


def image_batch(seeds, size: int, object_masks: bool = False) -> Dict[str, object]:
    """Scenes for the autoencoder; with ``object_masks``, also where the objects are (their visible
    masks grown by one pixel, so the outline counts too) as (B, 1, H, W) bool."""
    from scipy.ndimage import binary_dilation

    from ..shapesworld.scenes import render_scene

    scenes = [render_scene(int(s), size=(size, size)) for s in seeds]
    batch = {"image": _images(np.stack([sc.image for sc in scenes]))}
    if object_masks:
        masks = np.zeros((len(scenes), size, size), bool)
        for m, sc in zip(masks, scenes):
            for o in sc.objects:
                m |= o.mask
            m[:] = binary_dilation(m, iterations=1)
        batch["objects"] = torch.from_numpy(masks)[:, None]
    return batch


def hole_crop_pair(seed: int, size: int) -> Tuple[np.ndarray, str]:
    """The ground truth of edit task ``seed`` cropped around its hole the way the evaluation crops
    it (``crop_box``, margin drawn from 0.1-0.4), resized to ``size``, with the task's prompt."""
    import PIL.Image

    from ..pipelines.pipeline_regenerate import crop_box
    from ..shapesworld.tasks import make_task

    task = make_task(int(seed), size=(size, size))
    margin = np.random.default_rng(int(seed) + 13).uniform(0.1, 0.4)
    y0, y1, x0, x1 = crop_box(task.mask, margin, min_side=8)
    crop = PIL.Image.fromarray(task.target[y0:y1, x0:x1]).resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(crop), task.prompt


def caption_batch(seeds, size: int, hole_crops: float = 0.0) -> Dict[str, object]:
    """Image-caption pairs for ShapesCLIP: half whole scenes with scene captions, half crops around
    one object (resized to the canvas size) with its caption, so zero-shot works on hole crops.
    With ``hole_crops`` > 0, that fraction of the samples are instead edit tasks' ground truths
    cropped around the hole with the edit prompt (:func:`hole_crop_pair`): the exact inputs of
    the evaluation's zero-shot prompt accuracy (on training seeds, never the held-out split)."""
    import PIL.Image

    from ..shapesworld.scenes import render_scene

    images, captions = [], []
    for s in seeds:
        if hole_crops > 0 and np.random.default_rng(int(s) + 11).random() < hole_crops:
            image, caption = hole_crop_pair(int(s), size)
            images.append(image)
            captions.append(caption)
            continue
        scene = render_scene(int(s), size=(size, size))
        rng = np.random.default_rng(int(s) + 7)
        if rng.random() < 0.5 or not scene.objects:
            images.append(scene.image)
            captions.append(scene.caption)
            continue
        obj = scene.objects[rng.integers(len(scene.objects))]
        x0, y0, x1, y1 = obj.bbox
        side = int(max(x1 - x0, y1 - y0) * rng.uniform(1.2, 2.0)) + 2
        cx, cy = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * side, (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * side
        box = (int(cx - side / 2), int(cy - side / 2), int(cx - side / 2) + side, int(cy - side / 2) + side)
        crop = PIL.Image.fromarray(scene.image).crop(box).resize((size, size), PIL.Image.BICUBIC)
        images.append(np.asarray(crop))
        captions.append(obj.caption)
    return {"image": _images(np.stack(images)), "caption": captions}


MAKERS = {"autoencoder": image_batch, "shapes_clip": caption_batch, "lazy": edit_batch, "regenerate_image": edit_batch}


class TrainingStream(IterableDataset):
    """Yields batches for steps ``start_step, start_step + 1, ...`` of one process: ShapesWorld, or with
    ``data`` (the diffusion models) your own images (:mod:`.image_folder`)."""

    def __init__(self, model: str, batch_size: int, size: int, seed: int, start_step: int,
                 process_index: int = 0, num_processes: int = 1, data: Optional[str] = None, **options):
        # options of the batch maker: hole_crops (caption_batch), object_masks (image_batch);
        # TrainConfig allows each for its model only
        options = {k: v for k, v in options.items() if v}
        if data:
            from .image_folder import folder_edit_batch

            self.make = partial(folder_edit_batch, data=str(data))
        else:
            self.make = partial(MAKERS[model], **options) if options else MAKERS[model]
        self.batch_size, self.size = batch_size, size
        self.base = TRAIN_SEED_BASE + seed * 100_000_000
        self.start_step, self.rank, self.world = start_step, process_index, num_processes

    def seeds(self, step: int) -> np.ndarray:
        first = self.base + (step * self.world + self.rank) * self.batch_size
        return np.arange(first, first + self.batch_size)

    def __iter__(self) -> Iterator[Dict[str, object]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start_step + wid
        while True:  # worker w makes steps w, w + nw, ...; DataLoader interleaves them in order
            yield self.make(self.seeds(step), self.size)
            step += nw
