"""User errors: what a CLI reports as one line (exit 1), not a traceback; `-v` / `--debug` also logs the traceback."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import re
from typing import Iterator

import click

from common.lock import OutputLocked

log = logging.getLogger("kd-errors")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


class Interrupted(Exception):
    """SIGINT / SIGTERM stopped a run after saving what resumes it: reported as a stop, not an error, and exits with
    128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_DISK_FULL_ADVICE = "free space there and re-run the same command"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")  # 'common.corpus.CorpusError: ...' in a traceback


def worker_message(message: str) -> str:
    """A DataLoader worker's error arrives as 'Caught X in DataLoader worker process N.\nOriginal Traceback ...':
    keep the original exception's own text, from its unindented 'module.X: ' line to the end."""
    _, found, original = message.partition("\nOriginal Traceback")
    if not found:
        return message
    lines = original.rstrip().splitlines()
    at = max((i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)), default=len(lines) - 1)
    return "\n".join([_EXCEPTION_LINE.sub("", lines[at]), *lines[at + 1:]])


def user_message(error: BaseException, store: str | None = None, out: str | None = None) -> str | None:
    """One line a person can act on for `error`, or None for a bug (which keeps its traceback). `store`: the Zarr
    store the command opens; `out`: what it writes (named when a full disk's error does not say which file)."""
    # imported here, not at the top: the CLIs import this module, and their --help must not load torch or zarr
    from common.cache import CacheError, broken_metadata
    from common.corpus import CorpusError
    from common.models import ModelError

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the device writing {error.filename or out or 'the output'}: {_DISK_FULL_ADVICE}"
    if isinstance(error, json.JSONDecodeError) and store:  # an array's zarr.json, read after the store opened
        return broken_metadata(store, error)
    # ValueError covers the option checks and the losses' LossSpecError; FileNotFoundError a missing input file
    if isinstance(error, (CacheError, CorpusError, ModelError, ValueError, FileNotFoundError, OutputLocked,
                          NonFiniteError)):
        return worker_message(str(error))
    return None


@contextlib.contextmanager
def reported_errors(store: str | None = None, out: str | None = None) -> Iterator[None]:
    """Turn user errors into click's one-line report (see user_message for `store` and `out`)."""
    try:
        yield
    except Interrupted as e:  # asked for (Ctrl-C, a scheduler's SIGTERM): not an "Error:"
        click.echo(str(e), err=True)
        raise click.exceptions.Exit(e.exit_code) from e
    except Exception as e:  # noqa: BLE001 - bugs are re-raised untouched
        message = user_message(e, store, out)
        if message is None:
            raise
        log.debug("traceback of the error below", exc_info=True)
        report = click.ClickException(message)
        report.exit_code = getattr(e, "exit_code", 1)
        raise report from e


def run_reporting_errors(fn, *args, **kwargs):
    with reported_errors():
        return fn(*args, **kwargs)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange lets nan (it compares false) and inf (with no upper bound) through: refused here."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# click types of the CLIs' numeric options: nonsense is refused at parse time, naming the option
POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
POSITIVE_FLOAT = FiniteFloatRange(min=0, min_open=True)
NON_NEGATIVE_FLOAT = FiniteFloatRange(min=0)
PROBABILITY = FiniteFloatRange(0, 1)
SEED = click.IntRange(0, 2**63 - 1)  # what numpy's and torch's generators take (torch: 64 bits, with +epoch)


def check_device(ctx, param, value: str) -> str:
    """click callback for --device: a CUDA device needs a GPU that torch sees."""
    if not value.startswith("cuda"):
        return value
    import torch  # only a CUDA device needs it: --help and cpu runs' option parsing stay light

    if not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: torch sees no GPU here (torch.cuda.is_available() is False): "
                                 f"use --device cpu")
    return value


class DataPatternCommand(click.Command):
    """A command with --data: extra arguments are almost always an unquoted brace pattern the shell expanded."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if "unexpected extra argument" in e.message:
                e.message += ("\nThe shell expanded an unquoted --data pattern into several arguments: quote it, "
                              "e.g. --data 'shards/{00000..00099}.tar'")
            raise


class DataPatternGroup(click.Group):
    """A group whose subcommands give DataPatternCommand's hint."""
    command_class = DataPatternCommand
