"""Experiment tracking: `kd-train --report-to tensorboard,wandb`, the names open_clip_train uses.

`metrics.jsonl` stays the source of truth; the reporters get the same records (every loss term, lr, grad norm,
samples/s, cache hit rate, skipped samples, ...) at the same steps, under `train/<name>`, and the validation
records (`--val-data`, `--zeroshot-data`) under their own `val/<name>`. TensorBoard writes its
event files into `<run>/tensorboard`; W&B runs offline unless a key is set (WANDB_API_KEY, or `wandb login`'s
netrc entry), so that it never prompts, and keeps its files in `<run>/wandb` (`wandb sync` uploads them later).
Neither package is needed unless asked for: each is an extra of this package.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
from pathlib import Path

log = logging.getLogger("kd-train")
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # reporter -> the package (and extra) it needs
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """'tensorboard,wandb' -> ('tensorboard', 'wandb'), each checked to be known and installed."""
    names = tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"--report-to {value}: unknown reporter {name!r}; choose from "
                             f"{', '.join(REPORTERS)} (comma-separated)")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ValueError(f"--report-to {name}: the {REPORTERS[name]} package is not installed: "
                             f"pip install 'clip-kd-cache[{name}]'")
    return names


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Reporters:
    """The chosen reporters of one run (rank 0 only), opened as a context."""

    def __init__(self, names: tuple[str, ...], out: Path, run_name: str, project: str, run_id: str,
                 config: dict, first_step: int):
        self.names, self.out, self.run_name, self.project = names, out, run_name, project
        self.run_id, self.config, self.first_step = run_id, config, first_step
        self.writer = self.wandb_run = None

    def __enter__(self) -> "Reporters":
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a resumed run drops the events of steps it redoes
            self.writer = SummaryWriter(str(self.out / TENSORBOARD_DIR),
                                        purge_step=self.first_step + 1 if self.first_step else None)
        if "wandb" in self.names:
            import wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_key() else "offline")
            if mode == "offline":
                log.info("W&B runs offline (no WANDB_API_KEY or wandb login): `wandb sync %s` uploads it",
                         self.out / "wandb")
            self.wandb_run = wandb.init(project=self.project, name=self.run_name, id=self.run_id, resume="allow",
                                        dir=str(self.out), config=self.config, mode=mode)
        return self

    def log(self, record: dict) -> None:
        """A metrics.jsonl record at its step: training terms as train/<name>, names of their own section
        (val/...) as they are."""
        step = record["step"]
        scalars = {k if "/" in k else f"train/{k}": float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if exc[0] is not None else 0)
