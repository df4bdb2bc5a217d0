from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

# For every test, as for a cautious user: a logged model that needs pickle to load then fails the
# suite instead of passing quietly (MLflow reads the variable at each load).
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

import numpy as np
import pytest
from PIL import Image

from agecascade.demo.writers import png_bomb as demo_png_bomb

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGECASCADE_SHARED", REPO.parent / "shared"))


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared, or a clean skip on machines that do not have it."""
    path = SHARED / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (real-data check runs only beside ../shared)")
    return path


def write_image(path: Path, size: tuple[int, int] = (96, 96), mode: str = "RGB",
                fmt: str = "JPEG", seed: int = 0, **save) -> Path:
    """A small noisy image; content does not matter, decodability does."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **save)
    return path


def png_bomb(path: Path) -> Path:
    """A tiny PNG that declares 30000 x 30000 pixels: Pillow must refuse it before decoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(demo_png_bomb())
    return path


def truncated_jpeg(path: Path) -> Path:
    write_image(path, (128, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def broken_images(tmp_path: Path) -> dict[str, Path]:
    """Every kind of bad input from the issue, as UTKFace-named files, plus two good ones."""
    root = tmp_path / "utk"
    files = {
        "good": write_image(root / "30_0_1_20170101000000001.jpg.chip.jpg", seed=1),
        "good_grey": write_image(root / "70_1_0_20170101000000002.jpg.chip.jpg", mode="L", seed=2),
        "truncated": truncated_jpeg(root / "25_0_0_20170101000000003.jpg.chip.jpg"),
        "empty": root / "26_1_0_20170101000000004.jpg.chip.jpg",
        "png_as_jpg": write_image(root / "27_0_2_20170101000000005.jpg.chip.jpg", fmt="PNG"),
        "text": root / "notes.txt",
        "text_named_jpg": root / "28_1_3_20170101000000006.jpg.chip.jpg",
        "bomb": png_bomb(root / "29_0_4_20170101000000007.jpg.chip.jpg"),
        "corrupt": root / "31_0_4_20170101000000008.jpg.chip.jpg",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("these are my notes\n")
    files["text_named_jpg"].write_text("not really a picture\n")
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(3).integers(0, 255, 2000, dtype=np.uint8)))
    return files


AGES = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]


def write_checkpoint(path: Path, seed: int, **meta) -> Path:
    """An untrained resnet18 in the stage format (input 32 px), with a sharpened output layer so
    the softmax is far from flat and different images get clearly different ages. ``meta`` adds
    to or replaces the stage meta (a ``crop`` recipe, say)."""
    import torch

    from agecascade.nets import create_model
    from agecascade.train.data import IMAGENET

    torch.manual_seed(seed)
    model = create_model("resnet18", len(AGES))
    model.output_layer.weight.data.mul_(3)
    meta = {"arch": model.arch, "ages": AGES, "input_spec": asdict(IMAGENET), "input_size": 32,
            "backbone": "resnet18", "mode": "b", "dataset": "agedb"} | meta
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "metrics": {}}, path)
    return path
