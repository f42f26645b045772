"""Tiny, randomly initialised components built in code, for tests and examples (offline, CPU).

Nothing here is a trained model: use it to exercise shapes, plumbing and invariants, never to
report quality numbers.
"""
from __future__ import annotations

import os
import string
import tempfile
from typing import Dict

import torch

_VOCAB_WORDS = ("a an the small large red green blue yellow orange purple white black circle square triangle "
                "star hexagon diamond cross heart ring empty background on and with striped checkered dotted "
                "gradient solid of in").split()


def tiny_tokenizer(max_length: int = 32):
    """A real ``BertTokenizer`` over a small word-piece vocabulary written to a temp folder."""
    from transformers import BertTokenizer

    folder = tempfile.mkdtemp(prefix="lazydiff-tiny-tok-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + _VOCAB_WORDS
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizer(path, model_max_length=max_length)


def tiny_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """An ``AutoencoderKL`` with 2x downsampling (two blocks)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4,
                         sample_size=32).eval()


def tiny_components(seed: int = 0, text_dim: int = 32, width_heads: int = 2, head_dim: int = 8,
                    layers: int = 2, sample_size: int = 16, scheduler: str = "ddim") -> Dict[str, object]:
    """All components of the lazy pipeline and of the full-canvas baseline, tiny and random.

    Returns a dict with vae, text_encoder, tokenizer, context_encoder, decoder (lazy),
    full_decoder and scheduler. The decoders' output layers are randomised (not zero) so outputs
    depend on their inputs.
    """
    from diffusers import DPMSolverMultistepScheduler

    from .defaults import default_scheduler

    from .models import ContextEncoder, FullCanvasDecoder, LazyDecoder

    tok = tiny_tokenizer()
    text = tiny_text_encoder(tok, text_dim, seed)
    vae = tiny_vae(seed)
    torch.manual_seed(seed)
    common = dict(in_channels=4, patch_size=2, num_layers=layers, num_attention_heads=width_heads,
                  attention_head_dim=head_dim, caption_channels=text_dim, sample_size=sample_size)
    enc = ContextEncoder(latent_channels=4, patch_size=2, num_layers=layers, num_attention_heads=width_heads,
                         attention_head_dim=head_dim, context_dim=24, sample_size=sample_size).eval()
    lazy = LazyDecoder(context_dim=24, **common).eval()
    full = FullCanvasDecoder(**common).eval()
    with torch.no_grad():  # make every input matter (trained models would)
        for m in (lazy, full):
            m.trunk.proj_out.weight.normal_(0, 0.05)
        lazy.proj_in.weight.normal_(0, 0.1)
    sched = DPMSolverMultistepScheduler() if scheduler == "dpm" else default_scheduler()
    return dict(vae=vae, text_encoder=text, tokenizer=tok, context_encoder=enc, decoder=lazy, full_decoder=full,
                scheduler=sched)


def tiny_lazy_pipeline(seed: int = 0, **kw):
    from .pipelines import LazyDiffusionPipeline

    c = tiny_components(seed, **kw)
    pipe = LazyDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                 context_encoder=c["context_encoder"], decoder=c["decoder"], scheduler=c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_regenerate_pipeline(seed: int = 0, crop: bool = False, **kw):
    from .pipelines import RegenerateCropPipeline, RegenerateImagePipeline

    c = tiny_components(seed, **kw)
    cls = RegenerateCropPipeline if crop else RegenerateImagePipeline
    pipe = cls(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], decoder=c["full_decoder"],
               scheduler=c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


class FakeCUDA:
    """Stands in for ``torch.cuda`` in :mod:`lazydiff.pipelines.cuda_graphs` on a CPU, with a CUDA graph's
    semantics: recording logs the ATen ops the step runs (a ``TorchDispatchMode``) and leaves the
    static output as garbage (NaN); ``replay()`` re-runs those ops, not the Python that made them.
    Tensors made while recording are recomputed; every other tensor is read as it is *now*, by
    identity, as a graph reads an address. So a step that took a per-edit tensor from anywhere but
    its recorded buffers replays the recording edit's tensor, as on a GPU.
    ``fail=True``: every capture raises, as an op that cannot be captured does."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.graphs: list = []
        self.replays = 0

    def CUDAGraph(self):
        from torch.utils._pytree import tree_flatten, tree_map

        fake = self

        class Graph:
            ops, denoiser, captured_out = (), None, None

            def replay(self):
                fake.replays += 1
                env = {}

                def now(a):
                    return env.get(id(a), a) if isinstance(a, torch.Tensor) else a

                for func, args, kwargs, out in self.ops:
                    new = func(*tree_map(now, args), **tree_map(now, kwargs))
                    for o, n in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                        if isinstance(o, torch.Tensor):
                            env[id(o)] = n
                self.denoiser.static_out.copy_(env[id(self.captured_out)])

        g = Graph()
        self.graphs.append(g)
        return g

    def graph(self, g):
        import contextlib

        from torch.utils._python_dispatch import TorchDispatchMode

        from .pipelines.cuda_graphs import capturing

        class Record(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []  # (func, args, kwargs, out); holding them keeps every id unique

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                self.ops.append((func, args, kwargs, out))
                return out

        @contextlib.contextmanager
        def capture():
            if self.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            with Record() as rec:
                yield
            d = capturing()
            g.ops, g.denoiser, g.captured_out = rec.ops, d, d.static_out
            d.static_out = d.static_out.clone().fill_(float("nan"))  # captured kernels do not run

        return capture()


def use_fake_cuda_graphs(pipe, fake: "FakeCUDA", size: int = 4):
    """Makes ``pipe`` take its CUDA-graph path on the CPU with ``fake`` as the CUDA runtime (tests). The
    decoder's timestep constants are not memoised, as on a GPU (the memo is for CPU steps: a recorded
    memo hit would replay one timestep's constants at every step)."""
    pipe.cuda_graphs, pipe.max_cached_graphs, pipe.cuda_runtime = True, size, fake
    pipe.decoder.trunk.max_memoised_timesteps = 0
    pipe.decoder.trunk.clear_inference_cache()
    pipe._graphs_apply = lambda latents: True
    pipe.__dict__.pop("_graph_cache", None)
    return pipe
