"""The fused no-grad inference path of the shared DiT trunk (both decoders) and the inlined DDIM step.

Tolerance: none. Every fast path here is the same arithmetic in the same order as the reference
(diffusers' BasicTransformerBlock + AttnProcessor2_0, ``DDIMScheduler.step``), so outputs are
asserted bit-identical (``torch.equal``), on the tiny random models and on the shipped ones.
The caches behind it (memoised timestep constants, lazy positions) must follow weight changes:
load_state_dict, in-place updates, dtype moves.
"""
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lazydiff.testing import tiny_components, tiny_lazy_pipeline, tiny_regenerate_pipeline

MODELS = Path(__file__).resolve().parent.parent / "data" / "models"


def decoder_and_args(which, seed=0, b=2, k=13, **kw):
    c = tiny_components(seed=seed, **kw)
    dec = c["decoder"] if which == "lazy" else c["full_decoder"]
    g = torch.Generator().manual_seed(seed)
    text, tmask = torch.randn(b, 7, 32, generator=g), torch.ones(b, 7)
    tmask[0, 4:] = 0
    if which == "lazy":
        args = (torch.randn(b, k, 16, generator=g), torch.randn(b, k, 24, generator=g),
                torch.randperm(64, generator=g)[:k].sort().values[None].repeat(b, 1), (8, 8))
    else:
        args = (torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 4, 16, 16, generator=g),
                torch.rand(b, 1, 16, 16, generator=g).round())
    return dec, args, text, tmask


def run(dec, args, t, text, tmask, fast=True, prepared=True, **kw):
    dec.trunk.fast_inference = fast
    try:
        with torch.no_grad():
            cond = dec.prepare_text(text, tmask) if prepared else None
            return dec(*args, torch.tensor([t] * text.shape[0]), text, tmask, text_conditioning=cond, **kw).sample
    finally:
        dec.trunk.fast_inference = True


@pytest.mark.parametrize("which", ["lazy", "full"])
def test_fast_path_is_bit_identical_to_diffusers_blocks(which):
    dec, args, text, tmask = decoder_and_args(which)
    for t in (999, 500, 17, 500, 999):          # repeated timesteps come from the memo
        ref = run(dec, args, t, text, tmask, fast=False, prepared=False)
        assert torch.equal(run(dec, args, t, text, tmask), ref)
        assert torch.equal(run(dec, args, t, text, tmask, prepared=False), ref)
    memo = dec.trunk.__dict__["_step_memo"]
    assert len(memo) == 3                       # one entry per timestep value


@pytest.mark.parametrize("which", ["lazy", "full"])
def test_additional_conditions_are_part_of_the_memo_key(which):
    dec, args, text, tmask = decoder_and_args(which, width_heads=3)   # width 24: size embeddings of 24 / 3
    cfg = dict(dec.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["use_additional_conditions"] = True
    torch.manual_seed(1)
    dec2 = type(dec)(**cfg).eval()
    with torch.no_grad():
        dec2.trunk.proj_out.weight.normal_(0, 0.05)
    outs = []
    for res in ((128, 128), (96, 160), (128, 128)):
        added = {"resolution": torch.tensor([res] * 2, dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[res[0] / res[1]]] * 2)}
        ref = run(dec2, args, 400, text, tmask, fast=False, prepared=False, added_cond_kwargs=added)
        fast = run(dec2, args, 400, text, tmask, added_cond_kwargs=added)
        assert torch.equal(fast, ref)
        outs.append(fast)
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("which", ["lazy", "full"])
def test_caches_follow_load_state_dict(which):
    dec, args, text, tmask = decoder_and_args(which, seed=0)
    other, *_ = decoder_and_args(which, seed=1)
    before = run(dec, args, 700, text, tmask)   # fills the memo
    dec.load_state_dict(other.state_dict())
    after = run(dec, args, 700, text, tmask)
    assert not torch.equal(after, before)
    assert torch.equal(after, run(dec, args, 700, text, tmask, fast=False, prepared=False))
    assert torch.equal(after, run(other, args, 700, text, tmask, fast=False, prepared=False))


@pytest.mark.parametrize("param", ["qkv", "adaln", "block_table", "final_table"])
def test_caches_follow_in_place_weight_updates(param):
    dec, args, text, tmask = decoder_and_args("lazy")
    trunk = dec.trunk
    before = run(dec, args, 300, text, tmask)
    p = {"qkv": trunk.transformer_blocks[0].attn1.to_v.weight, "adaln": trunk.adaln_single.linear.bias,
         "block_table": trunk.transformer_blocks[1].scale_shift_table, "final_table": trunk.scale_shift_table}[param]
    with torch.no_grad():
        p.add_(0.05)                            # what an optimizer or EMA update does
    after = run(dec, args, 300, text, tmask)
    assert not torch.equal(after, before)
    assert torch.equal(after, run(dec, args, 300, text, tmask, fast=False, prepared=False))


