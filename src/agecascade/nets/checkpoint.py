"""Reading the `model.pt` files every training stage writes.

A checkpoint is ``{"model": state_dict, "meta": {...}, "epoch": int, "metrics": {...}}``; its
meta names the architecture (``arch``), the ages of the output classes (``ages``), the pixel
convention (``input_spec``) and the ``input_size`` it was trained at, so it rebuilds alone.
"""
from __future__ import annotations

from pathlib import Path

import torch

from agecascade.errors import MissingInput
from agecascade.nets.backbones import AgeNet, create_model
from agecascade.nets.weights import InputSpec


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[AgeNet, dict]:
    """(model in eval mode on ``device``, meta) of a stage's model.pt."""
    if not Path(path).is_file():
        raise MissingInput(f"{path}: no such checkpoint; run the stage that writes it")
    state = torch.load(path, map_location="cpu", weights_only=True)
    meta = state["meta"]
    model = create_model(meta["arch"], len(meta["ages"]))  # arch: e.g. resnet50-torchvision
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def input_spec(meta: dict) -> InputSpec:
    """The pixel convention a checkpoint's weights expect."""
    return InputSpec(**meta["input_spec"])
