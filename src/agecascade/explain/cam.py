"""Grad-CAM maps of the DEX age (thesis section 5, figure 14), computed by the `grad-cam` library.

The thesis weighs the last convolutional block's channels by the pooled gradient of the output.
Our networks regress age as DEX's expected value, so the target differentiated is that age,
softmax(logits) @ ages, not one class score: the map shows where the features push the predicted
age *up*. Grad-CAM keeps only the positive part, so a face on which every location lowers the
age gets a blank map; the `cam` stage counts those.

A map is as coarse as its layer. At the thesis's 224 px the last block is 7x7; at the demo's
32 px it is 1x1, and there Grad-CAM is constant (one cell, min-max scaled to 0), a blank map.
We keep the checkpoint's input size, since at any other size the network would predict other
ages than the ones it is explained for, and fall back to the deepest earlier block whose map is
still at least ``min_side`` cells wide (``target_layer``): ResNet ``layer3``, VGG's conv5_3 ReLU.
"""
from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch import Tensor, nn

from agecascade.errors import UserError
from agecascade.nets import AgeNet, dex_age
from agecascade.nets.weights import InputSpec
from agecascade.train.data import to_input

__all__ = ["CELL_PX", "MIN_SIDE", "TITLE_PX", "DexAgeTarget", "cam_grid", "cam_maps", "predict_ages",
           "target_layer"]

MIN_SIDE = 2  # a 1x1 map carries no "where"
CELL_PX, TITLE_PX, DPI = 128, 30, 100  # figure cell: square image plus a two-line title band


class DexAgeTarget:
    """grad-cam target: one sample's logits (K,) -> its DEX age, a scalar.

    grad-cam calls a target once per sample with that sample's output row.
    """

    def __init__(self, ages: Sequence[float] | Tensor) -> None:
        self.ages = torch.as_tensor(ages, dtype=torch.float32)  # (K,) age of each class

    def __call__(self, output: Tensor) -> Tensor:
        return dex_age(output.unsqueeze(0), self.ages)[0]


