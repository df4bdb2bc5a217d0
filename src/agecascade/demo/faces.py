"""Cartoon faces whose appearance is driven by age, for the synthetic demo datasets.

Without real data the pipeline still has to learn *something*, so every age cue here is
exaggerated and (roughly) monotone over 0..100: head proportions (big cranium, low large
eyes and a small jaw in babies), hair greyness, wrinkles, ear size, sagging and beards.
Background, pose, lighting and noise vary too, but much less than the age signal.

Geometry lives in "face units": x is measured in half jaw widths, y points down with the
brow line at 0 and the chin at ``L``. One similarity transform maps units to pixels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing
BROW_ARCH = 0.12  # how far the brow arch rises above the brow line, in face units
GREY_HAIR = np.array([238.0, 238.0, 234.0])
# Base skin tones indexed by UTKFace's race code (white, black, asian, indian, other).
SKIN_TONES = ((236, 200, 178), (112, 74, 52), (232, 194, 158), (186, 136, 102), (208, 162, 128))
HAIR_COLOURS = ((28, 24, 22), (66, 44, 30), (110, 76, 48), (196, 160, 98), (140, 68, 36))
IRIS_COLOURS = ((70, 45, 30), (40, 30, 25), (70, 110, 150), (80, 110, 70))

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Identity:
    """Traits fixed for one person, so a subject looks alike at every age."""

    skin: Colour
    hair: Colour
    iris: Colour
    width: float  # face width factor, 1.0 = average
    male: bool
    beard: float  # adult beard shading strength; 0 for women and clean-shaven men
    balding: float  # how far the hairline recedes in old age, 0..1
    hair_length: float  # 0 = short .. 1 = shoulder length

    @classmethod
    def random(cls, rng: np.random.Generator, male: bool | None = None,
               race: int | None = None) -> Identity:
        """Draw a person; ``race`` (UTKFace code 0..4) picks the skin tone family."""
        male = bool(rng.random() < 0.5) if male is None else male
        race = int(rng.integers(len(SKIN_TONES))) if race is None else race
        skin = _jitter(SKIN_TONES[race], rng, 14)
        dark_haired = race in (1, 2, 3) or rng.random() < 0.4
        hair = HAIR_COLOURS[int(rng.integers(2 if dark_haired else len(HAIR_COLOURS)))]
        iris = IRIS_COLOURS[int(rng.integers(2 if dark_haired else len(IRIS_COLOURS)))]
        return cls(
            skin=skin, hair=_jitter(hair, rng, 10), iris=iris,
            width=float(rng.uniform(0.9, 1.1)), male=male,
            beard=float(rng.uniform(0.4, 1.0)) if male and rng.random() < 0.5 else 0.0,
            balding=float(rng.uniform(0.3, 1.0)) if male and rng.random() < 0.6 else 0.0,
            hair_length=float(rng.uniform(0.0, 0.4) if male else rng.uniform(0.4, 1.0)),
        )


@dataclass(frozen=True)
class RenderedFace:
    image: Image.Image  # RGB
    box: Box  # (x0, y0, x1, y1), 0-based pixels, jaw to brow like a face detector's box
    landmarks: np.ndarray  # (68, 2) float pixel coordinates in iBUG-68 order


@dataclass(frozen=True)
class _Geometry:
    """Age-dependent proportions of one face, in face units."""

    a: float  # jaw half width
    length: float  # brow line to chin
    cranium_top: float  # y of the top of the skull (negative: above the brows)
    cranium_w: float  # skull half width
    eye_y: float
    eye_x: float
    eye_w: float  # eye half width
    eye_h: float  # eye half height
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip: float  # lip thickness
    jaw_power: float  # superellipse exponent: 2 = round, larger = squarer jaw
    hairline: float  # y of the hairline at the forehead centre
    ear: float  # ear size factor


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return min(max(x, lo), hi)


def _jitter(colour: Colour, rng: np.random.Generator, spread: int) -> Colour:
    offsets = rng.integers(-spread, spread + 1, 3)
    return tuple(int(_clip(c + d, 0, 255)) for c, d in zip(colour, offsets))


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> Colour:
    """Linear blend of two colours, ``t`` = 0 gives ``a``."""
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))


def _scale(colour: Colour, f: float) -> Colour:
    """Darken (f < 1) or lighten a colour: shadows and creases in the person's own skin tone."""
    return tuple(int(_clip(round(c * f), 0, 255)) for c in colour)


