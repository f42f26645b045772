"""The LazyDiffusion evaluation workbench (``python -m eval``).

* ``python -m eval quality --suite data/suites/shapes.yaml --methods lazy,regenerate-image,regenerate-crop --out runs/q1``
  -- quality of every method on a suite of edits (FID / KID, local FID, CLIP score, latency and,
  on ShapesWorld, prompt accuracy, background error and the unmasked-pixels check).
* ``python -m eval runtime --mask-ratios 0.01,0.1,0.4 --steps 20 --out runs/r1 [--preset paper-shape]``
  -- latency and FLOPs vs mask size against the full-canvas baselines.

See ``eval/README.md``.
"""
from .methods import known_methods, register_method, resolve_methods
from .suites import Suite, SuiteError, load_suite

__all__ = ["load_suite", "Suite", "SuiteError", "register_method", "resolve_methods", "known_methods"]
