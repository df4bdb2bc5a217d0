"""Pretrained weights: published files -> our module names, checked key by key, never downloaded.

Three sources:

* ``imagenet``: torchvision's own checkpoint files, read only from ``$TORCH_HOME/hub/checkpoints``
  (torch.hub's cache). A missing file is an error, never a download.
* ``vggface2`` for ResNet-50 / SE-ResNet-50: the Caffe models of the VGGFace2 authors as converted
  to PyTorch in cydonia999/VGGFace2-pytorch (``resnet50_ft_weight.pkl``, ``senet50_ft_weight.pkl``,
  ``*_scratch_weight.pkl``): a pickled ``dict`` name -> numpy array whose names are those of that
  repository's models/resnet.py and models/senet.py; or the same dict saved as a torch ``.pth``.
* ``vggface2`` for VGG-16: Oxford VGG-Face as converted to PyTorch (``vgg_face_dag.pth``: keys
  ``conv1_1.weight`` ... ``conv5_3.bias``, ``fc6`` ... ``fc8``) and VGG-16 conversions that keep
  those conv names.

Every load checks that each tensor the network expects is present with the right shape and that
nothing unknown is left over, so a wrong file fails loudly instead of half-loading.
"""
from __future__ import annotations

import codecs
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from agecascade.errors import MissingInput, UserError

__all__ = [
    "InputSpec", "LoadReport", "NumpyOnlyUnpickler", "cached_checkpoint", "load_imagenet",
    "load_vggface2", "read_weights_file", "vgg_face_conv_names",
]

# Tensors that may be absent from a file without harm: BatchNorm's step counter only matters with
# momentum=None, and the Caffe conversions predate it.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)
SHOW = 5  # how many names of each kind a message lists


def _first(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names[:SHOW]) + (", ..." if len(names) > SHOW else "")


@dataclass(frozen=True)
class InputSpec:
    """The pixels a set of weights was trained on; the data pipeline must feed the same.

    A uint8 pixel ``p`` in ``channels`` order becomes ``(p / 255 * value_range - mean) / std``,
    with ``mean`` and ``std`` given in that same channel order.
    """

    channels: str  # "RGB" or "BGR"
    value_range: float  # 1.0: pixels scaled to [0, 1]; 255.0: raw 0..255 (Caffe / MatConvNet)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# From cydonia999/VGGFace2-pytorch datasets/vgg_face2.py ("from resnet50_ft.prototxt"): the
