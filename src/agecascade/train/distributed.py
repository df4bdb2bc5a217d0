"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Without them, or with WORLD_SIZE 1, a run is one
process and nothing here changes what it does. With more, each process:
- trains on ``--batch`` images per step: the effective batch is WORLD_SIZE x ``--batch``, and
  the LR stays what the user gave unless ``--scale-lr`` asks for the linear scaling rule;
- reads its slice of every global batch (``data.BatchOrder``), so that for one seed the images
  of each optimiser step are those of a one-process run with the effective batch, whatever the
  world size; the random augmentation of each image is drawn per process, so it is not;
- evaluates its share of the validation rows, summed over processes;
- leaves writing (checkpoints, metrics, MLflow) to rank 0.
The backend is gloo on the CPU and NCCL on CUDA, where process ``LOCAL_RANK`` takes GPU
``LOCAL_RANK``. Commands whose processes each train alone (`lopo`'s folds, `tune`'s points,
`adience`'s folds) may start more processes than GPUs: they go round the GPUs
(:func:`gpu_index`), so one GPU trains several folds at once. Several nodes need one filesystem for ``--out`` (rank 0 writes the resume point
that every rank reads on a restart).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from agecascade.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes outputs and talks to MLflow."""
        return self.rank == 0


def from_env() -> World:
    """The world torchrun describes in the environment; one process without it."""
    try:
        world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                      int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as err:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None
    if not 0 <= world.rank < world.size:
        raise UserError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
    return world


def gpu_index(world: World, gpus: int, shared: bool) -> int:
    """The GPU of process LOCAL_RANK on its node. Data-parallel training takes one process per
    GPU, as NCCL requires. ``shared``: processes that each train alone (LOPO folds, grid
    points, Adience folds) go round the GPUs, so a node may start more of them than it has
    GPUs and train several folds at once on each GPU, as far as its memory allows."""
    if shared:
        return world.local_rank % gpus
    if world.local_rank >= gpus:
        raise UserError(f"LOCAL_RANK {world.local_rank}: this node has {gpus} GPU(s), and "
                        f"data-parallel training takes one process per GPU (--nproc-per-node "
                        f"{gpus} at most)")
    return world.local_rank


def own_device(device: torch.device, shared: bool = False) -> torch.device:
    """This process's device: under torchrun on CUDA, the GPU :func:`gpu_index` gives it;
    otherwise ``device``."""
    world = from_env()
    if world.size == 1 or device.type != "cuda":
        return device
    gpu = gpu_index(world, torch.cuda.device_count(), shared)
    if device.index not in (None, gpu):
        raise UserError(f"--device {device}: under torchrun each process takes the GPU of "
                        f"its LOCAL_RANK (here cuda:{gpu}); pass --device cuda or auto")
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    return device


def join(device: torch.device, shared: bool = False) -> tuple[World, torch.device]:
    """Join torchrun's process group (once per process) and return this process's device
    (:func:`own_device`). ``shared``: the processes only wait for each other (a gloo group,
    which several processes on one GPU can join), as LOPO's folds do; else NCCL on CUDA."""
    world = from_env()
    if world.size == 1:
        return world, device
    device = own_device(device, shared)
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device}: data-parallel runs support cpu (gloo) and cuda "
                        "(NCCL)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" and not shared else "gloo")
    return world, device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """``model`` itself for a world of one; else DDP around it, which averages the gradients of
    every step over the processes (and starts them all from rank 0's weights).

    Here and below, ``world`` is the run's, not torchrun's: a process that trains or scores
    alone under torchrun (a tune worker's trial, rank 0's test split) passes ``World()``."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # 1x1 convolutions get gradients whose strides differ from the parameter's only along
    # dimensions of size 1: the same memory layout, so DDP's layout warning is a false alarm
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    # gradients as views of DDP's buckets: no second copy of them in memory
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None, gradient_as_bucket_view=True)


def barrier(world: World) -> None:
    """Wait for every process of ``world`` (nothing to wait for in a world of one)."""
    if world.size > 1:
        dist.barrier()


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """The element-wise sum of ``values`` over ``world``'s processes (itself in a world of
    one), on the device it came from."""
    if world.size == 1:
        return values
    home = values.device
    on = values.to("cuda") if dist.get_backend() == "nccl" else values.cpu()
    on = on.clone()
    dist.all_reduce(on)
    return on.to(home)
