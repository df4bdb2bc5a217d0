"""Content fingerprints: what decides whether a resume point or a fold cache may be reused.

A cache may be reused only when everything that shaped it is the same *content*: the same
starting tensors, the same crops, the same pretrained weights, the same code and settings. A
file's path or date says nothing about that (a checkpoint copied elsewhere is the same start; a
rebuilt crop store at the old path is not the same data), so no key here is built from paths.

Writing such caches so that a kill never leaves half a file is ``agecascade.atomic``'s job.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from agecascade.data.store import CROPS, MANIFEST

# A crop store up to this size is hashed whole; above it, SAMPLE_BLOCKS blocks of BLOCK bytes.
BLOCK = 1 << 16
SAMPLE_BLOCKS = 1024
# The checkpoint meta fields that shape a run started from it: the architecture, the ages of
# the output classes (they decide the label space), the pixel convention and the input size.
# Not "init": it names the file the checkpoint itself started from.
SHAPING_META = ("arch", "ages", "input_spec", "input_size")


# --- fingerprints -----------------------------------------------------------------------------

def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    # Paths in particular: a key built from a path would say nothing about the content.
    raise TypeError(f"a fingerprint part must be plain data, not {type(value).__name__}: {value!r}")


def fingerprint(**parts: object) -> str:
    """sha256 of the named parts (plain data, dataclasses, or other fingerprints), order-free."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A state dict by its tensors: names, dtypes, shapes and values, wherever they were read."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_fingerprint(checkpoint: Mapping) -> str:
    """A stage's model.pt as read by ``read_init``: its tensors and the meta that shapes a run
    started from it (:data:`SHAPING_META`), not the file's name or date."""
    meta = checkpoint.get("meta", {})
    return fingerprint(tensors=state_fingerprint(checkpoint["model"]),
                       meta={k: meta.get(k) for k in SHAPING_META})


def weights_fingerprint(pretrained: str, weights: Path | str | None = None) -> str:
    """The choice of pretrained weights, and the weights file's whole content when there is one.

    ``imagenet`` reads torchvision's own file, whose name carries a prefix of its sha256 and is
    fixed by the torchvision version (part of :func:`code_version`), so the choice names it.
    """
    return fingerprint(pretrained=pretrained, weights=file_sha256(Path(weights)) if weights else None)


def store_fingerprint(folder: Path, block: int = BLOCK, blocks: int = SAMPLE_BLOCKS) -> str:
    """A prepared crop store by content: manifest.parquet whole, and crops.npy whole up to
    ``blocks * block`` bytes (64 MiB), else its size and ``blocks`` evenly spaced blocks.

    The real IMDB store runs to many GB, and a full hash would cost more than a short training
    run each time a stage starts. A sample is enough because the crops are a function of the
    manifest's rows and of ``prepare``'s settings and code: the manifest, hashed whole, names
    each row's source file by its sha1, its face box and its image size; the .npy header (in
    the first block) holds the crop size; and a change of margin, resampling or decoding alters
    nearly every crop, so the sampled blocks see it. What a sample can miss is an edit to a few
    crops by hand, which no stage does.
    """
    folder = Path(folder)
    digest = hashlib.sha256(file_sha256(folder / MANIFEST).encode())
    crops = folder / CROPS
    size = crops.stat().st_size
    digest.update(str(size).encode())
    with crops.open("rb") as handle:
        if size <= block * blocks:
            digest.update(handle.read())
        else:
            for i in range(blocks):  # the first block holds the header, the last the tail
                handle.seek(i * (size - block) // (blocks - 1))
                digest.update(handle.read(block))
    return digest.hexdigest()


def run_key(settings: Mapping, manifest: Path, device_type: str, init: Mapping | None,
            pretrained: str = "none", weights: Path | str | None = None) -> str:
    """What a run's cached results (a resume point, finished folds) depend on, by content: the
    starting checkpoint ``init``'s tensors (as ``read_init`` returns it), or without one the
    ``pretrained`` choice and ``weights`` file; the crop store at ``manifest``; the code; the
    device type; and the ``settings`` that shape a result."""
    start = (checkpoint_fingerprint(init) if init is not None
             else weights_fingerprint(pretrained, weights or None))
    return fingerprint(settings=settings, device=device_type, start=start,
                       store=store_fingerprint(manifest), code=code_version())


PACKAGES = ("agecascade", "agecascade.pipelines")


@functools.lru_cache
def code_version(packages: tuple[str, ...] = PACKAGES) -> str:
    """Every .py file of ``packages`` (the library and its stage modules), by path inside its
    package and content, plus the torch and torchvision versions: code that can change a result.

    Deliberately wide: an edit to logging code also retrains, which costs time but never reuses
    a result that the new code would not produce. Bytecode is not code, and does not count.
    """
    import torchvision

    roots = {Path(location).resolve() for name in packages
             for location in importlib.util.find_spec(name).submodule_search_locations}
    files = sorted((root.name, f.relative_to(root).as_posix(), f) for root in roots
                   for f in root.rglob("*.py") if "__pycache__" not in f.parts)
    digest = hashlib.sha256(f"torch {torch.__version__} torchvision {torchvision.__version__}".encode())
    for root_name, relative, path in files:
        digest.update(f"{root_name}/{relative}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
