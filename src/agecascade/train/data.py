"""Batches straight from the uint8 crop store, with augmentation done on the whole batch.

The store is memory-mapped, so a batch is one fancy-indexed read; decoding and resizing
already happened in `prepare`. Augmentation runs as one affine warp on the training device,
which keeps a fast GPU fed without a pile of CPU workers.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from agecascade.errors import UserError
from agecascade.nets.weights import InputSpec

from .distributed import World

# torchvision's ImageNet convention; also used for randomly initialised networks.
IMAGENET = InputSpec("RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --- labels -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelSpace:
    """Class k stands for age ``values[k]``; DEX predicts sum_k p_k * values[k]."""
    values: tuple[float, ...]

    @classmethod
    def from_ages(cls, ages: pd.Series) -> "LabelSpace":
        low, high = int(math.floor(ages.min())), int(math.ceil(ages.max()))
        return cls(tuple(float(a) for a in range(low, high + 1)))

    @property
    def size(self) -> int:
        return len(self.values)

    def encode(self, ages: np.ndarray) -> np.ndarray:
        low = self.values[0]
        return np.clip(np.rint(ages - low), 0, self.size - 1).astype(np.int64)

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.values, dtype=torch.float32, device=device)


def label_space_for(manifest: pd.DataFrame) -> LabelSpace:
    """One class per year over the manifest's ages: what an age-training stage predicts."""
    ages = manifest["age"].astype(float)
    if ages.isna().any():
        raise UserError(f"this stage trains on ages; {int(ages.isna().sum())} manifest rows "
                        "have none")
    return LabelSpace.from_ages(ages)


# --- splits -------------------------------------------------------------------------------

def split_groups(manifest: pd.DataFrame) -> pd.Series:
    """The unit a split must not cut through: the person, else the image content.

    Splitting by subject keeps a person's faces on one side; where there is no subject
    (UTKFace), byte-identical duplicates still share a hash and so a side.
    """
    subject = manifest["subject"].astype("string")
    return subject.fillna(manifest["sha1"].astype("string")).fillna(manifest["path"].astype("string"))


def assign_split(manifest: pd.DataFrame, val_fraction: float, test_fraction: float,
                 seed: int) -> np.ndarray:
    """'train' / 'val' / 'test' per row, by a seeded hash of its group: stable across runs
    and machines, and independent of row order."""
    groups = split_groups(manifest)
    unit = groups.map(lambda g: int(hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()[:12], 16) / 16**12)
    unit = unit.to_numpy(dtype=float)
    return np.where(unit < test_fraction, "test",
                    np.where(unit < test_fraction + val_fraction, "val", "train"))


# --- loading ------------------------------------------------------------------------------

class CropBatches(Dataset):
    """Indexed by a *list* of rows, returns a whole batch: (uint8 (B,H,W,3), labels (B,))."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray):
        self.crops, self.labels = crops, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        order = np.sort(np.asarray(rows))  # sorted reads are sequential on the memmap
        images = torch.from_numpy(np.ascontiguousarray(self.crops[order]))
        return images, torch.from_numpy(self.labels[order])


class BatchOrder(Sampler[list[int]]):
    """Row batches, reshuffled per epoch from (seed, epoch): a resumed run sees the same order.
    With ``weights`` an epoch is as many rows drawn with replacement in proportion to them.

    Under torchrun (``world.size`` > 1) the order is cut into global batches of
    ``world.size * batch_size`` rows, and this process yields its own ``batch_size`` slice of
    each: one optimiser step sees the rows that one process would with the effective batch.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, weights: np.ndarray | None = None,
                 world: World = World()):
        self.rows, self.batch_size, self.shuffle = rows, batch_size, shuffle
        self.seed, self.drop_last, self.epoch, self.world = seed, drop_last, 0, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rows = self.rows
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(rows), generator=gen) if self.weights is None else \
                torch.multinomial(self.weights, len(rows), replacement=True, generator=gen)
            rows = rows[order.numpy()]
        span = self.batch_size * self.world.size
        stop = len(rows) - (len(rows) % span if self.drop_last else 0)
        first = self.world.rank * self.batch_size
        for start in range(first, stop, span):
            yield rows[start:min(start + self.batch_size, stop)].tolist()

    def __len__(self) -> int:
        span = self.batch_size * self.world.size
        full, rest = divmod(len(self.rows), span)
        return full if self.drop_last else full + int(rest > self.world.rank * self.batch_size)


def balance_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-row sampling weights count(label) ** -power: 0 samples every image alike (the
    thesis), 1 every age alike. Between them, rare ages (children, teens and the old, in the
    web-photo datasets) are seen more often without repeating a few images too much."""
    counts = np.bincount(labels)
    return counts[labels].astype(np.float64) ** -power


def make_loader(crops: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int,
                shuffle: bool, seed: int, workers: int, pin_memory: bool,
                weights: np.ndarray | None = None, world: World = World()) -> DataLoader:
    """``weights`` (one per row of ``rows``): sample a shuffled epoch in proportion to them.
    ``world``: this process's share under torchrun (a training epoch drops the last partial
    global batch, so every process takes the same number of steps)."""
    span = batch_size * world.size
    if shuffle and world.size > 1 and len(rows) < span:
        raise UserError(f"{len(rows)} training images are fewer than one global batch "
                        f"({world.size} processes x {batch_size}); lower --batch or the "
                        "process count")
    order = BatchOrder(rows, batch_size, shuffle, seed, drop_last=shuffle and len(rows) > span,
                       weights=weights, world=world)
    return DataLoader(CropBatches(crops, labels), sampler=order, batch_size=None,
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


# --- augmentation (on the training device) -----------------------------------------------

@dataclass(frozen=True)
class Augment:
    """The thesis's rotation, shift, crop and flip as one random affine warp per image."""
    rotate_deg: float = 10.0
    shift: float = 0.05        # fraction of the image side
    min_crop: float = 0.85     # zoom in on a random crop covering at least this side fraction
    flip: bool = True

    @property
    def mean_zoom(self) -> float:
        """The side fraction of the stored crop the network sees on average."""
        return (self.min_crop + 1.0) / 2.0


def to_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 RGB (B,H,W,3) -> float RGB in [0, 1], (B,3,size,size)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def normalise(x: torch.Tensor, spec: InputSpec, channels_last: bool) -> torch.Tensor:
    """[0, 1] RGB (B,3,S,S) -> the pixel convention the weights expect (channel order, range,
    mean and std)."""
    if spec.channels == "BGR":
        x = x.flip(1)
    x = x * spec.value_range
    mean = x.new_tensor(spec.mean).view(1, 3, 1, 1)
    std = x.new_tensor(spec.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_input(images: torch.Tensor, size: int, channels_last: bool,
             spec: InputSpec = IMAGENET) -> torch.Tensor:
    """uint8 RGB (B,H,W,3) -> (B,3,size,size) float, in the pixel convention the weights expect."""
    return normalise(to_unit(images, size), spec, channels_last)


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Random affine per image of a normalised batch (B,3,S,S); parameters drawn on the CPU
    from ``gen`` so the result does not depend on the device's RNG."""
    b = x.shape[0]
    u = torch.rand(b, 5, generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(aug.rotate_deg)
    scale = aug.min_crop + (1 - aug.min_crop) * u[:, 1]           # <1 zooms in
    tx, ty = (u[:, 2] * 2 - 1) * aug.shift * 2, (u[:, 3] * 2 - 1) * aug.shift * 2
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if aug.flip else torch.ones(b)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)  # (B,2,3)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
        memory_format=torch.channels_last) else out
