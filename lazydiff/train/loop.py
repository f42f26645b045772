"""The training loop, on HF accelerate: one CPU, one GPU, or many GPUs/nodes with ``accelerate launch``.

Checkpoints are safetensors (weights, EMA) plus the optimizer state (tensors only, reloaded with
``weights_only=True``). Data and noise are functions of (seed, step, rank), so a resumed run
continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import TrainingStream
from .objectives import OBJECTIVES


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        # Frozen parameters are copied, not averaged: d*v + (1-d)*v can round away from v.
        self.frozen = {k for k, p in module.named_parameters() if not p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))
        state = module.state_dict()
        avg = [k for k, v in state.items() if v.dtype.is_floating_point and k not in self.frozen]
        if avg:  # one fused update for all averaged tensors (a per-tensor loop is ~1,000 tiny GPU kernels)
            shadow = [self.shadow[k] for k in avg]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [state[k].detach().float() for k in avg], alpha=1 - d)
        averaged = set(avg)
        for k, v in state.items():
            if k not in averaged:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module):
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


def _cpu_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _checkpoint_dirs(output_dir: Path):
    """The step-N folders, oldest first; not the step-N.tmp a run killed while saving leaves behind."""
    dirs = [p for p in (output_dir / "checkpoints").glob("step-*") if p.name[len("step-"):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len("step-"):]))


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    ckpts = [c for c in _checkpoint_dirs(output_dir) if (c / "state.json").exists()]  # state.json is written last
    return ckpts[-1] if ckpts else None


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Write a folder under a temporary sibling name (``final.tmp``) and swap it in only once complete.

    Whatever interrupts the write (Ctrl-C, a crash, a kill) leaves the previous folder, or none, never a
    partial one: the previous folder is moved aside (``final.tmp-old``) before the new one takes its name,
    and deleted after. A leftover ``.tmp`` or ``.tmp-old`` is removed by the next write."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".tmp-old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(output_dir: Path, step: int, model, ema: EMA, optimizer, log, cfg: TrainConfig,
                    num_processes: int = 1):
    with atomic_folder(output_dir / "checkpoints" / f"step-{step}") as tmp:
        save_file(_cpu_state(model.state_dict()), str(tmp / "model.safetensors"))
        save_file(_cpu_state(ema.shadow), str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        with open(tmp / "state.json", "w") as f:  # num_processes: a resume with another count is refused
            json.dump({"step": step, "log": log, "config": cfg.to_dict(), "num_processes": num_processes}, f)
    for c in _checkpoint_dirs(output_dir)[: -cfg.keep_checkpoints]:
        shutil.rmtree(c, ignore_errors=True)
    # what a run killed while saving left behind (atomic_folder cleans up only for the same step)
    for stale in (output_dir / "checkpoints").glob("step-*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model, ema: EMA, optimizer):
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors"), device="cpu"))
        ema.shadow = {k: v.to(next(iter(ema.shadow.values())).device) for k, v in
                      load_file(str(path / "ema.safetensors"), device="cpu").items()}
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        with open(path / "state.json") as f:
            state = json.load(f)
    except Exception as err:  # a corrupt or mismatched checkpoint must say which file and what to do
        raise RuntimeError(f"could not resume from checkpoint {path}: {err}. Delete that folder to resume from the "
                           "previous checkpoint, or pass --no-resume to start over.") from err
    return state["step"], state["log"]


#: config keys that may change when a run resumes: they do not change the weights' trajectory (paths may be
#: spelled differently from another machine or folder; init_from is ignored when a checkpoint exists)
RESUME_MAY_CHANGE = ("output_dir", "num_workers", "checkpoint_every", "log_every", "keep_checkpoints", "export_dtype",
                     "export_raw", "init_from", "pixart", "autoencoder", "text_encoder", "text_features", "data")


def check_resume_config(ckpt: Path, cfg: TrainConfig, num_processes: Optional[int] = None) -> Optional[str]:
    """A checkpoint resumes exactly only under the config that wrote it: refuse another one before anything in
    output_dir is touched (a different model or arch would not load, a different lr or steps would silently
    change the run). So is a resume that would train on with another number of processes (``num_processes``):
    each process's data and the effective batch depend on it. Returns a warning to print, or None: checkpoints
    written before the process count was recorded cannot be checked."""
    try:
        with open(ckpt / "state.json") as f:
            state = json.load(f)
        saved = state["config"]
    except Exception:
        return None  # a corrupt checkpoint is reported by load_checkpoint, with its fix
    new = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as in state.json
    if cfg.lr_schedule == "constant":  # `steps` is only an upper bound there: raising it continues the same run
        new["steps"] = saved.get("steps", new["steps"])
    diff = [k for k in new if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != new[k]]
    if diff:
        raise ValueError(
            f"{cfg.output_dir} holds a run of another config (checkpoint {ckpt}): "
            + "; ".join(f"{k}: {saved[k]!r} there, {new[k]!r} now" for k in diff[:6])
            + f". Train it with its own config ({Path(cfg.output_dir) / 'config.json'} is the config of its latest start), "
            "choose another output_dir (--set output_dir=...; init_from=<its export> continues from its weights), "
            "or pass --no-resume to start over there (its checkpoints and export are moved aside, not deleted).")
    if num_processes is None or state.get("step", 0) >= cfg.steps:  # a finished run only exports again
        return None
    def procs(n):
        return f"{n} process{'es' if n != 1 else ''}"

    before = state.get("num_processes")
    if before is None:
        return (f"checkpoint {ckpt} does not record how many processes trained it (it predates that record): "
                f"this resume with {procs(num_processes)} is exact only if that is the same number")
    if before != num_processes:
        raise ValueError(
            f"checkpoint {ckpt} was trained with {procs(before)}, this run has {procs(num_processes)}: each process's "
            "data and the effective batch (batch_size per process x processes) would change, so the resume would not "
            f"be exact. Resume with {procs(before)} (" + ("python -m lazydiff.train ..." if before == 1 else
                                                          f"accelerate launch --num_processes {before} ...")
            + "), or start a new run: --no-resume (the old checkpoints and export are moved aside) or another "
            "output_dir (--set output_dir=...).")
    return None


_USER_ERRORS = (OSError, ValueError, RuntimeError, TypeError)


def mark_user_error(err: BaseException) -> BaseException:
    err.lazydiff_user_error = True
    return err


def is_user_error(err: BaseException) -> bool:
    """Raised while setting a run up from the config and the files it names (the CLI prints the message only)."""
    return getattr(err, "lazydiff_user_error", False)


def _ignore_sigint(worker_id: int) -> None:
    """Data workers leave Ctrl-C to the training process, which stops at the end of the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def plot_loss(log, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if not log:
        return
    steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=1)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # 0.023, not 2.3 x 10^-2
    ax.yaxis.set_major_formatter(plain)  # label the minor ticks only where no decade tick is in view
    ax.yaxis.set_minor_formatter(plain if max(losses) < 10 * min(losses) else NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig, resume: bool = True, max_steps_this_run: Optional[int] = None,
          max_minutes: Optional[float] = None, export_at_stop: bool = False) -> Path:
    """Train ``cfg.model``; returns the export folder.

    ``max_steps_this_run`` / ``max_minutes`` stop early (tests, time-boxed machines) after a
    checkpoint, so the next call resumes. ``export_at_stop`` exports the EMA weights where the run
    stopped instead of only at ``cfg.steps``; ``train_info.json`` then records the step reached, and
    ``--max-steps-this-run <that step> --export-at-stop`` reproduces it (the LR schedule is a
    function of ``cfg.steps``, not of where the run stopped)."""
    from accelerate import Accelerator

    # cpu=True without a GPU: processes started by `accelerate launch` then form a gloo group
    # (without it each CPU process would train alone, all writing to one output_dir).
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    torch.backends.cuda.matmul.allow_tf32 = True  # free speed on Ampere+; no effect on CPU
    torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.output_dir)
    try:  # everything the config names is checked before output_dir is touched
        if cfg.data:
            from .image_folder import load_rows

            rows = load_rows(str(cfg.data))
            accelerator.print(f"data: {len(rows)} images from {cfg.data}")
        try:
            objective = OBJECTIVES[cfg.model](cfg, device)
        except TypeError as err:  # e.g. a misspelt `arch:` key reaches a model constructor
            raise TypeError(f"could not build model {cfg.model!r} from `arch: {cfg.arch}`: {err}") from err
        model = objective.trainable.to(device)
        ckpt = latest_checkpoint(out) if resume else None
        if ckpt is not None:
            warning = check_resume_config(ckpt, cfg, accelerator.num_processes)
            if warning and accelerator.is_main_process:
                print(f"warning: {warning}", file=sys.stderr)
        elif cfg.init_from:
            objective.init_from(cfg.init_from)
            accelerator.print(f"initialised from {cfg.init_from}")
    except _USER_ERRORS as err:
        raise mark_user_error(err)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        old = [name for name in ("checkpoints", "export", "export-raw", "train_info.json") if (out / name).exists()]
        if not resume and old:
            # Starting over: set the old run's checkpoints aside, or they would outrank the new run's on the
            # next resume (and the keep_checkpoints pruning would delete the new run's instead of theirs); and
            # its export, which the new run's would replace.
            n = 1
            while any((out / f"{name}.old-{n}").exists() for name in old):
                n += 1
            for name in old:
                os.replace(out / name, out / f"{name}.old-{n}")
            accelerator.print(f"--no-resume: moved the existing {', '.join(old)} to {out}/*.old-{n}")
        with open(out / "config.json", "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    start, log = 0, []
    ema = EMA(model, cfg.ema_decay)
    if ckpt is not None:
        try:
            start, log = load_checkpoint(ckpt, model, ema, optimizer)
        except RuntimeError as err:
            raise mark_user_error(err)
        accelerator.print(f"resumed from {ckpt} at step {start}"
                          + (" (already finished: exporting it again)" if start >= cfg.steps else ""))

    def lr_at(s: int) -> float:  # linear warm-up, then cosine decay to 10% at cfg.steps (or constant)
        decay = 1.0 if cfg.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))) * 0.9 + 0.1
        return cfg.lr * min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * decay

    model, optimizer = accelerator.prepare(model, optimizer)
    objective.trainable = model  # the objective calls the (possibly DDP-wrapped) module
    # Data step d feeds training steps d * echo ... d * echo + echo - 1 (a resume mid-echo restarts at its d).
    echo = cfg.data_echo
    stream = TrainingStream(cfg.model, cfg.batch_size, cfg.image_size, cfg.seed, start // echo,
                            accelerator.process_index, accelerator.num_processes, data=cfg.data,
                            hole_crops=cfg.hole_crops, object_masks=cfg.object_loss_weight > 0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                         prefetch_factor=4 if cfg.num_workers else None,
                                         persistent_workers=False, worker_init_fn=_ignore_sigint,
                                         pin_memory=device.type == "cuda")  # asynchronous copies to the GPU
    end = cfg.steps if max_steps_this_run is None else min(cfg.steps, start + max_steps_this_run)
    t0, run_losses = time.time(), []
    wall_before = log[-1]["wall_s"] if log else 0.0
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", disable=not accelerator.is_local_main_process)
    data = iter(loader)
    step = start
    deadline = None if max_minutes is None else time.time() + 60 * max_minutes

    # Whether to stop before the next step (Ctrl-C, time box): every process must agree, or DDP would hang on
    # the next step. Several processes vote once per step over a CPU (gloo) group of their own: a host-side
    # all-reduce of two numbers, which leaves the GPUs' queues alone (a GPU tensor would have to be read back).
    vote_group = None
    if (accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.is_gloo_available()):
        vote_group = torch.distributed.new_group(backend="gloo")
    interrupted = []  # the steps at which this process got Ctrl-C (SIGINT)

    def stop_votes():
        """-> (Ctrl-C, time is up), each true if it is true for any process."""
        local = [float(bool(interrupted)), float(deadline is not None and time.time() > deadline)]
        if accelerator.num_processes == 1:  # no round trip at all
            return bool(local[0]), bool(local[1])
        if vote_group is not None:
            votes = torch.tensor(local)
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX, group=vote_group)
        else:  # a launcher without torch.distributed: through the device
            votes = accelerator.reduce(torch.tensor(local, device=device), "max").cpu()
        return bool(votes[0]), bool(votes[1])

    def mean_loss() -> float:  # of the steps since the last log entry
        return float(torch.stack(run_losses).double().mean())

    def write_logs():
        if run_losses:
            log.append({"step": step, "loss": mean_loss(), "lr": lr_at(step - 1),
                        "wall_s": wall_before + time.time() - t0})
            run_losses.clear()
        if accelerator.is_main_process:
            save_checkpoint(out, step, accelerator.unwrap_model(model), ema, optimizer, log, cfg,
                            accelerator.num_processes)
            plot_loss(log, out / "loss.png", f"{cfg.model} training loss, {out.name} (mean of {cfg.log_every} steps)")
            with open(out / "loss.csv", "w") as f:
                f.write("step,loss,lr,wall_s\n" + "".join(f"{r['step']},{r['loss']:.6f},{r['lr']:.3g},{r['wall_s']:.1f}\n" for r in log))

    # Ctrl-C: finish the step, checkpoint, say how to resume; a second Ctrl-C quits at once. Under `accelerate
    # launch` the launcher gets the terminal's Ctrl-C and sends SIGINT to every process: they agree through
    # stop_votes() at the next step boundary and stop together.
    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(step)
        if accelerator.is_local_main_process:
            bar.write("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to quit without one)")

    catch_sigint = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if catch_sigint else None
    ctrl_c = False
    try:
        batch = None
        while step < end:
            ctrl_c, time_up = stop_votes()
            if ctrl_c or time_up:
                break
            if batch is None or step % echo == 0:
                batch = next(data)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            model.train()
            with accelerator.autocast():
                loss = objective.loss(batch, step, accelerator.process_index)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(model), step)
            step += 1
            run_losses.append(accelerator.reduce(loss.detach(), "mean"))  # read back only when logged
            if step % cfg.log_every == 0:
                log.append({"step": step, "loss": mean_loss(), "lr": lr_at(step - 1),
                            "wall_s": wall_before + time.time() - t0})
                run_losses.clear()
                bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            bar.update()
            if step % cfg.checkpoint_every == 0 and step < end:
                write_logs()
        bar.close()
        if step > start:
            write_logs()  # the final (or time-boxed, or interrupted) checkpoint: a first Ctrl-C lets it finish
    finally:
        if catch_sigint:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous_handler is None else previous_handler)
    accelerator.wait_for_everyone()
    # Ctrl-C, agreed in the loop or got by this process during the final checkpoint: no export, which the
    # resume makes (a finished run's resume only exports).
    if ctrl_c or interrupted:
        saved = latest_checkpoint(out)
        message = (f"interrupted at step {step}: checkpoint {saved}; run the same command again to resume" if saved
                   else "interrupted before the first step: nothing was saved")
        raise KeyboardInterrupt(message if accelerator.is_main_process else "")  # said once
    export = out / "export"
    if (step >= cfg.steps or export_at_stop) and step > 0 and accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        try:
            # Each folder is written aside and swapped in whole: an interrupted export leaves the previous one or
            # none, and the same command exports again (the checkpoint is already written).
            with atomic_folder(export) as export_tmp:
                if cfg.export_raw:  # before the EMA weights are copied in
                    with atomic_folder(out / "export-raw") as raw_tmp:
                        objective.export(final, raw_tmp)
                ema.copy_to(final)
                objective.export(final, export_tmp)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted while exporting step {step} (checkpoint {latest_checkpoint(out)} is "
                                    "complete): run the same command again to export it") from None
        info = {"model": cfg.model, "steps": step, "schedule_steps": cfg.steps, "batch_size_per_process": cfg.batch_size,
                "num_processes": accelerator.num_processes, "wall_s": log[-1]["wall_s"] if log else None,
                "final_loss": log[-1]["loss"] if log else None, "mixed_precision": cfg.mixed_precision,
                "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "params": sum(p.numel() for p in final.parameters())}
        with open(out / "train_info.json.tmp", "w") as f:
            json.dump(info, f, indent=2)
        os.replace(out / "train_info.json.tmp", out / "train_info.json")
        accelerator.print(f"exported to {export}: {info}")
    return export
