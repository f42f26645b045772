"""LazyDiffusion web demo: text- and sketch-guided interactive editing.

    python app.py                      # the shipped ShapesWorld models (data/models), http://127.0.0.1:7860
    python app.py --tiny               # random-weight test pipelines (no trained weights needed)
    python app.py --model DIR [--baseline DIR] [--host 0.0.0.0] [--port 7860] [--share]

Environment: LAZYDIFF_MODEL, LAZYDIFF_BASELINE, LAZYDIFF_TINY=1, LAZYDIFF_DEVICE, LAZYDIFF_MAX_SIDE,
LAZYDIFF_ONNX_RUNTIME (auto | on | off),
LAZYDIFF_MODELS_DIR (where load_default looks). Importing this module builds ``demo`` (a gr.Blocks)
without loading any model; the pipelines load on the first edit, or up front in ``main()``.
"""
from __future__ import annotations

import argparse
import os
import sys

from demo.models import ModelSpec, Models, ModelUnavailable
from demo.ui import build_demo

demo = build_demo(Models(ModelSpec.from_env()))


def parse_args(argv=None) -> argparse.Namespace:
    env = ModelSpec.from_env()
    ap = argparse.ArgumentParser(description="LazyDiffusion interactive editing demo")
    ap.add_argument("--model", default=env.model_dir, metavar="DIR",
                    help="a LazyDiffusionPipeline folder (save_pretrained, or a training export in data/models' layout); "
                         "default: the shipped model "
                         "[env LAZYDIFF_MODEL]")
    ap.add_argument("--baseline", default=env.baseline_dir, metavar="DIR",
                    help="a RegenerateImagePipeline folder for the comparison (same layouts as --model); default: the shipped baseline "
                         "[env LAZYDIFF_BASELINE]")
    ap.add_argument("--tiny", action="store_true", default=env.tiny,
                    help="random-weight test pipelines: try the UI without trained weights [env LAZYDIFF_TINY=1]")
    ap.add_argument("--device", default=env.device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--max-side", type=int, default=env.max_side,
                    help="largest side the model works at; bigger canvases are edited downscaled and pasted back "
                         "inside the mask at full resolution (default 512, 256 with --tiny) [env LAZYDIFF_MAX_SIDE]")
    ap.add_argument("--onnx-runtime", default=env.onnx_runtime, choices=["auto", "on", "off"],
                    help="run the denoising steps, the context encoder, the VAE and the text encoder in ONNX "
                         "Runtime (outputs equal to float32 rounding; a module over 2 GiB stays in PyTorch): "
                         "auto = on a CPU when onnxruntime is installed; on = insist (an error elsewhere) "
                         "[env LAZYDIFF_ONNX_RUNTIME]")
    ap.add_argument("--cuda-graphs", default=env.cuda_graphs, choices=["auto", "on", "off"],
                    help="replay the denoising steps from CUDA graphs (same pixels as eager steps, less launch "
                         "overhead): auto = on a CUDA device; on = insist (an error elsewhere) [env LAZYDIFF_CUDA_GRAPHS]")
    # A Hugging Face Space (SPACE_ID set) must listen on all interfaces to be reachable through its proxy.
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    ap.add_argument("--host", default=host,
                    help="interface to listen on (0.0.0.0 for all); default 127.0.0.1, 0.0.0.0 in a Hugging Face Space "
                         "[env GRADIO_SERVER_NAME]")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    ap.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    ap.add_argument("--no-preload", action="store_true", help="load the models on the first edit instead of at start")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    global demo
    args = parse_args(argv)
    spec = ModelSpec(model_dir=args.model, baseline_dir=args.baseline, tiny=args.tiny, device=args.device,
                     max_side=args.max_side, onnx_runtime=args.onnx_runtime,
                     cuda_graphs=args.cuda_graphs)
    models = Models(spec)
    if not args.no_preload:
        print(f"Loading {spec.describe()} ...", flush=True)
        try:
            models.lazy()
        except ModelUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not models.baseline_available():
            print("note: the full-canvas baseline is not available; the comparison option will say why.",
                  file=sys.stderr)
    if models.banner:
        print(f"NOTE: {models.banner}", flush=True)
    demo = build_demo(models)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
