"""Stage `report`: the thesis's tables, filled in from this run, beside the published numbers.

Reads the outputs of the other stages by their DVC paths (models/<backbone>/fgnet_<mode>/,
models/<backbone>/adience/, models/<backbone>/features/, reports/registry.json, prepared/) and
writes reports/summary.md, reports/metrics.json (headline numbers for `dvc metrics show`),
reports/age_bands.csv and the figures in reports/figures/.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from agecascade.evaluation.analysis import (band_confusion, band_names, cumulative_age_png,
                                            fold_mae_png, mae_by_band, worst_subjects)
from agecascade.evaluation.classification import precision_recall
from agecascade.evaluation.plots import confusion_png

MODE_NAMES = {"a": "pretrained, frozen", "b": "IMDB", "c": "IMDB-AgeDB"}
THESIS_NAMES = {"vgg16": "VGG-16", "resnet50": "ResNet-50", "senet50": "SENet-50"}
# Thesis table 4: MAE, median AE, upper and lower quartile on FG-NET (mode a = "-Faces2").
THESIS_TABLE4 = {("resnet50", "a"): (12.28, 12.02, 14.43, 10.18),
                 ("senet50", "a"): (8.61, 7.21, 10.13, 5.95),
                 ("vgg16", "a"): (4.78, 4.24, 5.54, 3.06),
                 ("resnet50", "b"): (4.33, 3.46, 5.12, 2.71),
                 ("senet50", "b"): (4.24, 3.20, 5.17, 2.28),
                 ("vgg16", "b"): (2.77, 2.34, 3.47, 1.54),
                 ("vgg16", "c"): (2.68, 2.24, 3.35, 1.58)}
# Thesis table 5 (VGG-16 only): (extractor, feature set) -> (MAE, R^2).
THESIS_TABLE5 = {("base", "last_conv_max"): (5.05, 0.40), ("cascade", "last_conv_max"): (3.98, 0.45),
                 ("base", "first_conv"): (9.68, -1.43), ("cascade", "first_conv"): (9.53, -1.40),
                 ("cascade", "last_conv_flat"): (9.98, -1.52)}
THESIS_ADIENCE = {"exact_acc": (61.41, 4.37), "one_off_acc": (87.80, 2.22)}
# Thesis table 6: 3-group confusion on Adience fold 1 (rows true, columns predicted).
THESIS_TABLE6 = np.array([[1646, 12, 9], [12, 36, 104], [66, 143, 2362]])
GROUPS3 = ["0-12", "15-20", "25-100"]


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
        raise FileNotFoundError(f"{path} is missing: run its stage first (dvc repro)")
    return json.loads(path.read_text())


def _md(frame: pd.DataFrame) -> str:
    """A pipe table without the `tabulate` dependency."""
    cells = [[str(c) for c in frame.columns]] + [[_cell(v) for v in row] for row in frame.to_numpy()]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(frame.columns), *lines[1:]])


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.2f}"
    return "–" if value is None else str(value)


def table4(args: argparse.Namespace) -> tuple[pd.DataFrame, dict, dict[str, pd.DataFrame]]:
    rows, fold_mae, predictions = [], {}, {}
    for backbone in args.backbones:
        for mode in args.modes:
            folder = args.models / backbone / f"fgnet_{mode}"
            m = _read_json(folder / "metrics.json")
            label = f"{THESIS_NAMES.get(backbone, backbone)}-{MODE_NAMES[mode]}"
            paper = THESIS_TABLE4.get((backbone, mode), (np.nan,) * 4)
            rows.append({"model": label, "mode": mode, "MAE": m["mae"], "MedianAE": m["median_ae"],
                         "fold MAE Q3": m["fold_mae_upper_quartile"],
                         "fold MAE Q1": m["fold_mae_lower_quartile"],
                         "95% CI": f"{m['mae_ci95_low']:.2f}-{m['mae_ci95_high']:.2f}",
                         "thesis MAE": paper[0], "thesis MedianAE": paper[1],
                         "thesis Q3": paper[2], "thesis Q1": paper[3]})
            fold_mae[f"{backbone}-{mode}"] = pd.read_csv(folder / "folds.csv")["mae"].to_numpy()
            predictions[f"{backbone}-{mode}"] = pd.read_csv(folder / "predictions.csv",
                                                            dtype={"subject": str})
    return pd.DataFrame(rows), fold_mae, predictions


def table5(args: argparse.Namespace) -> pd.DataFrame:
    rows = []
    for backbone in args.features_backbones:
        results = _read_json(args.models / backbone / "features" / "results.json")
        for r in results["rows"]:
            paper = THESIS_TABLE5.get((r["extractor"], r["feature_set"]), (np.nan, np.nan)) \
                if backbone == "vgg16" else (np.nan, np.nan)
            rows.append({"backbone": backbone, "extractor": r["extractor"],
                         "features": r["feature_set"], "engine": r["engine"],
                         "MAE": r["mae"] if r["status"] == "ok" else np.nan,
                         "R²": r["r2"] if r["status"] == "ok" else np.nan,
                         "status": r["status"] if r["status"] == "ok" else
                         f"{r['status']}: {r.get('reason') or ''}".strip(),
                         "thesis MAE": paper[0], "thesis R²": paper[1]})
    return pd.DataFrame(rows)


def adience(args: argparse.Namespace) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    rows, groups3 = [], {}
    for backbone in args.backbones:
        folder = args.models / backbone / "adience"
        m = _read_json(folder / "metrics.json")
        rows.append({"backbone": backbone, "exact acc %": 100 * m["exact_acc"],
                     "± std": 100 * m["exact_acc_std"], "1-off acc %": 100 * m["one_off_acc"],
                     "± std ": 100 * m["one_off_acc_std"],
                     "minors (0-12) recall %": 100 * m["minors_recall"],
                     "minors precision %": 100 * m["minors_precision"],
                     "thesis exact": "61.41 ± 4.37", "thesis 1-off": "87.80 ± 2.22"})
        matrix = folder / "confusion_g3.csv"
        if matrix.is_file():
            groups3[backbone] = pd.read_csv(matrix, index_col=0)
    return pd.DataFrame(rows), groups3


def confusion_with_scores(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Counts (rows true, columns predicted) plus per-class precision and recall, as table 6."""
    precision, recall = precision_recall(matrix)
    frame = pd.DataFrame(np.asarray(matrix).astype(int), columns=[f"pred {c}" for c in classes])
    frame.insert(0, "true", classes)
    frame["precision"], frame["recall"] = precision, recall
    return frame


