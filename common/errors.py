"""User errors: what a CLI reports as one line (exit 1), not a traceback."""
from __future__ import annotations

import click

from common.cache import CacheError
from common.corpus import CorpusError
from common.models import ModelError

# ValueError covers the option checks and the losses' LossSpecError; FileNotFoundError a missing --resume file
USER_ERRORS = (CacheError, CorpusError, ModelError, ValueError, FileNotFoundError)


def run_reporting_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from e
