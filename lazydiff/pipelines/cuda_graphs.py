"""CUDA-graph replay of the denoising step, within an edit and across edits.

On a GPU the lazy decoder's step is bound by kernel launches, not arithmetic (docs/BENCHMARKS.md §6):
replaying it from a recorded ``torch.cuda.CUDAGraph`` removes most of that cost. A graph knows
addresses, not values, so everything a step reads must sit in buffers the graph owns:

* :class:`StepFunction` is a denoiser written as ``fn(x, t, consts)``: the per-edit tensors (context
  tokens, hole indices, text keys / values, ...) are passed in, not held by a closure.
* :class:`CUDAGraphDenoiser` records one graph over static copies of ``x``, ``t`` and ``consts`` and
  replays it at every later step.
* :class:`CUDAGraphCache` keeps the last few of them, keyed on everything a graph bakes in (the step
  function, the shapes / dtypes / devices of its inputs, the plain values among the constants, the
  weights' storage). An edit with the same key (a re-roll, a new prompt of the same token length for
  the same region) copies its constants into the graph's buffers and replays from its first step: no
  eager step, no recording.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from contextvars import ContextVar
from typing import Any, Callable, Hashable, Optional, Tuple

import torch

from ..models.dit import capture_refs

_CAPTURING: ContextVar[Optional["CUDAGraphDenoiser"]] = ContextVar("lazydiff_graph_capture", default=None)


def capturing() -> Optional["CUDAGraphDenoiser"]:
    """The :class:`CUDAGraphDenoiser` whose graph is being recorded right now, or None. A decoder call
    made while recording is the one every replay repeats (``eval.flops`` keeps it in ``notes``)."""
    return _CAPTURING.get()


@dataclasses.dataclass(frozen=True)
class StepFunction:
    """``denoise(x, t) = fn(x, t, consts)``. ``consts``: tensors and plain values in dicts, lists, tuples
    and dataclasses. ``fn`` must read per-edit tensors only from ``consts``, never from a closure, so
    that a graph recorded in one edit computes the next edit's step once its constants are copied in."""

    fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
    consts: Any = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t, self.consts)


def _fields(obj):
    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init]


def signature(obj: Any) -> Hashable:
    """What a graph recorded over ``obj`` depends on: structure, each tensor's shape, dtype and device
    and every plain value. Equal signatures -> the graph can serve ``obj`` after copying its tensors in."""
    if torch.is_tensor(obj):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(signature(v) for v in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, signature(v)) for k, v in obj.items()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__qualname__, tuple((k, signature(v)) for k, v in _fields(obj)))
    hash(obj)  # a plain value is part of the key: it must be hashable (raises TypeError otherwise)
    return ("value", obj)