def main(args: argparse.Namespace) -> int:
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    t4, fold_mae, predictions = table4(args)
    t5 = table5(args)
    adience_table, groups3 = adience(args)
    registry = _read_json(args.registry) if args.registry.is_file() else None

    best_key = min(predictions, key=lambda k: t4.loc[list(predictions).index(k), "MAE"])
    best = predictions[best_key]
    bands = mae_by_band(best)
    bands.to_csv(args.out / "age_bands.csv", index=False)
    worst = worst_subjects(best, args.worst)
    worst_rows = best[best["subject"].isin(worst["subject"])]
    confusion_png(band_confusion(worst_rows), band_names(), figures / "worst_subjects_confusion.png",
                  f"FG-NET, {best_key}: the {args.worst} worst subjects (age bands)")
    fold_mae_png(fold_mae, figures / "fgnet_fold_mae.png")
    ages, label_rows = {}, []
    for name in args.datasets:
        manifest = pd.read_parquet(args.prepared / name / "manifest.parquet",
                                   columns=["age", "age_group"])
        if manifest["age"].notna().any():
            ages[name] = manifest["age"].dropna().to_numpy()
            label_rows.append({"dataset": name, "faces": len(manifest),
                               "median age": float(np.median(ages[name])),
                               "share under 20 %": 100 * float((ages[name] < 20).mean()),
                               "share 50+ %": 100 * float((ages[name] >= 50).mean())})
        else:
            counts = manifest["age_group"].value_counts()
            label_rows.append({"dataset": name, "faces": len(manifest),
                               "median age": f"groups: {', '.join(f'{g} {n}' for g, n in counts.items())}",
                               "share under 20 %": np.nan, "share 50+ %": np.nan})
    cumulative_age_png(ages, figures / "age_cdf.png")

    best_row = t4.loc[t4["MAE"].idxmin()]
    headline = {"fgnet_best_mae": float(best_row["MAE"]), "fgnet_best_model": best_row["model"],
                "adience_best_exact_acc": float(adience_table["exact acc %"].max()),
                "adience_best_one_off_acc": float(adience_table["1-off acc %"].max()),
                "adience_best_minors_recall": float(adience_table["minors (0-12) recall %"].max())}
    (args.out / "metrics.json").write_text(json.dumps(headline, indent=2) + "\n")

    parts = ["# agecascade: results of this run beside König (2019)\n",
             "Every number comes from this run's DVC outputs; the thesis's published figures are in "
             "the `thesis` columns (on the real datasets; a demo run uses synthetic faces).\n",
             "## Table 4: FG-NET leave-one-person-out (MAE in years)\n",
             "Mode a: the pretrained network frozen, a classifier trained per fold; b: fine-tuned on "
             "IMDB; c: IMDB then AgeDB; b and c are fine-tuned again per fold. MAE and MedianAE are "
             "over all images; the quartiles are of the per-subject (fold) MAE; the 95% interval is "
             "around the MAE, from the spread of the errors.\n", _md(t4),
             "\n![per-fold MAE](figures/fgnet_fold_mae.png)\n",
             "## Table 5: regression on CNN features (FG-NET)\n",
             "Extractor `base` is the starting network, `cascade` the IMDB -> AgeDB model; the "
             "thesis ran auto-sklearn on VGG-16 only.\n", _md(t5),
             "\n## Adience, 5 folds (8 groups)\n", _md(adience_table)]
    for backbone, matrix in groups3.items():
        parts += [f"\n### 3 groups (child / teen / adult), {backbone}, all test folds pooled\n",
                  _md(confusion_with_scores(matrix.to_numpy(), GROUPS3))]
    parts += ["\nThesis table 6 (fold 1):\n", _md(confusion_with_scores(THESIS_TABLE6, GROUPS3)),
              f"\n## Error analysis ({best_key}, the lowest FG-NET MAE)\n",
              "MAE per true-age band:\n", _md(bands),
              f"\nThe {args.worst} subjects with the largest fold MAE:\n", _md(worst),
              "\n![worst subjects](figures/worst_subjects_confusion.png)\n",
              "\nLabel distribution per dataset:\n", _md(pd.DataFrame(label_rows)),
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
