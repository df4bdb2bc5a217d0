"""Stage `report`: the thesis's tables, filled in from this run, beside their trivial baselines
and the published numbers.

What it reads and writes is ``agecascade.evaluation.summary``'s; this module turns the command
line into a ``ReportConfig``, writes the report and logs it to MLflow unless --no-track.
"""
from __future__ import annotations

import argparse
import json

from agecascade import config as cli_config
from agecascade.evaluation.summary import ReportConfig, write_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, ReportConfig)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(ReportConfig, args)
    headline = write_summary(config)
    print(f"wrote {config.out / 'summary.md'}; headline: {json.dumps(headline)}")
    if not args.no_track:
        import mlflow

        from agecascade import tracking

        with mlflow.start_run(experiment_id=tracking.experiment_id("report"), run_name="summary"):
            mlflow.set_tags({"stage": "report", "git_commit": tracking.git_commit()})
            mlflow.log_metrics({k: v for k, v in headline.items() if isinstance(v, float)})
            mlflow.log_artifact(str(config.out / "summary.md"))
            mlflow.log_artifacts(str(config.out / "figures"), "figures")
    return 0
