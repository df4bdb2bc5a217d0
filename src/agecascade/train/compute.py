"""How a network runs on its device: bf16 autocast and channels-last (NHWC) activations.

On CUDA both are on (bf16 needs no loss scaling; NHWC feeds the tensor cores). On the CPU each
helps some backbones and slows others, so ``--precision auto`` follows what
``benchmarks/train_throughput.py`` measured per backbone, and turns bf16 on only where the CPU
has native bf16 instructions (AVX512-BF16 or AMX); elsewhere torch emulates bf16, slower than
fp32. ``fp32`` and ``bf16`` force the precision; the memory format stays the measured one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from agecascade.config import option
from agecascade.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def precision_option():
    """The ``--precision`` every stage that trains a network takes."""
    return option("auto", choices=PRECISIONS,
                  help="auto: bf16 autocast on CUDA, and on the CPU for the backbones where it "
                       "measured faster; fp32: full precision throughout")

# CPU training choices per architecture: (bf16 autocast, channels_last), from
# benchmarks/train_throughput.py --all-variants at 128 px on a 2-core AVX512-BF16 machine (the
# figures are in the README's "Benchmark"). Not listed, so fp32 and NCHW: SE-ResNet-50 (bf16
# halves its speed there) and MobileNetV2 (bf16 gained ~10 %, within the noise, and its
# README model trained in bf16 scored worse on real photos: docs/zero-shot.md). channels_last
# helped none by more than the noise.
CPU_FAST: dict[str, tuple[bool, bool]] = {
    "resnet50-caffe": (True, False),
    "vgg16": (True, False),
}


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions; without them autocast emulates bf16 and is slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@dataclass(frozen=True)
class Compute:
    device: torch.device
    bf16: bool = False
    nhwc: bool = False   # channels_last activations and weights

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.nhwc else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return (f"{self.device.type}, {'bf16 autocast' if self.bf16 else 'fp32'}, "
                f"{'channels_last' if self.nhwc else 'NCHW'}")


def choose_compute(device: torch.device, arch: str, precision: str = "auto") -> Compute:
    """The fastest measured way to train ``arch`` on ``device``, within ``precision``."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return Compute(device, bf16=precision != "fp32", nhwc=True)
    if device.type != "cpu":  # unmeasured devices run the plain path unless told otherwise
        return Compute(device, bf16=precision == "bf16")
    bf16, nhwc = CPU_FAST.get(arch, (False, False))
    if precision == "auto":
        bf16 = bf16 and cpu_has_bf16()
    else:
        bf16 = precision == "bf16"
    return Compute(device, bf16=bf16, nhwc=nhwc)
