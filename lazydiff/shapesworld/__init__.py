"""ShapesWorld: a procedural image-editing domain with exact ground truth.

Scenes (:mod:`.scenes`): analytic backgrounds with global structure plus 1-4 flat objects
(6 shapes x 8 colours x 2 sizes), captions, per-object masks, deterministic by seed.
Edit tasks (:mod:`.tasks`): (canvas, mask, local prompt, ground truth) with object, box and
brush masks of 2%-60% of the canvas, and fixed train/val/test seed splits.

    >>> from lazydiff.shapesworld import render_scene, make_task
    >>> scene = render_scene(0)                 # Scene(image, background, objects, caption, ...)
    >>> task = make_task(10_000_000)            # the first held-out test task
"""

from .scenes import (
    BACKGROUND_COLORS,
    BACKGROUND_KINDS,
    COLORS,
    MIN_CONTRAST,
    MIN_VISIBLE,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Scene,
    ShapeObject,
    all_classes,
    allowed_colors,
    background_captions,
    class_prompts,
    compose,
    generate_scene,
    iter_scenes,
    object_caption,
    render_object,
    render_scene,
    scene_batch,
    scene_caption,
    shape_mask,
    size_range_px,
)
from .tasks import (
    EMPTY_PROMPT,
    INTENTS,
    KINDS,
    MAX_RATIO,
    MIN_RATIO,
    SPLITS,
    EditTask,
    edit_prompts,
    iter_tasks,
    make_split,
    make_task,
    random_edit_mask,
    task_to_pil,
)

__all__ = [
    "BACKGROUND_COLORS",
    "BACKGROUND_KINDS",
    "COLORS",
    "EMPTY_PROMPT",
    "INTENTS",
    "KINDS",
    "MAX_RATIO",
    "MIN_CONTRAST",
    "MIN_RATIO",
    "MIN_VISIBLE",
    "SHAPES",
    "SIZES",
    "SIZE_RANGES",
    "SPLITS",
    "EditTask",
    "Scene",
    "ShapeObject",
    "all_classes",
    "allowed_colors",
    "background_captions",
    "class_prompts",
    "compose",
    "edit_prompts",
    "generate_scene",
    "iter_scenes",
    "iter_tasks",
    "make_split",
    "make_task",
    "object_caption",
    "random_edit_mask",
    "render_object",
    "render_scene",
    "scene_batch",
    "scene_caption",
    "shape_mask",
    "size_range_px",
    "task_to_pil",
]
