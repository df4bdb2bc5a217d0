"""The age network as an MLflow pyfunc model: face crops in, DEX ages out.

The logged model carries a stage checkpoint (``model.pt``) as its artifact and the agecascade
package as code, so ``mlflow.pyfunc.load_model`` rebuilds it anywhere the pinned packages are
installed, with no repository checkout.

Input convention (the MLmodel signature is uint8 ``(-1, -1, -1, 3)`` -> float32 ``(-1,)``):

* RGB pixels, height x width x 3. uint8 (or any integer type) is read as 0..255; floats must
  already be scaled to [0, 1] (the torchvision ``ToTensor`` convention). A float image with
  values above 1 is refused rather than guessed at: a dark 0..255 image and a [0, 1] image cannot
  be told apart reliably.
* Any size: each image is resized (stretched if not square) to the checkpoint's input size.
* Through the pyfunc a batch is a uint8 array (N, H, W, 3), or a 1-D object array of images for
  mixed sizes, which MLflow's tensor signature lets through. :func:`as_batch` packs a list of
  arrays / PIL images, or a single image, into one of those forms. Called directly
  (``loaded.unwrap_python_model().predict(None, images)``), ``predict`` takes those lists and
  single images as they are.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models.model import ModelInfo
from PIL import Image

from agecascade.nets.checkpoint import input_spec, load_checkpoint
from agecascade.nets.dex import dex_age
from agecascade.registry import MODEL_TYPE
from agecascade.train.data import to_input

CHECKPOINT = "checkpoint"  # the artifact key of model.pt
# The logged model's entry point ("models from code"): MLflow runs it at load time instead of
# unpickling an object, so a model file cannot execute arbitrary pickled code.
ENTRY = ("import mlflow\n\nfrom agecascade.serving import AgeEstimator\n\n"
         "mlflow.models.set_model(AgeEstimator())\n")
BATCH = 64  # images per forward pass: bounds memory for large requests
EXPECTED = ("an RGB image (H, W, 3) or a batch (N, H, W, 3) as a numpy array (uint8 0..255, or "
            "float in [0, 1]), a PIL image, or a list of those")


def _pixels(image: Any, where: str) -> np.ndarray:
    """One image -> uint8 (H, W, 3); ValueError naming ``where`` and what was wrong."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, (list, tuple)):  # nested lists: a JSON request's ragged batch
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: got {type(image).__name__}; expected {EXPECTED}")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{where}: shape {image.shape} is not a non-empty RGB image (H, W, 3)")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"{where}: integer pixels must lie in 0..255, found {low}..{high}")
        return image.astype(np.uint8)
    if image.dtype.kind == "f":
        low, high = float(image.min()), float(image.max())
        if not (0.0 <= low and high <= 1.0):  # also catches NaN
            raise ValueError(f"{where}: float pixels must lie in [0, 1], found {low:g}..{high:g}; "
                             "pass 0..255 pixels as uint8")
        return np.rint(image * 255.0).astype(np.uint8)
    raise ValueError(f"{where}: pixel type {image.dtype} is neither integer nor float")


def to_images(model_input: Any) -> list[np.ndarray]:
    """Any accepted input -> a list of uint8 (H, W, 3) arrays, in input order."""
    if isinstance(model_input, Image.Image):
        return [_pixels(model_input, "image")]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object and model_input.ndim == 1:  # ragged batch
            return [_pixels(item, f"image {i}") for i, item in enumerate(model_input)]
        if model_input.ndim == 4:
            return [_pixels(item, f"image {i}") for i, item in enumerate(model_input)]
        if model_input.ndim == 3:
            return [_pixels(model_input, "image")]
        raise ValueError(f"input array of shape {model_input.shape}: expected {EXPECTED}")
    if isinstance(model_input, Sequence) and not isinstance(model_input, (str, bytes)):
        return [_pixels(item, f"image {i}") for i, item in enumerate(model_input)]
    raise ValueError(f"input of type {type(model_input).__name__}: expected {EXPECTED}")


def as_batch(images: Any) -> np.ndarray:
    """Pack any accepted input into what the pyfunc signature lets through: uint8 (N, H, W, 3)
    when all images share a size, else a 1-D object array of uint8 (H, W, 3) images."""
    pixels = to_images(images)
    if len({p.shape for p in pixels}) == 1:
        return np.stack(pixels)
    packed = np.empty(len(pixels), dtype=object)  # np.array(list) would try to stack them
    for i, p in enumerate(pixels):
        packed[i] = p
    return packed


class AgeEstimator(mlflow.pyfunc.PythonModel):
    """A stage checkpoint behind the pyfunc interface; see the module docstring for inputs."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, meta = load_checkpoint(Path(context.artifacts[CHECKPOINT]), self.device)
        self.size = int(meta["input_size"])
        self.spec = input_spec(meta)
        self.ages = torch.tensor(meta["ages"], dtype=torch.float32, device=self.device)

    # np.ndarray is what the pyfunc hands over; MLflow skips its own type-hint checks for it.
    def predict(self, context: Any, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """DEX ages, float32 (N,), in input order. Direct callers may also pass a list of arrays
        / PIL images or a single PIL image."""
        images = to_images(model_input)
        ages = np.empty(len(images), dtype=np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_shape[image.shape].append(i)
        for rows in by_shape.values():  # same-sized images run as one batch
            for start in range(0, len(rows), BATCH):
                chunk = rows[start:start + BATCH]
                ages[chunk] = self._ages(np.stack([images[i] for i in chunk]))
        return ages

    @torch.no_grad()
    def _ages(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) -> DEX ages (B,)."""
        x = to_input(torch.from_numpy(batch).to(self.device), self.size, False, self.spec)
        return dex_age(self.model(x), self.ages).cpu().numpy()


def requirements() -> list[str]:
    """Exact pins of what the model imports, from the installed versions (local tags like
    +cu130 dropped: they are not on PyPI)."""
    import PIL
    import torchvision

    found = {"torch": torch.__version__, "torchvision": torchvision.__version__,
             "numpy": np.__version__, "pillow": PIL.__version__, "mlflow": mlflow.__version__}
    return [f"{name}=={version.split('+')[0]}" for name, version in found.items()]


def log_age_estimator(checkpoint: Path, name: str = "model") -> ModelInfo:
    """Log ``checkpoint`` as an AgeEstimator pyfunc (into the active run, if any)."""
    import agecascade
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    _, meta = load_checkpoint(checkpoint)  # fails here, not at serving time, on a wrong file
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))
    example = np.full((1, 16, 16, 3), 128, dtype=np.uint8)  # small: the example is stored as JSON
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "age_estimator.py"
        entry.write_text(ENTRY)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(entry), artifacts={CHECKPOINT: str(checkpoint)},
            code_paths=[str(Path(agecascade.__file__).parent)], pip_requirements=requirements(),
            signature=signature, input_example=example, model_type=MODEL_TYPE,
            metadata={"arch": meta["arch"], "backbone": meta.get("backbone", ""),
                      "dataset": meta.get("dataset", ""), "mode": meta.get("mode", ""),
                      "input_size": int(meta["input_size"]),
                      "age_range": [float(min(meta["ages"])), float(max(meta["ages"]))]})