def age_factors(age: float) -> tuple[float, float, float]:
    """(child, old, grey) in 0..1: babyness fading by 16, wrinkling from 28, greying from 35."""
    child = _clip(1.0 - age / 16.0) ** 1.3
    old = _clip((age - 28.0) / 52.0)
    grey = _clip((age - 35.0) / 45.0) ** 0.8
    return child, old, grey


def _geometry(age: float, who: Identity) -> _Geometry:
    child, old, _ = age_factors(age)
    a = who.width * (1.0 + 0.06 * child)
    length = 2.55 - 0.6 * child + 0.15 * old + (0.08 if who.male else 0.0)
    eye_y = (0.17 + 0.09 * child) * length
    nose_y = eye_y + (0.36 - 0.08 * child) * length
    eye_w = a * (0.2 + 0.08 * child)
    recede = who.balding * _clip((age - 30.0) / 40.0)
    cranium_top = -(1.3 + 1.0 * child)
    hairline = -(0.75 + 0.3 * child)
    return _Geometry(
        a=a, length=length, cranium_top=cranium_top, cranium_w=a * (1.04 + 0.26 * child),
        eye_y=eye_y, eye_x=a * (0.43 - 0.03 * child), eye_w=eye_w,
        eye_h=eye_w * (0.42 + 0.28 * child - 0.1 * old),
        nose_y=nose_y, nose_w=a * (0.2 - 0.07 * child + 0.04 * old),
        mouth_y=nose_y + (0.19 - 0.03 * child) * length, mouth_w=a * (0.36 - 0.08 * child),
        lip=length * (0.035 + 0.012 * child - 0.015 * old),
        jaw_power=2.0 + 0.8 * (1.0 - child) + (0.4 if who.male else 0.0) - 0.3 * old,
        hairline=hairline + recede * (cranium_top + 0.12 - hairline),
        ear=1.0 + 0.35 * old - 0.1 * child,
    )


def _arc(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 32) -> np.ndarray:
    """Points on an ellipse from angle t0 to t1 (y down, so t = pi/2 is the bottom)."""
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _jaw(g: _Geometry, n: int) -> np.ndarray:
    """Jaw line from the left ear (image left) under the chin to the right ear."""
    t = np.linspace(math.pi, 0.0, n)
    c, s = np.cos(t), np.sin(t)
    e = 2.0 / g.jaw_power
    x = g.a * np.sign(c) * np.abs(c) ** e
    y = g.eye_y + (g.length - g.eye_y) * np.abs(s) ** e
    return np.stack([x, y], axis=1)


def _brow(g: _Geometry, side: int) -> np.ndarray:
    """Five brow points ordered image-left to image-right, as iBUG 17-21 and 22-26."""
    u = np.linspace(0.0, 1.0, 5)
    x = side * g.a * (0.14 + 0.68 * u)
    y = -BROW_ARCH * np.sin(math.pi * (0.2 + 0.6 * u))
    pts = np.stack([x, y], axis=1)
    return pts[::-1] if side < 0 else pts


def _eye(g: _Geometry, side: int) -> np.ndarray:
    """Six eye points: corner, two upper, corner, two lower (iBUG 36-41 / 42-47)."""
    cx, w, h, y = side * g.eye_x, g.eye_w, g.eye_h, g.eye_y
    xs = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3]) * w + cx
    ys = y + np.array([0.0, -h, -h, 0.0, 0.8 * h, 0.8 * h])
    return np.stack([xs, ys], axis=1)


def _landmarks_units(g: _Geometry) -> np.ndarray:
    """The 68 iBUG landmarks in face units."""
    nose_top = g.eye_y - 0.04 * g.length
    nose_tip = g.nose_y - 0.05 * g.length
    bridge = np.stack([np.zeros(4), np.linspace(nose_top, nose_tip, 4)], axis=1)
    nostrils = np.stack([g.nose_w * np.array([-1.0, -0.5, 0.0, 0.5, 1.0]),
                         g.nose_y + 0.03 * np.array([-0.6, 0.3, 0.6, 0.3, -0.6])], axis=1)
    m, t, y = g.mouth_w, g.lip, g.mouth_y
    outer_x = m * np.array([-1, -0.6, -0.25, 0, 0.25, 0.6, 1, 0.6, 0.25, 0, -0.25, -0.6])
    outer_y = t * np.array([0, -0.8, -1.1, -0.9, -1.1, -0.8, 0, 1.1, 1.4, 1.5, 1.4, 1.1])
    inner_x = m * np.array([-0.85, -0.3, 0, 0.3, 0.85, 0.3, 0, -0.3])
    inner_y = t * np.array([0, -0.15, -0.1, -0.15, 0, 0.15, 0.1, 0.15])
    return np.concatenate([
        _jaw(g, 17), _brow(g, -1), _brow(g, 1), bridge, nostrils, _eye(g, -1), _eye(g, 1),
        np.stack([outer_x, y + outer_y], axis=1), np.stack([inner_x, y + inner_y], axis=1),
    ])


