"""The method registry: names (or paths) -> editing pipelines with the shared call signature.

Built in:

* ``lazy``, ``regenerate-image``, ``regenerate-crop`` -- the shipped ShapesWorld models
  (:func:`lazydiff.load_default`),
* ``tiny-lazy``, ``tiny-regenerate-image``, ``tiny-regenerate-crop`` -- tiny random pipelines
  (:mod:`lazydiff.testing`) for tests and smoke runs; their numbers mean nothing,
* a path to a pipeline folder saved with ``save_pretrained`` (a LazyDiffusion / Regenerate pipeline,
  or any diffusers inpainting pipeline), or a model folder in data/models' layout such as a training
  export (:func:`lazydiff.load_pipeline`),
* ``diffusers-inpaint:PATH`` -- a local diffusers inpainting pipeline (SD2 / SDXL inpainting, ...)
  behind :class:`lazydiff.DiffusersInpaintAdapter`.

Tests and plugins add their own with :func:`register_method`.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch


class MethodError(ValueError):
    """Unknown or unavailable method; the message names the fix."""


@dataclass
class MethodFactory:
    build: Callable[[str, torch.dtype], object]   # (device, dtype) -> pipeline
    description: str
    check: Optional[Callable[[], None]] = None    # raises if the method cannot be loaded
    trained: bool = True                          # False: random weights, numbers are meaningless


@dataclass
class Method:
    spec: str          # as the user wrote it
    label: str         # file-system safe name used for folders, tables and plots
    factory: MethodFactory

    def load(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        pipe = self.factory.build(device, dtype)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    def check(self) -> None:
        if self.factory.check is not None:
            self.factory.check()

    @property
    def trained(self) -> bool:
        return self.factory.trained


# ----------------------------------------------------------------------------- built-ins
def _default(kind: str) -> MethodFactory:
    def build(device, dtype):
        from lazydiff import load_default

        return load_default(kind, device=device, torch_dtype=dtype)

    def check():
        from lazydiff import defaults

        root = defaults.MODELS_DIR
        need = [root / "autoencoder", root / ("lazy" if kind == "lazy" else "regenerate-image")]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise MethodError(f"method {kind!r} needs the shipped ShapesWorld models, missing: {', '.join(missing)}. "
                              "Get them with the repository (data/models), set LAZYDIFF_MODELS_DIR, or pass your own "
                              "pipeline folder as the method name")
        try:
            defaults.minilm_path()
        except ImportError as err:
            raise MethodError(f"method {kind!r}: {err}") from None

    names = {"lazy": "LazyDiffusion", "regenerate-image": "RegenerateImage", "regenerate-crop": "RegenerateCrop"}
    return MethodFactory(build, f"{names[kind]} (shipped ShapesWorld model)", check)


def _tiny(kind: str) -> MethodFactory:
    def build(device, dtype):
        from lazydiff.testing import tiny_lazy_pipeline, tiny_regenerate_pipeline

        pipe = tiny_lazy_pipeline() if kind == "lazy" else tiny_regenerate_pipeline(crop=kind == "regenerate-crop")
        return pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe.to(device)

    return MethodFactory(build, f"tiny random {kind} pipeline (tests only; meaningless numbers)", trained=False)


_REGISTRY: Dict[str, MethodFactory] = {}


def register_method(name: str, build: Callable[[str, torch.dtype], object], description: str = "",
                    check: Optional[Callable[[], None]] = None, trained: bool = True) -> None:
    """Add (or replace) a named method. ``build(device, dtype)`` returns a pipeline with the
    LazyDiffusion call signature (``pipe(prompt, image, mask_image, ...) -> out.images, out.timings``)."""
    _REGISTRY[name] = MethodFactory(build, description or name, check, trained)


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


for _k in ("lazy", "regenerate-image", "regenerate-crop"):
    _REGISTRY[_k] = _default(_k)
    _REGISTRY[f"tiny-{_k}"] = _tiny(_k)


def known_methods() -> List[str]:
    return list(_REGISTRY)


# ----------------------------------------------------------------------------- folders
def _folder_factory(path: Path) -> MethodFactory:
    def check():
        if not (path / "model_index.json").exists() and not (path / "decoder").is_dir():
            raise MethodError(f"{path} is not a pipeline folder (no model_index.json) nor a model folder in "
                              "data/models' layout (no decoder/); save one with pipe.save_pretrained(folder), or "
                              "pass a training export (runs/train/NAME/export)")

    def build(device, dtype):
        import lazydiff
        from lazydiff import DiffusersInpaintAdapter

        if (path / "model_index.json").exists():
            cls_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
            if cls_name not in lazydiff.__all__:
                return DiffusersInpaintAdapter.from_pretrained(str(path), torch_dtype=dtype).to(device)
        return lazydiff.load_pipeline(str(path), device=device, torch_dtype=dtype)

    return MethodFactory(build, f"pipeline folder {path}", check)


def _inpaint_factory(path: Path) -> MethodFactory:
    def check():
        if not path.is_dir():
            raise MethodError(f"diffusers-inpaint: folder {path} does not exist; pass a local diffusers inpainting "
                              "pipeline (e.g. a downloaded stable-diffusion-2-inpainting snapshot)")
        if not (path / "model_index.json").exists():
            raise MethodError(f"diffusers-inpaint: {path} has no model_index.json; pass the pipeline's root folder")

    def build(device, dtype):
        from lazydiff import DiffusersInpaintAdapter

        return DiffusersInpaintAdapter.from_pretrained(str(path), torch_dtype=dtype).to(device)

    return MethodFactory(build, f"diffusers inpainting pipeline {path}", check)


def _label(spec: str) -> str:
    if spec in _REGISTRY:
        return spec
    if spec.startswith("diffusers-inpaint:"):
        base = "diffusers-inpaint-" + Path(spec.split(":", 1)[1].rstrip("/")).name
    else:
        base = "folder-" + Path(spec.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)


def resolve_method(spec: str) -> Method:
    spec = spec.strip()
    if spec in _REGISTRY:
        return Method(spec, _label(spec), _REGISTRY[spec])
    if spec.startswith("diffusers-inpaint:"):
        return Method(spec, _label(spec), _inpaint_factory(Path(spec.split(":", 1)[1]).expanduser()))
    p = Path(spec).expanduser()
    if ("/" in spec or p.exists()) and p.is_dir():
        return Method(spec, _label(spec), _folder_factory(p))
    if "/" in spec:  # meant as a folder
        raise MethodError(f"method folder {spec} " + ("is a file, not a folder" if p.exists() else "does not exist")
                          + ": give a pipeline saved with save_pretrained or a model folder such as "
                          "runs/train/NAME/export")
    hint = difflib.get_close_matches(spec, known_methods(), n=2, cutoff=0.5)
    raise MethodError(f"unknown method {spec!r}" + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else ".")
                      + f" Known methods: {', '.join(known_methods())}; or a path to a pipeline folder, or "
                      "diffusers-inpaint:PATH")


def resolve_methods(specs: Sequence[str], check: bool = True) -> List[Method]:
    """Resolve every name first (all typos reported together), then check availability."""
    if not specs:
        raise MethodError("no methods given: pass --methods (e.g. lazy,regenerate-image,regenerate-crop) or list "
                          "methods in the suite file")
    errors, methods = [], []
    for s in specs:
        try:
            methods.append(resolve_method(s))
        except MethodError as err:
            errors.append(str(err))
    if errors:
        raise MethodError("\n".join(errors))
    labels = [m.label for m in methods]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MethodError(f"method(s) given twice: {', '.join(dup)}")
    if check:
        for m in methods:
            m.check()
    return methods