def target_layer(model: AgeNet, input_size: int, min_side: int = MIN_SIDE) -> tuple[str, nn.Module]:
    """(name, module) of the layer to explain at ``input_size``: ``model.cam_layer`` when its map
    has at least ``min_side`` cells a side, else the deepest block before it that has.

    Blocks are the children of ``nn.Sequential`` containers (ResNet bottlenecks, VGG's
    conv/ReLU/pool layers, MobileNet's inverted residuals) and of ``cam_layer``'s parent (ResNet
    stages): the units torchvision composes a network from. A module that runs twice per forward
    pass is skipped, as grad-cam would record two activations for it. One forward pass of a
    blank image finds the map sizes.
    """
    parent = model.cam_layer_name.rpartition(".")[0]
    containers = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.Sequential) or name == parent]
    blocks = {f"{name}.{child_name}".lstrip("."): child
              for name, container in containers for child_name, child in container.named_children()}
    finished: list[tuple[str, tuple[int, ...]]] = []  # (name, output shape) in completion order

    def record(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            finished.append((name, tuple(output.shape) if isinstance(output, Tensor) else ()))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in blocks.items()]
    try:
        with preserved(model), torch.no_grad():
            model.eval()
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    runs: dict[str, int] = {}
    for name, _ in finished:
        runs[name] = runs.get(name, 0) + 1
    end = max(i for i, (name, _) in enumerate(finished) if name == model.cam_layer_name)
    for name, shape in reversed(finished[:end + 1]):
        if runs[name] == 1 and len(shape) == 4 and min(shape[2:]) >= min_side:
            return name, blocks[name]
    last = dict(finished)[model.cam_layer_name]
    raise UserError(f"{model.arch} at {input_size} px: {model.cam_layer_name} gives a "
                    f"{last[2:]} map and no block before it reaches {min_side}x{min_side}; "
                    "use a larger input size")


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's train/eval mode and each weight's ``requires_grad`` afterwards:
    explaining a model must not change how it trains later."""
    training = model.training
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    finally:
        model.train(training)
        for param, flag in flags:
            param.requires_grad_(flag)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3) with N > 0, got "
                         f"{images.dtype} {images.shape}")


def _batches(images: np.ndarray, input_size: int, spec: InputSpec, device: torch.device,
             batch: int) -> Iterator[Tensor]:
    """Network inputs (B, 3, input_size, input_size), ``batch`` images at a time."""
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.array(images[start:start + batch])).to(device)  # a writable copy
        yield to_input(chunk, input_size, False, spec)


def cam_maps(model: AgeNet, images: np.ndarray, input_size: int, spec: InputSpec,
             ages: Sequence[float], device: torch.device | str, layer: nn.Module | None = None,
             batch: int = 16) -> np.ndarray:
    """Grad-CAM of the DEX age: uint8 RGB (N, H, W, 3) -> maps (N, input_size, input_size) in [0, 1].

    ``layer`` defaults to ``target_layer(model, input_size)``. The model is moved to ``device``
    and runs in eval mode (BatchNorm statistics, no dropout) with only the input requiring grad:
    frozen trunks get their activation gradients too, and no weight is left holding a ``.grad``;
    mode and ``requires_grad`` are restored after. grad-cam's hooks are removed even on error;
    its context manager is not used because it swallows IndexError.
    """
    _check_images(images)
    if len(ages) != model.output_layer.out_features:
        raise ValueError(f"{len(ages)} ages for a network with {model.output_layer.out_features} "
                         "outputs")
    device = torch.device(device)
    model.to(device)
    layer = layer if layer is not None else target_layer(model, input_size)[1]
    target = DexAgeTarget(ages)
    maps = []
    with preserved(model), torch.enable_grad():
        model.requires_grad_(False)
        cam = GradCAM(model=model, target_layers=[layer])  # puts the model in eval mode
        try:
            for x in _batches(images, input_size, spec, device, batch):
                maps.append(cam(x.requires_grad_(), [target] * len(x)))  # (B, S, S) float32
        finally:
            cam.activations_and_grads.release()
    return np.concatenate(maps)


def predict_ages(model: AgeNet, images: np.ndarray, input_size: int, spec: InputSpec,
                 ages: Sequence[float], device: torch.device | str, batch: int = 64) -> np.ndarray:
    """The DEX age (N,) the model predicts for uint8 RGB (N, H, W, 3), in eval mode."""
    _check_images(images)
    device = torch.device(device)
    model.to(device)
    values = torch.as_tensor(ages, dtype=torch.float32, device=device)
    out = []
    with preserved(model), torch.no_grad():
        model.eval()
        for x in _batches(images, input_size, spec, device, batch):
            out.append(dex_age(model(x), values).cpu())
    return torch.cat(out).numpy()


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) + map (S, S) in [0, 1] -> uint8 RGB (H, W, 3) with the heat map on top."""
    mask = F.interpolate(torch.from_numpy(cam)[None, None], size=image.shape[:2], mode="bilinear",
                         align_corners=False)[0, 0].clamp_(0, 1).numpy()  # (H, W)
    return show_cam_on_image(image.astype(np.float32) / 255, mask, use_rgb=True)


def cam_grid(columns: Sequence[tuple[str, np.ndarray, np.ndarray]], images: np.ndarray,
             true_ages: Sequence[float]) -> bytes:
    """Figure 14 as PNG bytes: one row per image; the face with its true age, then per model
    (title, maps (N, S, S), predicted ages (N,)) its map over the face and its predicted age.

    The layout is fixed, not fitted: ``len(columns) + 1`` cells of CELL_PX by CELL_PX + TITLE_PX
    pixels per row, so every run of the stage writes a figure of the same size.
    """
    _check_images(images)
    n = len(images)
    if len(true_ages) != n:
        raise ValueError(f"{len(true_ages)} true ages for {n} images")
    for title, maps, predicted in columns:
        if maps.ndim != 3 or len(maps) != n or len(predicted) != n:
            raise ValueError(f"column {title!r}: maps {maps.shape} and {len(predicted)} "
                             f"predictions do not match {n} images")
    n_cols, cell_h = len(columns) + 1, CELL_PX + TITLE_PX
    fig = Figure(figsize=(n_cols * CELL_PX / DPI, n * cell_h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    cells = [("face", images, [f"true age {age:g}" for age in true_ages])]
    cells += [(title, np.stack([overlay(img, cam) for img, cam in zip(images, maps)]),
               [f"predicted {age:.1f}" for age in predicted]) for title, maps, predicted in columns]
    for col, (title, pictures, captions) in enumerate(cells):
        for row in range(n):
            bottom = (n - 1 - row) * cell_h / (n * cell_h)
            ax = fig.add_axes((col / n_cols, bottom, 1 / n_cols, CELL_PX / (n * cell_h)))
            ax.imshow(pictures[row])
            ax.set_axis_off()
            ax.set_title(f"{title}\n{captions[row]}", fontsize=7, pad=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
