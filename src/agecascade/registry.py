"""The model registry's two aliases: ``champion`` (what serving loads) and ``challenger``.

Every registration makes the new version the champion and moves the previous champion to
``challenger``, so the last good model is one alias switch away (``promote``). Aliases, not the
deprecated stages. Load the champion with
``mlflow.pyfunc.load_model("models:/age-estimator@champion")``.

Every version is self-contained (its checkpoint is an artifact), so it serves from any folder
that reaches the tracking store. A training run's model refers to a checkpoint that DVC keeps
(see ``serving``); promoting that run registers a self-contained copy of it.
"""
from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models.model import MODEL_CONFIG
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from agecascade.errors import UserError
from agecascade.tracking import tracking_uri

NAME = "age-estimator"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_TYPE = "age-estimator"  # LoggedModel.model_type of AgeEstimator pyfuncs
DIGEST_TAG = "agecascade_digest"  # model_digest() of an AgeEstimator: equal digests, one copy
REFERENCE = "checkpoint_reference"  # model_config key of a model that stores no checkpoint
EXPERIMENT = "registry"  # where the runs that log registered copies go


def client() -> MlflowClient:
    """A client of MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), the registry included;
    also points MLflow's module-level API at that store."""
    uri = tracking_uri()
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


def checkpoint_reference(model_uri: str) -> dict | None:
    """The checkpoint reference (``serving.CheckpointRef`` as a dict) that the AgeEstimator at
    ``model_uri`` loads its weights from; None when it carries them itself."""
    flavor = mlflow.models.get_model_info(model_uri).flavors.get(mlflow.pyfunc.FLAVOR_NAME, {})
    return (flavor.get(MODEL_CONFIG) or {}).get(REFERENCE)


def register(model_uri: str, name: str = NAME, tags: dict[str, str] | None = None) -> int:
    """Register ``model_uri`` as a new version of ``name`` and crown it; its version number.
    A model that refers to a checkpoint in a checkout is refused: a version must serve from
    wherever the tracking store is reachable."""
    client()  # register_model uses the module-level store
    if checkpoint_reference(model_uri) is not None:
        raise UserError(f"{model_uri} refers to a checkpoint in the checkout instead of carrying "
                        "it, so it cannot be a registered version; `agecascade promote --run-id` "
                        "registers a self-contained copy of a run's model")
    found = mlflow.register_model(model_uri, name, tags=tags)
    version = int(found.version)
    crown(name, version)
    return version


def _existing_version(mlflow_client: MlflowClient, name: str, version: int) -> int:
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if _missing(err):
            raise UserError(f"no registered model {name!r}") from None
        raise
    try:
        return int(mlflow_client.get_model_version(name, str(version)).version)
    except MlflowException as err:
        if not _missing(err):
            raise
    known = sorted(int(v.version) for v in
                   mlflow_client.search_model_versions(f"name = '{name}'"))
    raise UserError(f"{name!r} has no version {version}; versions: "
                     f"{', '.join(map(str, known)) or 'none'}")


def run_estimator(mlflow_client: MlflowClient, run_id: str) -> LoggedModel:
    """The one AgeEstimator pyfunc among run ``run_id``'s output models (logged by it, or an
    identical one linked to it by :func:`link_twin`); UserError if none or several."""
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as err:
        if _missing(err):
            raise UserError(f"no MLflow run with id {run_id!r}") from None
        raise
    outputs = run.outputs.model_outputs if run.outputs else []
    logged = [mlflow_client.get_logged_model(output.model_id) for output in outputs]
    ours = [m for m in logged if m.model_type == MODEL_TYPE]
    if len(ours) != 1:
        others = ", ".join(f"{m.name} ({m.model_type or 'no type'})" for m in logged) or "nothing"
        raise UserError(f"run {run_id} logged {len(ours)} AgeEstimator models (model_type "
                         f"{MODEL_TYPE!r}), not one; it logged: {others}")
    return ours[0]


def find_twin(digest: str) -> LoggedModel | None:
    """A finished, self-contained AgeEstimator already logged with ``digest`` (see
    ``serving.model_digest``); None when there is none."""
    mlflow_client = client()
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    twins = [m for m in mlflow_client.search_logged_models(
        experiment_ids=experiments,
        filter_string=f"model_type = '{MODEL_TYPE}' AND tags.{DIGEST_TAG} = '{digest}'")
        if m.status == LoggedModelStatus.READY]  # not one whose upload was cut short
    return twins[0] if twins else None


def link_twin(run_id: str, digest: str) -> LoggedModel | None:
    """:func:`find_twin`, now also an output of run ``run_id``. Registering it stores no second
    copy of a checkpoint that an earlier run logged."""
    twin = find_twin(digest)
    if twin is not None:
        client().log_outputs(run_id, [LoggedModelOutput(twin.model_id, step=0)])
    return twin


def self_contained_copy(logged: LoggedModel, reference: dict, run_id: str,
                        experiment: str = EXPERIMENT) -> LoggedModel:
    """A self-contained AgeEstimator with the weights by-reference model ``logged`` (of run
    ``run_id``) points at, resolved from the working directory as its loader does: an identical
    one already stored, else a copy logged by a new run of ``experiment``.

    A new run rather than the training run: the training run stays as training left it (its
    one model, its end time), and the copy is logged like the ``register`` stage's champion,
    by a registry run whose tags name the run and model it was copied from.
    """
    from pathlib import Path

    from agecascade import tracking
    from agecascade.serving import (CheckpointRef, log_age_estimator, model_digest,
                                    resolve_checkpoint)

    ref = CheckpointRef(**reference)
    found = resolve_checkpoint(ref, Path.cwd())
    twin = find_twin(model_digest(found))
    if twin is not None:
        return twin
    tags = {"source_run_id": run_id, "source_model_id": logged.model_id, "source_model": ref.path,
            "checkpoint_md5": ref.md5, "git_commit": tracking.git_commit()}
    with mlflow.start_run(experiment_id=tracking.experiment_id(experiment),
                          run_name=f"promote-{run_id[:8]}"):
        mlflow.set_tags(tags)
        return log_age_estimator(found)


def promote(name: str = NAME, version: int | None = None, run_id: str | None = None,
            experiment: str = EXPERIMENT) -> int:
    """Crown an existing version, or the AgeEstimator logged in ``run_id`` (registered first
    unless a version of ``name`` already holds it; a self-contained copy, logged in
    ``experiment``, when the run's model refers to its checkpoint). Returns the crowned
    version."""
    if (version is None) == (run_id is None):
        raise UserError("promote needs exactly one of a version or a run id")
    mlflow_client = client()
    if version is not None:
        chosen = _existing_version(mlflow_client, name, version)
    else:
        logged = run_estimator(mlflow_client, run_id)
        reference = checkpoint_reference(logged.model_uri)
        if reference is not None:
            logged = self_contained_copy(logged, reference, run_id, experiment)
        held = [int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'")
                if v.source == logged.model_uri]
        if held:
            chosen = max(held)
        else:
            chosen = int(mlflow.register_model(logged.model_uri, name).version)
    crown(name, chosen)
    return chosen
