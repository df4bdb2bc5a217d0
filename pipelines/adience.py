"""Stage `adience`: the Adience 5-fold protocol (``agecascade.evaluation.adience``), logged.

The protocol and its settings live in the library; this module turns the command line into an
``AdienceConfig``, runs it, and logs to MLflow (experiment "adience": a parent run per backbone,
one nested run per fold with its curves, confusion matrix and rows) unless --no-track.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

from agecascade import config as cli_config
from agecascade.evaluation.adience import (CONFUSION, ROWS, AdienceConfig, OnEpoch,
                                           load_protocol, run)
from agecascade.train import distributed

EXPERIMENT, RUN_ID = "adience", "mlflow_run_id"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, AdienceConfig)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


class FoldRuns:
    """One nested MLflow run per fold under the active parent run (a ``FoldTracker``)."""

    def __init__(self) -> None:
        import mlflow

        self.mlflow = mlflow
        self.parent = mlflow.active_run().info

    @contextlib.contextmanager
    def fold(self, folder: Path, name: str, resume: bool = True) -> Iterator[OnEpoch]:
        """A fold's run; ``resume`` continues the one an interrupted attempt left in ``folder``
        when it is unfinished and under this parent run (a retry under another parent, with
        other settings, gets a fresh fold run)."""
        from agecascade import tracking
        from agecascade.atomic import write_text_atomic

        id_file = folder / RUN_ID
        run_id = (tracking.resumable_run(id_file, self.parent.experiment_id, {},
                                         parent=self.parent.run_id) if resume else None)
        with self.mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=True,
                                   experiment_id=None if run_id else self.parent.experiment_id) as run:
            write_text_atomic(id_file, run.info.run_id)
            yield tracking.log_epoch

    def finished(self, result: dict, folder: Path) -> None:
        self.mlflow.log_metrics({k: v for k, v in result.items()
                                 if k.endswith(("_acc", "recall", "val_group_mae")) and _finite(v)})
        for path in (folder / CONFUSION, folder / "history.csv", folder / ROWS):
            self.mlflow.log_artifact(str(path))
        result["mlflow_parent"] = self.parent.run_id

    def reused(self, result: dict, folder: Path, name: str) -> bool:
        """A fold finished under another parent run (or untracked): log it under this one."""
        if result.get("mlflow_parent") == self.parent.run_id:
            return False
        import pandas as pd

        with self.fold(folder, name, resume=False) as log_epoch:
            for epoch in pd.read_csv(folder / "history.csv").to_dict("records"):
                log_epoch(int(epoch.pop("epoch")), epoch)
            self.finished(result, folder)
        return True


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(AdienceConfig, args)
    if args.no_track or not distributed.from_env().main:  # under torchrun rank 0 alone logs
        metrics = run(config)
        if metrics is None:
            return 0
    else:
        import mlflow

        from agecascade import tracking

        p = load_protocol(config)
        backbone = str(p.init["meta"].get("backbone", p.init["meta"]["arch"]))
        tags = {"backbone": backbone, "stage": EXPERIMENT, "mode": config.mode,
                "dataset": "adience", "init": str(config.init)}
        params = {k: (str(v) if isinstance(v, (Path, tuple)) else v)
                  for k, v in vars(config).items()} | {"input_size": p.input_size}
        with tracking.tracked_run(EXPERIMENT, f"{backbone}-mode-{config.mode}", config.out, tags,
                                  params):
            metrics = run(config, p, FoldRuns())
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _finite(v)})
            for path in sorted(config.out.glob("confusion_g?.png")) + [
                    config.out / name for name in ("metrics.json", "folds.csv", "classes.csv")]:
                mlflow.log_artifact(str(path))
    print(json.dumps(metrics, indent=2))
    return 0
