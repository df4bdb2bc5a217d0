"""Regressors on CNN features, fitted per fold behind one interface (thesis table 5).

* ``hgb``: scikit-learn's HistGradientBoostingRegressor with its defaults: the no-search baseline.
* ``flaml``: FLAML AutoML (regression, MAE), a time budget per fold, in this process. Its inner
  cross-validation is grouped by subject, so a person never sits on both sides of it either.
* ``autosklearn``: auto-sklearn 0.15, the thesis's system, in its own venv (``automl_env``),
  run out of process by ``autosklearn_worker.py``. Its settings other than time, memory and seed
  stay at their defaults, as in the thesis: so its inner holdout splits images, not subjects.
  Without that venv it is reported as "unavailable" with the reason; the other engines still run.

Every engine gets the same folds and yields one out-of-fold prediction per image, so the scores
(pooled MAE and R^2 over all images, and the MAE per fold) compare like with like.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits

from agecascade.errors import UserError
from agecascade.features import automl_env

log = logging.getLogger(__name__)

ENGINES = ("hgb", "flaml", "autosklearn")
AUTOSKLEARN_MIN_BUDGET = 30  # auto-sklearn 0.15 refuses a smaller time_left_for_this_task
# FLAML's own default list for regression, fixed so that installing catboost changes nothing.
FLAML_ESTIMATORS = ("lgbm", "rf", "xgboost", "extra_tree", "xgb_limitdepth", "sgd")
WORKER = Path(__file__).with_name("autosklearn_worker.py")


@dataclass(frozen=True)
class EngineConfig:
    budget: float = 30.0            # FLAML seconds per fold
    autosklearn_budget: int = 30    # auto-sklearn seconds per fold (time_left_for_this_task)
    per_run: int = 0                # auto-sklearn per_run_time_limit; 0: see per_run_limit
    memory_mb: int = 3072           # auto-sklearn memory_limit per model fit
    jobs: int = 1                   # auto-sklearn processes, each on a share of the folds
    threads: int = 1                # threads of the in-process engines (HGB, FLAML's learners)
    seed: int = 0
    autosklearn_env: Path = automl_env.DEFAULT_PATH

    @property
    def per_run_limit(self) -> int:
        """auto-sklearn's own default, a tenth of the budget, but at least 10 s: at the
        minimum budget of 30 s a tenth is 3 s, too little for a model fit on a busy machine,
        and a run whose every fit times out has no ensemble at all."""
        return self.per_run or max(10, self.autosklearn_budget // 10)


@dataclass
class Outcome:
    """One engine on one feature matrix (a "task"), all folds."""
    engine: str
    task: str
    status: str                                 # "ok", "unavailable" or "failed"
    reason: str = ""
    version: str = ""
    pred: np.ndarray | None = None              # (N,) out-of-fold prediction per row
    fold_seconds: dict[int, float] = field(default_factory=dict)
    fold_models: dict[int, str] = field(default_factory=dict)  # what was fitted, one line
    listing: str = ""                           # the engine's own account of its models


# --- folds and scores -----------------------------------------------------------------------

def make_folds(groups: Sequence, k: int) -> np.ndarray:
    """Fold id per row: leave one subject out (k = 0, the thesis's protocol) or GroupKFold(k)."""
    names, group_id = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if len(names) < 2:
        raise UserError(f"folds need at least 2 subjects, the data has {len(names)}")
    if k == 0:
        return group_id.astype(np.int64)
    if not 2 <= k <= len(names):
        raise UserError(f"folds must be 0 (leave one subject out) or between 2 and the number "
                         f"of subjects ({len(names)}), not {k}")
    fold = np.empty(len(group_id), dtype=np.int64)
    for index, (_, test) in enumerate(GroupKFold(n_splits=k).split(group_id, groups=group_id)):
        fold[test] = index
    return fold


def score(y: np.ndarray, pred: np.ndarray, fold: np.ndarray) -> dict:
    """Pooled MAE and R^2 over all rows, and the MAE of each fold."""
    per_fold = {int(k): float(np.abs(pred[fold == k] - y[fold == k]).mean()) for k in np.unique(fold)}
    return {"mae": float(mean_absolute_error(y, pred)), "r2": float(r2_score(y, pred)),
            "mae_fold_mean": float(np.mean(list(per_fold.values()))), "fold_mae": per_fold}


# --- in-process engines ---------------------------------------------------------------------

# (X_train, y_train, groups_train, X_test, config) -> (test predictions, one-line description)
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, EngineConfig],
                      tuple[np.ndarray, str]]


