"""Helpers shared by the bench scripts: machine info, side-by-side timing, tables, JSON output, corpus setup.

Every script measures its variants interleaved (a, b, c, then b, c, a, ...) and reports medians, so that load
from other processes on a shared machine hits every variant alike and ratios stay meaningful.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as `python bench/x.py` from anywhere


def add_common_args(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")


def parse_args(parser: argparse.ArgumentParser, tiny: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv (default: the command line). With --tiny, `tiny` replaces those options' defaults (options
    given on the command line still win): the same measurement code at sizes a test runs in seconds."""
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and models: a smoke run of every step")
    unknown = set(tiny) - {action.dest for action in parser._actions}
    if unknown:
        raise ValueError(f"tiny settings name no option of {parser.prog}: {sorted(unknown)}")
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    return args


def start(title: str, args) -> dict:
    """Check the device, set torch threads, print the header; returns the header for the JSON output."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    return print_header(title, args.device)


def command_line() -> str:
    """The exact command this process was started with."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def machine_info(device: str) -> dict:
    """CPU count, torch threads and versions, the device name, and the load when the run started."""
    import zarr
    info = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "numpy": np.__version__, "zarr": zarr.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(0)})",
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def print_header(title: str, device: str) -> dict:
    """Print the title, machine info and exact command; return them for the JSON output."""
    info = machine_info(device)
    print(f"== {title} ==")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"command: {command_line()}")
    return {"title": title, "machine": info, "command": command_line()}


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call (GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: str = "cpu",
                warmup: int = 0, before_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured round-robin: round r runs the variants rotated by r (so no
    variant is always first after a pause). The first `warmup` rounds run but are not recorded.
    `before_round(r)`, if given, runs untimed before round r (e.g. to pick that round's input)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        if before_round is not None:
            before_round(r)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timed(variants[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[r] / denominator[r]: each ratio pairs two calls made moments apart,
    which is more robust to slow changes in machine load than a ratio of medians."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def print_table(headers: list[str], rows: list[list], title: str = "") -> None:
    """A plain right-aligned text table (floats to 4 significant digits)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n-- {title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def model_summary(clip) -> str:
    """'name: 2.1M params, 48 px, embed 128' for a common.models.LoadedCLIP ('48x64 px' for other images)."""
    from common.families import image_size
    params = sum(p.numel() for p in clip.model.parameters())
    height, width = image_size(clip.model)
    pixels = height if height == width else f"{height}x{width}"
    return f"{clip.name}: {params / 1e6:.1f}M params, {pixels} px, embed {clip.embed_dim}"


def write_json(path: str | None, results: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nresults written to {path}")


def make_corpus(root: Path, samples: int, image_size: int, shard_size: int = 1000) -> Path:
    """A synthetic train split of `samples` under root/train (seed 0); returns that directory."""
    from common.synth import generate_corpus
    generate_corpus(root, {"train": samples}, shard_size=shard_size, seed=0, image_size=image_size,
                    workers=min(4, os.cpu_count() or 1))
    return root / "train"


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, file count) of the files under path."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


@contextlib.contextmanager
def quiet_stderr():
    """Hide progress bars written to stderr; show them after all if the block raises."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def synthetic_index(rows: int):
    """A corpus index of `rows` samples in one shard with 9-digit keys (img2dataset's), for stores whose
    targets a benchmark writes itself."""
    from common.index import CorpusIndex
    keys = [f"{i:09d}".encode() for i in range(rows)]
    return CorpusIndex(urls=["synthetic.tar"], names=["synthetic.tar"], sizes=np.array([rows * 3072]),
                       versions=["0"], counts=np.array([rows]), ends=np.array([rows * 3072]), errors=[""],
                       offsets=np.arange(rows, dtype=np.int64) * 3072,
                       key_ends=np.cumsum([len(k) for k in keys]).astype(np.int64),
                       key_bytes=np.frombuffer(b"".join(keys), np.uint8).copy())
