"""Shapes world: render scenes of flat-coloured shapes, and detect them again.

The synthetic data set, the VQ tokenizer check and the generation evaluation share this one
definition of the world, so a detector verdict means the same thing everywhere. A scene is a
2x2 grid of cells; each object sits inside its own cell (so positions are unambiguous and
objects never touch). The detector finds connected non-background regions anywhere in the
image (a generated image need not respect the cells) and reads shape (the ideal circle, square or
triangle of the region's bounding box that overlaps it best), colour (nearest palette colour),
size and position (cell of the centroid). Like GenEval's detector threshold, it reports only
regions it is confident about: a region must overlap its ideal shape (IoU >= 0.8), be about as
tall as wide, and be mostly one palette colour; noise, smears and merged blobs are not objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": 0.42, "large": 0.72}  # object side as a fraction of the cell side
CELLS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
BACKGROUND = (245, 245, 245)
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    dx: float = 0.0  # centre offset inside the cell, fraction of the free margin (-1..1)
    dy: float = 0.0

    @property
    def position(self) -> str:
        return CELLS[(self.row, self.col)]

    def describe(self, with_size: bool = True) -> str:
        return f"{self.size + ' ' if with_size else ''}{self.color} {self.shape}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    row: int
    col: int
    area: int
    fill: float


def render(objects: list[ShapeObject], size: int) -> Image.Image:
    """Draw the scene at ``size`` x ``size`` px (supersampled, so edges are anti-aliased)."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / 2
    for obj in objects:
        side = SIZES[obj.size] * cell
        margin = (cell - side) / 2
        cx = obj.col * cell + cell / 2 + obj.dx * margin * 0.6
        cy = obj.row * cell + cell / 2 + obj.dy * margin * 0.6
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; use one of {SHAPES}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


MIN_SHAPE_IOU = 0.8  # region vs the ideal shape of its bounding box
MIN_COLOR_PURITY = 0.7  # share of a region's pixels close to its palette colour
_COLOR_TOLERANCE = 60.0  # max abs RGB difference that still counts as the palette colour


def _ideal_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """The rendered shapes filling an h x w bounding box (pixel centres)."""
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w
    return {"square": np.ones((h, w), dtype=bool),
            "circle": (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25,
            "triangle": y >= np.abs(2 * x - 1)}


def _shape_fit(mask: np.ndarray) -> tuple[str, float]:
    """(best shape, its IoU with the region)."""
    fits = {name: float((mask & ideal).sum() / (mask | ideal).sum())
            for name, ideal in _ideal_masks(*mask.shape).items()}
    best = max(fits, key=fits.get)
    return best, fits[best]


def detect(image: Image.Image, min_area_fraction: float = 0.004) -> list[Detection]:
    """Find the shapes in an image (rendered, reconstructed or generated), largest first.

    Regions that are not confidently one of our shapes in one palette colour are left out
    (see the module docstring)."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = arr.shape
    foreground = np.abs(arr - np.asarray(BACKGROUND, dtype=np.float32)).max(axis=-1) > 70
    labels, n = ndimage.label(foreground)
    palette_names = list(COLORS)
    palette = np.asarray([COLORS[c] for c in palette_names], dtype=np.float32)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        mask = labels[region] == index
        area = int(mask.sum())
        if area < min_area_fraction * h * w:
            continue
        bh, bw = mask.shape
        if not 2 / 3 <= bh / bw <= 3 / 2:
            continue
        shape, iou = _shape_fit(mask)
        if iou < MIN_SHAPE_IOU:
            continue
        pixels = arr[region][mask]
        ci = int(np.argmin(((palette - np.median(pixels, axis=0)) ** 2).sum(axis=1)))
        if (np.abs(pixels - palette[ci]).max(axis=1) <= _COLOR_TOLERANCE).mean() < MIN_COLOR_PURITY:
            continue
        extent = max(bh, bw) / (min(h, w) / 2)  # fraction of a cell side
        size = "large" if extent > (SIZES["small"] + SIZES["large"]) / 2 else "small"
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() + region[0].start, xs.mean() + region[1].start
        found.append(Detection(shape, palette_names[ci], size, int(cy >= h / 2), int(cx >= w / 2), area,
                               round(area / float(bh * bw), 3)))
    return sorted(found, key=lambda d: -d.area)


def matches(obj: ShapeObject, det: Detection, check_size: bool = True) -> bool:
    return (det.shape == obj.shape and det.color == obj.color and det.row == obj.row and det.col == obj.col
            and (not check_size or det.size == obj.size))


def recognised(objects: list[ShapeObject], image: Image.Image) -> list[bool]:
    """For each object of the scene: is it detected (shape, colour, cell, size) in ``image``?"""
    dets = detect(image)
    return [any(matches(o, d) for d in dets) for o in objects]