class _Painter:
    """Draws unit-space shapes on the supersampled canvas through one similarity transform."""

    def __init__(self, canvas: Image.Image, centre_px: np.ndarray, centre_units: np.ndarray,
                 ppu: float, angle: float):
        self.draw = ImageDraw.Draw(canvas, "RGBA")
        self.centre_px, self.centre_units, self.ppu = centre_px, centre_units, ppu
        c, s = math.cos(angle), math.sin(angle)
        self.rot = np.array([[c, -s], [s, c]])

    def to_px(self, pts: np.ndarray) -> np.ndarray:
        """Units -> 1x pixel coordinates (pixel centres at integers)."""
        return (np.asarray(pts) - self.centre_units) @ self.rot.T * self.ppu + self.centre_px

    def _ss(self, pts: np.ndarray) -> list[float]:
        """Flat x0, y0, x1, ... list on the supersampled canvas, as ImageDraw takes it."""
        return (self.to_px(pts) * SUPERSAMPLE + (SUPERSAMPLE - 1) / 2).ravel().tolist()

    def width(self, units: float) -> int:
        return max(1, int(round(units * self.ppu * SUPERSAMPLE)))

    def polygon(self, pts: np.ndarray, fill, alpha: int = 255) -> None:
        self.draw.polygon(self._ss(pts), fill=(*fill, alpha))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill, alpha: int = 255) -> None:
        self.polygon(_arc(cx, cy, rx, ry, 0.0, 2 * math.pi, 40), fill, alpha)

    def line(self, pts: np.ndarray, fill, width: float, alpha: int = 255) -> None:
        self.draw.line(self._ss(pts), fill=(*fill, alpha), width=self.width(width), joint="curve")


def _hair_colour(who: Identity, grey: float) -> Colour:
    return _mix(who.hair, GREY_HAIR, grey)


def _draw_body(p: _Painter, g: _Geometry, who: Identity, age: float, clothes: Colour) -> None:
    """Long hair behind the head, shoulders and neck."""
    child, _, grey = age_factors(age)
    length = who.hair_length * (1.0 - 0.6 * child)
    if length > 0.3:
        bottom = g.length + 1.2 * length
        top = g.cranium_top - 0.1
        p.ellipse(0, (top + bottom) / 2, g.cranium_w + 0.2 + 0.25 * length, (bottom - top) / 2,
                  _hair_colour(who, grey))
    p.ellipse(0, g.length + 2.1, 2.6, 1.5, clothes)
    neck = np.array([[-0.55, g.eye_y + 0.6], [0.55, g.eye_y + 0.6],
                     [0.6, g.length + 0.9], [-0.6, g.length + 0.9]]) * [g.a, 1]
    p.polygon(neck, _scale(who.skin, 0.82))


def _draw_head(p: _Painter, g: _Geometry, who: Identity, age: float) -> None:
    """Ears, skull, face and the hair cap with its (possibly receding) hairline."""
    child, _, grey = age_factors(age)
    ear_h = (g.nose_y - g.eye_y) * 0.6 * g.ear
    for side in (-1, 1):
        p.ellipse(side * (g.a + 0.05), (g.eye_y + g.nose_y) / 2 + 0.05, 0.17 * g.ear, ear_h,
                  _scale(who.skin, 0.9))
    top, bottom = g.cranium_top, g.nose_y
    p.ellipse(0, (top + bottom) / 2, g.cranium_w, (bottom - top) / 2, who.skin)
    jaw = _jaw(g, 40)
    p.polygon(np.concatenate([[[-g.a, g.eye_y - 0.4]], jaw, [[g.a, g.eye_y - 0.4]]]), who.skin)

    cy, ry = (top + bottom) / 2, (bottom - top) / 2 + 0.08
    rx = g.cranium_w + 0.08
    side_y = g.eye_y - 0.1
    ts = math.asin(_clip((side_y - cy) / ry, -1.0, 1.0))  # angle where the side hair ends
    outer = _arc(0, cy, rx, ry, math.pi - ts, 2 * math.pi + ts, 40)
    inner_rx = 0.84 * g.cranium_w
    inner = _arc(0, side_y, inner_rx, side_y - g.hairline, 0.0, -math.pi, 40)
    density = 1.0 - 0.75 * _clip(1.0 - age / 3.0)  # babies: sparse hair
    p.polygon(np.concatenate([outer, inner]), _hair_colour(who, grey), int(255 * density))
    if child > 0.2:  # rosy cheeks
        for side in (-1, 1):
            p.ellipse(side * 0.55 * g.a, g.nose_y, 0.2, 0.13, (230, 110, 110), int(70 * child))


