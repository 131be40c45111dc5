"""What every command shares: --json, storage options, and errors as one line + exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ckptkit.cli.render import emit_error
from ckptkit.errors import EXIT_OK, EXIT_STORAGE, CkptkitError

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def handles_errors(command: Callable[..., int | None]) -> Callable[..., None]:
    """Run a command; turn expected errors into one clear line and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = kwargs.get("as_json", False)
        try:
            code = command(*args, **kwargs) or EXIT_OK
        except CkptkitError as exc:
            emit_error(str(exc), type(exc).__name__, as_json)
            code = exc.exit_code
        except OSError as exc:  # an OS error no adapter translated: still no traceback
            emit_error(str(exc), type(exc).__name__, as_json)
            code = EXIT_STORAGE
        sys.exit(code)

    return wrapper


def storage_options(ctx: click.Context) -> dict[str, Any]:
    """The root group's ``-o KEY=VALUE`` options (empty when a command runs on its own)."""
    return dict((ctx.find_root().obj or {}).get("storage_options", {}))
