"""MLflow as a thin layer around training: the trainer only ever sees an ``on_epoch`` callback.

Backend: ``sqlite:///mlflow.db`` (MLflow 3 refuses a bare ./mlruns file store) with artifacts in
``mlruns/``. Open the UI with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000``.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACTS = Path("mlruns")
RUN_ID_FILE = "mlflow_run_id"


def git_commit() -> str:
    """HEAD's hash, with '-dirty' when the working tree differs: a run must name its code."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def experiment_id(name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    ARTIFACTS.mkdir(exist_ok=True)
    return mlflow.create_experiment(name, artifact_location=ARTIFACTS.resolve().as_uri())


@contextmanager
def tracked_run(experiment: str, run_name: str, out: Path, tags: dict[str, str],
                params: dict) -> Iterator[object]:
    """Start a run, or resume the one an interrupted attempt left its id for in ``out``, so a
    resumed training continues the same curves instead of starting a second, partial run."""
    import mlflow

    exp = experiment_id(experiment)
    run_id_path = out / RUN_ID_FILE
    resume = run_id_path.read_text().strip() if run_id_path.exists() else None
    with mlflow.start_run(run_id=resume, experiment_id=None if resume else exp,
                          run_name=None if resume else run_name) as run:
        out.mkdir(parents=True, exist_ok=True)
        run_id_path.write_text(run.info.run_id)
        mlflow.set_tags({**tags, "git_commit": git_commit()})
        if not resume:
            mlflow.log_params(params)
        yield run
    run_id_path.unlink(missing_ok=True)


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=epoch)


def log_child_run(name: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
                  artifacts: tuple[Path, ...] = ()) -> None:
    """One nested run under the active run: a fold of a protocol, say."""
    import mlflow

    parent = mlflow.active_run()  # a nested run would otherwise land in the default experiment
    with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id):
        mlflow.set_tags(tags or {})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path))


def log_final(summary: dict[str, float], out: Path, model, input_size: int) -> None:
    """Final scores, the files DVC also tracks, and the model itself."""
    log_summary({f"final_{k}": v for k, v in summary.items()}, out, ("metrics.json", "history.csv"))
    log_model(model, input_size)


def log_summary(summary: dict, out: Path, files: tuple[str, ...]) -> None:
    """The numbers of a summary as metrics (text values as tags) and the named files of ``out``."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
    mlflow.set_tags({k: v for k, v in summary.items() if isinstance(v, str)})
    for name in files:
        mlflow.log_artifact(str(out / name))


def log_model(model, input_size: int, name: str = "model") -> None:
    """The final model with explicit requirements. It is pickled (MLflow 3 defaults to a pt2
    export), so the agecascade code travels with it (``code_paths``)."""
    import mlflow
    import numpy
    import torch
    import torchvision

    import agecascade

    example = numpy.zeros((1, 3, input_size, input_size), dtype=numpy.float32)
    mlflow.pytorch.log_model(
        model.cpu().eval(), name=name, serialization_format="pickle", input_example=example,
        code_paths=[str(Path(agecascade.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={torchvision.__version__.split('+')[0]}",
                          f"numpy=={numpy.__version__}"])
