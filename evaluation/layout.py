"""Where an evaluation split's shards and class names are, for the two layouts `--data` may name.

* This project's (`kd-data synth`): shards as a brace pattern, a directory of `*.tar` or a `::` list; a zero-shot
  split's directory holds `classnames.txt` (and `templates.txt`, prompts with `{}`).
* CLIP_benchmark's published webdatasets, used as they are: `--data` is the dataset root, shards are
  `<root>/test/{0..n-1}.tar` with n in `<root>/test/nshards.txt`, class names in `<root>/classnames.txt` and
  prompts with `{c}` in `<root>/zeroshot_classification_templates.txt` (found by `evaluation.zeroshot.templates_for`).
  Samples are an image (`.webp`, `.jpg`...) with `.txt` captions (retrieval) or a `.cls` label (classification).
"""
from __future__ import annotations

from pathlib import Path

BENCHMARK_SPLIT = "test"  # the split CLIP_benchmark publishes
CLASSNAMES_FILE = "classnames.txt"


def benchmark_root(data: str) -> Path | None:
    """`data` as a path when it is a CLIP_benchmark dataset root (a directory with a `test/` folder), else None."""
    path = Path(data)
    return path if path.is_dir() and (path / BENCHMARK_SPLIT).is_dir() else None


def shard_spec(data: str) -> str:
    """The shards `--data` names: a CLIP_benchmark root's `test/` shards (the n of `nshards.txt`, in order, or the
    folder's tars when it has no `nshards.txt`), else `data` unchanged (pattern, directory or list)."""
    root = benchmark_root(data)
    if root is None:
        return data
    split = root / BENCHMARK_SPLIT
    count_file = split / "nshards.txt"
    if not count_file.is_file():
        return str(split)
    try:
        count = int(count_file.read_text().strip())
    except ValueError:
        raise ValueError(f"{count_file}: expected the number of shards, got {count_file.read_text()[:40]!r}") from None
    shards = [split / f"{i}.tar" for i in range(count)]
    missing = [shard for shard in shards if not shard.is_file()]
    if count < 1:
        raise ValueError(f"{count_file} says {count} shards: expected a positive number")
    if missing:
        raise ValueError(f"{count_file} says {count} shards, but {missing[0]} is missing ({len(missing)} of "
                         f"{count}): download the dataset again, or fix nshards.txt")
    return "::".join(map(str, shards))


def classnames_file(data: str, classnames: str | None) -> Path:
    """`--classnames` when given, else `classnames.txt` in the dataset root or the split directory `--data`."""
    if classnames is not None:
        return Path(classnames)
    folder = benchmark_root(data) or Path(data)
    if (folder / CLASSNAMES_FILE).is_file():
        return folder / CLASSNAMES_FILE
    raise ValueError(f"no {CLASSNAMES_FILE} in {folder}: give --classnames FILE (one class name per line, "
                     f"line i = class i)")