# converted Caffe models take BGR, 0..255, mean-subtracted, unit std.
VGGFACE2_CAFFE = InputSpec("BGR", 255.0, (91.4953, 103.8827, 131.0912), (1.0, 1.0, 1.0))
# vgg_face_dag.py's meta (MatConvNet conversion): RGB, 0..255, mean-subtracted. Other VGG-16
# conversions with the same names may differ (Caffe ones are BGR): check the file's source.
VGG_FACE_DAG = InputSpec("RGB", 255.0, (129.186279296875, 104.76238250732422, 93.59396362304688),
                         (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class LoadReport:
    """What a load did: logged by create_model and kept on the model for the run's records."""

    source: str
    loaded: int  # tensors copied into the network
    skipped: tuple[str, ...]  # file tensors deliberately left out (the original classifier)
    input_spec: InputSpec

    def __str__(self) -> str:
        shown = f" ({_first(self.skipped)})" if self.skipped else ""
        return f"{self.source}: loaded {self.loaded} tensors, skipped {len(self.skipped)}{shown}"


# ---------------------------------------------------------------------------------------------
# Reading files


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled dict of numpy arrays needs, under numpy 1.x and 2.x module names.

    The callables are taken from numpy's own ``__reduce__`` so they are right on any version.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict,
        # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else.

    ``pickle.load`` runs whatever callable a file names (``os.system`` included), and weights
    files come from download links. Only numpy's array reconstruction is let through.
    """

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: a weights .pkl may only contain "
                "numpy arrays") from None


def _read_pkl(path: Path) -> dict[str, Tensor]:
    with path.open("rb") as handle:
        # latin1: the published .pkl files were written by Python 2, whose str holds the raw bytes
        data = NumpyOnlyUnpickler(handle, encoding="latin1").load()
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: expected a dict name -> numpy array, not {type(data).__name__}")
    state = {}
    for key, value in data.items():
        if not (isinstance(value, np.ndarray) and value.dtype.kind in "fiu"):
            raise UserError(f"{path}: entry {key!r} is not a numeric numpy array "
                             f"({type(value).__name__})")
        state[str(key)] = torch.tensor(value)  # a copy: unpickled arrays may be read-only
    return state


def _read_pth(path: Path) -> dict[str, Tensor]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(data, Mapping) and all(isinstance(v, Tensor) for v in data.values())):
        raise UserError(f"{path}: expected a state dict (name -> tensor), found "
                         f"{type(data).__name__} with other values")
    return dict(data)


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """A ``.pkl`` (numpy dict, restricted unpickler) or ``.pth``/``.pt`` (torch, weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"weights file {path} does not exist")
    readers: dict[str, Callable[[Path], dict[str, Tensor]]] = {
        ".pkl": _read_pkl, ".pth": _read_pth, ".pt": _read_pth}
    if path.suffix not in readers:
        raise UserError(f"{path}: unknown weights format {path.suffix!r}; expected one of "
                         f"{sorted(readers)}")
    return readers[path.suffix](path)


# ---------------------------------------------------------------------------------------------
# Matching names and shapes


def _split(raw: Mapping[str, Tensor], drop: tuple[str, ...],
           rename: Callable[[str], str] = lambda key: key) -> tuple[dict[str, Tensor], list[str]]:
    """Keys under a ``drop`` prefix are skipped (the source's classifier); the rest renamed."""
    state, skipped = {}, []
    for key, value in raw.items():
        if key.startswith(drop):
            skipped.append(key)
        else:
            state[rename(key)] = value
    return state, skipped


def _load_checked(module: nn.Module, state: Mapping[str, Tensor], skipped: list[str],
                  source: str, target: str, spec: InputSpec) -> LoadReport:
    """Copy ``state`` into ``module`` after checking every key and shape; ValueError otherwise."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        found = {"missing": missing, "unexpected": unexpected, "shape-mismatched": mismatched}
        parts = [f"{len(names)} {kind} ({_first(names)})" for kind, names in found.items() if names]
        raise UserError(f"{source} does not fit {target}: " + "; ".join(parts))
    module.load_state_dict(state, strict=False)  # checked above; only the counters may be absent
    return LoadReport(source, len(state), tuple(skipped), spec)


# ---------------------------------------------------------------------------------------------
# ImageNet (torchvision's files, offline)


def cached_checkpoint(weights: WeightsEnum) -> Path:
    """The file torch.hub would read for ``weights``; FileNotFoundError rather than a download."""
    name = Path(urlparse(weights.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise MissingInput(
            f"ImageNet weights {weights} need the file {name} at {path}; it is not there and "
            "nothing is downloaded. Put the file there, or point TORCH_HOME at a directory "
            f"whose hub/checkpoints/ holds {name}.")
    return path


def load_imagenet(module: nn.Module, weights: WeightsEnum, drop: tuple[str, ...],
                  rename: Callable[[str], str] = lambda key: key) -> LoadReport:
    """torchvision's checkpoint for ``weights`` into ``module``, minus its ImageNet classifier."""
    path = cached_checkpoint(weights)
    state, skipped = _split(_read_pth(path), drop, rename)
    transform = weights.transforms()
    spec = InputSpec("RGB", 1.0, tuple(transform.mean), tuple(transform.std))
    return _load_checked(module, state, skipped, f"{weights} ({path})", type(module).__name__, spec)


# ---------------------------------------------------------------------------------------------
# VGGFace2 / VGG-Face (user-supplied files)

_VGG16_BLOCKS = (2, 2, 3, 3, 3)  # convs per block: conv1_1, conv1_2, conv2_1, ... conv5_3


def vgg_face_conv_names() -> list[str]:
    """The 13 conv names of VGG-Face / Caffe VGG-16, in network order."""
    return [f"conv{b}_{i}" for b, n in enumerate(_VGG16_BLOCKS, 1) for i in range(1, n + 1)]


def _vgg_face_rename(conv_base: nn.Sequential) -> Callable[[str], str]:
    """conv3_1.weight -> 10.weight: the index of the same conv in torchvision's ``features``."""
    indices = [name for name, layer in conv_base.named_children() if isinstance(layer, nn.Conv2d)]
    table = dict(zip(vgg_face_conv_names(), indices, strict=True))

    def rename(key: str) -> str:
        layer, _, param = key.partition(".")
        return f"{table[layer]}.{param}" if layer in table else key  # unknown keys stay, and fail

    return rename


def load_vggface2(module: nn.Module, layout: str, path: Path) -> LoadReport:
    """A VGGFace2 / VGG-Face file into ``module`` (VGG-16 conv base, or ResNet-50 / SE-ResNet-50
    trunk in the cydonia999 layout). The face-identity classifier (``fc``: 8631 classes;
    ``fc6``-``fc8`` for VGG) is skipped: our heads differ and are trained from He init."""
    raw = read_weights_file(path)
    if layout == "vgg16":
        # fc6/fc7 (4096-wide) are not used either: the thesis head is 512-256, trained from scratch.
        state, skipped = _split(raw, ("fc6.", "fc7.", "fc8."), _vgg_face_rename(module))
        spec = VGG_FACE_DAG
    elif layout in ("resnet50", "senet50"):
        state, skipped = _split(raw, ("fc.",))
        spec = VGGFACE2_CAFFE
    else:
        raise UserError(f"no VGGFace2 layout for {layout!r}; known: vgg16, resnet50, senet50")
    return _load_checked(module, state, skipped, str(path), f"{layout} (VGGFace2 layout)", spec)
