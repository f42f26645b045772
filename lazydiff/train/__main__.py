"""``python -m lazydiff.train CONFIG [--set key=value ...] [--no-resume] [--max-steps-this-run N] [--max-minutes M] [--export-at-stop]``

The same command runs on one CPU, one GPU, or many (``accelerate launch -m lazydiff.train CONFIG``).
"""
from __future__ import annotations

import argparse

import yaml


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lazydiff.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML training config, e.g. configs/train/lazy.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (YAML value), e.g. --set steps=200 --set output_dir=runs/x")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in output_dir")
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

    cfg = TrainConfig.load(args.config, overrides)
    train(cfg, resume=not args.no_resume, max_steps_this_run=args.max_steps_this_run,
          max_minutes=args.max_minutes, export_at_stop=args.export_at_stop)


if __name__ == "__main__":
    main()
