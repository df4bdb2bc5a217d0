"""Stage `train`: fine-tune one backbone on one prepared dataset (one step of the cascade).

The computation and its settings live in ``agecascade.train.finetune``; this module turns the
command line into a ``FinetuneConfig`` (lr and batch from --hparams, a grid's best.json, when
given), trains, and logs the run to MLflow unless --no-track. Its params include the resume
key, so an MLflow run is continued exactly when ``last.pt`` is. Under torchrun every process
trains and rank 0 alone logs and writes (``agecascade.train.distributed``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from agecascade import config as cli_config
from agecascade.data.store import MANIFEST
from agecascade.train import distributed
from agecascade.train.engine import clear_resume_point
from agecascade.train.finetune import (FinetuneConfig, Start, read_hparams, run,
                                       starting_point)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, FinetuneConfig)
    parser.add_argument("--hparams", type=Path,
                        help="best.json of `agecascade tune`: sets --lr and --batch")
    parser.add_argument("--stage", default="train", help="MLflow experiment (one per stage)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def config_from(args: argparse.Namespace) -> FinetuneConfig:
    chosen = read_hparams(args.hparams) if args.hparams else {}
    if chosen:
        print(f"lr {chosen['lr']:g} and batch {chosen['batch']} from {args.hparams}")
    return cli_config.from_args(FinetuneConfig, args, **chosen)


def main(args: argparse.Namespace) -> int:
    config = config_from(args)
    start = starting_point(config)  # read once: its key is a param; under torchrun, joins
    try:
        if args.no_track or not start.world.main:  # rank 0 alone logs under torchrun
            summary, _ = run(config, start=start)
        else:
            summary = run_tracked(config, start, args)
    finally:
        distributed.leave()
    if start.world.main:
        clear_resume_point(config.out)  # only now: a kill before this point resumes
        print(json.dumps(summary, indent=2))
    return 0


def run_tracked(config: FinetuneConfig, start: Start, args: argparse.Namespace) -> dict:
    from agecascade import tracking

    dataset = pd.read_parquet(config.manifest / MANIFEST, columns=["dataset"])["dataset"].iloc[0]
    tags = {"backbone": config.backbone, "stage": args.stage, "mode": config.mode,
            "dataset": str(dataset), "pretrained": config.pretrained}
    params = {k: str(v) if isinstance(v, Path) or v is None else v
              for k, v in asdict(config).items()}
    params |= {"hparams": str(args.hparams or ""), "resume_key": start.key,
               "world_size": start.world.size}
    with tracking.tracked_run(args.stage, f"{config.backbone}-{dataset}", config.out, tags,
                              params):
        summary, _ = run(config, tracking.log_epoch, start)
        tracking.log_final(summary, config.out)
    return summary
