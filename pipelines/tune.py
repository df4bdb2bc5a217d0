"""Stage `tune`: the thesis's lr x batch-size grid, one epoch per point, lowest val loss wins.

An Optuna GridSampler walks the grid; the study lives in SQLite (OUT/optuna.db), so an
interrupted search continues where it stopped. Each trial is a nested MLflow run. OUT/best.json
holds the winner and is what the tuned stage reads (`agecascade train --hparams`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil

from agecascade.pipelines import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train.add_arguments(parser)
    parser.set_defaults(stage="tune")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.01, 0.001, 0.0001])
    parser.add_argument("--batches", type=int, nargs="+", default=[12, 32, 48, 64])


def main(args: argparse.Namespace) -> int:
    import optuna

    args.out.mkdir(parents=True, exist_ok=True)
    space = {"lr": sorted(set(args.lrs)), "batch": sorted(set(args.batches))}
    study = optuna.create_study(
        study_name=f"{args.backbone}-{args.manifest.name}", direction="minimize",
        storage=f"sqlite:///{(args.out / 'optuna.db').resolve()}", load_if_exists=True,
        sampler=optuna.samplers.GridSampler(space, seed=args.seed))
    track = not args.no_track

    def objective(trial: "optuna.Trial") -> float:
        trial_args = copy.copy(args)
        trial_args.lr = trial.suggest_categorical("lr", space["lr"])
        trial_args.batch = trial.suggest_categorical("batch", space["batch"])
        trial_args.epochs, trial_args.hparams = 1, None
        trial_args.out = args.out / "trials" / f"{trial.number:03d}"
        summary, _ = train.run(trial_args, None)
        shutil.rmtree(trial_args.out)  # a trial's weights are not worth keeping
        loss = summary["val_loss"]
        if track:
            import mlflow

            parent = mlflow.active_run().info
            with mlflow.start_run(run_name=f"lr={trial_args.lr:g} batch={trial_args.batch}",
                                  experiment_id=parent.experiment_id, nested=True):
                mlflow.log_params({"lr": trial_args.lr, "batch": trial_args.batch})
                mlflow.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        return loss if math.isfinite(loss) else math.inf

    n_grid = len(space["lr"]) * len(space["batch"])
    remaining = n_grid - len([t for t in study.trials if t.state.is_finished()])
    if track:
        from agecascade import tracking

        tags = {"backbone": args.backbone, "stage": args.stage, "mode": args.mode,
                "dataset": args.manifest.name, "pretrained": args.pretrained}
        params = {"lrs": str(space["lr"]), "batches": str(space["batch"]),
                  "max_train_batches": args.max_train_batches, "input_size": args.input_size}
        with tracking.tracked_run(args.stage, f"{args.backbone}-grid", args.out, tags, params):
            study.optimize(objective, n_trials=max(remaining, 0))
            best = {**study.best_params, "val_loss": study.best_value}
            tracking.log_epoch(0, {"best_val_loss": best["val_loss"], "best_lr": best["lr"],
                                   "best_batch": best["batch"]})
    else:
        study.optimize(objective, n_trials=max(remaining, 0))
        best = {**study.best_params, "val_loss": study.best_value}
    shutil.rmtree(args.out / "trials", ignore_errors=True)
    (args.out / "best.json").write_text(json.dumps(best, indent=2) + "\n")
    print(f"best of {n_grid}: lr {best['lr']:g}, batch {best['batch']} "
          f"(val loss {best['val_loss']:.4f}) -> {args.out / 'best.json'}")
    return 0
