"""Thesis table 5 in one call: regressors on CNN features of FG-NET, per subject fold.

Features come from two extractors of one backbone: ``cascade``, the model fine-tuned IMDB ->
AgeDB, and ``base``, the weights that cascade started from (the thesis's "VGG-16-Faces2"; in the
demo a random init rebuilt from the training seed). Comparing the two separates what fine-tuning
added from what the architecture gives for free. Each extractor gives three feature sets
(``extract``), and each engine (``engines``) is fitted on the ones the plan names, on the same
folds, so every row of the table compares like with like.

``run`` writes into ``config.out``: results.json (every row: extractor x feature set x engine ->
MAE, R^2, status), metrics.json (the scores alone, for `dvc metrics`), folds.csv (MAE per fold)
and listings/<engine>/<extractor>.<set>.txt (what each engine fitted). It logs nothing: the
stage module decides where results go.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from agecascade.atomic import to_csv_atomic, write_text_atomic
from agecascade.config import device_option, option
from agecascade.data.store import load_prepared
from agecascade.errors import UserError
from agecascade.features import automl_env
from agecascade.features.engines import (AUTOSKLEARN_MIN_BUDGET, ENGINES, EngineConfig, Outcome,
                                         make_folds, run_engines, score)
from agecascade.features.extract import FEATURE_SETS, extract_features
from agecascade.nets import PRETRAINED, create_model
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.train.data import IMAGENET, split_groups
from agecascade.train.engine import pick_device

EXTRACTORS = ("base", "cascade")
FOLD_COLUMNS = ["extractor", "feature_set", "engine", "fold", "n_test", "mae", "seconds", "model"]


def parse_plan(items: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``["hgb", "flaml=last_conv_max"]`` -> {engine: ["base.last_conv_max", ...]}."""
    every = [f"{ex}.{name}" for ex in EXTRACTORS for name in FEATURE_SETS]
    plan: dict[str, list[str]] = {}
    for item in items:
        engine, _, chosen = item.partition("=")
        if engine not in ENGINES:
            raise UserError(f"--engines {item!r}: unknown engine {engine!r}; use {ENGINES}")
        if engine in plan:
            raise UserError(f"--engines names {engine!r} twice")
        tasks: list[str] = []
        for name in chosen.split(",") if chosen else every:
            expanded = [f"{ex}.{name}" for ex in EXTRACTORS] if name in FEATURE_SETS else [name]
            for task in expanded:
                if task not in every:
                    raise UserError(f"--engines {item!r}: unknown feature set {name!r}; use one "
                                    f"of {FEATURE_SETS}, optionally as EXTRACTOR.SET with "
                                    f"EXTRACTOR in {EXTRACTORS}")
                if task not in tasks:
                    tasks.append(task)
        plan[engine] = tasks
    return plan


