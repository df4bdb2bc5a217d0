"""A checkpoint as one ONNX graph, and the onnxruntime engine that runs it.

The graph takes what the crop store holds, uint8 RGB crops ``crops`` (B, S, S, 3) at the
checkpoint's input size, and normalises them itself with the training code's own ``to_input``, so
no caller can feed it the wrong pixel convention (BGR, 0..255, Caffe means). It returns the DEX
``age`` (B,), read through the checkpoint's age-bias line as ``predict`` reads it, and the class
``probs`` (B, K). What a runtime needs besides (the class ages, the
input size, the crop recipe) travels in the file's ``metadata_props``.

torch is imported only by the exporting functions: running an exported model needs numpy and
onnxruntime alone, which start in a fraction of the time torch and torchvision take to import.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from agecascade.atomic import replacing
from agecascade.calibrated import bias_line_of, temperature_of
from agecascade.data.recipe import CropRecipe
from agecascade.errors import MissingInput, UserError

if TYPE_CHECKING:  # MLflow is imported by log_onnx_model alone
    from mlflow.models.model import ModelInfo

__all__ = ["EXTRA", "MIN_OPSET", "OnnxEngine", "OnnxParityError", "export_onnx",
           "log_onnx_model", "probe_crops"]

EXTRA = "onnx"  # the optional-dependencies group that installs onnx, onnxruntime and onnxscript
# torch's exporter (torch.export + onnxscript) writes opset 18 and up; converting its graphs
# down to 17 fails on the Reduce* ops, whose axes moved from attribute to input.
MIN_OPSET = 18
MAX_AGE_DIFF = 0.05  # years: the most an exported age may differ from PyTorch's for the same crop
PROBE_CROPS = 100
CHECK_BATCH = 25  # crops per forward pass while checking: bounds memory for VGG-16 at 224 px
KEY = "agecascade."  # prefix of our metadata_props
FORMAT = "1"  # the layout of the graph and metadata below; bump when either changes


class OnnxParityError(RuntimeError):
    """The exported graph computes other ages than the checkpoint: a bug, not a user mistake."""


def _require(module: str) -> ModuleType:
    """``module``, or a UserError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"ONNX needs the package {module!r} ({err}); install it with "
                        f"pip install 'agecascade[{EXTRA}]'") from None