def _draw_features(p: _Painter, g: _Geometry, who: Identity, age: float, lm: np.ndarray) -> None:
    """Brows, eyes, nose and mouth from the landmark points."""
    child, old, grey = age_factors(age)
    brow_colour = _mix(_scale(who.hair, 0.8), GREY_HAIR, 0.7 * grey)
    brow_w = (0.05 if who.male else 0.035) * (1.0 - 0.5 * child)
    p.line(lm[17:22], brow_colour, brow_w + 0.02 * old, int(255 * (1 - 0.6 * child)))
    p.line(lm[22:27], brow_colour, brow_w + 0.02 * old, int(255 * (1 - 0.6 * child)))
    sclera = _mix((242, 240, 236), (222, 210, 180), old)
    iris_r = min(g.eye_h * 1.05, g.eye_w * 0.62)
    for side in (-1, 1):
        cx, cy = side * g.eye_x, g.eye_y
        upper = _arc(cx, cy, g.eye_w, g.eye_h, math.pi, 2 * math.pi, 16)
        lower = _arc(cx, cy, g.eye_w, 0.8 * g.eye_h, 0.0, math.pi, 16)
        p.polygon(np.concatenate([upper, lower]), sclera)
        p.ellipse(cx, cy + 0.1 * g.eye_h, iris_r, iris_r, who.iris)
        p.ellipse(cx, cy + 0.1 * g.eye_h, 0.45 * iris_r, 0.45 * iris_r, (15, 12, 12))
        p.ellipse(cx + 0.3 * iris_r, cy - 0.25 * iris_r, 0.18 * iris_r, 0.18 * iris_r, (250, 250, 250))
        p.line(upper, (35, 25, 25), 0.035 + 0.015 * child)
        if old > 0:  # drooping lid fold and bags under the eyes
            p.line(upper + [0, -0.06], _scale(who.skin, 0.6), 0.03, int(200 * old))
            p.line(lower[2:-2] + [0, 0.1], _scale(who.skin, 0.6), 0.03, int(220 * old))
    shade = _scale(who.skin, 0.7)
    p.line(np.array([lm[27] + [0.08, 0], lm[30] + [0.12, 0]]), shade, 0.03, 120)
    p.line(lm[31:36], shade, 0.035, 220)
    for x in (-0.45, 0.45):
        p.ellipse(x * g.nose_w, g.nose_y - 0.01, 0.22 * g.nose_w, 0.035, _scale(who.skin, 0.45))
    lips = _mix(who.skin, (200, 70, 80), 0.5 - 0.25 * old)
    p.polygon(np.concatenate([lm[48:55], lm[60:65][::-1]]), lips)
    p.polygon(np.concatenate([lm[54:60], lm[48:49], lm[60:61], lm[64:68][::-1]]), lips)
    p.line(lm[60:65], _scale(lips, 0.5), 0.02)


