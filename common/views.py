"""Image views: which part of the original image a model sees, independent of any model's preprocessing.

A view is a crop box in fractions of the original width/height plus a horizontal flip. The clean view is the
whole image. Augmented views are sampled like RandomResizedCrop, deterministically from (seed, key, view number),
and stored in the cache, so stage two regenerates the exact pixels the teacher saw. Each model then renders the
view with its own open_clip preprocessing (resolution, normalisation): `render(image, view, preprocess)`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_SCALE = (0.9, 1.0)  # CLIP-KD's RandomResizedCrop scale
DEFAULT_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class View:
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # x0, y0, x1, y1 as fractions
    flip: bool = False


CLEAN_VIEW = View()


def keyed_rng(*parts) -> np.random.Generator:
    """A generator seeded from sha256 of the parts joined by ':' (stable across processes and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_view(rng: np.random.Generator, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, flip_prob: float = 0.0) -> View:
    """A RandomResizedCrop box (area fraction in `scale`, aspect in `ratio`, log-uniform) and an optional flip."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = CLEAN_VIEW.box
    for _ in range(10):
        area = rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= 1.0 and h <= 1.0:
            x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            box = (x0, y0, x0 + w, y0 + h)
            break
    return View(box, bool(rng.uniform() < flip_prob))


def keyed_view(seed: int, key: str, view: int, **kwargs) -> View:
    """Stage one's stored view `view` (1..K) of sample `key`."""
    return sample_view(keyed_rng(seed, key, view), **kwargs)


def crop_view(image: Image.Image, view: View) -> Image.Image:
    if view == CLEAN_VIEW:
        return image
    w, h = image.size
    x0, y0, x1, y1 = view.box
    pixels = (round(x0 * w), round(y0 * h), max(round(x1 * w), round(x0 * w) + 1), max(round(y1 * h), round(y0 * h) + 1))
    out = image.crop(pixels)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view.flip else out


def render(image: Image.Image, view: View, preprocess):
    """The tensor a model with eval transform `preprocess` sees for `view` of `image`."""
    return preprocess(crop_view(image, view))


def views_to_arrays(views: list[list[View]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) views -> boxes (N, K, 4) float64, flips (N, K) bool, as stored in the cache."""
    boxes = np.array([[v.box for v in row] for row in views], dtype=np.float64).reshape(len(views), -1, 4)
    flips = np.array([[v.flip for v in row] for row in views], dtype=bool).reshape(len(views), -1)
    return boxes, flips


def view_from_arrays(box: np.ndarray, flip: bool) -> View:
    return View(tuple(float(x) for x in box), bool(flip))
