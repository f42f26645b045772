"""``python -m lazydiff.train CONFIG [--set key=value ...] [--no-resume] [--max-steps-this-run N] [--max-minutes M] [--export-at-stop]``

The same command runs on one CPU, one GPU, or many (``accelerate launch -m lazydiff.train CONFIG``).
Run it again to resume from the latest checkpoint in output_dir, under the same config and number of
processes. Ctrl-C (one process, or the launcher of several) stops after the current step with a checkpoint.
"""
from __future__ import annotations

import argparse

import yaml


def main(argv=None):
    import dataclasses
    import textwrap

    from .config import TrainConfig

    def default(f):
        if f.default is not dataclasses.MISSING:
            return f.default
        return "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory()

    keys = " ".join(f"{f.name}={default(f)}" for f in dataclasses.fields(TrainConfig))
    ap = argparse.ArgumentParser(
        prog="python -m lazydiff.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys and their defaults (lazydiff/train/config.py explains each; --set arch.KEY=VALUE\n"
               "changes one architecture key):\n" + textwrap.fill(keys, 100, initial_indent="  ", subsequent_indent="  "))
    ap.add_argument("config", help="YAML training config, e.g. configs/train/lazy.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (YAML value), e.g. --set steps=200 --set output_dir=runs/x")
    ap.add_argument("--no-resume", action="store_true", help="start over: move output_dir's checkpoints and export aside (to *.old-N)")
    ap.add_argument("--max-steps-this-run", type=int, default=None,
                    help="stop (with a checkpoint) after this many steps; run again to resume")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop (with a checkpoint) after this much wall time; run again to resume")
    ap.add_argument("--export-at-stop", action="store_true",
                    help="export the EMA weights where the run stops, even before `steps` (time-boxed runs)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    from . import TrainConfig, train
    from .loop import is_user_error

    try:
        cfg = TrainConfig.load(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:  # the message names the file or key and the fix; no traceback
        ap.exit(2, f"error: {err}\n")
    try:
        train(cfg, resume=not args.no_resume, max_steps_this_run=args.max_steps_this_run,
              max_minutes=args.max_minutes, export_at_stop=args.export_at_stop)
    except KeyboardInterrupt as err:  # after a first Ctrl-C train() checkpoints and says how to resume
        message = str(err) if err.args else "interrupted"  # "": another process of the run says it
        ap.exit(130, f"{message}\n" if message else None)
    except Exception as err:
        if not is_user_error(err):
            raise
        ap.exit(2, f"error: {err}\n")  # a file the config names is missing, corrupt or from another run


if __name__ == "__main__":
    main()