def _draw_age_marks(p: _Painter, g: _Geometry, who: Identity, age: float,
                    rng: np.random.Generator) -> None:
    """Wrinkles, age spots and beard shading: the strongest cues for adults."""
    _, old, grey = age_factors(age)
    line = _scale(who.skin, 0.5)
    if age > 15 and who.beard > 0:
        amount = who.beard * _clip((age - 15.0) / 10.0)
        colour, alpha = _hair_colour(who, grey), int(120 * amount)
        jaw = _jaw(g, 30)[4:-4]
        cheek = [[-g.mouth_w - 0.15, g.mouth_y - 0.1], [g.mouth_w + 0.15, g.mouth_y - 0.1]]
        p.polygon(np.concatenate([jaw, cheek[::-1]]), colour, alpha)
        moustache = np.array([[-1.0, 0.0], [-0.6, 1.2], [0.0, 1.4], [0.6, 1.2], [1.0, 0.0]])
        moustache = moustache * [g.mouth_w, -1.5 * g.lip] + [0.0, g.mouth_y]
        p.line(moustache, colour, 0.08, alpha)
    if old <= 0:
        return
    width, alpha = 0.02 + 0.025 * old, int(90 + 165 * old)
    top = max(g.hairline + 0.15, -0.9)
    for y in np.linspace(-0.22, top, 1 + int(round(4 * old)) + 1)[:-1]:
        x = np.linspace(-0.6, 0.6, 9) * g.a
        wobble = rng.normal(0, 0.01, 9)
        p.line(np.stack([x, y + 0.06 * (x / g.a) ** 2 + wobble], axis=1), line, width, alpha)
    for side in (-1, 1):
        corner = np.array([side * (g.eye_x + g.eye_w + 0.05), g.eye_y])
        for k in range(1 + int(round(3 * old))):
            ang = (k - 1) * 0.35
            tip = corner + 0.25 * np.array([side * math.cos(ang), math.sin(ang)])
            p.line(np.array([corner, tip]), line, width * 0.8, alpha)
        fold = np.array([[side * (g.nose_w + 0.06), g.nose_y - 0.12],
                         [side * (g.nose_w + 0.2), g.nose_y + 0.12],
                         [side * (g.mouth_w + 0.1), g.mouth_y + 0.12]])
        p.line(fold, line, width * 1.2, alpha)
        if age > 55:
            chin = np.array([[side * (g.mouth_w + 0.02), g.mouth_y + 0.05],
                             [side * (g.mouth_w + 0.06), g.length - 0.2]])
            p.line(chin, line, width, alpha)
    for _ in range(int(6 * max(0.0, old - 0.5))):  # age spots
        x, y = rng.uniform(-0.7, 0.7) * g.a, rng.uniform(-0.5, g.nose_y)
        p.ellipse(x, y, 0.05, 0.04, _scale(who.skin, 0.65), 150)


def _background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random colour gradient with a few soft blobs: nuisance the model must ignore."""
    w, h = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    base = rng.uniform(40, 220, 3)
    tilt = rng.uniform(-50, 50, 3)
    column = np.clip(base + np.linspace(-0.5, 0.5, h)[:, None, None] * tilt, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (h, w, 3))))
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(3):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.4) * w
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(*colour, 60))
    return img


def render_face(age: float, identity: Identity, rng: np.random.Generator,
                size: tuple[int, int], fill: float = 0.55) -> RenderedFace:
    """Render ``identity`` at ``age`` into a ``size`` = (width, height) RGB image.

    ``fill`` is the longer face box side as a fraction of the shorter image side; at
    1 / 1.8 a square crop with a 40% margin on every side just fits the picture.
    """
    g = _geometry(age, identity)
    lm_units = _landmarks_units(g)
    box_w, box_h = 2 * g.a, g.length + BROW_ARCH
    ppu = fill * min(size) * math.exp(rng.uniform(-0.07, 0.07)) / max(box_w, box_h)
    shift = rng.uniform(-0.04, 0.04, 2) * min(size)
    centre_px = (np.array(size, dtype=float) - 1) / 2 + shift
    centre_units = np.array([0.0, (g.length - BROW_ARCH) / 2])
    canvas = _background(size, rng)
    p = _Painter(canvas, centre_px, centre_units, ppu, math.radians(rng.uniform(-10, 10)))
    clothes = tuple(int(c) for c in rng.integers(20, 236, 3))
    _draw_body(p, g, identity, age, clothes)
    _draw_head(p, g, identity, age)
    _draw_age_marks(p, g, identity, age, rng)
    _draw_features(p, g, identity, age, lm_units)
    image = canvas.resize(size, Image.BOX)
    return RenderedFace(_photometric(image, rng), _box(p.to_px(lm_units), size), p.to_px(lm_units))


def _photometric(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and sensor noise."""
    pixels = np.asarray(image, dtype=np.float32)
    gain, bias = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(1.0, 4.0)
    out = (pixels - 128) * gain + 128 + bias + noise
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def _box(points: np.ndarray, size: tuple[int, int]) -> Box:
    """Landmark bounding box, rounded outwards and clipped to the image."""
    x0, y0 = np.floor(points.min(axis=0))
    x1, y1 = np.ceil(points.max(axis=0))
    return (int(max(x0, 0)), int(max(y0, 0)), int(min(x1, size[0] - 1)), int(min(y1, size[1] - 1)))