def hgb_fit_predict(X_tr, y_tr, g_tr, X_te, config: EngineConfig) -> tuple[np.ndarray, str]:
    from sklearn.ensemble import HistGradientBoostingRegressor

    model = HistGradientBoostingRegressor(random_state=config.seed).fit(X_tr, y_tr)
    return model.predict(X_te), f"HistGradientBoostingRegressor, {model.n_iter_} iterations"


def flaml_fit_predict(X_tr, y_tr, g_tr, X_te, config: EngineConfig) -> tuple[np.ndarray, str]:
    from flaml import AutoML

    automl = AutoML()
    settings = {}
    n_groups = len(np.unique(g_tr))
    if n_groups >= 2:  # for regression FLAML ignores groups unless told to split by them
        settings = {"groups": g_tr, "split_type": "group", "n_splits": min(5, n_groups)}
    automl.fit(X_tr, y_tr, task="regression", metric="mae", time_budget=config.budget,
               estimator_list=list(FLAML_ESTIMATORS), seed=config.seed, n_jobs=config.threads,
               verbose=0, **settings)
    if automl.best_estimator is None:
        raise RuntimeError(f"FLAML fitted no model within {config.budget} s; raise the budget")
    return (automl.predict(X_te),
            f"{automl.best_estimator} {json.dumps(automl.best_config, default=float)} "
            f"(inner MAE {automl.best_loss:.3f})")


def _version(engine: str) -> str | None:
    """The engine's version, or None when it cannot be imported here."""
    try:
        if engine == "hgb":
            import sklearn
            return f"scikit-learn {sklearn.__version__}"
        import flaml
        from flaml import AutoML  # noqa: F401  (flaml installs without its AutoML part)
        return f"flaml {flaml.__version__}"
    except ImportError:
        return None


IN_PROCESS: dict[str, FitPredict] = {"hgb": hgb_fit_predict, "flaml": flaml_fit_predict}


def run_in_process(engine: str, tasks: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray,
                   fold: np.ndarray, config: EngineConfig) -> list[Outcome]:
    version = _version(engine)
    if version is None:
        reason = f"{engine} cannot be imported: install flaml==2.7.0 lightgbm==4.7.0 xgboost-cpu==2.1.4"
        log.warning("%s unavailable: %s", engine, reason)
        return [Outcome(engine, task, "unavailable", reason) for task in tasks]
    fit_predict = IN_PROCESS[engine]
    outcomes = []
    # OpenMP (HGB, LightGBM) with a thread per core spins itself to a standstill on a busy
    # machine (see docs/timings.md), so the thread count is the user's choice, not OpenMP's.
    with threadpool_limits(limits=config.threads):
        for task, X in tasks.items():
            outcomes.append(_run_task(engine, fit_predict, version, task, X, y, groups, fold, config))
    return outcomes


def _run_task(engine: str, fit_predict: FitPredict, version: str, task: str, X: np.ndarray,
              y: np.ndarray, groups: np.ndarray, fold: np.ndarray, config: EngineConfig) -> Outcome:
    outcome = Outcome(engine, task, "ok", version=version, pred=np.full(len(y), np.nan))
    try:
        for k in np.unique(fold):
            test, start = fold == k, time.perf_counter()
            pred, about = fit_predict(X[~test], y[~test], groups[~test], X[test], config)
            outcome.pred[test] = pred
            outcome.fold_seconds[int(k)] = time.perf_counter() - start
            outcome.fold_models[int(k)] = about
    except Exception as err:  # recorded as a failed row; the other tasks and engines go on
        log.exception("%s on %s failed", engine, task)
        return Outcome(engine, task, "failed", f"{type(err).__name__}: {err}", version)
    outcome.listing = "\n".join(f"fold {k}: {about}" for k, about in outcome.fold_models.items())
    return outcome


# --- auto-sklearn, out of process -----------------------------------------------------------

