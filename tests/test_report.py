"""The report's tables: every result printed beside a baseline computed from the training side
only, checked on cases small enough to compute by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agecascade.evaluation import report, thesis


def lopo_predictions() -> pd.DataFrame:
    """Three subjects; the model predicts s1 1 year too old, s2 2 years, s3 3 years."""
    ages = [10.0, 20.0, 30.0, 40.0, 60.0]
    return pd.DataFrame({"path": list("abcde"), "subject": ["s1", "s1", "s2", "s3", "s3"],
                         "age": ages, "predicted": [11.0, 21.0, 32.0, 43.0, 63.0]})


def test_median_baseline_uses_only_the_other_folds():
    ages = np.array([10.0, 20.0, 30.0, 40.0, 60.0])
    folds = np.array([0, 0, 1, 2, 2])
    # fold 0: median(30, 40, 60) = 40; fold 1: median(10, 20, 40, 60) = 30; fold 2: median(10, 20, 30) = 20
    assert report.median_baseline(ages, folds).tolist() == [40, 40, 30, 20, 20]


def test_fgnet_table_puts_the_median_predictor_beside_the_mae():
    metrics = {"mae": 1.0, "median_ae": 1.0, "fold_mae_upper_quartile": 1.0,
               "fold_mae_lower_quartile": 1.0, "mae_ci95_low": 1.0, "mae_ci95_high": 1.0}
    table = report.fgnet_table({("vgg16", "c"): (metrics, lopo_predictions()),
                                ("vgg16", "x"): (metrics, lopo_predictions())})
    # |10-40| + |20-40| + |30-30| + |40-20| + |60-20| = 30 + 20 + 0 + 20 + 40 = 110, over 5
    assert table["median predictor MAE"].tolist() == [pytest.approx(22.0)] * 2
    assert table.loc[0, "model"] == "VGG-16-IMDB-AgeDB"
    assert table.loc[0, "thesis MAE"] == thesis.TABLE4[("vgg16", "c")][0]
    assert np.isnan(table.loc[1, "thesis MAE"])  # no such row in the thesis


def test_band_and_worst_tables_carry_the_baseline_per_row():
    bands = report.band_table(lopo_predictions()).set_index("band")
    assert bands.loc["10-19", "mae"] == pytest.approx(1.0)
    assert bands.loc["10-19", "median predictor MAE"] == pytest.approx(30.0)  # 10 vs 40
    assert bands.loc["60+", "median predictor MAE"] == pytest.approx(40.0)    # 60 vs 20
    assert bands.loc["50-59", "n"] == 0 and np.isnan(bands.loc["50-59", "median predictor MAE"])
    worst = report.worst_table(lopo_predictions(), 2).set_index("subject")
    assert worst.index.tolist() == ["s3", "s2"]
    assert worst.loc["s3", "median predictor MAE"] == pytest.approx(30.0)    # (20 + 40) / 2
    assert worst.loc["s2", "median predictor MAE"] == pytest.approx(0.0)     # 30 vs 30


def test_features_table_prints_the_baseline_and_the_reason_of_a_failed_row():
    results = {"rows": [
        {"extractor": "cascade", "feature_set": "last_conv_max", "engine": "hgb", "status": "ok",
         "mae": 4.0, "r2": 0.5},
        {"extractor": "base", "feature_set": "first_conv", "engine": "autosklearn",
         "status": "failed", "reason": "no budget", "mae": None, "r2": None}]}
    table = report.features_table("vgg16", results, baseline_mae=7.5)
    assert table["median predictor MAE"].tolist() == [7.5, 7.5]
    assert table.loc[0, "thesis MAE"] == thesis.TABLE5[("cascade", "last_conv_max")][0]
    assert np.isnan(table.loc[1, "MAE"]) and table.loc[1, "status"] == "failed: no budget"


def test_adience_table_has_a_row_per_grouping_that_ran_with_its_majority_class():
    metrics = {"exact_acc": 0.25, "exact_acc_std": 0.05, "majority_exact_acc": 0.1,
               "majority_exact_acc_std": 0.02, "one_off_acc": 0.6, "one_off_acc_std": 0.1,
               "majority_one_off_acc": 0.3, "majority_one_off_acc_std": 0.1,
               "g8as3_exact_acc": 0.5, "g8as3_exact_acc_std": None,
               "g8as3_majority_exact_acc": 0.33, "g8as3_majority_exact_acc_std": 0.1}
    table = report.adience_table({"vgg16": metrics})
    assert table["grouping"].tolist() == ["8 groups", "8 groups merged to 3"]
    eight, merged = table.iloc[0], table.iloc[1]
    assert (eight["exact acc %"], eight["majority class exact %"]) == ("25.0 ± 5.0", "10.0 ± 2.0")
    assert eight["thesis exact %"] == "61.41 ± 4.37"
    assert merged["exact acc %"] == "50.0" and merged["1-off acc %"] == "–"
    assert merged["thesis exact %"] == "–"  # the thesis reports 8 groups only


def test_confusion_with_scores_and_markdown():
    frame = report.confusion_with_scores(np.array([[2, 1, 0], [0, 0, 0], [1, 0, 3]]),
                                         report.GROUPS3)
    assert frame["recall"].iloc[0] == pytest.approx(2 / 3)
    assert np.isnan(frame["recall"].iloc[1])  # no true 15-20: undefined, shown as a dash
    text = report.markdown(frame)
    assert text.splitlines()[1] == "|" + "---|" * 6
    assert "| 15-20 | 0 | 0 | 0 | 0.00 | – |" in text


def test_stage_writes_a_summary_with_a_baseline_beside_every_result(tmp_path):
    """The stage end to end on hand-made stage outputs (one backbone, mode c)."""
    import argparse
    import json

    from agecascade.pipelines import report as stage

    models, prepared = tmp_path / "models", tmp_path / "prepared"
    predictions = lopo_predictions()
    lopo = models / "vgg16" / "fgnet_c"
    lopo.mkdir(parents=True)
    predictions.to_csv(lopo / "predictions.csv", index=False)
    pd.DataFrame({"subject": ["s1", "s2", "s3"], "mae": [1.0, 2.0, 3.0]}).to_csv(
        lopo / "folds.csv", index=False)
    (lopo / "metrics.json").write_text(json.dumps(
        {"mae": 2.2, "median_ae": 2.0, "fold_mae_upper_quartile": 2.5, "fold_mae_lower_quartile": 1.5,
         "mae_ci95_low": 1.0, "mae_ci95_high": 3.0}))
    features = models / "vgg16" / "features"
    features.mkdir(parents=True)
    (features / "results.json").write_text(json.dumps(
        {"folds": {"scheme": "leave-one-subject-out", "n_folds": 3},
         "rows": [{"extractor": "cascade", "feature_set": "last_conv_max", "engine": "hgb",
                   "status": "ok", "mae": 4.0, "r2": 0.5}]}))
    adience = models / "vgg16" / "adience"
    adience.mkdir(parents=True)
    (adience / "metrics.json").write_text(json.dumps(
        {"exact_acc": 0.25, "exact_acc_std": 0.05, "majority_exact_acc": 0.1,
         "majority_exact_acc_std": 0.02, "one_off_acc": 0.6, "one_off_acc_std": 0.1,
         "majority_one_off_acc": 0.3, "majority_one_off_acc_std": 0.1, "minors_recall": 0.8,
         "minors_recall_std": 0.1, "minors_precision": 0.7, "majority_minors_recall": 0.4,
         "minors_from_groups": 8}))
    pd.DataFrame(np.eye(3, dtype=int), index=pd.Index(report.GROUPS3, name="true"),
                 columns=report.GROUPS3).to_csv(adience / "confusion_g3.csv")
    for name in ("fgnet", "adience"):
        (prepared / name).mkdir(parents=True)
    predictions.assign(sha1=None, age_group=None).to_parquet(prepared / "fgnet" / "manifest.parquet")
    pd.DataFrame({"age": [np.nan] * 2, "age_group": ["0-2", "4-6"], "subject": ["u/1", "u/2"]}
                 ).to_parquet(prepared / "adience" / "manifest.parquet")
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    args = parser.parse_args(["--backbones", "vgg16", "--modes", "c", "--models", str(models),
                              "--prepared", str(prepared), "--datasets", "fgnet", "adience",
                              "--registry", str(tmp_path / "none.json"), "--worst", "2",
                              "--out", str(tmp_path / "reports"), "--no-track"])
    assert stage.main(args) == 0
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| VGG-16-IMDB-AgeDB | c | 2.20 | 22.00 |" in summary        # MAE beside the median's
    assert "| vgg16 | cascade | last_conv_max | hgb | 4.00 | 22.00 |" in summary  # same folds
    assert "| vgg16 | 8 groups | 25.0 ± 5.0 | 10.0 ± 2.0 |" in summary
    headline = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert headline["fgnet_best_median_predictor_mae"] == pytest.approx(22.0)
