"""One step of the cascade: a network that starts from the previous stage's checkpoint.

The previous stage fixes the architecture and the pixel convention. Its output layer is kept
only when the label space is the same: class k of another dataset may stand for another age
(or, for Adience, another group), so otherwise it starts afresh with He initialisation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from agecascade.nets import AgeNet, create_model
from agecascade.nets.weights import InputSpec
from agecascade.train.data import LabelSpace


def load_init(model: AgeNet, state: dict, same_labels: bool) -> list[str]:
    """Copy a previous stage's weights into ``model``; return the keys that were not copied."""
    own = model.state_dict()
    output = {f"head.{len(model.head) - 1}.{p}" for p, _ in model.output_layer.named_parameters()}
    fresh = [k for k in own if k not in state or state[k].shape != own[k].shape
             or (k in output and not same_labels)]
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in fresh},
                          strict=False)
    return fresh


def read_init(path: Path) -> dict:
    """A stage's model.pt, read once: folds of a protocol all start from the same one."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_init(init: dict, labels: tuple[float, ...]) -> tuple[AgeNet, InputSpec, list[str]]:
    """(network with the previous stage's weights, its pixel convention, re-initialised keys)
    for a target whose output classes stand for ``labels``."""
    model = create_model(init["meta"]["arch"], len(labels))
    fresh = load_init(model, init["model"], list(init["meta"]["ages"]) == list(labels))
    return model, InputSpec(**init["meta"]["input_spec"]), fresh


def inherited_labels(init: dict, own: LabelSpace) -> LabelSpace:
    """The previous stage's age classes when they cover this dataset's ages, else its own.

    IMDB's 0-100 covers AgeDB and FG-NET, so the output layer, the part that knows what each
    age looks like, carries over whole instead of being thrown away.
    """
    previous = tuple(float(a) for a in init["meta"]["ages"])
    return LabelSpace(previous) if previous[0] <= own.values[0] and own.values[-1] <= previous[-1] \
        else own
