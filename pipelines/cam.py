"""Stage `cam`: Grad-CAM maps of one backbone before and after each fine-tuning step (figure 14).

The computation and its settings live in ``agecascade.explain.figure``; this module turns the
command line into a ``CamConfig``, draws the figure and logs it, with the chosen faces,
predictions and layers, to MLflow (experiment "cam", one run per backbone) unless --no-track.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from agecascade import config as cli_config
from agecascade.explain.figure import CamConfig, run

EXPERIMENT = "cam"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli_config.add_arguments(parser, CamConfig)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def main(args: argparse.Namespace) -> int:
    config = cli_config.from_args(CamConfig, args)
    shown = run(config)
    if not args.no_track:  # logged once the figure exists: a failed attempt leaves no run behind
        import mlflow

        from agecascade import tracking

        tags = {"backbone": config.backbone, "stage": EXPERIMENT, "dataset": shown["dataset"],
                "pretrained": config.pretrained}
        params = {"manifest": str(config.manifest), "images": config.images,
                  "models": ";".join(config.model), "backbone": config.backbone,
                  "seed": config.seed, "min_map_side": config.min_map_side,
                  "input_size": shown["input_size"],  # as resolved from the checkpoints
                  "cam_layer": ",".join(sorted({c["layer"] for c in shown["columns"]}))}
        # A figure is made in one go: nothing to resume, so the run-id file goes to scratch.
        with tempfile.TemporaryDirectory() as scratch, \
                tracking.tracked_run(EXPERIMENT, f"{config.backbone}-{shown['dataset']}",
                                     Path(scratch), tags, params):
            mlflow.log_artifact(str(config.out))
            mlflow.log_dict(shown, "cam.json")
    print(json.dumps({"out": str(config.out), "layers": [c["layer"] for c in shown["columns"]]}))
    return 0
