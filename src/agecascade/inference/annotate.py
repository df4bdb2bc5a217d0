"""`predict --annotate DIR`: each photo drawn with its faces' boxes and "age ± std" labels.

People check a model by looking at it. Photos are redrawn from their files after the model ran
(video frames are not drawn: only their rows are written). Each picture is written as JPEG under
a name made from its input path, so two inputs named alike in different folders do not collide.
"""
from __future__ import annotations

from pathlib import Path

from PIL import ImageDraw, ImageFont

from agecascade.data.imaging import BadImage, decode
from agecascade.inference.faces import ImageFaces

MAX_SIDE = 1600  # drawn copies are scaled down to this: they are for looking, not measuring


class Annotator:
    def __init__(self, folder: Path, max_pixels: int):
        self.folder, self.max_pixels = folder, max_pixels
        folder.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def target(self, path: Path) -> Path:
        parts = [p for p in path.parts if p not in (path.anchor, "..", ".")]
        return self.folder / ("__".join([*parts[:-1], Path(parts[-1]).stem]) + ".jpg")

    def __call__(self, path: Path, found: ImageFaces, rows: list[dict]) -> None:
        if found.error or found.time is not None:
            return
        try:
            image = decode(path.read_bytes(), str(path), self.max_pixels).image
        except (OSError, BadImage):
            return
        scale = min(1.0, MAX_SIDE / max(image.size))
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        draw = ImageDraw.Draw(image)
        width = max(2, round(max(image.size) / 300))
        font = ImageFont.load_default(size=max(12, round(max(image.size) / 40)))
        for row in rows:
            if row["box"] is None:
                continue
            x0, y0, x1, y1 = (v * scale for v in row["box"])
            draw.rectangle((x0, y0, x1, y1), outline=(255, 64, 64), width=width)
            label = f"{row['age']:.0f} ± {row['age_std']:.0f}"
            left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
            lift = bottom - top + 2 * width
            draw.rectangle((left, top - lift, right + 2 * width, bottom - lift + width),
                           fill=(255, 64, 64))
            draw.text((x0 + width, y0 - lift), label, fill=(255, 255, 255), font=font)
        image.save(self.target(path), quality=90)
        self.written += 1
