"""The `report` stage's work: read the other stages' outputs by their DVC paths, fill in the
thesis's tables (``agecascade.evaluation.report``) beside their trivial baselines and the published
numbers, and write reports/summary.md, reports/metrics.json (the headline for
`dvc metrics show`), reports/age_bands.csv and the figures.

The stage outputs it reads: models/<backbone>/fgnet_<mode>/, models/<backbone>/adience/,
models/<backbone>/features/, reports/registry.json and prepared/<dataset>/manifest.parquet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agecascade.atomic import to_csv_atomic, write_text_atomic
from agecascade.config import option
from agecascade.errors import MissingInput
from agecascade.evaluation import report, thesis
from agecascade.evaluation.analysis import (band_confusion, band_names, cumulative_age_png,
                                            fold_mae_png)
from agecascade.evaluation.baselines import median_baseline
from agecascade.evaluation.plots import confusion_png
from agecascade.features.engines import make_folds
from agecascade.train.data import split_groups

md = report.markdown


@dataclass(frozen=True)
class ReportConfig:
    backbones: tuple[str, ...] = option(help="backbones whose LOPO and Adience stages ran")
    modes: tuple[str, ...] = option(("a", "b", "c"), help="FG-NET LOPO modes that ran")
    features_backbones: tuple[str, ...] = option(
        ("vgg16",), help="backbones whose feature regressions ran (the thesis: VGG-16)")
    models: Path = option(Path("models"), help="the stages' model folders")
    prepared: Path = option(Path("prepared"), help="the prepared datasets")
    datasets: tuple[str, ...] = option(("imdb", "agedb", "fgnet", "adience"),
                                       help="prepared datasets whose label distribution is shown")
    registry: Path = option(Path("reports/registry.json"),
                            help="the register stage's report (its section is left out if absent)")
    worst: int = option(4, help="worst subjects analysed (figure 13)")
    out: Path = option(Path("reports"), help="folder of summary.md, metrics.json, age_bands.csv "
                                             "and figures/")


def read_json(path: Path) -> dict:
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


def label_table(prepared: Path, datasets: tuple[str, ...]) -> tuple[pd.DataFrame, dict]:
    """One row per prepared dataset (faces, median age, young and old shares; group counts for a
    dataset labelled by group only), and the ages of each dataset that has them."""
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


def write_summary(config: ReportConfig) -> dict:
    """Every file of the report; returns the headline numbers (also in metrics.json)."""
    figures = config.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    runs = {}
    for backbone in config.backbones:
        for mode in config.modes:
            folder = config.models / backbone / f"fgnet_{mode}"
            runs[backbone, mode] = (read_json(folder / "metrics.json"),
                                    pd.read_csv(folder / "predictions.csv", dtype={"subject": str}))
    t4 = report.fgnet_table(runs)
    features = {b: read_json(config.models / b / "features" / "results.json")
                for b in config.features_backbones}
    t5 = pd.concat([report.features_table(b, r, features_baseline(r, config.prepared / "fgnet"))
                    for b, r in features.items()], ignore_index=True)
    adience = {b: read_json(config.models / b / "adience" / "metrics.json") for b in config.backbones}
    registry = read_json(config.registry) if config.registry.is_file() else None

    best_index = int(t4["MAE"].idxmin())
    best_key = list(runs)[best_index]
    best_name = f"{best_key[0]}-{best_key[1]}"
    best = runs[best_key][1]
    bands = report.band_table(best)
    to_csv_atomic(bands, config.out / "age_bands.csv")
    worst = report.worst_table(best, config.worst)
    worst_rows = best[best["subject"].isin(worst["subject"])]
    confusion_png(band_confusion(worst_rows), band_names(), figures / "worst_subjects_confusion.png",
                  f"FG-NET, {best_name}: the {config.worst} worst subjects (age bands)")
    fold_mae_png({f"{b}-{m}": pd.read_csv(config.models / b / f"fgnet_{m}" / "folds.csv")["mae"]
                  .to_numpy() for b, m in runs}, figures / "fgnet_fold_mae.png")
    labels, ages = label_table(config.prepared, config.datasets)
    cumulative_age_png(ages, figures / "age_cdf.png")

    headline = {"fgnet_best_mae": float(t4.loc[best_index, "MAE"]),
                "fgnet_best_model": str(t4.loc[best_index, "model"]),
                "fgnet_best_median_predictor_mae": float(t4.loc[best_index, "median predictor MAE"]),
                "adience_best_exact_acc": 100 * max(m["exact_acc"] for m in adience.values()),
                "adience_best_one_off_acc": 100 * max(m["one_off_acc"] for m in adience.values()),
                "adience_best_minors_recall": 100 * max(m["minors_recall"] for m in adience.values())}
    write_text_atomic(config.out / "metrics.json", json.dumps(headline, indent=2) + "\n")
    confusions = {b: pd.read_csv(path, index_col=0).to_numpy() for b in config.backbones
                  if (path := config.models / b / "adience" / "confusion_g3.csv").is_file()}
    text = summary_markdown(t4, t5, adience, confusions, best_name, bands, worst, labels, config,
                            registry)
    write_text_atomic(config.out / "summary.md", text)
    return headline


def summary_markdown(t4: pd.DataFrame, t5: pd.DataFrame, adience: dict[str, dict],
                     confusions: dict[str, np.ndarray], best_name: str, bands: pd.DataFrame,
                     worst: pd.DataFrame, labels: pd.DataFrame, config: ReportConfig,
                     registry: dict | None) -> str:
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
             "the 3 groups.\n", md(report.adience_table(adience)),
             "\nMinors (0-12), all test folds pooled:\n", md(report.minors_table(adience))]
    for backbone, matrix in confusions.items():
        parts += [f"\n### 3 groups (child / teen / adult), {backbone}, all test folds pooled\n",
                  md(report.confusion_with_scores(matrix, report.GROUPS3))]
    parts += ["\nThesis table 6 (fold 1):\n",
              md(report.confusion_with_scores(thesis.TABLE6, report.GROUPS3)),
              f"\n## Error analysis ({best_name}, the lowest FG-NET MAE)\n",
              "MAE per true-age band:\n", md(bands),
              f"\nThe {config.worst} subjects with the largest fold MAE:\n", md(worst),
              "\n![worst subjects](figures/worst_subjects_confusion.png)\n",
              "\nLabel distribution per dataset:\n", md(labels),
              "\n![cumulative age distribution](figures/age_cdf.png)\n",
              "\n## Grad-CAM\n"]
    parts += [f"![{b}](cam/{b}.png)" for b in config.backbones]
    if registry:
        chosen = registry["chosen"]
        parts += ["\n## Registry\n", f"`models:/{registry['name']}@champion` is version "
                  f"{registry['version']}: {chosen['backbone']} mode {chosen['mode']}, FG-NET MAE "
                  f"{chosen['mae']:.2f}; challenger: {registry.get('challenger') or 'none'}.\n"]
    return "\n".join(parts) + "\n"
