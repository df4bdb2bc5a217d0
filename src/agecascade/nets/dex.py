"""DEX (Rothe et al.): the predicted age is the expected value of the softmax over age classes.

Reading off the arg-max would waste the classifier's uncertainty between neighbouring ages;
the expectation is a smooth regression output from a network trained as a classifier.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dex_age"]


def dex_age(logits: Tensor, ages: Tensor) -> Tensor:
    """Logits (B, K) and the age of each class (K,) -> expected age (B,), in float32."""
    if logits.ndim != 2 or ages.ndim != 1 or logits.shape[1] != ages.shape[0]:
        raise ValueError(f"dex_age needs logits (B, K) and ages (K,); got {tuple(logits.shape)} "
                         f"and {tuple(ages.shape)}")
    probs = torch.softmax(logits.float(), dim=1)  # float32 even for half-precision logits
    return probs @ ages.to(device=probs.device, dtype=probs.dtype)
