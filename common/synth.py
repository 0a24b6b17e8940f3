"""The embedded demo/test corpus: procedurally drawn shape scenes with compositional captions.

Every sample is a small RGB image of 1-4 coloured shapes on a plain background, with captions that bind each
shape to its attributes ("a small striped red circle to the left of a big blue square on a grey background"),
so that retrieval needs fine-grained attribute binding: "red circle + blue square" and "blue circle + red
square" are different captions of different images.

Splits (img2dataset/webdataset layout, ``<key>.jpg`` / ``<key>.txt`` / ``<key>.json`` in ``{shard:05d}.tar``):

* ``train``: one caption per image;
* ``val``: 3-5 paraphrases per image, one per line of the ``.txt`` (COCO-like);
* ``zeroshot``: the image's main (large) object defines its class ``"<colour> <shape>"``; the json carries
  ``label`` and ``classname``, and the split directory holds ``classnames.txt`` and ``templates.txt``.

Generation is deterministic: sample ``i`` of split ``s`` is drawn from a numpy Generator seeded with
``(seed, crc32(s), i)``, and tar members have fixed metadata, so the same options give byte-identical shards
whatever the number of workers.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import tarfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

GENERATOR_VERSION = "1"
JPEG_QUALITY = 90
SPLITS = ("train", "val", "zeroshot")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (50, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "brown": (110, 75, 45),
    "navy": (25, 30, 90),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
SIZES: dict[str, float] = {"small": 0.07, "medium": 0.10, "large": 0.13}  # radius as a fraction of the side
TEXTURES = ("solid", "striped", "outlined")
TEXTURE_PROBS = (0.6, 0.2, 0.2)

# 3x3 grid of positions, (row, col) -> name.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left",),
    "top": ("at the top",),
    "top right": ("at the top right",),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("at the bottom left",),
    "bottom": ("at the bottom",),
    "bottom right": ("at the bottom right",),
}

# Surface forms of each attribute value in captions (the first is canonical). A solid texture is not mentioned.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "large": ("large", "big"),
    "outlined": ("outlined", "hollow"),
    "circle": ("circle", "disc"),
    "grey": ("grey", "gray"),
    "background": ("background", "backdrop"),
}

ZEROSHOT_CLASSNAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
ZEROSHOT_TEMPLATES = (
    "a photo of the {}.",
    "a drawing of the {}.",
    "a large {}.",
    "a picture with a big {} in it.",
    "the {} shape.",
    "a big {} on a plain background.",
)

_COUNT_WORDS = ("no", "one", "two", "three", "four")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: its attributes, grid cell, and exact placement in pixels of the final image."""
    shape: str
    colour: str
    size: str
    texture: str
    position: str
    center: tuple[float, float]
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A background colour and the objects drawn on it, in drawing order."""
    background: str
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict[str, Any]:
        """The structured scene as stored in the sample's json."""
        return {"background": self.background, "objects": [dict(vars(o)) for o in self.objects]}


# --------------------------------------------------------------------------------------------------- scenes

def _place_object(rng: np.random.Generator, image_size: int, shape: str, colour: str, size: str,
                  cell: tuple[int, int]) -> SceneObject:
    """Sample texture, jittered centre, radius and rotation of one object in grid cell `cell`."""
    hollow_is_ring = shape in ("circle", "ring")  # an outlined circle would look like a ring
    textures = [t for t in TEXTURES if not (hollow_is_ring and t == "outlined")]
    probs = np.array([p for t, p in zip(TEXTURES, TEXTURE_PROBS) if t in textures])
    texture = textures[rng.choice(len(textures), p=probs / probs.sum())]
    row, col = cell
    jitter = rng.uniform(-0.025, 0.025, size=2) * image_size
    center = ((col + 0.5) / 3 * image_size + jitter[0], (row + 0.5) / 3 * image_size + jitter[1])
    radius = SIZES[size] * image_size * rng.uniform(0.92, 1.08)
    angle = rng.uniform(-15.0, 15.0)
    return SceneObject(shape=shape, colour=colour, size=size, texture=texture, position=POSITIONS[cell],
                       center=(round(float(center[0]), 3), round(float(center[1]), 3)),
                       radius=round(float(radius), 3), angle=round(float(angle), 3))


