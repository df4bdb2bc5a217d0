"""The crop recipe: how a model's training crops were cut, kept with the model.

It lives apart from the crop geometry (``crops``) because training and serving read it while only
``prepare`` and ``predict`` cut crops.
"""
from __future__ import annotations

from dataclasses import dataclass

BOX_POLICIES = ("auto", "image", "aligned")


@dataclass(frozen=True)
class CropRecipe:
    """How a model's training crops were cut, stored in its checkpoint so that ``predict`` cuts
    every face of a photo the same way: a square window around the face box, grown by ``margin``
    of the box side on every side, resized to ``size``. ``box_policy`` says where training boxes
    came from: ``auto`` a face box (dataset or detector), ``image`` the whole (chip) image,
    ``aligned`` the whole chip warped so that its landmarks sit on the ``template``.
    ``box_source`` is where most training boxes came from (``dlib``, ``haar``, ``metadata``,
    ``landmarks``, ``image``; empty when unknown): detectors differ in how much of a face their
    box takes, so ``predict --detector auto`` uses the training crops' detector when it can."""
    margin: float = 0.4
    box_policy: str = "auto"
    size: int = 224
    box_source: str = ""
    # How the training crops framed the face, for crops that were not cut around a face box
    # (``box_policy`` image): the crop side over the detector's box side, and the crop centre's
    # offset from the box centre in box sides (x, y), as ``prepare`` measured them. 0: the crop
    # is the margin window around the box.
    window: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)
    # The mean zoom of the training augmentation: the network saw, on average, this fraction
    # of each stored crop's side (a random crop of 85-100 % of it by default). Framing a face at
    # that zoom shows the network the typical training view, not the widest one (UTKFace test
    # chips: MAE 4.90 whole, 4.64 at a 0.9 zoom; docs/zero-shot.md).
    zoom: float = 1.0
    # Aligned chips only: where dlib's five landmarks sit in the stored crops (crop sides, x
    # right, y down; median over the chips, as ``prepare --box image`` measured them). When set,
    # ``predict`` warps each face so that its landmarks land there (``landmarks.aligned_crop``)
    # instead of framing the box: a closer match to the chips (docs/zero-shot.md).
    template: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:  # a checkpoint or JSON gives lists
        object.__setattr__(self, "offset", tuple(float(v) for v in self.offset))
        object.__setattr__(self, "template", tuple((float(x), float(y)) for x, y in self.template))

    def framing(self) -> tuple[float, float, float]:
        """(crop side / face box side, x offset, y offset) of the face as the network saw it
        in training."""
        window, offset = (self.window, self.offset) if self.window > 0 else \
            (1.0 + 2.0 * self.margin, (0.0, 0.0))
        return window * self.zoom, *offset
