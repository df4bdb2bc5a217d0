"""One model behind one interface: face crops in, an age distribution and its summaries out.

An *engine* runs the network (PyTorch here, onnxruntime in ``inference.onnx``); the
:class:`Predictor` turns its class probabilities into what a user reads: the DEX expected age,
the spread of the predicted distribution, a central interval and the mass below 18, all read
with the checkpoint's calibration (its temperature and age-bias line, ``train/calibration.py``).
The CLI, the MLflow pyfunc and the ONNX path all go through it, so their ages agree.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from agecascade.calibrated import bias_line_of, temperature_of
from agecascade.data.recipe import CropRecipe
from agecascade.errors import MissingInput
from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.train.calibration import central_interval, corrected_ages, temper
from agecascade.train.data import to_input, to_unit
from agecascade.train.engine import pick_device

MINOR_AGE = 18.0         # p_under_18: the predicted mass of ages below this


class Engine(Protocol):
    name: str              # "torch", "onnx"
    size: int              # the square crop side the network takes
    ages: np.ndarray       # float32 (K,): the age of each output class
    recipe: CropRecipe     # how the training crops were cut
    resizes: bool          # takes crops of any size and resizes them as training does
    temperature: float     # fitted on the validation split (calibration.py); 1 for older models
    bias_line: tuple[float, float]  # (slope, intercept), the same; (1, 0) for older models

    def probs(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, size, size, 3) (any size if ``resizes``) -> float32 (B, K) probabilities."""


def recipe_of(meta: dict, source: str) -> CropRecipe:
    """The checkpoint's crop recipe; the defaults at its input size, with a warning, for a
    checkpoint written before recipes were stored."""
    if "crop" in meta:
        return CropRecipe(**meta["crop"])
    recipe = CropRecipe(size=int(meta["input_size"]))
    warnings.warn(f"{source} records no crop recipe; cropping with the defaults {asdict(recipe)}",
                  stacklevel=3)
    return recipe


class TorchEngine:
    """A ``model.pt`` checkpoint, read with ``weights_only=True``."""

    name = "torch"
    resizes = True  # to_input: the very resize training applies to stored crops

    def __init__(self, checkpoint: Path, device: str = "auto"):
        self.device = pick_device(device)
        self.model, meta = load_checkpoint(checkpoint, self.device)
        self.size = int(meta["input_size"])
        self.spec = input_spec(meta)
        self.ages = np.asarray(meta["ages"], dtype=np.float32)
        self.recipe = recipe_of(meta, str(checkpoint))
        self.temperature = temperature_of(meta)
        self.bias_line = bias_line_of(meta)
        self.meta = meta

    @torch.no_grad()
    def probs(self, crops: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(np.require(crops, requirements=["C", "W"]))  # copies a read-only mmap
        x = to_input(pixels.to(self.device), self.size, False, self.spec)
        return torch.softmax(self.model(x).float(), dim=1).cpu().numpy()


def load_engine(model: str | Path, device: str = "auto") -> Engine:
    """A checkpoint (``.pt``) or an exported ``.onnx`` file. MLflow URIs are resolved by the
    serving layer (``agecascade.serving.engine_from_uri``), which knows MLflow."""
    path = Path(model)
    if not path.is_file():
        raise MissingInput(f"--model {model}: no such file")
    if path.suffix.lower() == ".onnx":
        from agecascade.inference.onnx import OnnxEngine

        return OnnxEngine(path)
    return TorchEngine(path, device)


def fit_size(crops: np.ndarray, size: int) -> np.ndarray:
    """uint8 crops (B, S, S, 3) resized to ``size`` the way training resizes stored crops."""
    if crops.shape[1:3] == (size, size):
        return crops
    unit = to_unit(torch.from_numpy(np.ascontiguousarray(crops)), size)
    return (unit.permute(0, 2, 3, 1) * 255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def summarise(probs: np.ndarray, ages: np.ndarray, temperature: float = 1.0
              ) -> dict[str, np.ndarray]:
    """(B, K) probabilities over ``ages`` -> per face: age (the DEX expected value of ``probs``),
    and of the distribution tempered by ``temperature``: age_std (its standard deviation),
    age_low / age_high (its central INTERVAL) and p_under_18."""
    probs = probs.astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    ages = ages.astype(np.float64)
    mean = probs @ ages
    spread = temper(probs, temperature)
    std = np.sqrt(np.clip(spread @ ages**2 - (spread @ ages)**2, 0.0, None))
    low, high = central_interval(spread, ages)
    under = spread[:, ages < MINOR_AGE].sum(axis=1)
    return {"age": mean, "age_std": std, "age_low": low, "age_high": high, "p_under_18": under}


class Predictor:
    """An engine, batched: any number of crops at the recipe's size in, one estimate each out.
    With ``flip`` each crop's distribution is the mean of the crop's and its mirror image's
    (training flips faces at random, so both views are in-distribution)."""

    def __init__(self, engine: Engine, batch: int = 64, flip: bool = True):
        self.engine, self.batch, self.flip = engine, batch, flip
        self.ages = corrected_ages(engine.ages, engine.bias_line)  # the classes' ages as read

    @property
    def recipe(self) -> CropRecipe:
        return self.engine.recipe

    def probs(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) at any square size -> float32 (N, K), in batches."""
        out = np.empty((len(crops), len(self.engine.ages)), dtype=np.float32)
        for start in range(0, len(crops), self.batch):
            chunk = crops[start:start + self.batch]
            if not self.engine.resizes:
                chunk = fit_size(chunk, self.engine.size)
            probs = self.engine.probs(chunk)
            if self.flip:
                probs = (probs + self.engine.probs(np.ascontiguousarray(chunk[:, :, ::-1]))) / 2
            out[start:start + len(chunk)] = probs
        return out

    def estimate(self, crops: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(summaries of :func:`summarise` over the bias-corrected class ages, probabilities
        over the network's classes) of uint8 crops (N, S, S, 3)."""
        probs = self.probs(crops)
        return summarise(probs, self.ages, self.engine.temperature), probs
