"""The compute choice per device and backbone: bf16 autocast and channels_last where measured."""
from __future__ import annotations

import pytest
import torch

from agecascade.errors import UserError
from agecascade.train import compute as compute_module
from agecascade.train.compute import CPU_FAST, Compute, choose_compute

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a CUDA device object needs no GPU


def test_cuda_gets_bf16_and_channels_last_unless_fp32_is_asked():
    assert choose_compute(CUDA, "resnet18") == Compute(CUDA, bf16=True, nhwc=True)
    assert choose_compute(CUDA, "vgg16", "fp32") == Compute(CUDA, bf16=False, nhwc=True)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_auto_follows_the_measured_table_and_the_cpus_bf16_support(monkeypatch, native):
    monkeypatch.setattr(compute_module, "cpu_has_bf16", lambda: native)
    for arch, (bf16, nhwc) in CPU_FAST.items():
        assert choose_compute(CPU, arch) == Compute(CPU, bf16=bf16 and native, nhwc=nhwc)
    # an unmeasured architecture runs the plain path; an explicit choice is honoured
    assert choose_compute(CPU, "resnet18") == Compute(CPU)
    assert choose_compute(CPU, "resnet18", "bf16").bf16
    assert not choose_compute(CPU, "resnet50", "fp32").bf16


def test_an_unknown_precision_is_refused():
    with pytest.raises(UserError, match="--precision fp16"):
        choose_compute(CPU, "resnet50", "fp16")


def test_the_autocast_runs_matmuls_in_bf16_only_when_chosen():
    a = torch.randn(4, 4)
    with Compute(CPU, bf16=True).autocast():
        assert (a @ a).dtype == torch.bfloat16
    with Compute(CPU).autocast():
        assert (a @ a).dtype == torch.float32
