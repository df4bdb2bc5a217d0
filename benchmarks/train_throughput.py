"""Training throughput (images/s) per backbone: agecascade's path against a plain PyTorch loop.

Both train the same network on the same uint8 crops for the same number of steps:
  agecascade  memory-mapped crop store -> whole-batch reads -> augmentation and normalisation
              on the device -> ``train_one_epoch`` (the `train` stage's code) with the compute
              that ``--precision auto`` picks (``agecascade.train.compute``), and with each
              precision x memory format, so the choice can be checked on a new machine;
              with ``--compile``, auto's choice through torch.compile too
  plain       a per-image Dataset (ToTensor-style float conversion and normalisation on the
              CPU), default collate, fp32, NCHW, torch.optim.Adam's defaults, no augmentation:
              the loop a PyTorch user writes first, doing strictly less work per image
Run:  python benchmarks/train_throughput.py --backbones mobilenet_v2 resnet50 --size 128 --json
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from agecascade.data.store import create_store
from agecascade.nets import create_model
from agecascade.train.compute import Compute, choose_compute
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


def ours(model, crops, labels, batch, steps, compute: Compute, workers, size,
         compiled: bool = False) -> dict:
    """The `train` stage's epoch for ``steps`` batches after a warm-up one: its images/s, the
    share of the time it waited for data, (CUDA) the peak memory it allocated, and the
    warm-up's seconds (with ``compiled``, as `train --compile` runs it: compilation included)."""
    rows = np.arange(len(labels))
    loader = make_loader(crops, labels, rows, batch, True, 0, workers, compute.device.type == "cuda")
    config = TrainConfig(epochs=1, lr=1e-4, batch_size=batch, patience=5, input_size=size, seed=0,
                         max_train_batches=1)
    optimizer = adam(model.parameters(), 1e-4)
    model.to(memory_format=compute.memory_format)
    stepped = torch.compile(model) if compiled else model
    started = time.perf_counter()
    train_one_epoch(stepped, loader, optimizer, compute, config, epoch=0)  # warm-up
    warm_up_s = time.perf_counter() - started
    config.max_train_batches = steps
    if compute.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute.device)
    # the epoch reads its summed loss (a host sync) before its clock stops: honest on CUDA too
    metrics = train_one_epoch(stepped, loader, optimizer, compute, config, epoch=1)
    peak = torch.cuda.max_memory_allocated(compute.device) / 2**30 \
        if compute.device.type == "cuda" else None
    return {"img_s": round(metrics["train_images_per_s"], 1),
            "data_wait_fraction": round(metrics["data_wait_fraction"], 3),
            "peak_gpu_mem_gib": None if peak is None else round(peak, 2),
            "warm_up_s": round(warm_up_s, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def label(compute: Compute) -> str:
    return f"{'bf16' if compute.bf16 else 'fp32'}_{'nhwc' if compute.nhwc else 'nchw'}"


def measure(name: str, crops, labels, args, device: torch.device) -> dict:
    def fresh():
        torch.manual_seed(0)
        return create_model(name, 101).to(device)

    chosen = choose_compute(device, fresh().arch, "auto")
    variants = {}
    if args.all_variants:
        for bf16, nhwc in itertools.product((False, True), repeat=2):
            compute = Compute(device, bf16, nhwc)
            variants[label(compute)] = ours(fresh(), crops, labels, args.batch, args.steps,
                                            compute, args.workers, args.size)
    project = variants.get(label(chosen)) or ours(fresh(), crops, labels, args.batch, args.steps,
                                                  chosen, args.workers, args.size)
    plain = plain_loop(fresh(), crops, labels, args.batch, args.steps, device, args.workers)
    if args.compile:
        compiled = ours(fresh(), crops, labels, args.batch, args.steps, chosen, args.workers,
                        args.size, compiled=True)
        variants[label(chosen) + "_compiled"] = compiled
    return {"backbone": name, "size": args.size, "batch": args.batch, "device": device.type,
            "auto": label(chosen), "project_img_s": project["img_s"],
            "plain_img_s": round(plain, 1), "ratio": round(project["img_s"] / plain, 2),
            "data_wait_fraction": project["data_wait_fraction"],
            "peak_gpu_mem_gib": project["peak_gpu_mem_gib"],
            "variants_img_s": {k: v["img_s"] for k, v in variants.items()},
            "warm_up_s": {k: v["warm_up_s"] for k, v in variants.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50", "senet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--all-variants", action="store_true",
                        help="also time each of fp32/bf16 x NCHW/NHWC on the project's path")
    parser.add_argument("--compile", action="store_true",
                        help="also time auto's variant through torch.compile (train --compile)")
    parser.add_argument("--json", action="store_true", help="one JSON object per backbone")
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
        if not args.json:
            print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}),"
                  f" {torch.get_num_threads()} threads, input {args.size}px, batch {args.batch}, "
                  f"{args.steps} timed steps, {args.workers} loader workers")
            print(f"{'backbone':<14}{'auto':>11}{'agecascade img/s':>18}{'plain img/s':>14}"
                  f"{'ratio':>8}  variants")
        for name in args.backbones:
            r = measure(name, crops, labels, args, device)
            if args.json:
                print(json.dumps(r), flush=True)
                continue
            shown = "  ".join(f"{k} {v}" for k, v in r["variants_img_s"].items())
            print(f"{name:<14}{r['auto']:>11}{r['project_img_s']:>18.1f}{r['plain_img_s']:>14.1f}"
                  f"{r['ratio']:>8.2f}  {shown}", flush=True)


if __name__ == "__main__":
    main()
