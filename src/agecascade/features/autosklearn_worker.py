"""auto-sklearn regression on every fold of every task, in auto-sklearn's own Python 3.9 venv.

Run as ``<env python> autosklearn_worker.py IN.npz OUT.json``. It imports only numpy and
auto-sklearn (never agecascade, whose stack cannot load here), and handles all folds in one
process because importing auto-sklearn alone takes seconds.

IN.npz holds ``config`` (a JSON string: budget, per_run, seed, memory_limit, tasks, folds), the
targets ``y`` (N,), the fold id of each row ``fold`` (N,) and one feature matrix ``X<i>`` (N, D_i)
per task i. OUT.json gets, per (task, fold), the held-out rows, their predictions, the seconds
spent and auto-sklearn's own account of its search (``sprint_statistics()``) and of the ensemble
it built (``leaderboard()``, the members' configurations), which proves that it really fitted.
A fold that fails is recorded with its error and the others go on.
"""
import json
import os
import platform
import pprint
import sys
import time
import traceback


def describe(pipeline):
    """A member's configuration. auto-sklearn's dummy baseline, which the ensemble keeps when
    no real model beats it on the holdout, has a bare seed as its config and is named here."""
    config = getattr(pipeline, "config", None)
    if hasattr(config, "get_dictionary"):
        return pprint.pformat(dict(config.get_dictionary()), width=100)
    return f"{type(pipeline).__name__} (config {config!r})"


def fit_fold(X, y, train, test, config):
    """Predictions for the test rows and auto-sklearn's account of the ensemble, of one fold.

    The ensemble members are listed by their configurations (``get_models_with_weights``):
    ``show_models()`` holds component objects whose repr raises for some of them (scikit-learn
    0.24's pretty-printer asks NoPreprocessing for a random_state it does not have).
    """
    from autosklearn.regression import AutoSklearnRegressor

    model = AutoSklearnRegressor(
        time_left_for_this_task=config["budget"], per_run_time_limit=config["per_run"],
        seed=config["seed"], n_jobs=1, memory_limit=config["memory_limit"])
    model.fit(X[train], y[train])
    board = model.leaderboard(detailed=False, ensemble_only=True)
    ensemble = model.get_models_with_weights()
    members = "\n".join(f"weight {weight:.3f}: {describe(pipeline)}" for weight, pipeline in ensemble)
    return {"pred": [float(p) for p in model.predict(X[test])], "n_models": len(board),
            "n_success": sum(s == "Success" for s in model.cv_results_["status"]),
            "dummy_only": all(not hasattr(getattr(p, "config", None), "get_dictionary")
                              for _, p in ensemble),
            "leaderboard": board.to_string(), "statistics": model.sprint_statistics(),
            "models": members}


def main(argv):
    if len(argv) != 3:
        print("usage: autosklearn_worker.py IN.npz OUT.json", file=sys.stderr)
        return 2
    import numpy as np
    import autosklearn
    import sklearn

    data = np.load(argv[1], allow_pickle=False)
    config = json.loads(str(data["config"]))
    y, fold = data["y"].astype(float), data["fold"]
    results = []
    for index, task in enumerate(config["tasks"]):
        X = data[f"X{index}"]
        for k in config["folds"]:
            test = np.flatnonzero(fold == k)
            train = np.flatnonzero(fold != k)
            record = {"task": task, "fold": int(k), "rows": test.tolist()}
            start = time.perf_counter()
            try:
                record.update(fit_fold(X, y, train, test, config))
            except Exception as err:  # one failed fold must not cost the others
                record["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            record["seconds"] = time.perf_counter() - start
            print(f"{task} fold {k}: {record['seconds']:.1f} s"
                  + (f", {record['error']}" if "error" in record else ""), file=sys.stderr, flush=True)
            results.append(record)
    out = {"versions": {"autosklearn": autosklearn.__version__, "sklearn": sklearn.__version__,
                        "numpy": np.__version__, "python": platform.python_version()},
           "results": results}
    partial = argv[2] + ".part"
    with open(partial, "w") as handle:
        json.dump(out, handle)
    os.replace(partial, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
