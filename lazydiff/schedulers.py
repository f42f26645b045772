"""Samplers by name: diffusers schedulers built from a pipeline's own scheduler config.

Every pipeline samples through ``pipe.scheduler`` (``EditPipelineMixin.sample``), so any diffusers
scheduler can be swapped in::

    pipe.scheduler = make_scheduler("dpm-solver++", pipe.scheduler.config)

The training betas and timestep spacing carry over from the config; the shipped models use DDIM with
"trailing" spacing (:func:`lazydiff.defaults.default_scheduler`). DDIM keeps the inlined update of
``fast_scheduler_step``; the others run ``scheduler.step``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

# name -> (diffusers class name, config it adds)
SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),                          # deterministic; the shipped models' sampler
    "dpm-solver++": ("DPMSolverMultistepScheduler",         # DPM-Solver++(2M), deterministic multistep
                     {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),                # UniPC (bh2), deterministic multistep
    "euler": ("EulerDiscreteScheduler", {}),                 # Euler (Karras et al.), deterministic
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),      # Euler ancestral, stochastic (uses the generator)
}


def check_scheduler_name(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh scheduler ``name`` (see :data:`SCHEDULERS`) over the betas, spacing and prediction type of
    ``config`` (a scheduler's ``.config``). Keys the new class does not know are ignored, as in
    diffusers' ``from_config``."""
    check_scheduler_name(name)
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**base, **extra})
