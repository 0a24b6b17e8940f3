"""The CLIs answer --help and option errors without importing torch, open_clip, zarr or faiss: those take seconds
to import, and a person reading the help or fixing an option should not wait for them."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from tests.helpers import REPO

HEAVY = ("torch", "open_clip", "zarr", "faiss")
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]  # name -> "module:main"
# a console script's run, in a fresh interpreter; the last stdout line reports the exit code and the heavy imports
PROBE = """
import json, sys
from importlib import import_module
module, function = sys.argv[1].split(":")
sys.argv = [sys.argv[2], *sys.argv[3:]]
try:
    getattr(import_module(module), function)()
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_script(name: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, SCRIPTS[name], name, *args], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name,args", [
    *((name, ("--help",)) for name in SCRIPTS),
    ("kd-cache", ("build", "--help")), ("kd-cache", ("verify", "--help")), ("kd-eval", ("retrieval", "--help")),
    ("kd-eval", ("compare", "--help")), ("kd-data", ("synth", "--help")),
])
def test_help_imports_no_heavy_module(name, args):
    assert run_script(name, *args) == {"code": 0, "heavy": []}


@pytest.mark.parametrize("name,args", [
    ("kd-train", ("--data", "shards", "--out", "run", "--student", "s", "--batch-size", "0")),
    ("kd-train", ("--data", "shards", "--student", "s")),  # no --out
    ("kd-cache", ("build", "--teacher", "t", "--data", "shards", "--out", "s.zarr", "--dtype", "fp8")),
    ("kd-eval", ("retrieval", "--data", "shards")),  # neither --model nor --cache: a usage error in the command
])
def test_option_errors_import_no_heavy_module(name, args):
    assert run_script(name, *args) == {"code": 2, "heavy": []}
