"""Steps of the end-to-end runs (demo, ablation): each a real CLI command, printed, skipped when done.

A step is done when `<output>.step.json` records this very command and is newer than its inputs' records, so
changing an option re-runs the step it changes and every step downstream of it.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI_MODULES = {"kd-data": "common.synth_cli", "kd-cache": "stage1_teacher.cli", "kd-train": "stage2_student.cli",
               "kd-eval": "evaluation.cli"}


def cli(name: str) -> list[str]:
    """A console script run with this interpreter (works before the scripts are on PATH)."""
    return [sys.executable, "-m", CLI_MODULES[name]]


def _record(output: Path) -> Path:
    return output.with_name(output.name + ".step.json")


def finished_at(output: Path) -> float | None:
    record = _record(output)
    return json.loads(record.read_text())["finished"] if record.is_file() else None


def step_seconds(output: Path) -> float:
    """Wall seconds the step that wrote `output` took when it last ran (also when this run skipped it)."""
    return json.loads(_record(output).read_text())["seconds"]


def run_step(title: str, command: list, output: Path, inputs: tuple[Path, ...] = ()) -> float:
    """Run `command` (which writes `output`) unless already done with the same command after its inputs.
    Returns the wall seconds it took, 0 when skipped."""
    command = [str(c) for c in command]
    record = _record(output)
    done = json.loads(record.read_text()) if record.is_file() else None
    upstream = [finished_at(p) for p in inputs]
    # the output must still be there: a record outlives an output deleted by hand
    if (done and output.exists() and done["command"] == command
            and all(t is not None and t <= done["finished"] for t in upstream)):
        print(f"== {title}: done ({output}, {done['seconds']:.0f} s when run)", flush=True)
        return 0.0
    print(f"\n== {title}\n$ {shlex.join(command)}", flush=True)
    if output.is_dir() and (done or command[:3] != cli("kd-cache")):
        # stale (made by another command or before its inputs changed), or an interrupted run of a step that
        # starts over (kd-train refuses a non-empty --out); an interrupted kd-cache build resumes
        shutil.rmtree(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"step '{title}' failed: see the output above")
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"command": command, "finished": time.time(), "seconds": seconds}))
    print(f"== {title}: {seconds:.0f} s", flush=True)
    return seconds
