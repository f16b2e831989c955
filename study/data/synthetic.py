"""Generated datasets that need no download.

* ``alphabet`` -- the paper's crafted target task: the 26 capital letters, drawn
  with the DejaVu Sans Bold font that ships inside matplotlib, moved by a random
  offset and covered with additive Gaussian noise.
* ``shapes`` -- a harder *source* task that stands in for ImageNet in the demo.
  Each class is one (shape, texture) pair, 10 shapes x 5 textures = 50 classes by
  default. What makes it harder than alphabet: twice as many classes; every image
  draws its own colours (so colour carries no label information), scale (a 2x
  range), rotation (any angle), position, a smooth colour-gradient background with
  clutter strokes, and noise; and the texture, a fine high-frequency pattern, is
  half of the label -- the kind of cue ImageNet models are known to rely on.

Every image is a pure function of (seed, split, index), so the output is identical
for the same seed, whatever order or process draws it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLIT_IDS = {"train": 0, "test": 1}
LETTERS = [chr(ord("A") + i) for i in range(26)]
SHAPES = ["circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "ring", "diamond", "crescent"]
TEXTURES = ["solid", "stripes", "checker", "dots", "waves"]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return ImageFont.truetype(str(path), size)


class GeneratedSplit:
    """An indexable split: ``split[i]`` is (HxWx3 uint8 image, int label).

    Samples are laid out class-major-interleaved (label = index % num_classes) so
    any prefix of the split is class-balanced.
    """

    classes: list[str]

    def __init__(self, split: str, per_class: int, image_size: int, seed: int):
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLIT_IDS)})")
        self.split, self.per_class, self.image_size, self.seed = split, per_class, image_size, seed

    def __len__(self) -> int:
        return self.per_class * len(self.classes)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        label = index % len(self.classes)
        return self.render(label, _rng(self.seed, self.split, index)), label

    def render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class Alphabet(GeneratedSplit):
    """Letters A-Z, offset and noised (the paper's Alphabet dataset)."""

    classes = LETTERS

    def __init__(
        self, split, per_class=1000, image_size=32, seed=0, max_offset=0.18, noise_std=0.12, font_fraction=0.62
    ):
        super().__init__(split, per_class, image_size, seed)
        self.max_offset, self.noise_std, self.font_fraction = max_offset, noise_std, font_fraction

    def render(self, label, rng):
        s = self.image_size
        canvas = Image.new("L", (s, s), color=40)
        draw = ImageDraw.Draw(canvas)
        dx, dy = rng.uniform(-self.max_offset, self.max_offset, size=2) * s
        draw.text(
            (s / 2 + dx, s / 2 + dy),
            LETTERS[label],
            fill=230,
            font=_font(max(6, round(self.font_fraction * s))),
            anchor="mm",
        )
        img = np.asarray(canvas, dtype=np.float32) / 255.0
        img = img + rng.normal(0.0, self.noise_std, size=img.shape)
        img = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return np.repeat(img[:, :, None], 3, axis=2)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_mask(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-size shape in its own (rotated, scaled) frame."""
    r = np.hypot(x, y)
    t = np.arctan2(y, x)

    def polygon(n):
        sector = 2 * math.pi / n
        return r <= math.cos(math.pi / n) / np.cos(np.mod(t, sector) - math.pi / n)

    if kind == "circle":
        return r <= 0.9
    if kind == "square":
        return np.maximum(abs(x), abs(y)) <= 0.72
    if kind == "triangle":
        return polygon(3)
    if kind == "pentagon":
        return polygon(5)
    if kind == "hexagon":
        return polygon(6)
    if kind == "star":
        return r <= 0.55 + 0.4 * np.cos(5 * t)
    if kind == "cross":
        return ((abs(x) <= 0.3) & (abs(y) <= 0.95)) | ((abs(y) <= 0.3) & (abs(x) <= 0.95))
    if kind == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if kind == "diamond":
        return abs(x) + abs(y) <= 1.0
    if kind == "crescent":
        return (r <= 0.95) & (np.hypot(x - 0.45, y) > 0.7)
    raise ValueError(kind)


def _texture(kind: str, x: np.ndarray, y: np.ndarray, freq: float) -> np.ndarray:
    """Which pixels take the second colour (a boolean pattern in the shape's frame)."""
    if kind == "solid":
        return np.zeros_like(x, dtype=bool)
    if kind == "stripes":
        return np.sin(freq * x) > 0
    if kind == "checker":
        return (np.sin(freq * x) * np.sin(freq * y)) > 0
    if kind == "dots":
        return (np.cos(freq * x) + np.cos(freq * y)) > 1.0
    if kind == "waves":
        return np.sin(freq * x + 2.0 * np.sin(0.5 * freq * y)) > 0
    raise ValueError(kind)


class Shapes(GeneratedSplit):
    """(shape, texture) classes with random colour, pose, background and clutter; with
    ``by="shape"`` the 10 shapes alone are the classes (each image's texture drawn at
    random), with ``by="texture"`` the 5 textures (each image's shape drawn at random):
    target tasks close to the source, for Fig. 6's MMD axis."""

    def __init__(
        self,
        split,
        per_class=200,
        image_size=32,
        seed=0,
        noise_std=0.06,
        min_scale=0.5,
        supersample=2,
        by="shape_texture",
    ):
        super().__init__(split, per_class, image_size, seed)
        if not 0 < min_scale <= 0.5:
            raise ValueError(
                f"min_scale must be in (0, 0.5] (objects span min_scale..2*min_scale of the frame), got {min_scale}"
            )
        classes = {
            "shape_texture": [f"{s}_{t}" for s in SHAPES for t in TEXTURES],
            "shape": list(SHAPES),
            "texture": list(TEXTURES),
        }
        if by not in classes:
            raise ValueError(f"by must be one of {', '.join(classes)}, got {by!r}")
        self.noise_std, self.min_scale, self.supersample, self.by = noise_std, min_scale, supersample, by
        self.classes = classes[by]

    def render(self, label, rng):
        if self.by == "shape":
            shape, texture = self.classes[label], TEXTURES[rng.integers(len(TEXTURES))]
        elif self.by == "texture":
            shape, texture = SHAPES[rng.integers(len(SHAPES))], self.classes[label]
        else:
            shape, texture = self.classes[label].split("_")
        n = self.image_size * self.supersample
        grid = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1  # [-1, 1]
        gx, gy = np.meshgrid(grid, grid)

        # Background: a smooth gradient between two random colours, plus clutter strokes.
        hue = rng.uniform()
        c0 = _hsv_to_rgb(hue + rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9))
        c1 = _hsv_to_rgb(hue + rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.7), rng.uniform(0.2, 0.9))
        a = rng.uniform(0, 2 * math.pi)
        w = ((np.cos(a) * gx + np.sin(a) * gy) + 1.5) / 3.0
        img = c0 * (1 - w[..., None]) + c1 * w[..., None]
        for _ in range(rng.integers(1, 4)):
            b = rng.uniform(0, 2 * math.pi)
            d = np.abs(np.cos(b) * gx + np.sin(b) * gy - rng.uniform(-0.9, 0.9))
            img[d < 0.04] = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0, 1))

        # Object: pose in its own frame, texture between two shades of one random hue.
        scale = rng.uniform(self.min_scale, 2 * self.min_scale)
        cx, cy = rng.uniform(-(1 - scale) * 0.9, (1 - scale) * 0.9, size=2)
        rot = rng.uniform(0, 2 * math.pi)
        lx = (np.cos(rot) * (gx - cx) + np.sin(rot) * (gy - cy)) / scale
        ly = (-np.sin(rot) * (gx - cx) + np.cos(rot) * (gy - cy)) / scale
        inside = _shape_mask(shape, lx, ly)
        fg_h = rng.uniform()
        fg1 = _hsv_to_rgb(fg_h, rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
        fg2 = _hsv_to_rgb(fg_h + rng.uniform(-0.08, 0.08), rng.uniform(0.5, 1.0), rng.uniform(0.1, 0.4))
        pattern = _texture(texture, lx, ly, freq=rng.uniform(5.5, 7.5))
        img[inside & ~pattern] = fg1
        img[inside & pattern] = fg2

        k = self.supersample  # box-filter down to the target size (anti-aliasing)
        img = img.reshape(self.image_size, k, self.image_size, k, 3).mean(axis=(1, 3))
        img = img + rng.normal(0.0, self.noise_std, size=img.shape)
        return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)
