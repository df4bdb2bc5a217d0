"""Stage `features`: regressors on CNN features of FG-NET, per subject fold (thesis table 5).

The computation and its settings live in ``agecascade.features.protocol``; this module turns the
command line into a ``FeaturesConfig``, runs it, prints the table and logs it to MLflow
("features") unless --no-track.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from agecascade import config as cli_config
from agecascade.features.protocol import FeaturesConfig, run, table

EXPERIMENT = "features"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, FeaturesConfig)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def log_to_mlflow(results: dict, out: Path) -> None:
    """Scores as metrics ("cascade.last_conv_max.hgb.mae") and the output files as artifacts."""
    import mlflow

    for r in results["rows"]:
        key = f"{r['extractor']}.{r['feature_set']}.{r['engine']}"
        mlflow.set_tag(f"{key}.status", r["status"])
        if r["status"] == "ok":
            mlflow.log_metrics({f"{key}.mae": r["mae"], f"{key}.r2": r["r2"],
                                f"{key}.mae_fold_mean": r["mae_fold_mean"]})
    for name in ("results.json", "metrics.json", "folds.csv"):
        mlflow.log_artifact(str(out / name))
    mlflow.log_artifacts(str(out / "listings"), artifact_path="listings")


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(FeaturesConfig, args)
    results = run(config)
    print(table(results))
    if not args.no_track:  # logged once the results exist: nothing here streams per epoch
        from agecascade import tracking

        tags = {"stage": EXPERIMENT, "backbone": results["backbone"], "model": str(config.model),
                "engines": " ".join(config.engines)}
        params = {k: " ".join(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                  for k, v in asdict(config).items()}
        with tracking.tracked_run(EXPERIMENT, f"{results['backbone']}-features", config.out, tags,
                                  params):
            log_to_mlflow(results, config.out)
    return 0
