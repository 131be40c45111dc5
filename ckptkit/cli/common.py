"""What every command shares: --json, storage options, and errors as one line + exit code."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from ckptkit.cli.render import emit_error
from ckptkit.errors import EXIT_OK, EXIT_STORAGE, CkptkitError
from ckptkit.hashing import CHOICES, DIGEST_ENV

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
# For every command that writes a manifest. Unset, the library applies the same default
# (CKPTKIT_DIGEST, else blake3); through click a bad CKPTKIT_DIGEST is a usage error (exit 2).
digest_option = click.option(
    "--digest", type=click.Choice(CHOICES), default=None, envvar=DIGEST_ENV, show_envvar=True,
    help="How the manifest hashes each file: blake3 (default) or sha256 where a policy requires it.",
)


def handles_errors(command: Callable[..., int | None]) -> Callable[..., None]:
    """Run a command; turn expected errors into one clear line and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = kwargs.get("as_json", False)
        try:
            code = command(*args, **kwargs) or EXIT_OK
        except CkptkitError as exc:
            _report(exc, as_json)
            code = exc.exit_code
        except OSError as exc:  # an OS error no adapter translated: still no traceback
            _report(exc, as_json)
            code = EXIT_STORAGE
        sys.exit(code)

    return wrapper


def _report(exc: Exception, as_json: bool) -> None:
    """The one-line message; with ``CKPTKIT_DEBUG=1`` also the traceback, on stderr, so that a
    bug report can say where an expected error came from without a debugger."""
    emit_error(str(exc), type(exc).__name__, as_json)
    if os.environ.get("CKPTKIT_DEBUG", "") not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)


def storage_options(ctx: click.Context) -> dict[str, Any]:
    """The root group's ``-o KEY=VALUE`` options (empty when a command runs on its own)."""
    return dict((ctx.find_root().obj or {}).get("storage_options", {}))