def test_data_writes_need_clear_inference_cache():
    dec, args, text, tmask = decoder_and_args("full")
    run(dec, args, 300, text, tmask)
    dec.trunk.adaln_single.linear.weight.data.mul_(1.5)   # bypasses the version counter
    dec.trunk.clear_inference_cache()
    assert torch.equal(run(dec, args, 300, text, tmask), run(dec, args, 300, text, tmask, fast=False, prepared=False))


def test_dtype_move_rebuilds_caches():
    dec, args, text, tmask = decoder_and_args("lazy")
    run(dec, args, 300, text, tmask)
    dec.to(torch.float64)
    args64 = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    out = run(dec, args64, 300, text.double(), tmask)
    assert out.dtype == torch.float64
    assert torch.equal(out, run(dec, args64, 300, text.double(), tmask, fast=False, prepared=False))


def test_training_and_grad_use_the_diffusers_path():
    dec, args, text, tmask = decoder_and_args("lazy")
    t = torch.tensor([100, 100])
    out = dec(*args, t, text, tmask).sample          # grad enabled: no memo
    out.sum().backward()
    assert "_step_memo" not in dec.trunk.__dict__
    assert dec.trunk.transformer_blocks[0].attn1.to_q.weight.grad is not None


def test_lazy_positions_memo_follows_the_index():
    dec, args, text, tmask = decoder_and_args("lazy")
    idx = args[2].clone()
    with torch.no_grad():
        a = dec.positions(idx, (8, 8), torch.float32)
        assert dec.positions(idx, (8, 8), torch.float32) is a
        idx[:, 0] = 63                           # in place: recomputed
        b = dec.positions(idx, (8, 8), torch.float32)
        assert not torch.equal(a, b)
        assert torch.equal(b, dec.positions(idx.clone(), (8, 8), torch.float32))


def test_inlined_ddim_step_matches_the_scheduler():
    pipe = tiny_lazy_pipeline(seed=0)
    s = pipe.scheduler
    s.set_timesteps(20)
    step = pipe._ddim_step_fn()
    assert step is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 16, generator=g)
    for t in s.timesteps:
        eps = torch.randn(1, 9, 16, generator=g)
        ref = s.step(eps, t, x, return_dict=True)
        new, x0 = step(eps, t, x)
        assert torch.equal(new, ref.prev_sample) and torch.equal(x0, ref.pred_original_sample)
        x = new


def test_inlined_ddim_step_only_for_plain_ddim():
    pipe = tiny_lazy_pipeline(seed=0, scheduler="dpm")
    pipe.scheduler.set_timesteps(4)
    assert pipe._ddim_step_fn() is None
    pipe = tiny_lazy_pipeline(seed=0)
    pipe.scheduler.set_timesteps(4)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    assert pipe._ddim_step_fn() is None


def _edit(pipe, img, mask, seed=3):
    lat = []
    out = pipe("a small red star", img, mask, num_inference_steps=6, guidance_scale=4.5,
               generator=torch.Generator().manual_seed(seed),
               callback_on_step_end=lambda p, i, t, kw: lat.append(kw["latents"].clone()))
    return np.asarray(out.images[0]), torch.stack(lat)


def _reference_mode(pipe, on: bool):
    pipe.decoder.trunk.fast_inference = not on
    pipe.fast_scheduler_step = not on
    pipe.precompute_text = not on


@pytest.mark.parametrize("kind", ["lazy", "regenerate-image"])
def test_pipeline_fast_paths_bit_identical_tiny(kind, make_canvas, make_mask):
    pipe = tiny_lazy_pipeline(seed=0) if kind == "lazy" else tiny_regenerate_pipeline(seed=0)
    img, mask = make_canvas(64, 64), make_mask(64, 64, (20, 16, 44, 40))
    fast = _edit(pipe, img, mask)
    again = _edit(pipe, img, mask)               # memo hits this time
    _reference_mode(pipe, True)
    try:
        ref = _edit(pipe, img, mask)
    finally:
        _reference_mode(pipe, False)
    for a in (fast, again):
        assert np.array_equal(a[0], ref[0]) and torch.equal(a[1], ref[1])