def map_tensors(obj: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``f(tensor)`` (structure and plain values kept)."""
    if torch.is_tensor(obj):
        return f(obj)
    if isinstance(obj, list):
        return [map_tensors(v, f) for v in obj]
    if isinstance(obj, tuple):
        items = [map_tensors(v, f) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: map_tensors(v, f) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{k: map_tensors(v, f) for k, v in _fields(obj)})
    return obj


def copy_tensors(dst: Any, src: Any) -> None:
    """``dst_tensor.copy_(src_tensor)`` for every pair of tensors at the same place in two structures
    of equal :func:`signature`."""
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            copy_tensors(d, s)
    elif isinstance(dst, dict):
        for k, d in dst.items():
            copy_tensors(d, src[k])
    elif dataclasses.is_dataclass(dst) and not isinstance(dst, type):
        for k, d in _fields(dst):
            copy_tensors(d, getattr(src, k))


class CUDAGraphDenoiser:
    """``denoise(x, t)`` replayed from one CUDA graph.

    Within an edit every step has the same shapes (the hole tokens, or the full canvas), so one
    graph serves all steps. Call 1 runs eagerly (warm-up: cuBLAS handles, the decoder's memos);
    call 2 records the graph on static copies of ``x``, ``t`` and, for a :class:`StepFunction`, its
    constants, then replays it; later calls copy their inputs in and replay. :meth:`rebind` hands the
    recorded graph to another edit (see :class:`CUDAGraphCache`). If recording fails, it warns once and
    runs eagerly. ``on_replay(self)``, if given, is called at every step that only replays: such a step
    runs no Python code of the decoder, so tools that count decoder calls (FLOP counters) hear of it
    there; ``notes`` is theirs to keep what they saw while the graph was recorded.
    """

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cuda=None,
                 on_replay: Optional[Callable[["CUDAGraphDenoiser"], None]] = None):
        if isinstance(denoise, StepFunction):
            self.fn, self.consts = denoise.fn, denoise.consts
        else:
            self.fn, self.consts = (lambda x, t, _: denoise(x, t)), None
        self.calls, self.graph, self.failed, self.on_replay = 0, None, False, on_replay
        self.cuda = torch.cuda if cuda is None else cuda  # swappable for tests without a GPU
        self.notes: dict = {}
        self.static_consts = None

    def rebind(self, step: StepFunction, on_replay=None) -> None:
        """Serve a new edit whose step has this graph's signature: its constants are copied into the
        graph's buffers, and every call of the edit replays (once a graph has been recorded)."""
        self.consts, self.calls, self.on_replay = step.consts, 0, on_replay
        if self.static_consts is not None:
            copy_tensors(self.static_consts, step.consts)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failed or (self.graph is None and self.calls == 1):
            return self.fn(x, t, self.consts)
        if self.graph is None:
            if not self._record(x, t):
                return self.fn(x, t, self.consts)
        else:
            self.static_x.copy_(x)
            self.static_t.copy_(t)
            if self.on_replay is not None:  # not at the recording call, which ran the decoder's Python
                self.on_replay(self)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out

    def _record(self, x: torch.Tensor, t: torch.Tensor) -> bool:
        self.static_x, self.static_t = x.clone(), t.clone()
        self.static_consts = map_tensors(self.consts, torch.Tensor.clone)
        token = _CAPTURING.set(self)
        try:
            graph = self.cuda.CUDAGraph()
            # capture_refs: cached tensors the step reads (position tables) stay alive as long as the graph
            with capture_refs() as self.refs, self.cuda.graph(graph):
                self.static_out = self.fn(self.static_x, self.static_t, self.static_consts)
        except Exception as err:  # an op that cannot be captured: stay correct, just slower
            warnings.warn(f"CUDA graph capture of the denoiser failed ({type(err).__name__}: {err}); "
                          "running it eagerly")
            self.failed, self.static_consts = True, None
            return False
        finally:
            _CAPTURING.reset(token)
        self.graph = graph
        return True


class CUDAGraphCache:
    """The last ``size`` :class:`CUDAGraphDenoiser` s, reused across edits (least recently used first out).

    :meth:`denoiser` returns the denoiser of one edit. At its first call it looks up the key: the step
    function, the signature of ``(x, t, consts)`` and ``weights`` (the caller's key for the weights'
    storage and versions: a graph reads parameters by address). A hit replays from step 1; a miss
    records as :class:`CUDAGraphDenoiser` does. Each graph keeps its own memory pool, hence the bound.
    """

    def __init__(self, size: int = 4, cuda=None):
        self.size, self.cuda = size, cuda
        self.graphs: "OrderedDict[Hashable, CUDAGraphDenoiser]" = OrderedDict()
        self.hits = self.misses = 0

    def denoiser(self, denoise, on_replay=None, weights: Hashable = (), notes: Optional[dict] = None) -> Callable:
        """``notes["cuda_graph"]``, if given: ``"recorded"`` (this edit records its graph), ``"cached"``
        (it replays one recorded earlier) or ``"eager"`` (that graph's recording failed)."""
        notes = {} if notes is None else notes
        if not isinstance(denoise, StepFunction) or self.size <= 0:  # closures: a graph per edit, as before
            notes["cuda_graph"] = "recorded"
            return CUDAGraphDenoiser(denoise, self.cuda, on_replay)
        chosen = []

        def first_call_picks(x, t):
            if not chosen:
                g, hit = self._lookup(denoise, x, t, on_replay, weights)
                notes["cuda_graph"] = "eager" if g.failed else "cached" if hit else "recorded"
                chosen.append(g)
            return chosen[0](x, t)

        return first_call_picks

    def _lookup(self, step: StepFunction, x, t, on_replay, weights) -> Tuple[CUDAGraphDenoiser, bool]:
        """-> (the graph for this key, whether it was recorded by an earlier edit)."""
        fn = step.fn
        # a bound method is created anew at each attribute access: key on what it binds
        fn_key = (id(fn.__self__), fn.__func__) if hasattr(fn, "__func__") else fn
        key = (fn_key, signature((x, t, step.consts)), weights)
        g = self.graphs.get(key)
        if g is not None:
            self.hits += 1
            self.graphs.move_to_end(key)
            g.rebind(step, on_replay)
            return g, True
        self.misses += 1
        g = self.graphs[key] = CUDAGraphDenoiser(step, self.cuda, on_replay)
        while len(self.graphs) > self.size:
            self.graphs.popitem(last=False)
        return g, False
