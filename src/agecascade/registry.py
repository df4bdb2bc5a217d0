"""The model registry's two aliases: ``champion`` (what serving loads) and ``challenger``.

Every registration makes the new version the champion and moves the previous champion to
``challenger``, so the last good model is one alias switch away (``promote``). Aliases, not the
deprecated stages. Load the champion with
``mlflow.pyfunc.load_model("models:/age-estimator@champion")``.
"""
from __future__ import annotations

import os

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from agecascade.tracking import DEFAULT_URI

NAME = "age-estimator"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_TYPE = "age-estimator"  # LoggedModel.model_type of AgeEstimator pyfuncs


def client() -> MlflowClient:
    """A client of MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), the registry included;
    also points MLflow's module-level API at that store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _missing(err: MlflowException) -> bool:
    return err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def aliases(name: str) -> dict[str, int]:
    """Alias -> version of registered model ``name`` (a missing alias is simply absent)."""
    found = client().get_registered_model(name).aliases
    return {alias: int(version) for alias, version in found.items()}


def crown(name: str, version: int) -> int | None:
    """Make ``version`` the champion; the previous champion becomes the challenger.

    Returns the new challenger's version (None when there was no other champion). Crowning the
    champion again changes nothing.
    """
    held = aliases(name)
    previous = held.get(CHAMPION)
    if previous == version:
        return held.get(CHALLENGER)
    mlflow_client = client()
    if previous is not None:
        mlflow_client.set_registered_model_alias(name, CHALLENGER, str(previous))
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))
    return previous


def register(model_uri: str, name: str = NAME, tags: dict[str, str] | None = None) -> int:
    """Register ``model_uri`` as a new version of ``name`` and crown it; its version number."""
    client()  # register_model uses the module-level store
    found = mlflow.register_model(model_uri, name, tags=tags)
    version = int(found.version)
    crown(name, version)
    return version


def _existing_version(mlflow_client: MlflowClient, name: str, version: int) -> int:
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if _missing(err):
            raise ValueError(f"no registered model {name!r}") from None
        raise
    try:
        return int(mlflow_client.get_model_version(name, str(version)).version)
    except MlflowException as err:
        if not _missing(err):
            raise
    known = sorted(int(v.version) for v in
                   mlflow_client.search_model_versions(f"name = '{name}'"))
    raise ValueError(f"{name!r} has no version {version}; versions: "
                     f"{', '.join(map(str, known)) or 'none'}")


def run_estimator(mlflow_client: MlflowClient, run_id: str) -> LoggedModel:
    """The one AgeEstimator pyfunc logged by run ``run_id``; ValueError if none or several."""
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as err:
        if _missing(err):
            raise ValueError(f"no MLflow run with id {run_id!r}") from None
        raise
    logged = mlflow_client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'")
    ours = [m for m in logged if m.model_type == MODEL_TYPE]
    if len(ours) != 1:
        others = ", ".join(f"{m.name} ({m.model_type or 'no type'})" for m in logged) or "nothing"
        raise ValueError(f"run {run_id} logged {len(ours)} AgeEstimator models (model_type "
                         f"{MODEL_TYPE!r}), not one; it logged: {others}")
    return ours[0]


def promote(name: str = NAME, version: int | None = None, run_id: str | None = None) -> int:
    """Crown an existing version, or the AgeEstimator logged in ``run_id`` (registered first
    unless a version of ``name`` already holds it). Returns the crowned version."""
    if (version is None) == (run_id is None):
        raise ValueError("promote needs exactly one of a version or a run id")
    mlflow_client = client()
    if version is not None:
        chosen = _existing_version(mlflow_client, name, version)
    else:
        logged = run_estimator(mlflow_client, run_id)
        held = [int(v.version) for v in mlflow_client.search_model_versions(
            f"name = '{name}' and run_id = '{run_id}'") if v.source == logged.model_uri]
        if held:
            chosen = max(held)
        else:
            chosen = int(mlflow.register_model(logged.model_uri, name).version)
    crown(name, chosen)
    return chosen