@dataclass(frozen=True, kw_only=True)
class FeaturesConfig:
    """Every setting of the `features` stage and its default; the command line is built
    from it, so a default lives here only."""
    manifest: Path = option(help="prepared FG-NET folder")
    model: Path = option(help="the cascade checkpoint (e.g. models/vgg16/agedb/model.pt)")
    base_backbone: str = option("", help="backbone of the starting weights (default: the "
                                          "checkpoint's)")
    base_pretrained: str = option("none", choices=PRETRAINED,
                                  help="starting weights; 'none' rebuilds the random init from "
                                       "--seed")
    base_weights: str = option("", help="weights file for vggface2")
    engines: tuple[str, ...] = option(
        ENGINES, metavar="ENGINE[=SETS]",
        help=f"engines of {ENGINES}, each on all feature sets of both extractors or on the "
             f"comma-separated ones named: a set of {FEATURE_SETS} (both extractors) or "
             f"EXTRACTOR.SET with EXTRACTOR in {EXTRACTORS}; e.g. hgb flaml=last_conv_max "
             "autosklearn=cascade.last_conv_max")
    budget: float = option(30.0, help="AutoML seconds per fold (FLAML, and auto-sklearn by "
                                      "default)")
    autosklearn_budget: int = option(0, help=f"auto-sklearn seconds per fold (default --budget; "
                                             f"at least {AUTOSKLEARN_MIN_BUDGET})")
    per_run: int = option(0, help="auto-sklearn seconds per model fit (0: max(10, budget / 10))")
    memory_mb: int = option(3072, help="auto-sklearn memory per fit")
    jobs: int = option(1, help="auto-sklearn processes, folds shared among them (one core each)")
    threads: int = option(1, help="threads of HGB and of FLAML's learners; more than the free "
                                  "cores make OpenMP's waiting threads spin and slow every fit")
    autosklearn_env: Path = option(automl_env.DEFAULT_PATH,
                                   help="the venv of `agecascade automl-env`")
    folds: int = option(0, help="0: leave one subject out (thesis); k: GroupKFold(k) by subject")
    seed: int = option(0, help="regressors' seed and the base random init's (use train.seed)")
    input_size: int = option(0, help="0: the checkpoint's")
    batch: int = option(64, help="images per forward pass of the extractors")
    device: str = device_option()
    out: Path = option(help="folder of results.json, metrics.json, folds.csv and listings/")

    def __post_init__(self) -> None:
        self.engine_config()  # checks the plan and budgets: a bad value fails before any work
        if self.base_pretrained not in PRETRAINED:
            raise UserError(f"--base-pretrained {self.base_pretrained!r}: use one of {PRETRAINED}")
        if self.folds < 0 or self.folds == 1:
            raise UserError(f"--folds {self.folds}: 0 (leave one subject out) or at least 2")
        if self.input_size < 0 or self.batch < 1 or self.per_run < 0 or self.memory_mb < 1:
            raise UserError(f"--input-size must be >= 0, --batch and --memory-mb >= 1, --per-run "
                            f">= 0 (got {self.input_size}, {self.batch}, {self.memory_mb}, "
                            f"{self.per_run})")

    @property
    def plan(self) -> dict[str, list[str]]:
        """{engine: ["extractor.set", ...]} as ``engines`` names them."""
        return parse_plan(self.engines)

    def engine_config(self) -> EngineConfig:
        askl_budget = self.autosklearn_budget or int(round(self.budget))
        if "autosklearn" in self.plan and askl_budget < AUTOSKLEARN_MIN_BUDGET:
            raise UserError(f"auto-sklearn needs at least {AUTOSKLEARN_MIN_BUDGET} s per fold, "
                            f"not {askl_budget}: set --autosklearn-budget (or --budget)")
        if self.budget <= 0 or self.jobs < 1 or self.threads < 1:
            raise UserError(f"--budget must be > 0, --jobs and --threads >= 1 (got {self.budget}, "
                            f"{self.jobs}, {self.threads})")
        return EngineConfig(budget=self.budget, autosklearn_budget=askl_budget,
                            per_run=self.per_run, memory_mb=self.memory_mb, jobs=self.jobs,
                            threads=self.threads, seed=self.seed,
                            autosklearn_env=self.autosklearn_env)


def extractors(config: FeaturesConfig, device: torch.device,
               names: set[str]) -> tuple[dict, dict]:
    """({name: (model, pixel spec)} for the extractors in ``names``, the checkpoint's meta)."""
    cascade, meta = load_checkpoint(config.model, device)
    nets = {"cascade": (cascade, input_spec(meta))} if "cascade" in names else {}
    if "base" in names:
        backbone = config.base_backbone or meta["backbone"]
        torch.manual_seed(config.seed)  # as the first training stage did before building its net
        base = create_model(backbone, len(meta["ages"]), config.base_pretrained,
                            Path(config.base_weights) if config.base_weights else None)
        if base.arch != cascade.arch:
            raise UserError(f"--base-backbone {backbone} with {config.base_pretrained} weights "
                            f"builds {base.arch}, but {config.model} is a {cascade.arch}: the "
                            "starting weights must be of the cascade's own architecture")
        nets["base"] = (base, base.load_report.input_spec if base.load_report else IMAGENET)
    return nets, meta


