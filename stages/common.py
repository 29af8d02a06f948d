"""What every stage command shares: ``--params``/``--set`` options, logging, and the user-error boundary."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from pipeline.errors import UserError, shown_here
from pipeline.params import Params, load_params

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("sae")


def setup_logging(level: str | None = None) -> None:
    """``SAE_LOG_LEVEL`` (default INFO); off a terminal (CI, DVC logs) third-party progress bars are silenced."""
    level = (level or os.environ.get("SAE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # transformers is a dependency; this only guards odd installs
            pass


def stage_command(help: str) -> Callable[[F], F]:
    """Decorate ``fn(params: Params, **kw)`` into a click command with --params/--set and clean errors.

    A :class:`UserError` (bad params, missing input, corrupted shard) becomes ``error: <line>`` on
    stderr and exit code 2; anything else is a bug and keeps its traceback.
    """

    def wrap(fn: F) -> F:
        @click.command(help=help, short_help=help.split(". ")[0].rstrip("."))
        @click.option("--params", "params_path", default="params.yaml", show_default=True,
                      type=click.Path(dir_okay=False), help="Params file.")
        @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a param, e.g. --set train.lr=1e-3 (repeatable).")
        @functools.wraps(fn)
        def cmd(params_path: str, overrides: tuple[str, ...], **kwargs: Any) -> None:
            setup_logging()
            try:
                params = load_params(params_path, overrides)
                fn(params, **kwargs)
            except UserError as e:
                if shown_here(e):  # an error every process finds alike: rank 0's line only
                    click.echo(f"error: {e}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo("interrupted: completed work is kept; rerun to resume", err=True)
                sys.exit(130)

        return cmd  # type: ignore[return-value]

    return wrap


def run_user_errors(fn: Callable[[], Any]) -> None:
    """For non-stage commands: same one-line error boundary."""
    setup_logging()
    try:
        fn()
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


__all__ = ["Params", "stage_command", "run_user_errors", "log"]
