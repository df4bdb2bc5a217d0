"""Training throughput (images/s) per backbone: agecascade's path versus a plain PyTorch loop.

Both train the same network on the same uint8 crops for the same number of steps:
  agecascade  memory-mapped crop store -> whole-batch reads -> augmentation and normalisation
              on the device -> channels_last + bf16 autocast on CUDA (the `train` stage's code)
  plain       a per-image Dataset (ToTensor-style float conversion and normalisation on the
              CPU), default collate, fp32, no augmentation
Run:  python benchmarks/train_throughput.py --size 224 --batch 32 --steps 20
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from agecascade.data.store import create_store
from agecascade.nets import create_model
from agecascade.train.data import IMAGENET, make_loader
from agecascade.train.engine import TrainConfig, adam, pick_device, train_one_epoch


class PlainCrops(Dataset):
    """What a first PyTorch loop looks like: one image at a time, normalised on the CPU."""

    def __init__(self, crops: np.ndarray, labels: np.ndarray):
        self.crops, self.labels = crops, labels
        self.mean = torch.tensor(IMAGENET.mean).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.array(self.crops[i])).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std, int(self.labels[i])


def plain_loop(model, crops, labels, batch, steps, device, workers) -> float:
    loader = DataLoader(PlainCrops(crops, labels), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 1:  # step 0 warms up kernels and workers
            _sync(device)
            start, seen = time.perf_counter(), 0
        if step > steps:
            break
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def ours(model, crops, labels, batch, steps, device, workers, size) -> float:
    rows = np.arange(len(labels))
    loader = make_loader(crops, labels, rows, batch, True, 0, workers, device.type == "cuda")
    config = TrainConfig(epochs=1, lr=1e-4, batch_size=batch, patience=5, input_size=size, seed=0,
                         max_train_batches=1)
    optimizer = adam(model.parameters(), 1e-4)
    model.to(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    train_one_epoch(model, loader, optimizer, device, config, epoch=0)  # warm-up
    config.max_train_batches = steps
    # loss.item() every step synchronises, so the epoch's own clock is honest on CUDA too
    return train_one_epoch(model, loader, optimizer, device, config, epoch=1)["train_images_per_s"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50", "senet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = pick_device(args.device)
    n = args.batch * (args.steps + 2)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 101, n)
    with tempfile.TemporaryDirectory() as tmp:
        crops = create_store(Path(tmp) / "crops.npy", n, args.size)
        crops[:] = rng.integers(0, 256, crops.shape, dtype=np.uint8)
        crops.flush()
        crops = np.load(Path(tmp) / "crops.npy", mmap_mode="r")
        print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}),"
              f" {torch.get_num_threads()} threads, input {args.size}px, batch {args.batch}, "
              f"{args.steps} timed steps, {args.workers} loader workers")
        print(f"{'backbone':<14}{'agecascade img/s':>18}{'plain img/s':>14}{'ratio':>8}")
        for name in args.backbones:
            torch.manual_seed(0)
            a = ours(create_model(name, 101).to(device), crops, labels, args.batch, args.steps,
                     device, args.workers, args.size)
            torch.manual_seed(0)
            b = plain_loop(create_model(name, 101).to(device), crops, labels, args.batch,
                           args.steps, device, args.workers)
            print(f"{name:<14}{a:>18.1f}{b:>14.1f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
