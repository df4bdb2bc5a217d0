"""Stage `tune`: the thesis's lr x batch-size grid, one epoch per point, lowest val loss wins.

The grid, its resumable Optuna study and its settings live in ``agecascade.train.tune``; this
module turns the command line into a ``TuneConfig`` (the grid, and the `train` options every
point runs with, less those a point sets), walks the grid and logs it to MLflow unless
--no-track: a parent run, and one nested run per point this process trained (under torchrun:
rank 0's run, with every process's points). The study sits in
OUT/optuna.db, a `persist: true` out, so `dvc repro` keeps it and an interrupted grid resumes;
or in the storage --storage names, which several `tune` workers share to split the grid.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from agecascade import config as cli_config
from agecascade.train import distributed
from agecascade.train.finetune import FinetuneConfig
from agecascade.train.tune import POINT_SETTINGS, TuneConfig, run, study_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, FinetuneConfig, skip=POINT_SETTINGS)
    cli_config.add_arguments(parser, TuneConfig, skip=("trial",))
    parser.add_argument("--stage", default="tune", help="MLflow experiment")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def config_from(args: argparse.Namespace) -> TuneConfig:
    return cli_config.from_args(TuneConfig, args,
                                trial=cli_config.from_args(FinetuneConfig, args))


def log_trial(lr: float, batch: int, summary: dict) -> None:
    """A trained point as a run nested under the grid's."""
    import mlflow

    parent = mlflow.active_run().info
    with mlflow.start_run(run_name=f"lr={lr:g} batch={batch}",
                          experiment_id=parent.experiment_id, nested=True):
        mlflow.log_params({"lr": lr, "batch": batch})
        mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})


def main(args: argparse.Namespace) -> int:
    config = config_from(args)
    main_process = distributed.from_env().main  # under torchrun, rank 0 alone logs and prints
    if args.no_track or not main_process:
        best = run(config)
    else:
        from agecascade import tracking

        trial = config.trial
        tags = {"backbone": trial.backbone, "stage": args.stage, "mode": trial.mode,
                "dataset": trial.manifest.name, "pretrained": trial.pretrained}
        params = {k: str(v) if isinstance(v, Path) or v is None else v
                  for k, v in asdict(trial).items() if k not in POINT_SETTINGS}
        params |= {"lrs": str(list(config.lrs)), "batches": str(list(config.batches)),
                   "study": study_name(config)}
        with tracking.tracked_run(args.stage, f"{trial.backbone}-grid", config.out, tags, params):
            best = run(config, log_trial)
            tracking.log_epoch(0, {"best_val_loss": best["val_loss"], "best_lr": best["lr"],
                                   "best_batch": best["batch"]})
    if main_process:
        print(f"best of {len(config.grid())}: lr {best['lr']:g}, batch {best['batch']} "
              f"(val loss {best['val_loss']:.4f}) -> {config.out / 'best.json'}")
    return 0
