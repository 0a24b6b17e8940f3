"""Decoding one webdataset sample into Python values: an image, its captions and its metadata.

Two layouts are good samples: img2dataset's (image, `.txt` captions, optional `.json`) and CLIP_benchmark's
classification shards (image and a `.cls` class index, no caption). Kept apart from the index and the byte reads
(corpus.py) so that what counts as a good sample is one small function.
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# single-channel modes wider than 8 bit: Pillow's own convert("RGB") clips them at 255 (an all-white image).
# "I" is how Pillow may open a 16-bit greyscale PNG or TIFF; 16-bit RGB PNGs Pillow already opens as 8-bit RGB.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale is scaled by 255 / 65535 (rounded), not clipped."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > SIXTEEN_BIT_MAX:
            raise ValueError(f"{image.mode} image with values in [{values.min()}, {values.max()}], outside the "
                             f"16-bit range [0, {SIXTEEN_BIT_MAX}]")
        scaled = (values * 255 + SIXTEEN_BIT_MAX // 2) // SIXTEEN_BIT_MAX
        image = Image.fromarray(scaled.astype(np.uint8), mode="L")
    return image.convert("RGB")


def _no_image_message(raw: dict) -> str:
    """Why no image was found; names the dotted-key trap when the extensions look like one."""
    exts = sorted(k for k in raw if not k.startswith("__"))
    message = f"no image ({'/'.join(IMAGE_EXTS)}) among {exts}"
    dotted = [ext for ext in exts if "." in ext and ext.rsplit(".", 1)[-1] in IMAGE_EXTS]
    if dotted:
        key, (stem, ext) = raw.get("__key__", "KEY"), dotted[0].rsplit(".", 1)
        message += (f": the key seems to contain a dot. webdataset groups a tar's files by the basename up to its "
                    f"first dot and takes everything after it as the extension, so {key}.{dotted[0]} is read as "
                    f"key {key!r} with extension {dotted[0]!r}. Rename the files so that keys have no dots "
                    f"(e.g. {key}_{stem.replace('.', '_')}.{ext})")
    return message


def _captions(raw: dict) -> list[str]:
    """Non-blank lines of the `.txt`, which must be UTF-8 (replacement characters would be cached as text)."""
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption (.txt) is not valid UTF-8: {e.reason} at byte {e.start} "
                         f"({raw['txt'][e.start:e.start + 4]!r})") from e
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise ValueError("empty caption (.txt)")
    return captions


def _class_label(raw: bytes) -> int:
    """CLIP_benchmark's `.cls`: the class index as decimal text."""
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"bad class label (.cls) {raw[:20]!r}: expected an integer class index") from e


def decode_sample(raw: dict) -> tuple[Image.Image, list[str], dict]:
    """Decode one webdataset sample dict; raise ValueError saying what is wrong with it.

    A `.txt` is required unless the sample carries a `.cls` label (a classification sample: captions = []);
    the `.cls` label goes to meta["label"] as an int.
    """
    image_ext = next((ext for ext in IMAGE_EXTS if ext in raw), None)
    if image_ext is None:
        raise ValueError(_no_image_message(raw))
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ValueError(f"undecodable image .{image_ext}: {e}") from e
    image = to_rgb8(image)
    if "txt" in raw:
        captions = _captions(raw)
    elif "cls" in raw:
        captions = []
    else:
        raise ValueError("no caption (.txt) and no class label (.cls)")
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError as e:
            raise ValueError(f"bad .json: {e}") from e
    if "cls" in raw:
        meta["label"] = _class_label(raw["cls"])
    return image, captions, meta