@pytest.mark.skipif(not (MODELS / "lazy").exists(), reason="data/models not present")
@pytest.mark.parametrize("kind", ["lazy", "regenerate-image"])
def test_pipeline_fast_paths_bit_identical_shipped(kind):
    from lazydiff import load_default
    from lazydiff.shapesworld import render_scene

    pipe = load_default(kind)
    pipe.set_progress_bar_config(disable=True)
    img = PIL.Image.fromarray(render_scene(0, (128, 128)).image)
    m = np.zeros((128, 128), np.uint8)
    m[44:84, 48:88] = 255
    mask = PIL.Image.fromarray(m)
    fast = _edit(pipe, img, mask)
    _reference_mode(pipe, True)
    try:
        ref = _edit(pipe, img, mask)
    finally:
        _reference_mode(pipe, False)
    assert np.array_equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])


def test_cuda_graph_denoiser_replays_on_static_inputs():
    from lazydiff.pipelines.cuda_graphs import CUDAGraphDenoiser, StepFunction
    from lazydiff.testing import FakeCUDA

    fake, calls = FakeCUDA(), []

    def fn(x, t, c):
        calls.append("python")
        return x * c["scale"] + t

    step = StepFunction(fn, {"scale": torch.tensor(2.0)})
    g = CUDAGraphDenoiser(step, cuda=fake, on_replay=lambda graph: calls.append("replay"))
    xs = [torch.randn(2, 5, 3) for _ in range(4)]
    ts = [torch.tensor(t) for t in (999.0, 749.0, 499.0, 249.0)]
    outs = [g(x, t) for x, t in zip(xs, ts)]
    # step 1 eager, step 2 records (the decoder's Python runs, then a replay computes), then replays only
    assert len(fake.graphs) == 1 and fake.replays == 3
    assert [c for c in calls if c == "replay"] == ["replay", "replay"]
    for x, t, o in zip(xs, ts, outs):
        assert torch.equal(o, x * 2 + t)
    assert outs[2].data_ptr() != outs[3].data_ptr()  # results are copies: the next replay cannot overwrite them
    assert g.static_x.data_ptr() not in {x.data_ptr() for x in xs}  # the caller's tensors are never recorded
    assert g.static_consts["scale"] is not step.consts["scale"]     # nor its constants


def test_cuda_graph_denoiser_falls_back_to_eager_when_capture_fails():
    from lazydiff.pipelines.editing import CUDAGraphDenoiser
    from lazydiff.testing import FakeCUDA

    g = CUDAGraphDenoiser(lambda x, t: x + t, cuda=FakeCUDA(fail=True))
    x = torch.ones(3)
    assert torch.equal(g(x, torch.tensor(1.0)), x + 1)
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert torch.equal(g(x, torch.tensor(2.0)), x + 2)
    assert torch.equal(g(x, torch.tensor(3.0)), x + 3) and g.failed


def test_cuda_graph_cache_serves_a_later_edit_from_its_first_step():
    """A graph recorded in one edit replays the next edit of the same signature with that edit's
    constants copied in; another shape, plain value or weights key records a new graph (LRU bound)."""
    from lazydiff.pipelines.cuda_graphs import CUDAGraphCache, StepFunction
    from lazydiff.testing import FakeCUDA

    def fn(x, t, c):
        return x * c["w"][0] + c["b"] * t + c["k"]

    def edit(cache, w, b, k=1, n=3, weights="v1", steps=4):
        step = StepFunction(fn, {"w": [torch.tensor(w)], "b": torch.full((n,), b), "k": k})
        denoise = cache.denoiser(step, weights=weights)
        xs = [torch.randn(n) for _ in range(steps)]
        ts = [torch.tensor(float(s)) for s in range(steps)]
        for x, t in zip(xs, ts):
            assert torch.allclose(denoise(x, t), x * w + b * t + k)

    fake = FakeCUDA()
    cache = CUDAGraphCache(2, cuda=fake)
    edit(cache, 2.0, 0.5)
    assert (cache.hits, cache.misses, len(fake.graphs), fake.replays) == (0, 1, 1, 3)
    edit(cache, -3.0, 7.0)                       # new constants, same signature: replays all 4 steps
    assert (cache.hits, cache.misses, len(fake.graphs), fake.replays) == (1, 1, 1, 7)
    edit(cache, 1.0, 1.0, k=2)                   # a plain value differs: new graph
    edit(cache, 1.0, 1.0, n=5)                   # a shape differs: new graph, the first one evicted
    edit(cache, 1.0, 1.0, weights="v2")          # other weights: new graph
    assert cache.misses == 4 and len(cache.graphs) == 2
    edit(cache, 4.0, -1.0)                       # evicted: recorded again
    assert cache.misses == 5


