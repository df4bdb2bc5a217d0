"""One step of the cascade: a network that starts from the previous stage's checkpoint.

The previous stage fixes the architecture and the pixel convention. Its output layer is kept
only when the label space is the same: class k of another dataset may stand for another age
(or, for Adience, another group), so otherwise it starts afresh with He initialisation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from agecascade.errors import MissingInput
from agecascade.nets import AgeNet, create_model
from agecascade.nets.weights import InputSpec
from agecascade.train.data import LabelSpace

# The thesis's three ways to reach a target dataset; `train` and `lopo` both take --mode.
MODES = {"a": "frozen backbone, classifier layers trained",
         "b": "full fine-tune (IMDB -> target)",
         "c": "full fine-tune (IMDB -> AgeDB -> target)"}


def load_init(model: AgeNet, state: dict, old_labels: tuple[float, ...],
              new_labels: tuple[float, ...]) -> list[str]:
    """Copy a previous stage's weights into ``model``; return the keys that were not copied.

    Output units are matched by the label they stand for: a unit for age 30 keeps its weights
    wherever age 30 sits in the new label space; units for labels the previous stage never had
    keep their fresh (He) initialisation.
    """
    own = model.state_dict()
    output = {f"head.{len(model.head) - 1}.{p}" for p, _ in model.output_layer.named_parameters()}
    shared = [(old_labels.index(v), i) for i, v in enumerate(new_labels) if v in old_labels]
    fresh = [k for k in own if k not in state or (k not in output and state[k].shape != own[k].shape)
             or (k in output and (not shared or state[k].shape[1:] != own[k].shape[1:]))]
    copied = {k: v for k, v in state.items() if k in own and k not in fresh and k not in output}
    for key in output - set(fresh):
        rows = own[key].clone()
        old, new = zip(*shared)
        rows[list(new)] = state[key][list(old)]
        copied[key] = rows
        if len(shared) < len(new_labels):
            fresh.append(f"{key} (rows of {len(new_labels) - len(shared)} new labels)")
    model.load_state_dict(copied, strict=False)
    return fresh


def read_init(path: Path) -> dict:
    """A stage's model.pt, read once: folds of a protocol all start from the same one."""
    if not Path(path).is_file():
        raise MissingInput(f"{path}: no such checkpoint; run the cascade stage that writes it")
    return torch.load(path, map_location="cpu", weights_only=True)


# meta that finetune.finish fits on a run's own validation split (calibration.py): a model
# trained further from that run has other weights, so it does not inherit them
CALIBRATION = ("temperature", "bias_line")


def inherited_meta(init: dict) -> dict:
    """A copy of the previous stage's meta, less its calibration."""
    return {k: v for k, v in init["meta"].items() if k not in CALIBRATION}


def model_from_init(init: dict, labels: tuple[float, ...]) -> tuple[AgeNet, InputSpec, list[str]]:
    """(network with the previous stage's weights, its pixel convention, re-initialised keys)
    for a target whose output classes stand for ``labels``."""
    model = create_model(init["meta"]["arch"], len(labels))
    old = tuple(float(a) for a in init["meta"]["ages"])
    fresh = load_init(model, init["model"], old, tuple(float(a) for a in labels))
    return model, InputSpec(**init["meta"]["input_spec"]), fresh


def inherited_labels(init: dict, own: LabelSpace) -> LabelSpace:
    """One class per year over both the previous stage's ages and this dataset's.

    IMDB's 0-100 covers AgeDB and FG-NET, so the output layer, the part that knows what each
    age looks like, carries over whole; UTKFace (1-116) to FG-NET (0-69) gains one class.
    """
    previous = [float(a) for a in init["meta"]["ages"]]
    low, high = min(previous[0], own.values[0]), max(previous[-1], own.values[-1])
    return LabelSpace(tuple(float(a) for a in range(int(low), int(high) + 1)))