def _worker_env() -> dict[str, str]:
    """Our PYTHONPATH must not leak into Python 3.9. Each worker is one core (n_jobs=1), so its
    BLAS/OpenMP get one thread unless the user set otherwise: more only spin against the
    other workers."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    return env


def _tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _launch_shards(python: Path, tasks: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray,
                   config: EngineConfig, workdir: Path, logdir: Path) -> tuple[list[dict], dict]:
    """Run the worker on ``config.jobs`` shards of the folds at once; (records, versions).

    Raises RuntimeError naming the log when a worker fails or overruns its time."""
    folds = [int(k) for k in np.unique(fold)]
    shards = [folds[i::config.jobs] for i in range(min(config.jobs, len(folds)))]
    running = []
    for index, shard in enumerate(shards):
        spec = {"budget": config.autosklearn_budget, "per_run": config.per_run_limit, "seed": config.seed,
                "memory_limit": config.memory_mb, "tasks": list(tasks), "folds": shard}
        inputs, outputs = workdir / f"in{index}.npz", workdir / f"out{index}.json"
        np.savez(inputs, config=np.array(json.dumps(spec)), y=y, fold=fold,
                 **{f"X{i}": X for i, X in enumerate(tasks.values())})
        logfile = logdir / f"worker{index}.log"
        with logfile.open("w") as sink:
            process = subprocess.Popen([str(python), str(WORKER), str(inputs), str(outputs)],
                                       stdout=sink, stderr=subprocess.STDOUT, env=_worker_env())
        # auto-sklearn stops at its budget; ensemble building and start-up come on top
        limit = 1.5 * config.autosklearn_budget * len(tasks) * len(shard) + 120
        running.append((process, outputs, logfile, limit))
    start, records, versions = time.monotonic(), [], {}
    try:
        for process, outputs, logfile, limit in running:
            try:
                code = process.wait(timeout=max(1.0, limit - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"auto-sklearn worker overran {limit:.0f} s; log {logfile}:\n"
                                   f"{_tail(logfile)}") from None
            if code != 0 or not outputs.exists():
                raise RuntimeError(f"auto-sklearn worker exited with {code}; log {logfile}:\n"
                                   f"{_tail(logfile)}")
            result = json.loads(outputs.read_text())
            records += result["results"]
            versions = result["versions"]
    finally:
        for process, *_ in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return records, versions


def run_autosklearn(tasks: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray,
                    config: EngineConfig, logdir: Path) -> list[Outcome]:
    python = automl_env.locate(config.autosklearn_env)
    if not isinstance(python, Path):
        log.warning("auto-sklearn unavailable: %s", python)
        return [Outcome("autosklearn", task, "unavailable", python) for task in tasks]
    logdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agecascade-autosklearn-") as workdir:
        try:
            records, versions = _launch_shards(python, tasks, y, fold, config, Path(workdir), logdir)
        except RuntimeError as err:
            log.error("%s", err)
            return [Outcome("autosklearn", task, "failed", str(err)) for task in tasks]
    version = f"auto-sklearn {versions['autosklearn']} (scikit-learn {versions['sklearn']})"
    outcomes = []
    for task in tasks:
        mine = sorted((r for r in records if r["task"] == task), key=lambda r: r["fold"])
        listing = "\n\n".join(
            f"== fold {r['fold']} ({r['seconds']:.1f} s) ==\n{r['statistics']}\nleaderboard():\n"
            f"{r['leaderboard']}\n\nensemble members:\n{r['models']}" for r in mine if "error" not in r)
        errors = [f"fold {r['fold']}: {r['error']}" for r in mine if "error" in r]
        errors += [f"fold {r['fold']}: no model fitted successfully, only auto-sklearn's dummy "
                   f"baseline (timeouts at the per-run limit of {config.per_run_limit} s, crashes "
                   "or memory: see the listing); raise --per-run or --autosklearn-budget"
                   for r in mine if "error" not in r and r["n_success"] == 0]
        if errors:
            outcomes.append(Outcome("autosklearn", task, "failed", "; ".join(errors[:3]), version,
                                    listing=listing))
            continue
        outcome = Outcome("autosklearn", task, "ok", version=version, pred=np.full(len(y), np.nan),
                          listing=listing)
        for r in mine:
            outcome.pred[r["rows"]] = r["pred"]
            outcome.fold_seconds[r["fold"]] = r["seconds"]
            outcome.fold_models[r["fold"]] = (
                f"dummy baseline only: none of {r['n_success']} fitted models beat it"
                if r["dummy_only"] else f"ensemble of {r['n_models']} of {r['n_success']} fitted models")
        outcomes.append(outcome)
    return outcomes


def run_engines(plan: dict[str, list[str]], tasks: dict[str, np.ndarray], y: np.ndarray,
                groups: np.ndarray, fold: np.ndarray, config: EngineConfig,
                logdir: Path) -> list[Outcome]:
    """Each engine of ``plan`` (engine -> task names) on its tasks, all on the same folds."""
    outcomes = []
    for engine, names in plan.items():
        chosen = {name: tasks[name] for name in names}
        if engine == "autosklearn":
            outcomes += run_autosklearn(chosen, y, fold, config, logdir / "autosklearn")
        else:
            outcomes += run_in_process(engine, chosen, y, groups, fold, config)
    for outcome in outcomes:
        if outcome.status == "ok" and np.isnan(outcome.pred).any():
            raise AssertionError(f"{outcome.engine} on {outcome.task} left rows unpredicted")
    return outcomes
