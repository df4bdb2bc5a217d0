"""The report's tables as pure functions: this run's numbers, each beside its trivial baseline and
the thesis's published one (``agecascade.evaluation.thesis``).

A number means little without the score of a predictor that learnt nothing of the faces: for an
MAE the median predictor (the median age of the training subjects, predicted for everyone), for
an accuracy the majority class (the commonest group of the training folds). Both are computed
per fold from the training side only, as the models are, so a model that learnt nothing scores
about the baseline and one that learnt something beats it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from agecascade.evaluation import thesis
from agecascade.evaluation.analysis import mae_by_band, worst_subjects
from agecascade.evaluation.baselines import median_baseline
from agecascade.evaluation.classification import precision_recall

GROUPS3 = ["0-12", "15-20", "25-100"]


# --- baselines ----------------------------------------------------------------------------

def lopo_baseline(predictions: pd.DataFrame) -> pd.DataFrame:
    """A LOPO predictions.csv (subject, age, ...) with ``predicted`` replaced by the median
    predictor: each subject's faces get the median age of every other subject's faces."""
    return predictions.assign(predicted=median_baseline(predictions["age"].to_numpy(),
                                                        predictions["subject"].astype(str).to_numpy()))


def mae(predictions: pd.DataFrame) -> float:
    return float((predictions["predicted"] - predictions["age"]).abs().mean())


# --- tables -------------------------------------------------------------------------------

def fgnet_table(runs: dict[tuple[str, str], tuple[dict, pd.DataFrame]]) -> pd.DataFrame:
    """Thesis table 4: {(backbone, mode): (metrics.json, predictions.csv)} -> one row each."""
    rows = []
    for (backbone, mode), (m, predictions) in runs.items():
        paper = thesis.TABLE4.get((backbone, mode), (np.nan,) * 4)
        rows.append({"model": f"{thesis.BACKBONE_NAMES.get(backbone, backbone)}-"
                              f"{thesis.MODE_NAMES.get(mode, mode)}",
                     "mode": mode, "MAE": m["mae"],
                     "median predictor MAE": mae(lopo_baseline(predictions)),
                     "MedianAE": m["median_ae"],
                     "fold MAE Q3": m["fold_mae_upper_quartile"],
                     "fold MAE Q1": m["fold_mae_lower_quartile"],
                     "95% CI": f"{m['mae_ci95_low']:.2f}-{m['mae_ci95_high']:.2f}",
                     "thesis MAE": paper[0], "thesis MedianAE": paper[1],
                     "thesis Q3": paper[2], "thesis Q1": paper[3]})
    return pd.DataFrame(rows)


def features_table(backbone: str, results: dict, baseline_mae: float) -> pd.DataFrame:
    """Thesis table 5 from a features results.json; ``baseline_mae``: the median predictor on
    the same folds (:func:`median_baseline` with the stage's folds)."""
    rows = []
    for r in results["rows"]:
        paper = thesis.TABLE5.get((r["extractor"], r["feature_set"]), (np.nan, np.nan)) \
            if backbone == "vgg16" else (np.nan, np.nan)
        ok = r["status"] == "ok"
        rows.append({"backbone": backbone, "extractor": r["extractor"],
                     "features": r["feature_set"], "engine": r["engine"],
                     "MAE": r["mae"] if ok else np.nan, "median predictor MAE": baseline_mae,
                     "R²": r["r2"] if ok else np.nan,
                     "status": "ok" if ok else f"{r['status']}: {r.get('reason') or ''}".strip(),
                     "thesis MAE": paper[0], "thesis R²": paper[1]})
    return pd.DataFrame(rows)


# (label, metrics key prefix) of each Adience grouping, in the order the table shows them
ADIENCE_GROUPINGS = (("8 groups", ""), ("3 groups", "g3_"), ("8 groups merged to 3", "g8as3_"))


def adience_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """{backbone: adience metrics.json} -> a row per backbone and grouping that ran: exact (and,
    where scored, 1-off) accuracy in %, mean ± std over the test folds, beside the majority
    class's (the commonest group of each fold's training folds) and the thesis's."""
    rows = []
    for backbone, m in metrics.items():
        for label, prefix in ADIENCE_GROUPINGS:
            if f"{prefix}exact_acc" not in m:
                continue
            row = {"backbone": backbone, "grouping": label,
                   "exact acc %": _pct(m, f"{prefix}exact_acc"),
                   "majority class exact %": _pct(m, f"{prefix}majority_exact_acc"),
                   "1-off acc %": _pct(m, f"{prefix}one_off_acc"),
                   "majority class 1-off %": _pct(m, f"{prefix}majority_one_off_acc"),
                   "thesis exact %": "–", "thesis 1-off %": "–"}
            if not prefix:
                row["thesis exact %"] = "{:.2f} ± {:.2f}".format(*thesis.ADIENCE["exact_acc"])
                row["thesis 1-off %"] = "{:.2f} ± {:.2f}".format(*thesis.ADIENCE["one_off_acc"])
            rows.append(row)
    return pd.DataFrame(rows)


def _pct(m: dict, key: str) -> str:
    """'mean ± std' in %, or '–' where the metric was not scored."""
    mean, std = m.get(key), m.get(f"{key}_std")
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def minors_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """The access-control view: recall and precision of 0-12 over the pooled test folds, beside
    the majority class's recall (the children of the folds whose training majority is a child)."""
    return pd.DataFrame([{"backbone": b, "from groups": m.get("minors_from_groups"),
                          "minors (0-12) recall %": _pct(m, "minors_recall"),
                          "majority class recall %": _pct(m, "majority_minors_recall"),
                          "minors precision %": _pct(m, "minors_precision")}
                         for b, m in metrics.items()])


def confusion_with_scores(matrix: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Counts (rows true, columns predicted) plus per-class precision and recall, as table 6."""
    precision, recall = precision_recall(matrix)
    frame = pd.DataFrame(np.asarray(matrix).astype(int), columns=[f"pred {c}" for c in classes])
    frame.insert(0, "true", classes)
    frame["precision"], frame["recall"] = precision, recall
    return frame


def band_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """MAE per true-age band of a LOPO run, beside the median predictor's in the same band."""
    bands = mae_by_band(predictions)
    bands.insert(3, "median predictor MAE", mae_by_band(lopo_baseline(predictions))["mae"])
    return bands


def worst_table(predictions: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k subjects with the largest fold MAE, beside the median predictor's on them."""
    worst = worst_subjects(predictions, k)
    baseline = lopo_baseline(predictions)
    error = (baseline["predicted"] - baseline["age"]).abs().groupby(baseline["subject"]).mean()
    worst.insert(3, "median predictor MAE", error.reindex(worst["subject"]).to_numpy())
    return worst


def markdown(frame: pd.DataFrame) -> str:
    """A pipe table without the `tabulate` dependency."""
    cells = [[str(c) for c in frame.columns]] + [[_cell(v) for v in row] for row in frame.to_numpy()]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(frame.columns), *lines[1:]])


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.2f}"
    return "–" if value is None else str(value)
