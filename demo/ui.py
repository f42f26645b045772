"""The Gradio Blocks of the demo: two editing tabs (text- and sketch-guided) over one shared model.

Event plumbing (see ../shared/SPEC.md §4): an event that takes the ImageEditor as input never writes
back into it. Generate writes the new canvas to the session's history (a ``gr.State``) and the result
image; a chained ``.success`` step then loads the history's current canvas into the editor. Undo /
redo / reset / picking a variation do the same, so every change of canvas goes through one path.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Dict, Optional


import gradio as gr

from . import handlers as H
from .examples import load_examples
from .models import Models

CSS = (Path(__file__).with_name("style.css")).read_text()
SYSTEM_FONT = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONT = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", font=SYSTEM_FONT, font_mono=MONO_FONT)

MASK_BRUSH = ("#ff00c8", 0.55)  # = handlers.MASK_RGBA: the sketch tab tells region paint from strokes by it
BRUSH_SIZE = 10
SKETCH_COLORS = ["#dc1e1e", "#1eaa32", "#234be1", "#fae11e", "#fa8714", "#8c28b9", "#fafafa", "#0f0f0f"]

ABOUT_MD = f"""
**How it works.** LazyDiffusion edits in two stages. A *context encoder* looks at the whole canvas
and your mask **once** and summarises what the hole needs to know into one token per masked patch.
The *diffusion decoder* then denoises **only those hole tokens** at every step, so the cost of an edit
scales with the size of the mask, not of the image. Pixels outside the mask are returned untouched.
Tick *Compare with full-canvas baseline* to run RegenerateImage (same backbone, every token at every
step) on the same edit and see both times.

