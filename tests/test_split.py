"""Partial fine-tuning: the stem/tail split must compute exactly what the whole network does."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agecascade.nets import AgeNet, create_model
from agecascade.nets.split import split_trunk, trunk_blocks


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "vgg16"])
def test_tail_of_stem_is_the_whole_network(backbone):
    torch.manual_seed(0)
    model = create_model(backbone, 5).eval()
    x = torch.randn(3, 3, 64, 64)
    stem, tail = split_trunk(model, 2, x)
    torch.testing.assert_close(tail.eval()(stem(x)), model(x), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in stem.parameters())
    # training the tail leaves the model as it was: every fold starts from the same weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    next(tail.parameters()).data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_tail_holds_the_last_weighted_blocks_and_the_head():
    model = create_model("resnet18", 5)
    stem, tail = split_trunk(model, 3, torch.randn(2, 3, 32, 32))
    trained = {k.rsplit(".", 2)[0] for k, _ in tail.named_parameters()}
    assert {"features.layer4.0", "features.layer4.1", "features.layer3.1"} <= trained
    assert not any(name.startswith(("features.layer3.0", "features.conv1")) for name in trained)
    assert len(stem) == len(trunk_blocks(model)) - 3


class _SkipTrunk(nn.Module):
    """A trunk whose forward adds its input back: not a plain chain of its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.features(x)).mean((2, 3))


def test_a_trunk_that_is_not_a_chain_is_refused():
    model = AgeNet(_SkipTrunk(), nn.Sequential(nn.Linear(3, 4)), "features.features", "skip")
    with pytest.raises(ValueError, match="cannot be split"):
        split_trunk(model, 1, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("blocks", [0, 10])
def test_train_blocks_out_of_range_is_refused(blocks):
    with pytest.raises(ValueError, match="between 1 and 9"):
        split_trunk(create_model("resnet18", 5), blocks, torch.randn(2, 3, 32, 32))