def probe_crops(size: int, n: int = PROBE_CROPS, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 crops (n, size, size, 3) for a parity check when no real ones are
    given: noise over a brightness ramp, so the images (and their ages) differ. Real faces probe
    the network where it is used and are the better check."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 64, (n, size, size, 3))
    ramp = np.linspace(0, 191, n).reshape(n, 1, 1, 1)
    return (noise + ramp).astype(np.uint8)


def _check_batch(crops: np.ndarray, what: str, size: int | None = None) -> np.ndarray:
    """``crops`` as a C-contiguous uint8 (B, S, S, 3) array, with S = ``size`` if given;
    UserError otherwise."""
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8:
        raise UserError(f"{what}: expected a uint8 numpy array, got "
                        f"{getattr(crops, 'dtype', type(crops).__name__)}")
    side = crops.shape[1] if crops.ndim == 4 else None
    if crops.ndim != 4 or crops.shape[1:] != (side, side, 3) or size not in (None, side):
        wanted = "S, S" if size is None else f"{size}, {size}"
        raise UserError(f"{what}: expected square crops of shape (B, {wanted}, 3), got "
                        f"{crops.shape}")
    return np.ascontiguousarray(crops)


# ---------------------------------------------------------------------------------------------
# Export


def _graph_module(model: Any, meta: dict) -> Any:
    """The checkpoint's network with the pixel normalisation before it and DEX after it."""
    import torch

    from agecascade.nets.checkpoint import input_spec
    from agecascade.train.calibration import corrected_ages
    from agecascade.train.data import to_input

    class AgeGraph(torch.nn.Module):
        """uint8 crops (B, S, S, 3) -> (DEX age (B,), probabilities (B, K))."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.size = int(meta["input_size"])
            self.spec = input_spec(meta)
            # the age output is read as `predict` reads it: through the age-bias line
            read = corrected_ages(np.asarray(meta["ages"]), bias_line_of(meta))
            self.register_buffer("ages", torch.tensor(read, dtype=torch.float32))

        def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # H = W = size, so to_input does not resize: what is left is its exact arithmetic.
            logits = self.model(to_input(crops, self.size, False, self.spec))
            probs = torch.softmax(logits.float(), dim=1)
            return probs @ self.ages, probs  # agecascade.nets.dex.dex_age, keeping the probs

    return AgeGraph().eval()


def _metadata(meta: dict, recipe: CropRecipe) -> dict[str, str]:
    return {
        f"{KEY}format": FORMAT,
        f"{KEY}ages": json.dumps([float(a) for a in meta["ages"]]),
        f"{KEY}input_size": str(int(meta["input_size"])),
        f"{KEY}crop": json.dumps(asdict(recipe)),
        f"{KEY}arch": str(meta["arch"]),
        f"{KEY}backbone": str(meta.get("backbone", meta["arch"])),
        f"{KEY}temperature": repr(temperature_of(meta)),
        f"{KEY}bias_line": json.dumps(list(bias_line_of(meta))),
    }


def _torch_outputs(graph: Any, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    ages, probs = [], []
    with torch.no_grad():
        for start in range(0, len(crops), CHECK_BATCH):
            # torch.tensor copies: the crops may be a read-only memory map
            age, prob = graph(torch.tensor(crops[start:start + CHECK_BATCH]))
            ages.append(age.numpy())
            probs.append(prob.numpy())
    return np.concatenate(ages), np.concatenate(probs)


def _onnx_outputs(path: Path, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = _session(path, threads=None)
    ages, probs = [], []
    for start in range(0, len(crops), CHECK_BATCH):
        age, prob = session.run(["age", "probs"], {"crops": crops[start:start + CHECK_BATCH]})
        ages.append(age)
        probs.append(prob)
    return np.concatenate(ages), np.concatenate(probs)


def export_onnx(checkpoint: Path, out: Path, opset: int = MIN_OPSET,
                check_crops: np.ndarray | None = None) -> dict:
    """Export ``checkpoint`` (a stage's model.pt) to ``out`` and check it against PyTorch.

    ``check_crops``: uint8 (N, S, S, 3), ideally real face crops, resized to the checkpoint's
    input size as training resizes stored crops; by default :func:`probe_crops`. The file
    reaches ``out`` only once onnxruntime's ages on those crops are within ``MAX_AGE_DIFF`` years
    of PyTorch's; otherwise :class:`OnnxParityError` is raised and ``out`` is left as it was.
    Returns the facts of the export.
    """
    onnx = _require("onnx")
    _require("onnxruntime")
    _require("onnxscript")  # torch.onnx.export(dynamo=True) converts through it
    import torch

    from agecascade.inference.predictor import fit_size, recipe_of
    from agecascade.nets.checkpoint import load_checkpoint

    if opset < MIN_OPSET:
        raise UserError(f"opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or later")
    model, meta = load_checkpoint(checkpoint, "cpu")
    size = int(meta["input_size"])
    crops = probe_crops(size) if check_crops is None else fit_size(
        _check_batch(check_crops, "check crops"), size)
    if len(crops) == 0:
        raise UserError("check crops: none given; parity needs at least one crop")
    graph = _graph_module(model, meta)
    example = torch.from_numpy(probe_crops(size, n=2))  # batch 2: a batch of 1 would be baked in
    program = torch.onnx.export(
        graph, (example,), None, dynamo=True, opset_version=opset, verbose=False,
        input_names=["crops"], output_names=["age", "probs"],
        dynamic_shapes={"crops": {0: torch.export.Dim("batch")}})
    program.model.metadata_props.update(_metadata(meta, recipe_of(meta, str(checkpoint))))
    expected_age, expected_probs = _torch_outputs(graph, crops)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        program.save(tmp, external_data=False)
        onnx.checker.check_model(str(tmp))
        age, probs = _onnx_outputs(tmp, crops)
        age_diff = float(np.abs(age - expected_age).max())
        if not age_diff <= MAX_AGE_DIFF:  # `not <=`: a NaN fails too
            raise OnnxParityError(
                f"{checkpoint} -> ONNX: ages differ from PyTorch's by up to {age_diff:.4g} years "
                f"on {len(crops)} crops (allowed {MAX_AGE_DIFF}); {out} not written")
    return {"out": str(out), "opset": program.model.opset_imports[""], "max_abs_diff_age": age_diff,
            "max_abs_diff_probs": float(np.abs(probs - expected_probs).max()),
            "n_checked": int(len(crops)), "size_bytes": out.stat().st_size,
            "input_size": size, "n_classes": len(meta["ages"]), "arch": str(meta["arch"])}


# ---------------------------------------------------------------------------------------------
# Running


def _session(path: Path, threads: int | None) -> Any:
    """A CPU onnxruntime session; UserError for a file onnxruntime cannot read."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one chain of layers: parallelism is within each op
    # Idle worker threads would busy-wait for the next op, taking cores from whatever else runs
    # (a training job, the caller's face detector); on a shared machine that made it slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf/... classes
        raise UserError(f"{path}: not a readable ONNX model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


class OnnxEngine:
    """An exported ``.onnx`` file run by onnxruntime on the CPU (the ``Engine`` interface of
    ``agecascade.inference.predictor``). ``threads``: onnxruntime's intra-op threads; None lets
    it use every core."""

    name = "onnx"
    resizes = False  # the graph takes crops at ``size`` only; the Predictor resizes the others

    def __init__(self, path: Path, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"{path}: no such ONNX model")
        self.session = _session(path, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        if props.get(f"{KEY}format") != FORMAT:
            found = props.get(f"{KEY}format")
            raise UserError(f"{path}: not an agecascade ONNX model (metadata {KEY}format is "
                            f"{found!r}, expected {FORMAT!r}); export one with "
                            "`agecascade export --format onnx`")
        self.ages = np.asarray(json.loads(props[f"{KEY}ages"]), dtype=np.float32)
        self.size = int(props[f"{KEY}input_size"])
        crop = json.loads(props[f"{KEY}crop"])
        if "offset" in crop:  # JSON has no tuples
            crop["offset"] = tuple(crop["offset"])
        self.recipe = CropRecipe(**crop)
        self.arch = props[f"{KEY}arch"]
        self.backbone = props[f"{KEY}backbone"]
        # A file exported before calibration has neither; the checkpoint's defaults apply.
        calibration = {name: json.loads(props[f"{KEY}{name}"]) for name in
                       ("temperature", "bias_line") if f"{KEY}{name}" in props}
        self.temperature = temperature_of(calibration)
        self.bias_line = bias_line_of(calibration)

    def probs(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, size, size, 3) -> float32 (B, K) class probabilities."""
        crops = _check_batch(crops, f"{self.name} engine input", self.size)
        if len(crops) == 0:
            return np.empty((0, len(self.ages)), dtype=np.float32)
        return self.session.run(["probs"], {"crops": crops})[0]


# ---------------------------------------------------------------------------------------------
# MLflow


def log_onnx_model(checkpoint: Path, name: str = "onnx") -> ModelInfo:
    """Export ``checkpoint`` and log it with MLflow's ONNX flavor (no pickle: the artifact is the
    .onnx file and its pyfunc runs it with onnxruntime). Returns MLflow's ModelInfo."""
    import mlflow
    import mlflow.onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    onnx = _require("onnx")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        facts = export_onnx(checkpoint, path)
        model = onnx.load(str(path))
    size, classes = facts["input_size"], facts["n_classes"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3), "crops")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), "age"),
                        TensorSpec(np.dtype(np.float32), (-1, classes), "probs")]))
    return mlflow.onnx.log_model(
        model, name=name, signature=signature, save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
        metadata={"agecascade_parity": {k: facts[k] for k in
                                        ("max_abs_diff_age", "n_checked", "opset")}})
