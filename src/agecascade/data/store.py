"""The crop store: one ``crops.npy`` of shape (N, size, size, 3) uint8, row i = manifest row i.

A plain ``.npy`` opens with ``np.load(path, mmap_mode="r")``: no decoding, no per-file I/O,
and random access from many data-loader workers at once. That is what keeps a GPU fed.
"""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from agecascade.data.recipe import CropRecipe
from agecascade.errors import MissingInput, UserError

MANIFEST, CROPS, REPORT, COUNTS = "manifest.parquet", "crops.npy", "report.json", "counts.json"


def create_store(path: Path, rows: int, size: int) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, size, size, 3))


def shrink_store(path: Path, rows: int) -> None:
    """Cut a store down to its first ``rows`` rows in place, instead of copying gigabytes.

    Rows are written in order, so dropping the unused tail only needs a new header (padded to
    the old header's length) and a truncate.
    """
    with path.open("r+b") as handle:
        major, minor = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[(major, minor)]
        shape, _, _ = read_header(handle)
        offset = handle.tell()
        header_start = 8 + (2 if major == 1 else 4)
        old_len = offset - header_start
        text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {(rows, *shape[1:])}, }}"
        new = text.ljust(old_len - 1) + "\n"
        assert len(new) == old_len and ast.literal_eval(text)["shape"][0] == rows
        handle.seek(header_start)
        handle.write(new.encode("latin1"))
        handle.truncate(offset + rows * int(np.prod(shape[1:])))


def load_prepared(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(manifest, memory-mapped crops) of one prepared dataset folder."""
    for name in (MANIFEST, CROPS):
        if not (folder / name).is_file():
            raise MissingInput(f"{folder}: no {name}; make it with `agecascade prepare`")
    manifest = pd.read_parquet(folder / MANIFEST)
    crops = np.load(folder / CROPS, mmap_mode="r")
    if len(manifest) != len(crops):
        raise UserError(f"{folder}: manifest has {len(manifest)} rows but crops.npy {len(crops)}")
    return manifest, crops


def crop_recipe(folder: Path, zoom: float = 1.0) -> CropRecipe:
    """How ``prepare`` cut this folder's crops, from its report.json (and, for face-box crops,
    the manifest's box sources); the defaults, with a warning, for a store without a report
    (made by hand or by an older version). ``zoom``: the training augmentation's mean zoom."""
    try:
        crops = json.loads((folder / REPORT).read_text())["crops"]
        framing = crops.get("framing")  # whole-image crops: measured against a detector's boxes
        if framing:
            return CropRecipe(margin=float(crops["margin"]), box_policy=str(crops["box_policy"]),
                              size=int(crops["shape"][1]), box_source=str(framing["detector"]),
                              window=float(framing["window"]),
                              offset=tuple(framing["offset"]), zoom=zoom,
                              template=tuple(framing.get("template", ())))
        return CropRecipe(margin=float(crops["margin"]), box_policy=str(crops["box_policy"]),
                          size=int(crops["shape"][1]), box_source=_box_source(folder), zoom=zoom)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        size = int(np.load(folder / CROPS, mmap_mode="r").shape[1])
        warnings.warn(f"{folder}: no crop recipe in {REPORT} ({type(err).__name__}: {err}); the "
                      f"model records the defaults at size {size}", stacklevel=2)
        return CropRecipe(size=size, box_source=_box_source(folder), zoom=zoom)


def _box_source(folder: Path) -> str:
    """Where most of the store's face boxes came from ("" when none is recorded)."""
    sources = pd.read_parquet(folder / MANIFEST, columns=["box_source"])["box_source"]
    return str(sources.mode().iloc[0]) if sources.notna().any() else ""
