"""Stage `report`: the thesis's tables, filled in from this run, beside their trivial baselines
and the published numbers.

Reads the outputs of the other stages by their DVC paths (models/<backbone>/fgnet_<mode>/,
models/<backbone>/adience/, models/<backbone>/features/, reports/registry.json, prepared/) and
writes reports/summary.md, reports/metrics.json (headline numbers for `dvc metrics show`),
reports/age_bands.csv and the figures in reports/figures/. The tables themselves are
``agecascade.evaluation.report``'s; this module reads, writes and logs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from agecascade.errors import MissingInput
from agecascade.evaluation import report, thesis
from agecascade.evaluation.analysis import (band_confusion, band_names, cumulative_age_png,
                                            fold_mae_png)
from agecascade.evaluation.baselines import median_baseline
from agecascade.evaluation.plots import confusion_png
from agecascade.features.engines import make_folds
from agecascade.train.data import split_groups


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbones", nargs="+", required=True)
    parser.add_argument("--modes", nargs="+", default=["a", "b", "c"])
    parser.add_argument("--features-backbones", nargs="+", default=["vgg16"],
                        help="backbones whose feature regressions ran (the thesis: VGG-16)")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--prepared", type=Path, default=Path("prepared"))
    parser.add_argument("--datasets", nargs="+", default=["imdb", "agedb", "fgnet", "adience"],
                        help="prepared datasets whose label distribution is shown")
    parser.add_argument("--registry", type=Path, default=Path("reports/registry.json"))
    parser.add_argument("--worst", type=int, default=4, help="worst subjects analysed (figure 13)")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingInput(f"{path} is missing: run its stage first (dvc repro)")
    return json.loads(path.read_text())


def features_baseline(results: dict, manifest_folder: Path) -> float:
    """The median predictor's MAE on the features stage's own folds (rebuilt as it built them)."""
    manifest = pd.read_parquet(manifest_folder / "manifest.parquet")
    k = 0 if results["folds"]["scheme"] == "leave-one-subject-out" else results["folds"]["n_folds"]
    folds = make_folds(split_groups(manifest).to_numpy(dtype=str), k)
    ages = manifest["age"].to_numpy(dtype=float)
    return float(np.abs(median_baseline(ages, folds) - ages).mean())


def label_table(prepared: Path, datasets: list[str]) -> tuple[pd.DataFrame, dict]:
    ages, rows = {}, []
    for name in datasets:
        manifest = pd.read_parquet(prepared / name / "manifest.parquet", columns=["age", "age_group"])
        if manifest["age"].notna().any():
            ages[name] = manifest["age"].dropna().to_numpy()
            rows.append({"dataset": name, "faces": len(manifest),
                         "median age": float(np.median(ages[name])),
                         "share under 20 %": 100 * float((ages[name] < 20).mean()),
                         "share 50+ %": 100 * float((ages[name] >= 50).mean())})
        else:
            counts = manifest["age_group"].value_counts()
            rows.append({"dataset": name, "faces": len(manifest),
                         "median age": f"groups: {', '.join(f'{g} {n}' for g, n in counts.items())}",
                         "share under 20 %": np.nan, "share 50+ %": np.nan})
    return pd.DataFrame(rows), ages


def main(args: argparse.Namespace) -> int:
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    md = report.markdown
    runs = {}
    for backbone in args.backbones:
        for mode in args.modes:
            folder = args.models / backbone / f"fgnet_{mode}"
            runs[backbone, mode] = (_read_json(folder / "metrics.json"),
                                    pd.read_csv(folder / "predictions.csv", dtype={"subject": str}))
    t4 = report.fgnet_table(runs)
    t5 = pd.concat([report.features_table(b, results, features_baseline(results, args.prepared / "fgnet"))
                    for b in args.features_backbones
                    for results in [_read_json(args.models / b / "features" / "results.json")]],
                   ignore_index=True)
    adience = {b: _read_json(args.models / b / "adience" / "metrics.json") for b in args.backbones}
    registry = _read_json(args.registry) if args.registry.is_file() else None

    best_index = int(t4["MAE"].idxmin())
    best_key = list(runs)[best_index]
    best_name = f"{best_key[0]}-{best_key[1]}"
    best = runs[best_key][1]
    bands = report.band_table(best)
    bands.to_csv(args.out / "age_bands.csv", index=False)
    worst = report.worst_table(best, args.worst)
    worst_rows = best[best["subject"].isin(worst["subject"])]
    confusion_png(band_confusion(worst_rows), band_names(), figures / "worst_subjects_confusion.png",
                  f"FG-NET, {best_name}: the {args.worst} worst subjects (age bands)")
    fold_mae_png({f"{b}-{m}": pd.read_csv(args.models / b / f"fgnet_{m}" / "folds.csv")["mae"]
                  .to_numpy() for b, m in runs}, figures / "fgnet_fold_mae.png")
    labels, ages = label_table(args.prepared, args.datasets)
    cumulative_age_png(ages, figures / "age_cdf.png")

    adience_table = report.adience_table(adience)
    headline = {"fgnet_best_mae": float(t4.loc[best_index, "MAE"]),
                "fgnet_best_model": str(t4.loc[best_index, "model"]),
                "fgnet_best_median_predictor_mae": float(t4.loc[best_index, "median predictor MAE"]),
                "adience_best_exact_acc": 100 * max(m["exact_acc"] for m in adience.values()),
                "adience_best_one_off_acc": 100 * max(m["one_off_acc"] for m in adience.values()),
                "adience_best_minors_recall": 100 * max(m["minors_recall"] for m in adience.values())}
    (args.out / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")

    parts = ["# agecascade: results of this run beside König (2019)\n",
             "Every number comes from this run's DVC outputs; the thesis's published figures are in "
             "the `thesis` columns (on the real datasets; a demo run uses synthetic faces). Beside "
             "each result is the score of a predictor that learnt nothing of the faces: the "
             "*median predictor* (the median age of the training subjects) for an MAE, the "
             "*majority class* (the commonest group of the training folds) for an accuracy, both "
             "computed per fold from the training side only.\n",
             "## Table 4: FG-NET leave-one-person-out (MAE in years)\n",
             "Mode a: the pretrained network frozen, a classifier trained per fold; b: fine-tuned on "
             "IMDB; c: IMDB then AgeDB; b and c are fine-tuned again per fold. MAE and MedianAE are "
             "over all images; the quartiles are of the per-subject (fold) MAE; the 95% interval is "
             "around the MAE, from the spread of the errors.\n", md(t4),
             "\n![per-fold MAE](figures/fgnet_fold_mae.png)\n",
             "## Table 5: regression on CNN features (FG-NET)\n",
             "Extractor `base` is the starting network, `cascade` the IMDB -> AgeDB model; the "
             "thesis ran auto-sklearn on VGG-16 only. The median predictor uses the same folds.\n",
             md(t5),
             "\n## Adience, 5 folds\n",
             "Accuracy in %, mean ± std over the test folds. `3 groups` is a separate network per "
             "fold (child / teen / adult); `8 groups merged to 3` reads the 8-group predictions as "
             "the 3 groups.\n", md(adience_table),
             "\nMinors (0-12), all test folds pooled:\n", md(report.minors_table(adience))]
    for backbone in args.backbones:
        matrix = args.models / backbone / "adience" / "confusion_g3.csv"
        if matrix.is_file():
            parts += [f"\n### 3 groups (child / teen / adult), {backbone}, all test folds pooled\n",
                      md(report.confusion_with_scores(pd.read_csv(matrix, index_col=0).to_numpy(),
                                                      report.GROUPS3))]
    parts += ["\nThesis table 6 (fold 1):\n",
              md(report.confusion_with_scores(thesis.TABLE6, report.GROUPS3)),
              f"\n## Error analysis ({best_name}, the lowest FG-NET MAE)\n",
              "MAE per true-age band:\n", md(bands),
              f"\nThe {args.worst} subjects with the largest fold MAE:\n", md(worst),
              "\n![worst subjects](figures/worst_subjects_confusion.png)\n",
              "\nLabel distribution per dataset:\n", md(labels),
              "\n![cumulative age distribution](figures/age_cdf.png)\n",
              "\n## Grad-CAM\n"]
    parts += [f"![{b}](cam/{b}.png)" for b in args.backbones]
    if registry:
        chosen = registry["chosen"]
        parts += ["\n## Registry\n", f"`models:/{registry['name']}@champion` is version "
                  f"{registry['version']}: {chosen['backbone']} mode {chosen['mode']}, FG-NET MAE "
                  f"{chosen['mae']:.2f}; challenger: {registry.get('challenger') or 'none'}.\n"]
    (args.out / "summary.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {args.out / 'summary.md'}; headline: {json.dumps(headline)}")

    if not args.no_track:
        import mlflow

        from agecascade import tracking

        with mlflow.start_run(experiment_id=tracking.experiment_id("report"), run_name="summary"):
            mlflow.set_tags({"stage": "report", "git_commit": tracking.git_commit()})
            mlflow.log_metrics({k: v for k, v in headline.items() if isinstance(v, float)})
            mlflow.log_artifact(str(args.out / "summary.md"))
            mlflow.log_artifacts(str(figures), "figures")
    return 0
