"""Decoding one webdataset sample (img2dataset layout: image, `.txt` captions, optional `.json`) into Python values.

Kept apart from the index and the byte reads (corpus.py) so that what counts as a good sample is one small function.
"""
from __future__ import annotations

import io
import json

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_sample(raw: dict) -> tuple[Image.Image, list[str], dict]:
    """Decode one webdataset sample dict; raise ValueError saying what is wrong with it."""
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if image_ext is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_EXTS)}) among {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        image.load()
        image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"undecodable image .{image_ext}: {e}") from e
    if "txt" not in raw:
        raise ValueError("no caption (.txt)")
    captions = [line.strip() for line in raw["txt"].decode("utf-8", errors="replace").splitlines() if line.strip()]
    if not captions:
        raise ValueError("empty caption (.txt)")
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError as e:
            raise ValueError(f"bad .json: {e}") from e
    return image, captions, meta
