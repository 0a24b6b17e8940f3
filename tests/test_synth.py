"""The synthetic corpus: layout, determinism, captions that match the drawn scene, shard writer, CLI."""
from __future__ import annotations

import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from common.synth import (BACKGROUNDS, COLOURS, POSITION_PHRASES, SHAPES, SYNONYMS, ZEROSHOT_CLASSNAMES,
                          generate_split, make_sample, write_shard)
from common.synth_cli import main

# The documented contract of the shared `synth_corpus` fixture (tests/conftest.py), which other tests rely on.
SYNTH_SIZES = {"train": 192, "val": 48, "zeroshot": 48}
SYNTH_SHARD_SIZES = {"train": 64, "val": 24, "zeroshot": 24}
SYNTH_IMAGE_SIZE = 32

SHAPE_OF_WORD = {form: shape for shape in SHAPES for form in SYNONYMS.get(shape, (shape,))}
PHRASE_STARTS = ("a", "the", "single", "with", "showing")
ALL_POSITION_PHRASES = sorted({p for forms in POSITION_PHRASES.values() for p in forms}, key=len, reverse=True)
RELATION = re.compile(
    rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPE_OF_WORD)}) (to the left of|to the right of|above|below) "
    rf"(?:a|the) (?:\S+ )*?({'|'.join(COLOURS)}) ({'|'.join(SHAPE_OF_WORD)})\b")


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a shard, in member order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def read_split(root: Path, split: str) -> list[tuple[str, Image.Image, str, dict]]:
    """(key, image, txt, json) of every sample of a split, via webdataset."""
    urls = [str(p) for p in sorted((root / split).glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    return [(s["__key__"], s["jpg"], s["txt"], s["json"]) for s in dataset]


def mentions(caption: str) -> dict[tuple[str, str], list[tuple[list[str], str]]]:
    """{(colour, shape): [(modifiers before the colour, text after the shape word), ...]} for each mention of a
    coloured shape in `caption`; modifiers are the words between the article and the colour."""
    words = caption.replace(",", " ,").replace(":", " :").split()
    found: dict[tuple[str, str], list[tuple[list[str], str]]] = defaultdict(list)
    for j in range(len(words) - 1):
        if words[j] in COLOURS and words[j + 1] in SHAPE_OF_WORD:
            k = j
            while k > 0 and words[k - 1] not in PHRASE_STARTS:
                k -= 1
            found[(words[j], SHAPE_OF_WORD[words[j + 1]])].append((words[k:j], " ".join(words[j + 2:])))
    return dict(found)


@pytest.fixture(scope="module")
def splits(synth_corpus: Path) -> dict[str, list[tuple[str, Image.Image, str, dict]]]:
    return {split: read_split(synth_corpus, split) for split in SYNTH_SIZES}


def test_layout_keys_and_corpus_json(synth_corpus: Path, splits) -> None:
    keys = []
    for split, n in SYNTH_SIZES.items():
        shards = sorted((synth_corpus / split).glob("*.tar"))
        assert [p.name for p in shards] == [f"{i:05d}.tar" for i in range(-(-n // SYNTH_SHARD_SIZES[split]))]
        for shard in shards:
            for key, members in read_tar(shard).items():
                assert re.fullmatch(r"\d{9}", key)
                assert list(members) == ["jpg", "txt", "json"]
                assert json.loads(members["json"])["key"] == key
        split_keys = [key for key, *_ in splits[split]]
        assert len(split_keys) == n
        keys += split_keys
    assert keys == [f"{i:09d}" for i in range(sum(SYNTH_SIZES.values()))]  # img2dataset-style, unique overall

    corpus = json.loads((synth_corpus / "corpus.json").read_text())
    assert corpus["seed"] == 0 and corpus["image_size"] == SYNTH_IMAGE_SIZE and corpus["generator_version"]
    assert {s: d["samples"] for s, d in corpus["splits"].items()} == SYNTH_SIZES
    assert corpus["splits"]["val"]["first_key"] == f"{SYNTH_SIZES['train']:09d}"


def test_images_are_rgb_and_show_the_scene(splits) -> None:
    palette = {**COLOURS, **BACKGROUNDS}
    names, rgb = list(palette), np.array(list(palette.values()), dtype=float)

    def nearest(pixel: np.ndarray) -> str:
        return names[int(np.argmin(((rgb - pixel) ** 2).sum(axis=1)))]

    checked = 0
    for split, samples in splits.items():
        for _, image, _, meta in samples:
            assert image.mode == "RGB" and image.size == (SYNTH_IMAGE_SIZE, SYNTH_IMAGE_SIZE)
            assert (meta["width"], meta["height"]) == image.size
            pixels = np.asarray(image, dtype=float)
            assert nearest(np.median(pixels.reshape(-1, 3), axis=0)) == meta["background"]
            main = meta["objects"][0]
            if split == "zeroshot" and main["texture"] == "solid" and main["shape"] != "ring":
                x, y = (int(c) for c in main["center"])
                assert nearest(pixels[y, x]) == main["colour"], meta
                checked += 1
    assert checked >= 10


def test_train_has_one_caption_and_val_several(splits) -> None:
    for _, _, txt, meta in splits["train"]:
        assert "\n" not in txt and txt == meta["caption"] and txt
    for _, _, txt, meta in splits["val"]:
        lines = txt.split("\n")
        assert 3 <= len(lines) <= 5
        assert len(set(lines)) == len(lines) and all(lines)
        assert lines == meta["captions"] and meta["caption"] == lines[0]


def test_zeroshot_labels_match_classnames(synth_corpus: Path, splits) -> None:
    classnames = (synth_corpus / "zeroshot" / "classnames.txt").read_text().splitlines()
    templates = (synth_corpus / "zeroshot" / "templates.txt").read_text().splitlines()
    assert classnames == list(ZEROSHOT_CLASSNAMES) and len(set(classnames)) == len(classnames) >= 24
    assert templates and all(t.count("{}") == 1 for t in templates)
    for _, _, txt, meta in splits["zeroshot"]:
        main = meta["objects"][0]
        assert classnames[meta["label"]] == meta["classname"] == f"{main['colour']} {main['shape']}"
        assert main["size"] == "large" and all(o["size"] == "small" for o in meta["objects"][1:])
        assert (main["colour"], main["shape"]) in mentions(txt)
    assert len({meta["label"] for *_, meta in splits["zeroshot"]}) > 10


def test_captions_bind_every_attribute_to_its_object(splits) -> None:
    """Each caption mentions exactly the scene's (colour, shape) pairs; each object at least once with its
    size and texture (as an allowed synonym) directly before the colour; positions, when given, are right."""
    for samples in splits.values():
        for _, _, _, meta in samples:
            objects = {(o["colour"], o["shape"]): o for o in meta["objects"]}
            for caption in meta.get("captions", [meta["caption"]]):
                found = mentions(caption)
                assert set(found) == set(objects), caption
                assert any(form in caption for form in SYNONYMS.get(meta["background"], (meta["background"],)))
                for pair, obj in objects.items():
                    expected = [SYNONYMS.get(obj["size"], (obj["size"],))]
                    if obj["texture"] != "solid":
                        expected.append(SYNONYMS.get(obj["texture"], (obj["texture"],)))
                    full = [(mods, rest) for mods, rest in found[pair] if mods]
                    assert full, caption
                    for mods, rest in full:
                        assert len(mods) == len(expected) and all(m in e for m, e in zip(mods, expected)), caption
                        given = [p for p in ALL_POSITION_PHRASES if rest.startswith(p)]
                        assert not given or given[0] in POSITION_PHRASES[obj["position"]], caption


def test_relations_agree_with_object_positions(splits) -> None:
    relations = 0
    for samples in splits.values():
        for _, _, _, meta in samples:
            centre = {(o["colour"], o["shape"]): o["center"] for o in meta["objects"]}
            for caption in meta.get("captions", [meta["caption"]]):
                for c1, s1, relation, c2, s2 in RELATION.findall(caption):
                    (x1, y1), (x2, y2) = centre[(c1, SHAPE_OF_WORD[s1])], centre[(c2, SHAPE_OF_WORD[s2])]
                    assert {"to the left of": x1 < x2, "to the right of": x1 > x2,
                            "above": y1 < y2, "below": y1 > y2}[relation], caption
                    relations += 1
    assert relations >= 20


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    a = generate_split(tmp_path / "a", 10, 4, seed=3, split="val", image_size=24, workers=1)
    b = generate_split(tmp_path / "b", 10, 4, seed=3, split="val", image_size=24, workers=2)
    c = generate_split(tmp_path / "c", 10, 4, seed=4, split="val", image_size=24, workers=1)
    assert [p.name for p in a] == [p.name for p in b] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert all(pa.read_bytes() != pc.read_bytes() for pa, pc in zip(a, c))


def test_samples_differ_across_splits_and_indices() -> None:
    train0, train1 = make_sample(0, "train", 0, "000000000", 24), make_sample(0, "train", 1, "000000001", 24)
    val0 = make_sample(0, "val", 0, "000000000", 24)
    assert len({train0["jpg"], train1["jpg"], val0["jpg"]}) == 3
    with pytest.raises(ValueError, match="unknown split"):
        make_sample(0, "test", 0, "000000000")


def test_generate_split_arguments(tmp_path: Path) -> None:
    assert generate_split(tmp_path / "empty", 0, 4, seed=0, split="train") == []
    assert not list((tmp_path / "empty").glob("*.tar"))
    with pytest.raises(ValueError, match="unknown split"):
        generate_split(tmp_path, 4, 4, seed=0, split="test")
    with pytest.raises(ValueError, match="shard_size"):
        generate_split(tmp_path, 4, 0, seed=0, split="train")
    shards = generate_split(tmp_path / "off", 3, 2, seed=0, split="train", image_size=16, key_offset=999_999_997)
    assert [list(read_tar(p)) for p in shards] == [["999999997", "999999998"], ["999999999"]]
    with pytest.raises(ValueError, match="9 digits"):
        generate_split(tmp_path, 4, 4, seed=0, split="train", key_offset=999_999_997)


def test_write_shard_any_members_reproducibly(tmp_path: Path) -> None:
    samples = [
        {"__key__": "000000001", "jpg": b"\xff\xd8 not a jpeg", "json": {"key": "000000001", "caption": "é"}},
        {"__key__": "000000002", "txt": "only a caption", "cls": b"3"},
    ]
    path = write_shard(tmp_path / "bad" / "00000.tar", samples)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000000001.jpg", "000000001.json", "000000002.txt", "000000002.cls"]
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    read = read_tar(path)
    assert read["000000001"]["jpg"] == b"\xff\xd8 not a jpeg"
    assert json.loads(read["000000001"]["json"]) == samples[0]["json"]
    assert read["000000002"] == {"txt": b"only a caption", "cls": b"3"}
    loaded = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in loaded] == [["jpg", "json"], ["cls", "txt"]]
    assert write_shard(tmp_path / "again.tar", samples).read_bytes() == path.read_bytes()
    assert not list(tmp_path.rglob("*.partial"))
    with pytest.raises(TypeError):
        write_shard(tmp_path / "x.tar", [{"__key__": "000000003", "txt": 3.5}])


def test_cli_synth_writes_a_corpus_and_guards_out(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    args = ["synth", str(out), "--val", "3", "--zeroshot", "2", "--shard-size", "4", "--image-size", "16",
            "--workers", "1", "--seed", "7"]
    runner = CliRunner()
    result = runner.invoke(main, args + ["--train", "6"])
    assert result.exit_code == 0, result.output
    assert "samples/s" in result.output
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "zeroshot" / "classnames.txt").is_file() and (out / "zeroshot" / "templates.txt").is_file()
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["seed"] == 7 and {s: d["samples"] for s, d in corpus["splits"].items()} == {
        "train": 6, "val": 3, "zeroshot": 2}

    refused = runner.invoke(main, args + ["--train", "6"])
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    (out / "notes.md").write_text("mine")
    replaced = runner.invoke(main, args + ["--train", "3", "--val", "0", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar"]  # stale shard removed
    assert not (out / "val").exists() and (out / "notes.md").read_text() == "mine"

    zeros = ["--train", "0", "--val", "0", "--zeroshot", "0"]
    nothing = runner.invoke(main, ["synth", str(tmp_path / "none"), *zeros])
    assert nothing.exit_code == 2 and "nothing to generate" in nothing.output
    negative = runner.invoke(main, ["synth", str(tmp_path / "neg"), "--train", "-1"])
    assert negative.exit_code == 2 and "--train" in negative.output
    assert not (tmp_path / "none").exists() and not (tmp_path / "neg").exists()
