"""Checkpoint history: `kd-train --keep N [--keep-best METRIC]` (open_clip_train's --save-frequency with
--delete-previous-checkpoint, counted in saves).

Every save also writes `checkpoints/step_NNNNNN/`, an open_clip hub folder of that step's weights (config,
safetensors, tokenizer files: `local-dir:RUN/checkpoints/step_000500` loads it, or its
`open_clip_model.safetensors` as a `--checkpoint`); the N newest are kept, and with --keep-best the one with the
best validation value of METRIC too. The run folder's own weights stay the latest. `checkpoints/history.json`
holds each kept step's validation record and the best step, which the model card shows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.hub_folder import HUB_FILES, TOKENIZER_FILES
from common.model_card import CHECKPOINTS_DIR, HISTORY_FILE
from common.storage import atomic_write


def step_dir(step: int) -> str:
    return f"step_{step:06d}"


def lower_is_better(metric: str) -> bool:
    """Losses go down; recalls and accuracies go up."""
    return metric.endswith("loss")


class CheckpointHistory:
    """The step folders of the run folder `out`, and which of them to keep."""

    def __init__(self, out: Path, keep: int, keep_best: str | None):
        self.out, self.keep, self.keep_best = out, keep, keep_best
        self.folder = out / CHECKPOINTS_DIR
        self.path = out / HISTORY_FILE

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}, "best": None}

    def write(self, history: dict) -> None:
        self.folder.mkdir(exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(history, indent=2) + "\n"))

    def best(self, steps: dict[str, dict]) -> dict | None:
        """{"step", "metric", "value"} of the kept step with the best value of --keep-best, or None."""
        scored = [(record[self.keep_best], int(step)) for step, record in steps.items() if self.keep_best in record]
        if not self.keep_best or not scored:
            return None
        sign = 1 if lower_is_better(self.keep_best) else -1
        value, step = min(scored, key=lambda vs: (sign * vs[0], vs[1]))  # a tie goes to the earlier step
        return {"step": step, "metric": self.keep_best, "value": value}

    def add(self, step: int, validation: dict) -> None:
        """Copy the run folder's hub files (just saved at `step`) into checkpoints/step_NNNNNN/ with the step's
        validation record (empty when it was not validated); drop the step folders no longer kept."""
        target = self.folder / step_dir(step)
        tmp = self.folder / f".{step_dir(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in (*HUB_FILES, *TOKENIZER_FILES):
            if (self.out / name).is_file():
                shutil.copyfile(self.out / name, tmp / name)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        history = self.read()
        steps = history["steps"] | {str(step): {k: v for k, v in validation.items() if k != "step"}}
        history["best"] = self.best(steps)
        newest = sorted(steps, key=int)[-self.keep:] if self.keep else []
        kept = set(newest) | ({str(history["best"]["step"])} if history["best"] else set())
        for dropped in set(steps) - kept:
            shutil.rmtree(self.folder / step_dir(int(dropped)), ignore_errors=True)
        history["steps"] = {s: steps[s] for s in sorted(kept, key=int)}
        self.write(history)

    def forget_after(self, step: int) -> None:
        """A resumed run redoes the steps after `step`: step folders saved after it are not its own."""
        history = self.read()
        later = [s for s in history["steps"] if int(s) > step]
        if not later:
            return
        for s in later:
            shutil.rmtree(self.folder / step_dir(int(s)), ignore_errors=True)
        steps = {s: r for s, r in history["steps"].items() if int(s) <= step}
        self.write({"steps": steps, "best": self.best(steps)})
