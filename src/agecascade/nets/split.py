"""Split an age network into a frozen stem and a trainable tail, for partial fine-tuning.

Why: fine-tuning only the last blocks of the trunk (plus the head) keeps most of what the source
stage learnt and costs a fraction of a full fine-tune. The stem never changes, so its output can
be computed once per image and reused by every epoch and every leave-one-person-out fold.

The trunk must be a chain: blocks applied one after the other from the input, as in ResNets
(stem layers, then the blocks of ``layer1``..``layer4``) and in torchvision models with a
``features`` Sequential (MobileNet, EfficientNet, VGG, ConvNeXt). :func:`split_trunk` checks
that ``tail(stem(x)) == model(x)`` and refuses the split otherwise.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from agecascade.errors import UserError
from agecascade.nets.backbones import AgeNet

__all__ = ["split_trunk", "trunk_blocks"]


def trunk_blocks(model: AgeNet) -> list[str]:
    """Names (in ``model``) of the trunk's blocks, in the order the input goes through them."""
    trunk = model.features
    if isinstance(trunk, ResNet):
        names = ["conv1", "bn1", "relu", "maxpool"]
        names += [f"{layer}.{i}" for layer in ("layer1", "layer2", "layer3", "layer4")
                  for i in range(len(trunk.get_submodule(layer)))]
    elif isinstance(getattr(trunk, "conv", None), nn.Sequential):       # agecascade's VGG-16
        names = [f"conv.{i}" for i in range(len(trunk.conv))]
    elif isinstance(getattr(trunk, "features", None), nn.Sequential):   # torchvision's
        names = [f"features.{i}" for i in range(len(trunk.features))]
    else:
        raise UserError(f"{model.arch}: its trunk is not a known chain of blocks (a ResNet or a "
                         "model with a `features` Sequential); partial fine-tuning cannot split it")
    return [f"features.{name}" for name in names]


def _parameterised(model: nn.Module, names: list[str]) -> list[str]:
    return [n for n in names if next(model.get_submodule(n).parameters(), None) is not None]


@torch.no_grad()
def split_trunk(model: AgeNet, train_blocks: int, probe: torch.Tensor) -> tuple[nn.Sequential, AgeNet]:
    """``(stem, tail)`` with ``tail(stem(x)) == model(x)``: the tail keeps the last
    ``train_blocks`` blocks that have weights (activations and pools between them go with them),
    and the head; the stem is every block before, frozen and in eval mode.

    Both are copies: training the tail leaves ``model`` as it was. ``probe`` (B, 3, H, W), a
    batch of real inputs, checks the split: a trunk with work between its blocks that the chain
    does not see (a reshape, a skip connection) fails it here rather than training on nonsense.
    """
    blocks = trunk_blocks(model)
    weighted = _parameterised(model, blocks)
    if not 0 < train_blocks < len(weighted):
        raise UserError(f"train_blocks must be between 1 and {len(weighted) - 1} for "
                         f"{model.arch} (its trunk has {len(weighted)} blocks with weights)")
    first_trained = blocks.index(weighted[-train_blocks])
    stem_names, tail = blocks[:first_trained], copy.deepcopy(model)
    # one copy: the stem takes its blocks out of the tail's, which keeps Identity in their place
    stem = nn.Sequential(*(tail.get_submodule(n) for n in stem_names))
    for name in stem_names:
        tail.set_submodule(name, nn.Identity())
    stem.eval().requires_grad_(False)

    was_training = model.training
    model.eval()
    tail.eval()
    expected, got = model(probe), tail(stem(probe))
    model.train(was_training)
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise UserError(f"{model.arch}: its forward does more than run the trunk's blocks in "
                         "order, so it cannot be split for partial fine-tuning; use a full "
                         "fine-tune (train_blocks 0)")
    return stem, tail
