"""The calibration a trained model carries: the temperature of its intervals and the line its
ages are read through.

Both a ``model.pt``'s meta and an exported ONNX file's metadata hold them, and both may predate
them. This module imports nothing but the standard library, so the ONNX engine reads them with
the checkpoint's defaults without loading torch.
"""
from __future__ import annotations

from collections.abc import Mapping


def temperature_of(meta: Mapping) -> float:
    """The temperature that calibrates a model's intervals; 1 for one trained before
    calibration existed (its distribution as it is)."""
    return float(meta.get("temperature", 1.0))


def bias_line_of(meta: Mapping) -> tuple[float, float]:
    """The (slope, intercept) of the age-bias correction fitted in training; no correction for
    a model trained before it existed."""
    slope, intercept = meta.get("bias_line", (1.0, 0.0))
    return float(slope), float(intercept)
