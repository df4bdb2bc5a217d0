"""Stage `features`: regressors on CNN features of FG-NET, per subject fold (thesis table 5).

Features come from two extractors of one backbone: ``cascade``, the model fine-tuned IMDB ->
AgeDB (``--model``), and ``base``, the weights that cascade started from (the thesis's
"VGG-16-Faces2"; in the demo a random init rebuilt from the training seed). Each gives three
feature sets (``agecascade.features.extract``), and each engine (``agecascade.features.engines``)
is fitted on the ones the plan names, on the same folds.

Writes into OUT: results.json (every row: extractor x feature set x engine -> MAE, R^2, status),
metrics.json (the scores alone, for `dvc metrics`), folds.csv (MAE per fold) and
listings/<engine>/<extractor>.<set>.txt (what each engine fitted: auto-sklearn's leaderboard and
ensemble per fold, FLAML's best model per fold). Tracked in MLflow ("features") unless --no-track.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from agecascade.data.store import load_prepared
from agecascade.features import automl_env
from agecascade.features.engines import (AUTOSKLEARN_MIN_BUDGET, ENGINES, EngineConfig, Outcome,
                                         make_folds, run_engines, score)
from agecascade.features.extract import FEATURE_SETS, extract_features
from agecascade.nets import PRETRAINED, create_model
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.train.data import IMAGENET, split_groups
from agecascade.train.engine import pick_device

EXTRACTORS = ("base", "cascade")
EXPERIMENT = "features"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="prepared FG-NET folder")
    parser.add_argument("--model", type=Path, required=True,
                        help="the cascade checkpoint (e.g. models/vgg16/agedb/model.pt)")
    parser.add_argument("--base-backbone", default="",
                        help="backbone of the starting weights (default: the checkpoint's)")
    parser.add_argument("--base-pretrained", choices=PRETRAINED, default="none",
                        help="starting weights; 'none' rebuilds the random init from --seed")
    parser.add_argument("--base-weights", default="", help="weights file for vggface2")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), metavar="ENGINE[=SETS]",
                        help=f"engines of {ENGINES}, each on all feature sets of both extractors "
                             f"or on the comma-separated ones named: a set of {FEATURE_SETS} "
                             f"(both extractors) or EXTRACTOR.SET with EXTRACTOR in {EXTRACTORS}; "
                             "e.g. hgb flaml=last_conv_max autosklearn=cascade.last_conv_max")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="AutoML seconds per fold (FLAML, and auto-sklearn by default)")
    parser.add_argument("--autosklearn-budget", type=int, default=0,
                        help=f"auto-sklearn seconds per fold (default --budget; at least "
                             f"{AUTOSKLEARN_MIN_BUDGET})")
    parser.add_argument("--per-run", type=int, default=0,
                        help="auto-sklearn seconds per model fit (0: max(10, budget / 10))")
    parser.add_argument("--memory-mb", type=int, default=3072, help="auto-sklearn memory per fit")
    parser.add_argument("--jobs", type=int, default=1,
                        help="auto-sklearn processes, folds shared among them (one core each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of HGB and of FLAML's learners; more than the free cores "
                             "make OpenMP spin (40 s instead of 0.5 s per fit on a busy machine)")
    parser.add_argument("--autosklearn-env", type=Path, default=automl_env.DEFAULT_PATH,
                        help="the venv of `agecascade automl-env`")
    parser.add_argument("--folds", type=int, default=0,
                        help="0: leave one subject out (thesis); k: GroupKFold(k) by subject")
    parser.add_argument("--seed", type=int, default=0,
                        help="regressors' seed and the base random init's (use train.seed)")
    parser.add_argument("--input-size", type=int, default=0, help="0: the checkpoint's")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def parse_plan(items: list[str]) -> dict[str, list[str]]:
    """``["hgb", "flaml=last_conv_max"]`` -> {engine: ["base.last_conv_max", ...]}."""
    every = [f"{ex}.{name}" for ex in EXTRACTORS for name in FEATURE_SETS]
    plan: dict[str, list[str]] = {}
    for item in items:
        engine, _, chosen = item.partition("=")
        if engine not in ENGINES:
            raise ValueError(f"--engines {item!r}: unknown engine {engine!r}; use {ENGINES}")
        if engine in plan:
            raise ValueError(f"--engines names {engine!r} twice")
        tasks: list[str] = []
        for name in chosen.split(",") if chosen else every:
            expanded = [f"{ex}.{name}" for ex in EXTRACTORS] if name in FEATURE_SETS else [name]
            for task in expanded:
                if task not in every:
                    raise ValueError(f"--engines {item!r}: unknown feature set {name!r}; use one "
                                     f"of {FEATURE_SETS}, optionally as EXTRACTOR.SET with "
                                     f"EXTRACTOR in {EXTRACTORS}")
                if task not in tasks:
                    tasks.append(task)
        plan[engine] = tasks
    return plan


def engine_config(args: argparse.Namespace, plan: dict[str, list[str]]) -> EngineConfig:
    askl_budget = args.autosklearn_budget or int(round(args.budget))
    if "autosklearn" in plan and askl_budget < AUTOSKLEARN_MIN_BUDGET:
        raise ValueError(f"auto-sklearn needs at least {AUTOSKLEARN_MIN_BUDGET} s per fold, not "
                         f"{askl_budget}: set --autosklearn-budget (or --budget)")
    if args.budget <= 0 or args.jobs < 1 or args.threads < 1:
        raise ValueError(f"--budget must be > 0, --jobs and --threads >= 1 (got {args.budget}, "
                         f"{args.jobs}, {args.threads})")
    return EngineConfig(budget=args.budget, autosklearn_budget=askl_budget, per_run=args.per_run,
                        memory_mb=args.memory_mb, jobs=args.jobs, threads=args.threads,
                        seed=args.seed, autosklearn_env=args.autosklearn_env)


def extractors(args: argparse.Namespace, device: torch.device,
               names: set[str]) -> tuple[dict, dict]:
    """({name: (model, pixel spec)} for the extractors in ``names``, the checkpoint's meta)."""
    cascade, meta = load_checkpoint(args.model, device)
    nets = {"cascade": (cascade, input_spec(meta))} if "cascade" in names else {}
    if "base" in names:
        backbone = args.base_backbone or meta["backbone"]
        torch.manual_seed(args.seed)  # as the first training stage did before building its network
        base = create_model(backbone, len(meta["ages"]), args.base_pretrained,
                            Path(args.base_weights) if args.base_weights else None)
        if base.arch != cascade.arch:
            raise ValueError(f"--base-backbone {backbone} with {args.base_pretrained} weights "
                             f"builds {base.arch}, but {args.model} is a {cascade.arch}: the "
                             "starting weights must be of the cascade's own architecture")
        nets["base"] = (base, base.load_report.input_spec if base.load_report else IMAGENET)
    return nets, meta


def run(args: argparse.Namespace) -> dict:
    """Extract, fit every engine of the plan per fold, write the outputs; return results.json."""
    plan = parse_plan(args.engines)
    config = engine_config(args, plan)
    manifest, crops = load_prepared(args.manifest)
    y = manifest["age"].to_numpy(dtype=float, na_value=np.nan)
    if np.isnan(y).any():
        raise ValueError(f"{args.manifest}: {int(np.isnan(y).sum())} rows have no age; "
                         "regression needs one on every row")
    groups = split_groups(manifest).to_numpy(dtype=str)
    fold = make_folds(groups, args.folds)
    device = pick_device(args.device)
    wanted = {task for names in plan.values() for task in names}  # "extractor.set"
    nets, meta = extractors(args, device, {task.split(".")[0] for task in wanted})
    size = args.input_size or int(meta["input_size"])
    tasks: dict[str, np.ndarray] = {}
    for extractor, (model, spec) in nets.items():
        sets = [name for name in FEATURE_SETS if f"{extractor}.{name}" in wanted]
        found = extract_features(model, crops, np.arange(len(y)), size, spec, device, sets,
                                 args.batch)
        tasks |= {f"{extractor}.{name}": values for name, values in found.items()}
    print("features: " + ", ".join(f"{t} {x.shape[1]}" for t, x in tasks.items()))
    listings = args.out / "listings"
    shutil.rmtree(listings, ignore_errors=True)  # no stale listing of an earlier plan
    listings.mkdir(parents=True)
    outcomes = run_engines(plan, tasks, y, groups, fold, config, listings)
    results = {
        "backbone": meta["backbone"], "arch": meta["arch"], "model": str(args.model),
        "manifest": str(args.manifest), "n_images": len(y), "n_subjects": len(np.unique(groups)),
        "folds": {"scheme": "leave-one-subject-out" if args.folds == 0 else f"GroupKFold({args.folds})",
                  "n_folds": len(np.unique(fold))},
        "input_size": size,
        "base": {"backbone": args.base_backbone or meta["backbone"], "pretrained": args.base_pretrained,
                 "weights": args.base_weights, "seed": args.seed},
        "engine_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
                         | {"per_run_limit": config.per_run_limit},
        "feature_dims": {task: int(x.shape[1]) for task, x in tasks.items()},
        "rows": [result_row(o, y, fold) for o in outcomes],
    }
    write_outputs(args.out, results, outcomes, y, fold)
    return results


def result_row(outcome: Outcome, y: np.ndarray, fold: np.ndarray) -> dict:
    extractor, feature_set = outcome.task.split(".")
    row = {"extractor": extractor, "feature_set": feature_set, "engine": outcome.engine,
           "status": outcome.status, "reason": outcome.reason, "version": outcome.version,
           "mae": None, "r2": None, "mae_fold_mean": None,
           "seconds": round(sum(outcome.fold_seconds.values()), 2)}
    if outcome.status == "ok":
        scores = score(y, outcome.pred, fold)
        row |= {k: round(scores[k], 4) for k in ("mae", "r2", "mae_fold_mean")}
    return row


def write_outputs(out: Path, results: dict, outcomes: list[Outcome], y: np.ndarray,
                  fold: np.ndarray) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    metrics = {}  # {task: {engine: {mae, r2}}}, scored rows only
    for row in results["rows"]:
        if row["status"] == "ok":
            task = metrics.setdefault(f"{row['extractor']}.{row['feature_set']}", {})
            task[row["engine"]] = {"mae": row["mae"], "r2": row["r2"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "folds.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["extractor", "feature_set", "engine", "fold", "n_test", "mae", "seconds", "model"])
        for o in outcomes:
            if o.status != "ok":
                continue
            for k, mae in score(y, o.pred, fold)["fold_mae"].items():
                writer.writerow([*o.task.split("."), o.engine, k, int((fold == k).sum()),
                                 round(mae, 4), round(o.fold_seconds[k], 2), o.fold_models[k]])
    for o in outcomes:
        folder = out / "listings" / o.engine
        folder.mkdir(parents=True, exist_ok=True)
        head = f"{o.engine} on {o.task}: {o.status}" + (f" ({o.version})" if o.version else "")
        body = o.listing if o.status == "ok" else "\n\n".join(filter(None, (o.reason, o.listing)))
        (folder / f"{o.task}.txt").write_text(f"{head}\n\n{body}\n")


def print_table(results: dict) -> None:
    print(f"{'extractor':<9} {'feature set':<15} {'engine':<12} {'status':<12} {'MAE':>7} "
          f"{'R^2':>7} {'s':>7}")
    for r in results["rows"]:
        mae = f"{r['mae']:7.2f}" if r["mae"] is not None else f"{'-':>7}"
        r2 = f"{r['r2']:7.2f}" if r["r2"] is not None else f"{'-':>7}"
        print(f"{r['extractor']:<9} {r['feature_set']:<15} {r['engine']:<12} {r['status']:<12} "
              f"{mae} {r2} {r['seconds']:7.1f}")
    for r in results["rows"]:
        if r["status"] != "ok":
            print(f"{r['engine']} on {r['extractor']}.{r['feature_set']}: {r['status']}: {r['reason']}")


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
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    print_table(results)
    if not args.no_track:  # logged once the results exist: nothing here streams per epoch
        from agecascade import tracking

        tags = {"stage": EXPERIMENT, "backbone": results["backbone"], "model": str(args.model),
                "engines": " ".join(args.engines)}
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("run", "command", "no_track")}
        with tracking.tracked_run(EXPERIMENT, f"{results['backbone']}-features", args.out, tags,
                                  params):
            log_to_mlflow(results, args.out)
    return 0