**Limits and input policy.** Uploads up to {H.MAX_UPLOAD_MB} MB and {H.MAX_CANVAS_SIDE} px on a side.
Larger canvases than the model's working size are edited downscaled; the edit is then upscaled and
pasted back inside the mask only, so everything else keeps its original pixels. An empty mask is
refused; a mask over (almost) the whole canvas is allowed with a warning. Prompts up to
{H.MAX_PROMPT_CHARS} characters. The models were trained on English ShapesWorld captions ("a small red
star", "empty background"): to remove something, write "empty background"; an empty prompt lets the
model paint whatever it finds likely (unconditional sampling), background or an object.
Your canvas and history live in this browser session only.
"""


class CanvasEditor(gr.ImageEditor):
    """``gr.ImageEditor`` whose unreadable uploads become a clear message instead of a server error."""

    is_template = True  # rendered by the stock ImageEditor frontend

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - corrupt or unsupported files
            raise H.UserError(f"Could not read the uploaded image ({type(err).__name__}): the file is corrupt or not "
                           "a supported image. Upload a PNG, JPEG or WebP file.") from None


# --------------------------------------------------------------------------------------------- event functions
def _no_progress(*_a, **_k):
    return None


# UI-only events: not in the API, not queued behind edits, no spinner
QUIET = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")


def _to_editor(history):
    """The current canvas into the editor, with the mask and strokes of the edit made from it (after an
    Undo: ready to try again)."""
    img = H.history_current(history)
    return H.editor_value(img, *H.history_current_inputs(history)) if img is not None else gr.skip()


def _carry_canvas(other_history, editor_value):
    """On switching tabs, an empty editor takes the other tab's current canvas, so an edit made there can be
    continued here; an editor that already holds an image keeps it."""
    if isinstance(editor_value, dict) and editor_value.get("background") is not None:
        return gr.skip()
    img = H.history_current(other_history)
    return H.editor_value(img) if img is not None else gr.skip()   # the canvas, not that tab's mask


def _edit_events(models: Models, mode: str, editor_value, prompt, strength, negative_prompt, seed, randomize_seed,
                 steps, guidance_scale, variations, compare, history, progress, outs: Dict[str, Any]):
    """The generator behind /edit and /sketch: validate, stream previews, then publish the result."""
    progress = progress or _no_progress
    canvas = H.parse_editor(editor_value, mode)
    tokenizer = None
    max_tokens = None
    try:
        pipe = models.lazy()
        tokenizer = getattr(pipe, "tokenizer", None)
        max_tokens = min(120, getattr(tokenizer, "model_max_length", 120) or 120)
    except Exception as err:  # noqa: BLE001 - reported as a clear message
        raise H.UserError(f"The model is not available: {err}") from None
    req = H.normalise_request(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, variations,
                              compare, strength, tokenizer=tokenizer, mode=mode, max_tokens=max_tokens)
    progress(0.0, desc="Encoding canvas and context")
    result = None
    cancel = threading.Event()
    stream = H.stream_edit(models, canvas, req, cancel=cancel)
    try:
        for ev in stream:
            if isinstance(ev, H.Progress):
                progress((ev.step, ev.total), desc=ev.phase, unit="steps")
            elif isinstance(ev, H.Preview):
                yield {outs["result"]: ev.image}
            else:
                result = ev
    finally:
        stream.close()
    if result is None:  # pragma: no cover - stream_edit always ends with a result or an error
        raise H.UserError("The edit produced no result; try again.")

    h = H.history_current(history)
    new = history
    if h is None or not H.same_canvas(h, canvas.rgb):
        new = H.history_push(new, canvas.rgb, "the image you started from")
    new = H.history_set_inputs(new, canvas.mask, canvas.sketch)
    label = f"'{req.prompt}'" if req.prompt else "no prompt"
    if mode == "sketch" and canvas.sketch is not None:
        label = f"sketch, strength {req.strength:.2f}, {label}"
    new = H.history_push(new, result.images[0], f"{label} (seed {req.seed})")
    new["variations"] = list(result.images) if len(result.images) > 1 else []
    has_cmp = result.baseline is not None
    yield {
        outs["result"]: result.images[0],
        outs["gallery"]: gr.update(value=[(im, f"variation {i + 1}") for i, im in enumerate(result.images)],
                                   visible=len(result.images) > 1, selected_index=None),
        outs["stats"]: H.speed_html(result),
        outs["seed"]: req.seed,
        outs["history"]: new,
        outs["history_md"]: H.history_markdown(new),
        outs["download"]: H.canvas_png(result.images[0]),
        outs["cmp_lazy"]: gr.update(value=result.images[0] if has_cmp else None, visible=has_cmp),
        outs["cmp_base"]: gr.update(value=result.baseline_image if has_cmp else None, visible=has_cmp),
        outs["cmp_html"]: gr.update(value=H.compare_html(result) if has_cmp else "", visible=has_cmp),
    }


def _move(to: str, history):
    new = H.history_move(history, to)
    img = H.history_current(new)
    return new, H.history_markdown(new), H.canvas_png(img), img


def _pick(history, evt: gr.SelectData):
    variations = (history or {}).get("variations") or []
    i = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else 0)
    if not variations or not 0 <= i < len(variations):
        raise H.UserError("That variation is no longer available; generate again.")
    label = (history["labels"][history["pos"]] if history.get("labels") else "edit").split(" [variation")[0]
    new = H.history_replace(history, variations[i], f"{label} [variation {i + 1}]")
    return new, H.history_markdown(new), H.canvas_png(variations[i]), variations[i]


# --------------------------------------------------------------------------------------------- layout
def _header(models: Models):
    gr.HTML("<div class='ld-header'><h1>LazyDiffusion</h1><span class='ld-tag'>interactive image editing whose cost "
            "scales with the mask, not the image</span></div>"
            "<p class='ld-sub-header'>Paint over a region, say what should be there, press Generate. The result becomes "
            "your new canvas, so you can keep editing. "
            "<a href='https://arxiv.org/abs/2404.12382' target='_blank' rel='noopener'>Paper</a></p>")
    if models.banner:
        gr.HTML(f"<div class='ld-banner'>⚠ {models.banner}</div>", elem_id="ld-banner")


def _edit_tab(models: Models, mode: str, examples) -> Dict[str, Any]:
    if mode == "text":
        brush = gr.Brush(colors=[MASK_BRUSH], color_mode="fixed", default_size=BRUSH_SIZE)
        editor_label = "Canvas"
        howto = ("**1.** Upload an image, pick an example below or start from a blank canvas. "
                 "**2.** Paint over the region to change. **3.** Describe what should be there and press Generate.")
    else:
        brush = gr.Brush(colors=SKETCH_COLORS + [MASK_BRUSH], default_color=SKETCH_COLORS[0], color_mode="defaults",
                         default_size=BRUSH_SIZE)
        editor_label = "Canvas"
        howto = ("**1.** Load an image. **2.** Draw the shape you want with a **solid colour** (palette icon). "
                 "Optionally paint the region to regenerate with the **translucent pink** brush; otherwise the area "
                 "around your strokes is used. **3.** Set the strength and press Generate.")
    c: Dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=6, min_width=400):
            gr.Markdown(howto, elem_classes="ld-howto")
            c["editor"] = CanvasEditor(label=editor_label, type="numpy", image_mode="RGBA", format="png",
                                       sources=["upload", "clipboard"], brush=brush, eraser=gr.Eraser(),
                                       layers=False, transforms=(), height=560, canvas_size=(512, 512),
                                       elem_id=f"{mode}-editor")
            with gr.Row(elem_classes="ld-tools"):
                c["undo"] = gr.Button("↶ Undo", size="sm", elem_id=f"{mode}-undo")
                c["redo"] = gr.Button("↷ Redo", size="sm", elem_id=f"{mode}-redo")
                c["reset"] = gr.Button("⟲ Reset", size="sm", elem_id=f"{mode}-reset")
                c["blank"] = gr.Button("□ Blank canvas", size="sm", elem_id=f"{mode}-blank")
                c["download"] = gr.DownloadButton("⤓ Download", size="sm", interactive=False,  # until the first result
                                                  elem_id=f"{mode}-download")
            c["history_md"] = gr.Markdown(H.history_markdown(None), label="History", elem_id=f"{mode}-history")
            if examples:
                # The label goes above as text: Gradio floats a gallery's label over its first row.
                gr.Markdown("**Examples** (ShapesWorld): click one to load its canvas, mask and prompt")
                c["ex_gallery"] = gr.Gallery(value=[(e.thumbnail(), e.title) for e in examples],
                                             label="Examples", show_label=False, columns=4, height=200, allow_preview=False, format="png",
                                             object_fit="contain", elem_id=f"{mode}-examples")
        with gr.Column(scale=5, min_width=360):
            c["prompt"] = gr.Textbox(label="Prompt: what should appear in the painted region",
                                     placeholder="a small red star" if mode == "text" else "optional, e.g. a large yellow circle",
                                     max_length=H.MAX_PROMPT_CHARS, lines=1, elem_id=f"{mode}-prompt")
            if mode == "sketch":
                c["strength"] = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Strength",
                                          info="low = follow your strokes closely, 1 = ignore their colours",
                                          elem_id=f"{mode}-strength")
            with gr.Row():
                c["generate"] = gr.Button("Generate", variant="primary", scale=3, elem_classes="ld-generate",
                                          elem_id=f"{mode}-generate")
                c["compare"] = gr.Checkbox(label="Compare with full-canvas baseline", value=False, scale=2,
                                           elem_id=f"{mode}-compare")
            c["result"] = gr.Image(label="Result (live preview while denoising)", show_label=True, type="numpy", format="png",
                                   image_mode="RGB", interactive=False, height=300, buttons=["download", "fullscreen"],
                                   elem_id=f"{mode}-result")
            c["gallery"] = gr.Gallery(label="Variations: click one to make it the canvas", columns=4, height=130,
                                      allow_preview=False, visible=False, format="png", elem_id=f"{mode}-gallery")
            c["stats"] = gr.HTML(apply_default_css=False, value="<div class='ld-empty'>Speed: mask size, tokens denoised and the time of each stage "
                                 "appear here after each edit.</div>", label="Speed", elem_id=f"{mode}-stats")
            with gr.Accordion("Settings", open=False):
                c["negative"] = gr.Textbox(label="Negative prompt", placeholder="what to avoid (optional)",
                                           max_length=H.MAX_PROMPT_CHARS)
                with gr.Row():
                    c["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=H.MAX_SEED)
                    c["randomize"] = gr.Checkbox(label="Randomise seed", value=True)
                with gr.Row():
                    c["steps"] = gr.Slider(1, H.MAX_STEPS, value=20, step=1, label="Denoising steps",
                                           info="shipped models: 10 score like 20, in half the time")
                    c["guidance"] = gr.Slider(0.0, 12.0, value=4.5, step=0.5, label="Guidance scale")
                c["variations"] = gr.Slider(1, H.MAX_VARIATIONS, value=1, step=1, label="Variations",
                                            info="several results to pick from (one batched run)")
    with gr.Row():
        c["cmp_lazy"] = gr.Image(label="LazyDiffusion (hole tokens only)", type="numpy", format="png", interactive=False,
                                 visible=False, height=260, elem_id=f"{mode}-cmp-lazy")
        c["cmp_base"] = gr.Image(label="RegenerateImage baseline (full canvas)", type="numpy", format="png",
                                 interactive=False, visible=False, height=260, elem_id=f"{mode}-cmp-base")
        c["cmp_html"] = gr.HTML(apply_default_css=False, visible=False, label="Speed comparison", elem_id=f"{mode}-cmp-stats")
    c["history"] = gr.State(H.new_history(), time_to_live=4 * 3600)
    c["examples"] = examples
    _wire(models, mode, c)
    return c


def _wire(models: Models, mode: str, c: Dict[str, Any]) -> None:
    outs = {k: c[k] for k in ("result", "gallery", "stats", "seed", "history", "history_md", "download",
                              "cmp_lazy", "cmp_base", "cmp_html")}
    out_list = list(outs.values())
    to_editor = _to_editor

    if mode == "text":
        def edit(editor_value, prompt, negative_prompt=None, seed=0, randomize_seed=True, steps=20, guidance_scale=4.5,
                 variations=1, compare=False, history=None, progress=gr.Progress()):
            yield from _edit_events(models, "text", editor_value, prompt, 1.0, negative_prompt, seed, randomize_seed,
                                    steps, guidance_scale, variations, compare, history, progress, outs)

        inputs = [c["editor"], c["prompt"], c["negative"], c["seed"], c["randomize"], c["steps"], c["guidance"],
                  c["variations"], c["compare"], c["history"]]
        api_name, desc = "edit", "Text-guided edit: regenerate the painted region following the prompt."
    else:
        def edit(editor_value, prompt=None, strength=0.75, negative_prompt=None, seed=0, randomize_seed=True, steps=20,
                 guidance_scale=4.5, variations=1, compare=False, history=None, progress=gr.Progress()):
            yield from _edit_events(models, "sketch", editor_value, prompt, strength, negative_prompt, seed,
                                    randomize_seed, steps, guidance_scale, variations, compare, history, progress, outs)

        inputs = [c["editor"], c["prompt"], c["strength"], c["negative"], c["seed"], c["randomize"], c["steps"],
                  c["guidance"], c["variations"], c["compare"], c["history"]]
        api_name, desc = "sketch", ("Sketch-guided edit. Layers: [mask, strokes] (any opaque pixel of the first is the "
                                     "region; the second's opaque pixels are coloured strokes), or one layer where "
                                     "translucent / #ff00c8 pixels are the region and solid colours are strokes.")

    ev = gr.on([c["generate"].click, c["prompt"].submit], edit, inputs, out_list, api_name=api_name,
               api_description=desc, concurrency_id="model", concurrency_limit=1, show_progress_on=[c["stats"]])
    ev.success(to_editor, [c["history"]], [c["editor"]], **QUIET)
    ev.success(lambda: gr.update(interactive=True), None, [c["download"]], **QUIET)  # greyed out until a result

    move_outs = [c["history"], c["history_md"], c["download"], c["result"]]
    for name in ("undo", "redo", "reset"):
        api = f"{mode}_{name}" if mode != "text" else name
        c[name].click(functools.partial(_move, name), [c["history"]], move_outs, api_name=api,
                      concurrency_limit=None, show_progress="hidden") \
            .success(to_editor, [c["history"]], [c["editor"]], **QUIET)
    c["gallery"].select(_pick, [c["history"]], move_outs, **QUIET).success(to_editor, [c["history"]], [c["editor"]],
                                                                          **QUIET)
    c["blank"].click(lambda: H.editor_value(H.blank_canvas()), None, [c["editor"]], **QUIET)
    if c.get("ex_gallery") is not None:
        examples = c["examples"]
        ex_outs = [c["editor"], c["prompt"]] + ([c["strength"]] if mode == "sketch" else [])

        def load_example(evt: gr.SelectData):
            e = examples[evt.index if isinstance(evt.index, int) else evt.index[0]]
            vals = [e.editor_value(), e.prompt]
            return vals + ([e.strength] if mode == "sketch" else [])

        c["ex_gallery"].select(load_example, None, ex_outs, **QUIET)


def build_demo(models: Optional[Models] = None) -> gr.Blocks:
    """The demo's Blocks (not launched). ``models`` defaults to the environment's settings."""
    models = models or Models()
    with gr.Blocks(title="LazyDiffusion: interactive image editing", delete_cache=(1800, 3600)) as demo:
        _header(models)
        with gr.Tabs() as tabs:
            with gr.Tab("Text-guided edit", id="text"):
                text = _edit_tab(models, "text", load_examples("text"))
            with gr.Tab("Sketch-guided edit", id="sketch"):
                sketch = _edit_tab(models, "sketch", load_examples("sketch"))
            with gr.Tab("About & limits", id="about"):
                gr.Markdown(ABOUT_MD)
                gr.Markdown(f"Model: {models.spec.describe()}. Working size: up to {models.max_side} px on a side.")
        def carry(text_history, sketch_history, text_editor, sketch_editor, evt: gr.SelectData):
            if evt.index in (0, "text"):
                return _carry_canvas(sketch_history, text_editor), gr.skip()
            if evt.index in (1, "sketch"):
                return gr.skip(), _carry_canvas(text_history, sketch_editor)
            return gr.skip(), gr.skip()

        tabs.select(carry, [text["history"], sketch["history"], text["editor"], sketch["editor"]],
                    [text["editor"], sketch["editor"]], **QUIET)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.models = models  # for tests and scripts
    _with_launch_defaults(demo)
    return demo


def launch_defaults() -> Dict[str, Any]:
    """What every launch of the demo needs: style, upload limit, and no extra served paths."""
    return dict(css=CSS, theme=THEME, max_file_size=f"{H.MAX_UPLOAD_MB}mb", allowed_paths=[],
                footer_links=["api", "gradio"])


def _with_launch_defaults(demo: gr.Blocks) -> None:
    launch = demo.launch

    @functools.wraps(launch)
    def launch_with_defaults(*args, **kwargs):
        for k, v in launch_defaults().items():
            kwargs.setdefault(k, v)
        return launch(*args, **kwargs)

    demo.launch = launch_with_defaults
