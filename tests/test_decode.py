"""What a good sample is (common/decode.py), read through the real corpus reader from real tars."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from common.corpus import Corpus, CorpusError
from common.decode import to_rgb8


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    return buffer.getvalue()


def png16_rgb_bytes(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written chunk by chunk (Pillow cannot write one)."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def read_one(tmp_path: Path, sample: dict, on_error: str = "raise"):
    shard = write_shard(tmp_path / "00000.tar", [sample])
    return next(Corpus.open(str(shard), on_error=on_error).read(on_error=on_error))


GRADIENT16 = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
GRADIENT8 = np.round(GRADIENT16.astype(np.float64) * 255 / 65535).astype(np.uint8)


def test_16_bit_greyscale_png_is_scaled_to_8_bit_not_clipped_to_white(tmp_path):
    sample = read_one(tmp_path, {"__key__": "a", "png": png_bytes(GRADIENT16), "txt": b"a grey ramp"})
    pixels = np.asarray(sample.image)
    assert sample.image.mode == "RGB"
    np.testing.assert_array_equal(pixels[..., 0], GRADIENT8)
    assert pixels.min() == 0 and 100 < pixels.mean() < 155  # a ramp, not the old all-white image


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16_bit_modes_scale_the_same_way(mode):
    big_endian = Image.frombytes("I;16B", (32, 32), GRADIENT16.astype(">u2").tobytes())
    image = big_endian if mode == "I;16B" else Image.fromarray(GRADIENT16.astype(np.int32), mode="I")
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb8(image))[..., 1], GRADIENT8)


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    rgb = np.stack([GRADIENT16, GRADIENT16[::-1], np.full_like(GRADIENT16, 40000)], axis=-1)
    sample = read_one(tmp_path, {"__key__": "a", "png": png16_rgb_bytes(rgb), "txt": b"colours"})
    assert np.abs(np.asarray(sample.image).astype(int) - rgb.astype(int) * 255 // 65535).max() <= 1


def test_caption_with_invalid_utf8_is_an_invalid_sample(tmp_path):
    sample = {"__key__": "000000007", "jpg": png_bytes(np.zeros((8, 8, 3), np.uint8)), "txt": b"caf\xe9 au lait"}
    with pytest.raises(CorpusError, match=r"key 000000007: caption \(\.txt\) is not valid UTF-8"):
        read_one(tmp_path, sample)
    skipped = read_one(tmp_path, sample, on_error="skip")
    assert skipped.image is None and "not valid UTF-8" in skipped.error


def test_a_dot_in_the_key_is_explained(tmp_path):
    sample = {"__key__": "000000013.v2", "jpg": png_bytes(np.zeros((8, 8, 3), np.uint8)), "txt": b"a caption"}
    with pytest.raises(CorpusError) as error:
        read_one(tmp_path, sample)
    message = str(error.value)
    assert "key 000000013:" in message and "'v2.jpg'" in message
    assert "the key seems to contain a dot" in message and "everything after it as the extension" in message
    assert "Rename the files so that keys have no dots (e.g. 000000013_v2.jpg)" in message


def test_classification_sample_has_a_cls_label_and_no_caption(tmp_path):
    image = png_bytes(np.full((8, 8, 3), 90, np.uint8))
    sample = read_one(tmp_path, {"__key__": "s0000000", "webp": image, "cls": 3})
    assert sample.captions == [] and sample.meta == {"label": 3}
    with pytest.raises(CorpusError, match=r"no caption \(\.txt\) and no class label \(\.cls\)"):
        read_one(tmp_path, {"__key__": "s0000001", "webp": image})
    with pytest.raises(CorpusError, match=r"bad class label \(\.cls\)"):
        read_one(tmp_path, {"__key__": "s0000002", "webp": image, "cls": b"cat"})
