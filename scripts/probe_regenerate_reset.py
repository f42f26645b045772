"""Why RegenerateImage resets the tokens outside the hole after every step (``reset_outside_hole``,
data/models/regenerate-image/README.md). For the first N validation edits, 20 steps, hard paste: the x0
estimate's error outside the hole against E(canvas), and the hole's MAE against the ground truth.

    python scripts/probe_regenerate_reset.py 60 0     # no reset: every token evolves from the model's predictions
    python scripts/probe_regenerate_reset.py 60 1     # reset to E(canvas) noised to the next timestep
    python scripts/probe_regenerate_reset.py 60 2     # reset to E(masked canvas): the pipeline's reset_outside_hole

Per-edit MAEs go to runs/nonhole/mae{N}_{variant}.npy (compare two variants edit by edit).
"""
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without `pip install -e .`
from lazydiff import load_default
from lazydiff.models.dit import patchify, token_mask_from_pixels
from lazydiff.pipelines.editing import to_tensor
from lazydiff.shapesworld.tasks import make_task  # noqa: E402

torch.set_num_threads(1)
pipe = load_default("regenerate-image", device="cpu")
pipe.set_progress_bar_config(disable=True)
pipe.canvas_cache = "off"
n, variant = int(sys.argv[1]), int(sys.argv[2])
pipe.reset_outside_hole = variant == 2
out_dir = Path("runs/nonhole")
out_dir.mkdir(parents=True, exist_ok=True)
rows, t0 = [], time.time()
for seed in range(10_100_000, 10_100_000 + n):  # the validation split's first seeds
    task = make_task(seed)
    with torch.no_grad():
        z_canvas = pipe.vae_encode(to_tensor(task.canvas, "cpu", torch.float32))
    hole = token_mask_from_pixels(torch.from_numpy(task.mask)[None, None], 8)[0].flatten()  # 8 px per token
    grid = int(hole.numel() ** 0.5)
    keep = (~hole).reshape(1, 1, grid, grid).repeat_interleave(2, 2).repeat_interleave(2, 3)  # latent cells
    noise = torch.randn(z_canvas.shape, generator=torch.Generator().manual_seed(seed))
    errs = []

    def callback(p, i, t, kw):
        x0, ref = patchify(kw["pred_x0"], 2)[0], patchify(z_canvas, 2)[0]
        errs.append((x0 - ref).abs().mean(-1)[~hole].mean().item())
        if variant != 1:
            return None
        ts = pipe.scheduler.timesteps
        known = z_canvas if i + 1 >= len(ts) else pipe.scheduler.add_noise(z_canvas, noise, ts[i + 1][None])
        return {"latents": torch.where(keep, known.expand_as(kw["latents"]), kw["latents"])}

    out = pipe(task.prompt, PIL.Image.fromarray(task.canvas), PIL.Image.fromarray(task.mask.astype(np.uint8) * 255),
               generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=("latents", "pred_x0"), blend="hard")
    mae = np.abs(np.asarray(out.images[0]).astype(float) - task.target)[task.mask].mean()
    rows.append((errs[-1], mae))
r = np.array(rows)
np.save(out_dir / f"mae{n}_{variant}.npy", r[:, 1])
print(["no reset", "reset to E(canvas)", "reset to E(masked canvas) (reset_outside_hole)"][variant],
      f"{n} edits: outside-hole |x0 - E(canvas)| at the last step {r[:, 0].mean():.3f}, "
      f"hole MAE vs ground truth {r[:, 1].mean():.2f} ({time.time() - t0:.0f} s)")