def test_cuda_graphs_carry_over_to_the_next_edit_of_the_pipeline(make_canvas, make_mask):
    """With cuda_graphs on (a stand-in CUDA runtime on this CPU), a second edit with the same mask (a
    new canvas, prompt and seed) replays the graph the first edit recorded at every step, and its
    result is the eager edit's. FakeCUDA replays recorded ops on recorded tensors, so this fails if a
    step reads a per-edit tensor from anywhere but its constants (it would replay the first edit's)."""
    from lazydiff.testing import FakeCUDA, tiny_lazy_pipeline, tiny_regenerate_pipeline, use_fake_cuda_graphs

    for make in (tiny_lazy_pipeline, tiny_regenerate_pipeline):
        pipe = make(seed=0)
        mask = make_mask(64, 64, (20, 16, 44, 40))
        first, second = make_canvas(64, 64, seed=1), make_canvas(64, 64, seed=2)

        notes = []

        def run(img, prompt, seed):
            out = pipe(prompt, img, mask, num_inference_steps=5, guidance_scale=4.5,
                       generator=torch.Generator().manual_seed(seed))
            notes.append(out.stats.get("cuda_graph"))
            return np.asarray(out.images[0])

        ref = run(second, "a large blue square", 5)
        fake = FakeCUDA()
        use_fake_cuda_graphs(pipe, fake)
        replays = []
        pipe.graph_replay_hook = lambda graph: replays.append(graph)
        run(first, "a small red star", 3)                    # records (steps 1-2), replays 3 steps
        assert len(fake.graphs) == 1 and len(replays) == 3
        out = run(second, "a large blue square", 5)          # same token count: all 5 steps replay
        assert notes == [None, "recorded", "cached"]
        cache = pipe.__dict__["_graph_cache"]
        assert (cache.hits, cache.misses, len(fake.graphs), len(replays)) == (1, 1, 1, 8)
        assert np.array_equal(out, ref), make.__name__
        pipe.clear_caches()                                  # forgets the graphs too
        assert "_graph_cache" not in pipe.__dict__


def test_cuda_graphs_flag_leaves_cpu_edits_unchanged(make_canvas, make_mask):
    """cuda_graphs only applies to CUDA latents: on the CPU the edit is bit-identical with it on."""
    pipe = tiny_lazy_pipeline(seed=0)
    img, mask = make_canvas(64, 64), make_mask(64, 64, (20, 16, 44, 40))
    ref = _edit(pipe, img, mask)
    pipe.cuda_graphs = True
    try:
        on = _edit(pipe, img, mask)
    finally:
        pipe.cuda_graphs = False
    assert np.array_equal(on[0], ref[0]) and torch.equal(on[1], ref[1])


def test_demo_turns_cuda_graphs_on_for_cuda_pipelines_unless_told_not_to():
    from types import SimpleNamespace

    from demo.models import ModelSpec, Models, ModelUnavailable

    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    assert Models(ModelSpec()).use_cuda_graphs(cuda) and not Models(ModelSpec()).use_cuda_graphs(cpu)   # auto
    assert Models(ModelSpec(cuda_graphs="on")).use_cuda_graphs(cuda)
    assert not Models(ModelSpec(cuda_graphs="off")).use_cuda_graphs(cuda)
    with pytest.raises(ModelUnavailable, match="needs a CUDA device"):
        Models(ModelSpec(cuda_graphs="on")).use_cuda_graphs(cpu)
    with pytest.raises(ModelUnavailable, match="auto, on or off"):
        Models(ModelSpec(cuda_graphs="fast")).use_cuda_graphs(cuda)
    assert ModelSpec.from_env({"LAZYDIFF_CUDA_GRAPHS": "Off"}).cuda_graphs == "off"
    assert Models(ModelSpec(tiny=True)).lazy().cuda_graphs is False      # the tiny pipelines run on this CPU


@pytest.mark.parametrize("which", ["lazy", "full"])
def test_decoder_step_copies_nothing_from_the_host(which):
    """A step inside a CUDA graph may not copy host tensors to the device (capture fails: the
    full-canvas decoder once re-sent its position table every step). Stand-in for a GPU: the meta
    device; after a first call (per-edit memos), no op of a step may see a CPU tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 for a in flat):
                self.ops.append(str(func))
            return func(*args, **kwargs)

    dec, args, text, tmask = decoder_and_args(which)
    meta = lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a  # noqa: E731
    dec = dec.to("meta")
    args, text, tmask = tuple(meta(a) for a in args), meta(text), meta(tmask)
    with torch.no_grad():
        cond = dec.prepare_text(text, tmask)
        t = torch.full((2,), 500.0, device="meta")
        dec(*args, t, text, tmask, text_conditioning=cond)  # first step: memos may be filled here
        with HostTensors() as mode:
            dec(*args, t, text, tmask, text_conditioning=cond)
    assert mode.ops == []
