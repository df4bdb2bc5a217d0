"""The `register` stage's work: the lowest FG-NET MAE candidate becomes the registry's champion.

A candidate is a JSON summary of one FG-NET leave-one-person-out evaluation with at least
``{"mae": float, "model": "path/to/model.pt", "backbone": str, "mode": str}``. The best one is
logged as an AgeEstimator pyfunc in a run of experiment ``registry`` and registered as a new
version; the version that was champion becomes ``challenger``. Every run adds a version, so
rerunning after a change of candidates keeps the previous winner one ``agecascade promote`` away.
A winner whose identical model (same checkpoint, code and requirements) is already logged is
linked to the run instead of stored again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from agecascade import tracking
from agecascade.atomic import write_text_atomic
from agecascade.config import option
from agecascade.errors import MissingInput, UserError
from agecascade.inference.onnx import log_onnx_model
from agecascade.registry import (CHALLENGER, CHAMPION, EXPERIMENT, NAME, aliases, link_twin,
                                 register)
from agecascade.serving import log_age_estimator, model_digest

REQUIRED = {"mae": (int, float), "model": str, "backbone": str, "mode": str}


@dataclass(frozen=True)
class RegisterConfig:
    candidate: tuple[Path, ...] = option(help="FG-NET LOPO summary JSON (repeat for each "
                                              "candidate)", repeat=True)
    out: Path = option(help="report JSON, e.g. reports/registry.json")
    name: str = option(NAME, help="registered model name")
    experiment: str = option(EXPERIMENT, help="MLflow experiment of the run")
    onnx: bool = option(False, help="also log the winner as an ONNX model (mlflow.onnx: no "
                                    "pickle, no PyTorch) and register it as NAME-onnx")


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


def register_best(config: RegisterConfig) -> dict:
    """Log and crown the best candidate (ties: the first listed); the report written to
    ``config.out``."""
    candidates = [read_candidate(path) for path in config.candidate]
    best = min(candidates, key=lambda c: c["mae"])
    tags = {"backbone": best["backbone"], "mode": best["mode"], "fgnet_mae": f"{best['mae']:.4f}",
            "source_model": best["model"], "git_commit": tracking.git_commit()}
    exp = tracking.experiment_id(config.experiment)
    with mlflow.start_run(experiment_id=exp, run_name=f"{best['backbone']}-{best['mode']}") as run:
        mlflow.set_tags(tags)
        mlflow.log_metric("fgnet_mae", best["mae"])
        mlflow.log_text(pd.DataFrame(candidates).to_csv(index=False), "candidates.csv")
        checkpoint = Path(best["model"])
        model = (link_twin(run.info.run_id, model_digest(checkpoint))
                 or log_age_estimator(checkpoint))
        onnx_model = log_onnx_model(checkpoint) if config.onnx else None
    version = register(model.model_uri, config.name, tags)
    onnx = ({"name": f"{config.name}-onnx", "model_uri": onnx_model.model_uri,
             "version": register(onnx_model.model_uri, f"{config.name}-onnx", tags)}
            if onnx_model else None)
    report = {"name": config.name, "version": version, "alias": CHAMPION,
              CHALLENGER: aliases(config.name).get(CHALLENGER), "run_id": run.info.run_id,
              "model_uri": f"models:/{config.name}/{version}", "logged_model": model.model_uri,
              "logged_by_run": model.source_run_id, "onnx": onnx, "chosen": best,
              "candidates": candidates}
    config.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config.out, json.dumps(report, indent=2) + "\n")
    return report
