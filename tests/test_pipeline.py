"""The demo's step runner: a step runs once, and again only when its command or an input changed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from pipeline import run_step  # noqa: E402


def writer(path: Path, text: str) -> list[str]:
    return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(path)!r}); p.mkdir(exist_ok=True); "
                                  f"(p / 'out.txt').write_text({text!r})"]


def test_steps_run_once_and_rerun_on_change(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_step("first", writer(first, "a"), first) > 0
    assert run_step("second", writer(second, "b"), second, inputs=(first,)) > 0
    assert run_step("first", writer(first, "a"), first) == 0  # same command: skipped
    assert run_step("second", writer(second, "b"), second, inputs=(first,)) == 0
    assert "done" in capsys.readouterr().out
    assert run_step("first", writer(first, "c"), first) > 0  # other command: re-run, stale output replaced
    assert (first / "out.txt").read_text() == "c"
    assert run_step("second", writer(second, "b"), second, inputs=(first,)) > 0  # its input is newer now


def test_failed_step_stops_with_its_title(tmp_path):
    with pytest.raises(SystemExit, match="step 'broken' failed"):
        run_step("broken", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "never")
    assert not (tmp_path / "never.step.json").exists()