def run(config: FeaturesConfig) -> dict:
    """Extract, fit every engine of the plan per fold, write the outputs; return results.json."""
    plan, engine_config = config.plan, config.engine_config()
    manifest, crops = load_prepared(config.manifest)
    y = manifest["age"].to_numpy(dtype=float, na_value=np.nan)
    if np.isnan(y).any():
        raise UserError(f"{config.manifest}: {int(np.isnan(y).sum())} rows have no age; "
                        "regression needs one on every row")
    groups = split_groups(manifest).to_numpy(dtype=str)
    fold = make_folds(groups, config.folds)
    device = pick_device(config.device)
    wanted = {task for names in plan.values() for task in names}  # "extractor.set"
    nets, meta = extractors(config, device, {task.split(".")[0] for task in wanted})
    size = config.input_size or int(meta["input_size"])
    tasks: dict[str, np.ndarray] = {}
    for extractor, (model, spec) in nets.items():
        sets = [name for name in FEATURE_SETS if f"{extractor}.{name}" in wanted]
        found = extract_features(model, crops, np.arange(len(y)), size, spec, device, sets,
                                 config.batch)
        tasks |= {f"{extractor}.{name}": values for name, values in found.items()}
    print("features: " + ", ".join(f"{t} {x.shape[1]}" for t, x in tasks.items()))
    listings = config.out / "listings"
    shutil.rmtree(listings, ignore_errors=True)  # no stale listing of an earlier plan
    listings.mkdir(parents=True)
    outcomes = run_engines(plan, tasks, y, groups, fold, engine_config, listings)
    scheme = "leave-one-subject-out" if config.folds == 0 else f"GroupKFold({config.folds})"
    results = {
        "backbone": meta["backbone"], "arch": meta["arch"], "model": str(config.model),
        "manifest": str(config.manifest), "n_images": len(y),
        "n_subjects": len(np.unique(groups)),
        "folds": {"scheme": scheme, "n_folds": len(np.unique(fold))},
        "input_size": size,
        "base": {"backbone": config.base_backbone or meta["backbone"],
                 "pretrained": config.base_pretrained, "weights": config.base_weights,
                 "seed": config.seed},
        "engine_config": {k: str(v) if isinstance(v, Path) else v
                          for k, v in asdict(engine_config).items()}
                         | {"per_run_limit": engine_config.per_run_limit},
        "feature_dims": {task: int(x.shape[1]) for task, x in tasks.items()},
        "rows": [result_row(o, y, fold) for o in outcomes],
    }
    write_outputs(config.out, results, outcomes, y, fold)
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
    """Listings first, the files DVC and a reader take as the result last, each atomically: a
    killed run leaves either the old results or the new ones, never a half-written file."""
    for o in outcomes:
        folder = out / "listings" / o.engine
        folder.mkdir(parents=True, exist_ok=True)
        head = f"{o.engine} on {o.task}: {o.status}" + (f" ({o.version})" if o.version else "")
        body = o.listing if o.status == "ok" else "\n\n".join(filter(None, (o.reason, o.listing)))
        (folder / f"{o.task}.txt").write_text(f"{head}\n\n{body}\n")
    per_fold = [[*o.task.split("."), o.engine, k, int((fold == k).sum()), round(mae, 4),
                 round(o.fold_seconds[k], 2), o.fold_models[k]]
                for o in outcomes if o.status == "ok"
                for k, mae in score(y, o.pred, fold)["fold_mae"].items()]
    to_csv_atomic(pd.DataFrame(per_fold, columns=FOLD_COLUMNS), out / "folds.csv")
    metrics: dict[str, dict] = {}  # {task: {engine: {mae, r2}}}, scored rows only
    for row in results["rows"]:
        if row["status"] == "ok":
            task = metrics.setdefault(f"{row['extractor']}.{row['feature_set']}", {})
            task[row["engine"]] = {"mae": row["mae"], "r2": row["r2"]}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    """The rows as a fixed-width table, then the reason of every row that was not scored."""
    lines = [f"{'extractor':<9} {'feature set':<15} {'engine':<12} {'status':<12} {'MAE':>7} "
             f"{'R^2':>7} {'s':>7}"]
    for r in results["rows"]:
        mae = f"{r['mae']:7.2f}" if r["mae"] is not None else f"{'-':>7}"
        r2 = f"{r['r2']:7.2f}" if r["r2"] is not None else f"{'-':>7}"
        lines.append(f"{r['extractor']:<9} {r['feature_set']:<15} {r['engine']:<12} "
                     f"{r['status']:<12} {mae} {r2} {r['seconds']:7.1f}")
    lines += [f"{r['engine']} on {r['extractor']}.{r['feature_set']}: {r['status']}: {r['reason']}"
              for r in results["rows"] if r["status"] != "ok"]
    return "\n".join(lines)
