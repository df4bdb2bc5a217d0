"""Error analysis (thesis section 5): where the errors are, and for whom.

The thesis traces FG-NET's worst folds to the label distribution, not the images: ages above 50
are sparsely sampled, so a held-out old subject may have almost no training faces of its age.
These tables and figures make that visible for any run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

AGE_BANDS = (0, 10, 20, 30, 40, 50, 60)  # left edges; the last band is open-ended


def band_names(edges: tuple[int, ...] = AGE_BANDS) -> list[str]:
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def to_band(ages: np.ndarray, edges: tuple[int, ...] = AGE_BANDS) -> np.ndarray:
    """Band index of each age (negative predictions fall in the first band)."""
    return np.clip(np.searchsorted(edges, np.asarray(ages, float), side="right") - 1, 0,
                   len(edges) - 1)


def mae_by_band(predictions: pd.DataFrame, edges: tuple[int, ...] = AGE_BANDS) -> pd.DataFrame:
    """MAE and signed error per true-age band; bands without images are listed with n = 0."""
    error = predictions["predicted"] - predictions["age"]
    frame = pd.DataFrame({"band": to_band(predictions["age"].to_numpy(), edges),
                          "abs": error.abs(), "signed": error})
    stats = frame.groupby("band").agg(n=("abs", "size"), mae=("abs", "mean"),
                                      mean_signed_error=("signed", "mean"))
    stats = stats.reindex(range(len(edges)))
    stats["n"] = stats["n"].fillna(0).astype(int)
    stats.insert(0, "band", band_names(edges))
    return stats.reset_index(drop=True)


def worst_subjects(predictions: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k held-out subjects with the largest fold MAE, with their age range."""
    error = (predictions["predicted"] - predictions["age"]).abs()
    per_subject = predictions.assign(error=error).groupby("subject").agg(
        n=("age", "size"), mae=("error", "mean"), min_age=("age", "min"), max_age=("age", "max"))
    return per_subject.sort_values("mae", ascending=False).head(k).reset_index()


def band_confusion(predictions: pd.DataFrame, edges: tuple[int, ...] = AGE_BANDS) -> np.ndarray:
    """Counts (true band, predicted band): the thesis's figure 13 for the rows given."""
    size = len(edges)
    true, predicted = to_band(predictions["age"].to_numpy(), edges), \
        to_band(predictions["predicted"].to_numpy(), edges)
    return np.bincount(true * size + predicted, minlength=size * size).reshape(size, size)


def cumulative_age_png(ages: dict[str, np.ndarray], path: Path) -> None:
    """Figure 5: the share of each dataset's faces at or below each age."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in ages.items():
        values = np.sort(np.asarray(values, float))
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                label=f"{name} (n={len(values)})")
    ax.set(xlabel="age (years)", ylabel="cumulative share of faces", ylim=(0, 1.01),
           title="Cumulative age distribution")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fold_mae_png(fold_mae: dict[str, np.ndarray], path: Path) -> None:
    """Figures 10-11: the spread of per-subject MAE for each backbone and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(fold_mae)
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(labels) + 2), 4))
    ax.boxplot([np.asarray(fold_mae[k], float) for k in labels], showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    ax.set(ylabel="MAE of the held-out subject (years)", title="FG-NET leave-one-person-out")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
