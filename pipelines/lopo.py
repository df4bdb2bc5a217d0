"""Stage `lopo`: FG-NET leave-one-person-out from one cascade checkpoint, in mode a, b or c.

The protocol and its settings live in ``agecascade.evaluation.lopo``; this module turns the
command line into a ``LopoConfig``, runs it (predictions.csv, folds.csv, metrics.json and
model.pt in OUT) and logs it to MLflow unless --no-track: a run per stage, and one child run
per fold as it finishes.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import pandas as pd

from agecascade import config as cli_config
from agecascade.evaluation.lopo import LopoConfig, run
from agecascade.train import distributed
from agecascade.train.cascade import read_init


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, LopoConfig)
    parser.add_argument("--stage", default="fgnet_lopo", help="MLflow experiment")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(LopoConfig, args)
    if args.no_track or not distributed.from_env().main:  # under torchrun rank 0 alone logs
        done = run(config)
        if done is None:
            return 0
        summary, _ = done
    else:
        from agecascade import tracking

        init = read_init(config.model) if config.model else None  # read once: tags, then folds
        backbone = config.backbone or init["meta"]["backbone"]
        tags = {"backbone": backbone, "stage": args.stage, "mode": config.mode,
                "dataset": "fgnet", "protocol": "leave-one-person-out"}
        params = {k: str(v) for k, v in asdict(config).items()}

        def on_fold(subject: str, frame: pd.DataFrame) -> None:
            mae = float((frame["predicted"] - frame["age"]).abs().mean())
            tracking.log_child_run(f"fold-{subject}", {"mae": mae, "n_images": len(frame)},
                                   {"subject": subject, **tags})

        with tracking.tracked_run(args.stage, f"{backbone}-mode-{config.mode}", config.out, tags,
                                  params):
            summary, _ = run(config, on_fold, init)
            tracking.log_summary(summary, config.out,
                                 ("metrics.json", "folds.csv", "predictions.csv"))
    print(json.dumps(summary, indent=2))
    return 0
