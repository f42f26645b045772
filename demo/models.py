"""Which pipelines the demo serves, loaded once per process and shared by every user.

Three sources, in order of precedence:

* ``tiny=True`` (``--tiny`` / ``LAZYDIFF_TINY=1``): :func:`lazydiff.testing.tiny_lazy_pipeline` and
  :func:`~lazydiff.testing.tiny_regenerate_pipeline`, random weights, for tests and UI work;
* ``model_dir`` (``--model DIR`` / ``LAZYDIFF_MODEL``): a :class:`~lazydiff.LazyDiffusionPipeline`
  folder; ``baseline_dir`` (``--baseline DIR`` / ``LAZYDIFF_BASELINE``) a
  :class:`~lazydiff.RegenerateImagePipeline` folder. Either saved with ``save_pretrained`` or in
  data/models' layout (a training export), as :func:`lazydiff.load_pipeline` reads them;
* otherwise the shipped ShapesWorld models, :func:`lazydiff.load_default`.

Loading is lazy (first use) and thread-safe, so importing ``app`` stays cheap. The pipelines are not
re-entrant (the scheduler keeps per-call state): every call goes through :attr:`Models.lock`.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Optional

TINY_BANNER = ("random-weight test model: outputs are noise. Use it to try the interface and to run the "
               "tests, never to judge quality.")


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded; the message says how to proceed."""


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class ModelSpec:
    model_dir: Optional[str] = None
    baseline_dir: Optional[str] = None
    tiny: bool = False
    device: Optional[str] = None
    max_side: Optional[int] = None  # working resolution cap; None = the default for the model kind
    onnx_runtime: str = "auto"  # steps, context encoder, VAE, text in ONNX Runtime: "auto" (on a CPU, when installed), "on", "off"
    cuda_graphs: str = "auto"  # denoising steps replayed from CUDA graphs: "auto" (on a CUDA device), "on", "off"

    @classmethod
    def from_env(cls, environ=None) -> "ModelSpec":
        env = os.environ if environ is None else environ
        side = env.get("LAZYDIFF_MAX_SIDE")
        return cls(model_dir=env.get("LAZYDIFF_MODEL") or None, baseline_dir=env.get("LAZYDIFF_BASELINE") or None,
                   tiny=_truthy(env.get("LAZYDIFF_TINY")), device=env.get("LAZYDIFF_DEVICE") or None,
                   max_side=int(side) if side else None,
                   onnx_runtime=(env.get("LAZYDIFF_ONNX_RUNTIME") or "auto").strip().lower(),
                   cuda_graphs=(env.get("LAZYDIFF_CUDA_GRAPHS") or "auto").strip().lower())

    @property
    def working_max_side(self) -> int:
        """Largest side the model works at; bigger canvases are edited downscaled (see handlers)."""
        if self.max_side:
            return int(self.max_side)
        return 256 if self.tiny else 512

    def describe(self) -> str:
        if self.tiny:
            return "tiny random-weight test pipelines (lazydiff.testing)"
        lazy = self.model_dir or "shipped ShapesWorld model (data/models/lazy)"
        base = self.baseline_dir or ("shipped RegenerateImage model (data/models/regenerate-image)")
        return f"LazyDiffusion: {lazy}; baseline: {base}"


_HOW_TO = ("To try the demo without trained weights run `python app.py --tiny` (random-weight test model); "
           "to use your own checkpoint pass `--model DIR` (a LazyDiffusionPipeline folder saved with "
           "save_pretrained) or set LAZYDIFF_MODEL; LAZYDIFF_MODELS_DIR points load_default at another "
           "models folder.")


def _switch(mode: str, name: str) -> str:
    """An auto / on / off setting, checked (the environment variables reach here unvalidated)."""
    if mode not in ("auto", "on", "off"):
        raise ModelUnavailable(f"{name} must be auto, on or off, got {mode!r}")
    return mode


