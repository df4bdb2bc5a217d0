"""Confusion matrices as PNG files, for DVC plots and MLflow artifacts.

Cells show raw counts (what happened) shaded by the row-normalised share (the recall view), so
a rare class (Adience's 15-20) is as readable as a frequent one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion_png(confusion: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    """Write a (K, K) confusion matrix (rows true, columns predicted) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {k} class names")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)  # (K,K)

    side = 1.2 + 0.62 * k
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true group")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted group")
    ax.set_ylabel("true group")
    if title:
        ax.set_title(title)
    for i in range(k):
        for j in range(k):
            colour = "white" if share[i, j] > 0.55 else "black"
            ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}" if counts[i, j] else "0",
                    ha="center", va="center", fontsize=8, color=colour)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
