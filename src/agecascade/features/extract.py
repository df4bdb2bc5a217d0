"""CNN activations as regression features (thesis section 4, "Age Estimation Regression Model").

Three feature sets per image, all from one forward pass through the trunk, taken with forward hooks:

* ``last_conv_max``: the last convolutional block (``AgeNet.cam_layer``) max-pooled over space,
  one value per filter map -> (N, C). The thesis's main set.
* ``first_conv``: the first convolution to run, also max-pooled over space -> (N, C1), e.g. 64 for
  VGG-16. Flattened it would be C1 x H x W (3.2 million values per image at 224 px), which no
  regressor in the comparison can take; the global maximum is the thesis's own reduction, so the
  first and last layers differ in depth only, not in pooling.
* ``last_conv_flat``: the last block's activations flattened -> (N, C*h*w), 25,088 for VGG-16 at
  224 px (its Keras ``flatten`` layer), to see what the pooling throws away.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from agecascade.nets import AgeNet
from agecascade.nets.weights import InputSpec
from agecascade.train.data import to_input

FEATURE_SETS = ("last_conv_max", "first_conv", "last_conv_flat")
_FROM_FIRST = {"first_conv"}


def first_conv(model: AgeNet, probe: Tensor) -> nn.Conv2d:
    """The Conv2d that runs first on ``probe`` (1,3,S,S).

    Registration order is not execution order in general (a ResNet registers its downsample
    convs after the blocks' own), so the first one to fire is found by running the trunk once.
    """
    fired: list[nn.Conv2d] = []
    handles = [m.register_forward_hook(lambda mod, _in, _out: fired.append(mod))
               for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.features(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not fired:
        raise ValueError(f"{model.arch} has no Conv2d in its trunk: no convolutional features")
    return fired[0]


def _reduce(name: str, maps: Tensor) -> Tensor:
    """(B,C,h,w) activations -> (B,D) features of set ``name``."""
    if name == "last_conv_flat":
        return maps.flatten(1)
    return maps.amax(dim=(2, 3))


@torch.no_grad()
def extract_features(model: AgeNet, crops: np.ndarray, rows: np.ndarray, input_size: int,
                     spec: InputSpec, device: torch.device,
                     sets: Sequence[str] = FEATURE_SETS, batch: int = 64) -> dict[str, np.ndarray]:
    """{set name: float32 (len(rows), D)} for the images ``crops[rows]`` (uint8 (N,S,S,3) RGB).

    Full precision even on a GPU: these numbers are the regressors' input, not a training
    signal, and bf16 would keep only about three significant digits of each.
    """
    unknown = sorted(set(sets) - set(FEATURE_SETS))
    if unknown or not sets:
        raise ValueError(f"feature sets must be among {FEATURE_SETS}, not {list(sets)}")
    if len(rows) == 0:
        raise ValueError("no images to extract features from")
    model = model.eval().to(device)
    probe = to_input(torch.from_numpy(np.ascontiguousarray(crops[rows[:1]])).to(device),
                     input_size, False, spec)
    taps = {"last": model.cam_layer}
    if _FROM_FIRST & set(sets):
        taps["first"] = first_conv(model, probe)
    captured: dict[str, Tensor] = {}
    handles = [module.register_forward_hook(
        lambda _mod, _in, out, key=key: captured.__setitem__(key, out)) for key, module in taps.items()]
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in sets}
    try:
        for start in range(0, len(rows), batch):
            part = np.sort(rows[start:start + batch])  # sorted reads are sequential on the memmap
            order = np.argsort(np.argsort(rows[start:start + batch]))  # back to the caller's order
            images = torch.from_numpy(np.ascontiguousarray(crops[part])).to(device)
            model.features(to_input(images, input_size, False, spec))
            for name in sets:
                maps = captured["first" if name in _FROM_FIRST else "last"]
                if maps.dim() != 4:
                    raise ValueError(f"{model.arch}: layer output has shape {tuple(maps.shape)}, "
                                     "not (B, C, h, w) maps; it has no spatial filter maps to pool")
                chunks[name].append(_reduce(name, maps.float())[order].cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