@dataclass
class Models:
    """The shared pipelines. ``lazy()`` / ``baseline()`` load on first use."""

    spec: ModelSpec = field(default_factory=ModelSpec)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # held while a pipeline runs

    def __post_init__(self):
        self._load_lock = threading.Lock()
        self._lazy = None
        self._baseline = None
        self._baseline_error: Optional[str] = None

    # -- info shown in the UI
    @property
    def is_tiny(self) -> bool:
        return self.spec.tiny

    @property
    def banner(self) -> Optional[str]:
        return TINY_BANNER if self.spec.tiny else None

    @property
    def max_side(self) -> int:
        return self.spec.working_max_side

    # -- loading
    def lazy(self):
        with self._load_lock:
            if self._lazy is None:
                self._lazy = self._prepare(self._load_lazy())
            return self._lazy

    def baseline(self):
        """The RegenerateImage pipeline, or raises :class:`ModelUnavailable` (comparison disabled)."""
        with self._load_lock:
            if self._baseline is None:
                if self._baseline_error is not None:
                    raise ModelUnavailable(self._baseline_error)
                try:
                    self._baseline = self._prepare(self._load_baseline())
                except ModelUnavailable as err:
                    self._baseline_error = str(err)
                    raise
            return self._baseline

    def baseline_available(self) -> bool:
        try:
            self.baseline()
            return True
        except ModelUnavailable:
            return False

    def _prepare(self, pipe):
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        pipe.cuda_graphs = self.use_cuda_graphs(pipe)
        parts = self.onnx_parts(pipe)
        if parts:
            pipe.enable_onnx_runtime(parts=parts)
            pipe.warm_up(20)  # the UI's default steps: graphs built and timestep constants memoised at load
        return pipe

    def use_cuda_graphs(self, pipe) -> bool:
        """Whether ``pipe`` replays its denoising steps from CUDA graphs (``pipe.cuda_graphs``): "auto" and
        "on" on a CUDA device. On an H200 at the PixArt-XL/2 size they made both methods faster at every
        mask size (a 10% edit 261 vs 626 ms eager for LazyDiffusion, 842 vs 901 ms for RegenerateImage),
        with pixels equal to eager edits (docs/BENCHMARKS.md §6), so the comparison stays fair."""
        mode = _switch(self.spec.cuda_graphs, "--cuda-graphs / LAZYDIFF_CUDA_GRAPHS")
        on_cuda = getattr(pipe, "device", None) is not None and pipe.device.type == "cuda"
        if mode == "on" and not on_cuda:
            raise ModelUnavailable(f"--cuda-graphs on needs a CUDA device; this pipeline is on {pipe.device}. "
                                   "Use --cuda-graphs auto or off, or --device cuda.")
        return mode != "off" and on_cuda

    def onnx_parts(self, pipe) -> tuple:
        """What of ``pipe`` runs in ONNX Runtime (lazydiff.models.onnx_backend): ``pipe.ONNX_PARTS``
        (denoising steps, context encoder, VAE, text encoder) or ``()``. "auto" (fp32 on a CPU,
        onnxruntime installed) and "on" put them all there, except a module too big for one ONNX graph
        (over 2 GiB of weights: T5-XXL, a real-size PixArt-XL/2 in fp32), which stays in PyTorch. With the transformer graphs
        written node by node, ONNX Runtime's step is faster than PyTorch's at every canvas size measured,
        the 4,096-token full canvas included (docs/BENCHMARKS.md §7), so it is a lever for both methods
        of the demo's comparison alike."""
        from lazydiff.models.onnx_backend import INSTALL_HINT, graph_fits, onnxruntime_available

        mode = _switch(self.spec.onnx_runtime, "--onnx-runtime / LAZYDIFF_ONNX_RUNTIME")
        if mode == "off" or not hasattr(pipe, "enable_onnx_runtime"):
            return ()
        import torch

        on_cpu = pipe.device.type == "cpu" and pipe.decoder.dtype == torch.float32
        if mode == "on":
            if not on_cpu:
                raise ModelUnavailable("--onnx-runtime on is a CPU fp32 backend; this pipeline is on "
                                       f"{pipe.device} in {pipe.decoder.dtype}. Use --onnx-runtime auto or off.")
            if not onnxruntime_available():
                raise ModelUnavailable(f"--onnx-runtime on needs onnxruntime: {INSTALL_HINT}")
        elif not (on_cpu and onnxruntime_available()):
            return ()
        modules = {"decoder": pipe.decoder, "context_encoder": getattr(pipe, "context_encoder", None), "vae": pipe.vae,
                   "text_encoder": pipe.text_encoder}
        return tuple(part for part in pipe.ONNX_PARTS if modules[part] is None or graph_fits(modules[part]))

    def _device(self) -> str:
        if self.spec.device:
            return self.spec.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load_lazy(self):
        if self.spec.tiny:
            from lazydiff.testing import tiny_lazy_pipeline

            return tiny_lazy_pipeline()
        if self.spec.model_dir:
            return self._from_pretrained("LazyDiffusionPipeline", self.spec.model_dir, "--model / LAZYDIFF_MODEL")
        return self._default("lazy", "the LazyDiffusion model")

    def _load_baseline(self):
        if self.spec.tiny:
            from lazydiff.testing import tiny_regenerate_pipeline

            return tiny_regenerate_pipeline()
        if self.spec.baseline_dir:
            return self._from_pretrained("RegenerateImagePipeline", self.spec.baseline_dir, "--baseline / LAZYDIFF_BASELINE")
        return self._default("regenerate-image", "the RegenerateImage baseline")

    def _from_pretrained(self, cls_name: str, folder: str, flag: str):
        import lazydiff

        if not os.path.isdir(folder):
            raise ModelUnavailable(f"{flag}: {folder!r} is not a folder. Pass a {cls_name} folder: one saved with "
                                   "save_pretrained (model_index.json), or a model folder in data/models' layout "
                                   "such as a training export (runs/train/NAME/export).")
        try:
            pipe = lazydiff.load_pipeline(folder, device=self._device())
        except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear message
            raise ModelUnavailable(f"{flag}: could not load a {cls_name} from {folder!r}: "
                                   f"{type(err).__name__}: {err}") from err
        if type(pipe).__name__ != cls_name:
            raise ModelUnavailable(f"{flag}: {folder!r} holds a {type(pipe).__name__}, not a {cls_name}")
        return pipe

    def _default(self, kind: str, what: str):
        import lazydiff

        try:
            return lazydiff.load_default(kind, device=self._device())
        except FileNotFoundError as err:
            raise ModelUnavailable(f"{what} is not available: {err}\n{_HOW_TO}") from err
        except ImportError as err:
            raise ModelUnavailable(f"{what} cannot be loaded: {err}") from err
