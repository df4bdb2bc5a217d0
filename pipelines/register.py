"""Stage `register`: the lowest FG-NET MAE candidate becomes the registry's champion.

Each ``--candidate`` is a JSON summary of one FG-NET leave-one-person-out evaluation with at
least ``{"mae": float, "model": "path/to/model.pt", "backbone": str, "mode": str}``. The best
one is logged as an AgeEstimator pyfunc in a run of experiment ``registry`` and registered as a
new version; the version that was champion becomes ``challenger``. Every run of this stage adds
a version, so re-running it after a change of candidates keeps the previous winner one
``agecascade promote`` away. A winner whose identical model (same checkpoint, code and
requirements) is already logged is linked to the run instead of stored again.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from agecascade.errors import MissingInput, UserError
from agecascade.registry import CHALLENGER, CHAMPION, EXPERIMENT, NAME, aliases, register

REQUIRED = {"mae": (int, float), "model": str, "backbone": str, "mode": str}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", type=Path, action="append", required=True,
                        help="FG-NET LOPO summary JSON (repeat for each candidate)")
    parser.add_argument("--name", default=NAME, help="registered model name")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment of the run")
    parser.add_argument("--out", type=Path, required=True, help="report JSON, e.g. "
                        "reports/registry.json")


def read_candidate(path: Path) -> dict:
    """One summary, checked: a finite MAE and an existing model file."""
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"candidate {path}: not JSON ({err})") from None
    if not isinstance(summary, dict):
        raise UserError(f"candidate {path}: expected a JSON object, found "
                         f"{type(summary).__name__}")
    for key, kind in REQUIRED.items():
        value = summary.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"candidate {path}: {key!r} must be a "
                             f"{'number' if key == 'mae' else 'string'}, found {value!r}")
    if not math.isfinite(summary["mae"]):
        raise UserError(f"candidate {path}: mae is {summary['mae']}")
    if not Path(summary["model"]).is_file():
        raise MissingInput(f"candidate {path}: model {summary['model']} does not exist")
    return {**summary, "mae": float(summary["mae"]), "candidate": str(path)}


def main(args: argparse.Namespace) -> int:
    import mlflow
    import pandas as pd

    from agecascade import tracking
    from agecascade.registry import link_twin
    from agecascade.serving import log_age_estimator, model_digest

    candidates = [read_candidate(path) for path in args.candidate]
    best = min(candidates, key=lambda c: c["mae"])  # ties: the first listed
    tags = {"backbone": best["backbone"], "mode": best["mode"], "fgnet_mae": f"{best['mae']:.4f}",
            "source_model": best["model"], "git_commit": tracking.git_commit()}
    exp = tracking.experiment_id(args.experiment)
    with mlflow.start_run(experiment_id=exp, run_name=f"{best['backbone']}-{best['mode']}") as run:
        mlflow.set_tags(tags)
        mlflow.log_metric("fgnet_mae", best["mae"])
        mlflow.log_text(pd.DataFrame(candidates).to_csv(index=False), "candidates.csv")
        checkpoint = Path(best["model"])
        model = (link_twin(run.info.run_id, model_digest(checkpoint))
                 or log_age_estimator(checkpoint))
    version = register(model.model_uri, args.name, tags)
    report = {"name": args.name, "version": version, "alias": CHAMPION,
              CHALLENGER: aliases(args.name).get(CHALLENGER), "run_id": run.info.run_id,
              "model_uri": f"models:/{args.name}/{version}", "logged_model": model.model_uri,
              "logged_by_run": model.source_run_id, "chosen": best,
              "candidates": candidates}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    previous = report[CHALLENGER]
    print(f"{args.name} v{version} ({best['backbone']}, mode {best['mode']}, FG-NET MAE "
          f"{best['mae']:.2f}) is {CHAMPION}; {CHALLENGER}: "
          f"{'none' if previous is None else f'v{previous}'}")
    return 0