def sample_scene(rng: np.random.Generator, image_size: int, main_class: int | None = None) -> Scene:
    """Random scene: 1-4 objects with distinct (colour, shape) pairs in distinct grid cells.

    With `main_class` (an index into ``ZEROSHOT_CLASSNAMES``) the scene is a zero-shot scene instead: one large
    object of that class first, then 0-2 small distractors of other classes.
    """
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n_classes = len(ZEROSHOT_CLASSNAMES)
    if main_class is None:
        n_objects = 1 + int(rng.choice(4, p=[0.25, 0.3, 0.25, 0.2]))
        classes = rng.choice(n_classes, size=n_objects, replace=False)
        sizes = [list(SIZES)[i] for i in rng.integers(len(SIZES), size=n_objects)]
    else:
        others = np.delete(np.arange(n_classes), main_class)
        n_distractors = int(rng.integers(3))
        classes = np.concatenate([[main_class], rng.choice(others, size=n_distractors, replace=False)])
        sizes = ["large"] + ["small"] * n_distractors
    cells = rng.choice(9, size=len(classes), replace=False)
    objects = [
        _place_object(rng, image_size, SHAPES[c % len(SHAPES)], list(COLOURS)[c // len(SHAPES)], size,
                      divmod(int(cell), 3))
        for c, size, cell in zip(classes, sizes, cells)
    ]
    return Scene(background=background, objects=tuple(objects))


# ----------------------------------------------------------------------------------------------- rendering

def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of a polygonal shape centred on 0 with radius ~1, y pointing down."""
    def ring_of(n: int, radius: float, phase_deg: float) -> np.ndarray:
        t = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
        return radius * np.stack([np.cos(t), np.sin(t)], axis=1)

    if shape == "square":
        return ring_of(4, 1.2, 45.0)
    if shape == "triangle":
        return ring_of(3, 1.2, -90.0)
    if shape == "hexagon":
        return ring_of(6, 1.05, 0.0)
    if shape == "diamond":
        return np.array([[0.0, -1.2], [0.75, 0.0], [0.0, 1.2], [-0.75, 0.0]])
    if shape == "star":
        outer, inner = ring_of(5, 1.25, -90.0), ring_of(5, 0.5, -54.0)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "cross":
        a, w = 1.05, 0.35
        return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
                         [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]])
    raise ValueError(f"{shape!r} is not a polygon")


@lru_cache(maxsize=8)
def _stripes(side: int, period: int) -> Image.Image:
    """Diagonal stripe mask (255 on, 0 off) of a `side` x `side` canvas."""
    y, x = np.mgrid[:side, :side]
    return Image.fromarray(((((x + y) // (period // 2)) % 2 == 0) * 255).astype(np.uint8), "L")


def _object_mask(obj: SceneObject, scale: float, side: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Coverage mask of one object on a `side` x `side` canvas that is `scale` times the final image, cropped to
    the object's bounding box; returns (mask, box)."""
    cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.radius * scale
    reach = 1.5 * r  # unit polygons lie within radius 1.25, plus room for outlines
    box = (max(0, math.floor(cx - reach)), max(0, math.floor(cy - reach)),
           min(side, math.ceil(cx + reach) + 1), min(side, math.ceil(cy + reach) + 1))
    mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = cx - box[0], cy - box[1]
    if obj.shape in ("circle", "ring"):  # never outlined (see _place_object)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if obj.shape == "ring":
            hole = 0.55 * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    else:
        t = math.radians(obj.angle)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        xy = [tuple(p) for p in ((_unit_polygon(obj.shape) @ rot.T) * r + (cx, cy)).tolist()]
        if obj.texture == "outlined":
            draw.polygon(xy, fill=0, outline=255, width=max(2, round(0.35 * r)))
        else:
            draw.polygon(xy, fill=255)
    if obj.texture == "striped":
        mask = ImageChops.multiply(mask, _stripes(side, max(4, round(side / 16))).crop(box))
    return mask, box


def _jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    """`rgb` with each channel moved by up to +-`amount`."""
    shift = rng.integers(-amount, amount + 1, size=3).tolist()
    return tuple(min(255, max(0, c + d)) for c, d in zip(rgb, shift))


def render_scene(rng: np.random.Generator, scene: Scene, image_size: int, supersample: int = 2) -> Image.Image:
    """Draw `scene` (antialiased by supersampling), with colour jitter and pixel noise, as an RGB image."""
    side = image_size * supersample
    canvas = Image.new("RGB", (side, side), _jitter_colour(rng, BACKGROUNDS[scene.background], 10))
    for obj in sorted(scene.objects, key=lambda o: -o.radius):  # small objects on top
        mask, box = _object_mask(obj, supersample, side)
        canvas.paste(_jitter_colour(rng, COLOURS[obj.colour], 15), box, mask)
    image = np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.float32)
    image = image + 4.0 * rng.standard_normal(image.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of `image` with fixed settings (deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------- captions

def _pick(rng: np.random.Generator, forms: tuple[str, ...]) -> str:
    """A random element of `forms`."""
    return forms[rng.integers(len(forms))]


def _word(rng: np.random.Generator, value: str) -> str:
    """A random surface form of an attribute value (see ``SYNONYMS``)."""
    return _pick(rng, SYNONYMS.get(value, (value,)))


def _description(rng: np.random.Generator, obj: SceneObject) -> str:
    """'small striped red circle': size, texture (unless solid), colour and shape, colour bound to shape."""
    words = [_word(rng, obj.size)]
    if obj.texture != "solid":
        words.append(_word(rng, obj.texture))
    return " ".join(words + [obj.colour, _word(rng, obj.shape)])


def _noun_phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    """'a small striped red circle' (size words never start with a vowel, so the article is always 'a')."""
    return "a " + _description(rng, obj)


def _reference(rng: np.random.Generator, obj: SceneObject) -> str:
    """'the red circle' (unambiguous: (colour, shape) pairs are distinct within a scene)."""
    return f"the {obj.colour} {_word(rng, obj.shape)}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Spatial relation of `a` to `b` from their grid cells; horizontal wins on diagonals."""
    cells = {name: cell for cell, name in POSITIONS.items()}
    (ra, ca), (rb, cb) = cells[a.position], cells[b.position]
    if ca != cb and abs(ca - cb) >= abs(ra - rb):
        return "to the left of" if ca < cb else "to the right of"
    return "above" if ra < rb else "below"


def _join(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background(rng: np.random.Generator, scene: Scene) -> str:
    """'a grey background' / 'a gray backdrop'."""
    return f"a {_word(rng, scene.background)} {_word(rng, 'background')}"


def _placed(rng: np.random.Generator, objects: list[SceneObject]) -> str:
    """Objects with their grid positions: 'a small red circle on the left and a big blue square at the top'."""
    return _join([f"{_noun_phrase(rng, o)} {_pick(rng, POSITION_PHRASES[o.position])}" for o in objects])


def _listed(rng: np.random.Generator, objects: list[SceneObject]) -> str:
    """Objects without positions: 'a small red circle and a big blue square'."""
    return _join([_noun_phrase(rng, o) for o in objects])


def _caption_positional(rng: np.random.Generator, scene: Scene, objects: list[SceneObject]) -> str:
    """Objects with positions, then the background."""
    return f"{_placed(rng, objects)} on {_background(rng, scene)}"


def _caption_background_first(rng: np.random.Generator, scene: Scene, objects: list[SceneObject]) -> str:
    """The background, then the objects with positions."""
    return f"{_background(rng, scene)} with {_placed(rng, objects)}"


def _caption_counting(rng: np.random.Generator, scene: Scene, objects: list[SceneObject]) -> str:
    """The number of shapes and the background, then the objects (without positions)."""
    n = len(objects)
    return f"{_COUNT_WORDS[n]} shape{'s' if n > 1 else ''} on {_background(rng, scene)}: {_listed(rng, objects)}"


def _caption_relational(rng: np.random.Generator, scene: Scene, objects: list[SceneObject]) -> str:
    """A chain of pairwise spatial relations between consecutive objects, then the background."""
    if len(objects) == 1:
        return f"a single {_description(rng, objects[0])} on {_background(rng, scene)}"
    first, second = objects[:2]
    parts = [f"{_noun_phrase(rng, first)} {_relation(first, second)} {_noun_phrase(rng, second)}"]
    parts += [f"{_noun_phrase(rng, b)} {_relation(b, a)} {_reference(rng, a)}"
              for a, b in zip(objects[1:], objects[2:])]
    return f"{_join(parts)}, on {_background(rng, scene)}"


def _caption_showing(rng: np.random.Generator, scene: Scene, objects: list[SceneObject]) -> str:
    """'an image showing' the objects (without positions), against the background."""
    return f"an image showing {_listed(rng, objects)} against {_background(rng, scene)}"


CaptionTemplate = Callable[[np.random.Generator, Scene, list[SceneObject]], str]
CAPTION_TEMPLATES: tuple[CaptionTemplate, ...] = (
    _caption_positional, _caption_background_first, _caption_counting, _caption_relational, _caption_showing,
)


def caption_scene(rng: np.random.Generator, scene: Scene, n_captions: int = 1) -> list[str]:
    """`n_captions` (<= number of templates) paraphrases of `scene`, each from a different template with its
    own object order and synonyms. Every caption names every object with its size, texture (unless solid),
    colour and shape; positions are given as grid cells, as relations, or not at all, depending on the template."""
    if not 1 <= n_captions <= len(CAPTION_TEMPLATES):
        raise ValueError(f"n_captions must be in 1..{len(CAPTION_TEMPLATES)}, got {n_captions}")
    captions = []
    for t in rng.choice(len(CAPTION_TEMPLATES), size=n_captions, replace=False):
        objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
        captions.append(CAPTION_TEMPLATES[t](rng, scene, objects))
    return captions


# -------------------------------------------------------------------------------------------------- samples

def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of sample `index` of `split`: independent of every other sample and of sharding."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def make_sample(seed: int, split: str, index: int, key: str, image_size: int = 64) -> dict[str, Any]:
    """Sample `index` of `split` as a webdataset dict {"__key__", "jpg", "txt", "json"}."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = sample_rng(seed, split, index)
    label = int(rng.integers(len(ZEROSHOT_CLASSNAMES))) if split == "zeroshot" else None
    scene = sample_scene(rng, image_size, main_class=label)
    image = render_scene(rng, scene, image_size)
    captions = caption_scene(rng, scene, n_captions=int(rng.integers(3, 6)) if split == "val" else 1)
    meta: dict[str, Any] = {"key": key, "caption": captions[0], "width": image_size, "height": image_size,
                            **scene.to_json()}
    if split == "val":
        meta["captions"] = captions
    if label is not None:
        meta["label"] = label
        meta["classname"] = ZEROSHOT_CLASSNAMES[label]
    return {"__key__": key, "jpg": encode_jpeg(image), "txt": "\n".join(captions), "json": meta}


# ---------------------------------------------------------------------------------------------------- shards

def _encode_member(value: bytes | str | Mapping[str, Any]) -> bytes:
    """Bytes of a tar member: bytes as-is, str as UTF-8, a mapping as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"cannot write a {type(value).__name__} into a tar member")


def write_shard(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> Path:
    """Write webdataset samples to the tar `path`, reproducibly; return the path.

    Each sample is a dict with ``"__key__"`` and any extensions (``"jpg"``, ``"txt"``, ``"json"``, ...) as
    bytes, str (UTF-8) or dict (JSON); members are ``<key>.<ext>`` in the dict's order, with fixed mtime,
    owner and mode, so equal samples give byte-identical tars. Written to a temporary file, then renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = _encode_member(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    os.replace(partial, path)
    return path


@dataclass(frozen=True)
class _ShardJob:
    """Everything a worker needs to generate and write one shard."""
    path: Path
    split: str
    seed: int
    start: int
    stop: int
    key_offset: int
    image_size: int


def _run_shard_job(job: _ShardJob) -> int:
    """Generate and write one shard; return its number of samples."""
    write_shard(job.path, (make_sample(job.seed, job.split, i, f"{job.key_offset + i:09d}", job.image_size)
                           for i in range(job.start, job.stop)))
    return job.stop - job.start


def write_zeroshot_metadata(out_dir: str | os.PathLike) -> None:
    """Write ``classnames.txt`` (line i = class i) and ``templates.txt`` (prompts with ``{}``) into `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "classnames.txt").write_text("\n".join(ZEROSHOT_CLASSNAMES) + "\n")
    (out_dir / "templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")


def generate_split(out_dir: str | os.PathLike, n: int, shard_size: int, seed: int, split: str,
                   image_size: int = 64, workers: int = 1, *, key_offset: int = 0,
                   progress: bool = False) -> list[Path]:
    """Write `n` samples of `split` as ``out_dir/{shard:05d}.tar`` shards of `shard_size`; return their paths.

    Sample ``i`` has key ``f"{key_offset + i:09d}"`` and depends only on (seed, split, i, image_size), so the
    output is the same for any `workers` (> 1: one process per shard at a time). The zero-shot split also gets
    ``classnames.txt`` and ``templates.txt``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0 or shard_size < 1 or image_size < 8 or workers < 1:
        raise ValueError(f"need n >= 0, shard_size >= 1, image_size >= 8, workers >= 1; got "
                         f"n={n}, shard_size={shard_size}, image_size={image_size}, workers={workers}")
    if key_offset + n > 10**9:
        raise ValueError(f"keys are 9 digits: key_offset + n = {key_offset + n} is too many samples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [_ShardJob(out_dir / f"{shard:05d}.tar", split, seed, start, min(start + shard_size, n), key_offset,
                      image_size)
            for shard, start in enumerate(range(0, n, shard_size))]
    with tqdm(total=n, desc=split, unit="sample", disable=not progress) as bar:
        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                bar.update(_run_shard_job(job))
        else:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for done in pool.imap_unordered(_run_shard_job, jobs):
                    bar.update(done)
    if split == "zeroshot":
        write_zeroshot_metadata(out_dir)
    return [job.path for job in jobs]


def generate_corpus(out: str | os.PathLike, sizes: Mapping[str, int], shard_size: int | Mapping[str, int],
                    seed: int, image_size: int = 64, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Write the splits of `sizes` ({split: n}; n = 0 or absent skips it) under ``out/<split>/``, with keys
    unique across splits (train, then val, then zeroshot), and ``out/corpus.json`` describing the corpus;
    return that description. `shard_size` is one size for all splits or a {split: size} mapping."""
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {SPLITS}")
    out = Path(out)
    description: dict[str, Any] = {"generator": "kd-data synth", "generator_version": GENERATOR_VERSION,
                                   "seed": seed, "image_size": image_size, "jpeg_quality": JPEG_QUALITY,
                                   "splits": {}}
    key_offset = 0
    for split in SPLITS:
        n = sizes.get(split, 0)
        if n == 0:
            continue
        split_shard_size = shard_size[split] if isinstance(shard_size, Mapping) else shard_size
        shards = generate_split(out / split, n, split_shard_size, seed, split, image_size, workers,
                                key_offset=key_offset, progress=progress)
        description["splits"][split] = {"samples": n, "shard_size": split_shard_size,
                                        "shards": [p.name for p in shards], "first_key": f"{key_offset:09d}",
                                        "captions_per_image": "3-5" if split == "val" else 1}
        if split == "zeroshot":
            description["splits"][split]["classes"] = len(ZEROSHOT_CLASSNAMES)
        key_offset += n
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").write_text(json.dumps(description, indent=2) + "\n")
    return description
