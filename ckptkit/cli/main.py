"""``ckptkit`` commands. Each one is a library call plus rendering; exit codes per docs/cli.md."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from ckptkit.catalog import list_checkpoints
from ckptkit.cli.render import emit_error, emit_json, format_bytes, table
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_STORAGE, CkptkitError
from ckptkit.ops.gc import DEFAULT_GRACE_SECONDS, collect_garbage, find_debris
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.verify import VerifyReport, verify_tree
from ckptkit.storage import Store, open_store

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

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


def _store(ctx: click.Context, url: str) -> Store:
    return open_store(url, **ctx.obj["storage_options"])


def _parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _parse_duration(value: str) -> float:
    match = _DURATION.match(value.strip())
    if not match:
        raise click.BadParameter(f"expected a duration like 30s, 10m, 1h or 2d, got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-o", "--option", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="Storage option for the backend, e.g. -o endpoint_url=http://127.0.0.1:9000 (repeatable).",
)
@click.version_option(package_name="ckptkit")
@click.pass_context
def cli(ctx: click.Context, storage_options: tuple[str, ...]) -> None:
    """Atomic, verifiable checkpoints: list, verify, index and clean them on disk or S3."""
    ctx.obj = {"storage_options": _parse_options(storage_options)}


@cli.command("ls")
@click.argument("root")
@json_option
@click.pass_context
@handles_errors
def ls_command(ctx: click.Context, root: str, as_json: bool) -> int:
    """List the checkpoints under ROOT, committed and incomplete, newest last."""
    store = _store(ctx, root)
    checkpoints = list_checkpoints(store)
    if as_json:
        emit_json([
            {"name": c.name, "url": c.url, "step": c.step, "status": c.status, "files": c.files,
             "size": c.size, "created": c.created,
             "layout": c.manifest.layout if c.manifest else None,
             "checkpoint_id": c.manifest.checkpoint_id if c.manifest else None}
            for c in checkpoints
        ])
        return EXIT_OK
    leftovers = find_debris(store)
    if not checkpoints:
        click.echo(f"no checkpoints under {root}")
    if leftovers:
        click.echo(
            f"note: {len(leftovers)} leftover item(s) of interrupted saves "
            f"({format_bytes(sum(d.size for d in leftovers))}); 'ckptkit gc {root}' removes them",
            err=True,
        )
    if not checkpoints:
        return EXIT_OK
    rows = [
        [c.name, "-" if c.step is None else c.step, c.status, c.manifest.layout if c.manifest else "-",
         c.files, format_bytes(c.size), c.created or "-"]
        for c in checkpoints
    ]
    click.echo(table(rows, ["checkpoint", "step", "status", "layout", "files", "size", "created"]))
    return EXIT_OK


@cli.command("verify")
@click.argument("path")
@click.option("--quick", is_flag=True, help="Check presence and sizes only, not digests.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Hashing threads.")
@json_option
@click.pass_context
@handles_errors
def verify_command(ctx: click.Context, path: str, quick: bool, jobs: int | None, as_json: bool) -> int:
    """Verify a checkpoint (or every checkpoint under a root) against its manifest.

    Exit 0 if everything matches, 1 if anything is missing, truncated, corrupt or uncommitted.
    """
    reports = verify_tree(_store(ctx, path), quick=quick, jobs=jobs)
    code = EXIT_OK if all(r.ok for r in reports) else EXIT_FINDINGS
    if as_json:
        emit_json({"ok": code == EXIT_OK, "checkpoints": [r.to_json() for r in reports]})
        return code
    click.echo(_verify_table(reports))
    problems = [f for r in reports for f in r.findings]
    for finding in problems:
        click.echo(f"{finding.severity}: {finding.message}")
    verdict = "OK" if code == EXIT_OK else "FAILED"
    how = "sizes only (--quick)" if quick else "sizes and sha256 digests"
    click.echo(f"{verdict}: {len(reports)} checkpoint(s) checked, {how}")
    return code


def _verify_table(reports: list[VerifyReport]) -> str:
    rows = []
    for r in reports:
        errors = sum(f.severity == "error" for f in r.findings)
        warnings = len(r.findings) - errors
        rows.append([
            r.url.rstrip("/").rsplit("/", 1)[-1], "-" if r.step is None else r.step, r.status,
            r.files_checked, format_bytes(r.bytes_checked), errors, warnings, f"{r.seconds:.2f}s",
        ])
    return table(rows, ["checkpoint", "step", "result", "files", "checked", "errors", "warnings", "time"])


@cli.command("index")
@click.argument("path")
@click.option("--force", is_flag=True, help="Replace an existing manifest.")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Step to record (default: detected).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Hashing threads.")
@json_option
@click.pass_context
@handles_errors
def index_command(
    ctx: click.Context, path: str, force: bool, step: int | None, jobs: int | None, as_json: bool
) -> int:
    """Hash a checkpoint directory another tool wrote and commit a manifest for it."""
    result = index_checkpoint(_store(ctx, path), force=force, step=step, jobs=jobs)
    m = result.manifest
    if as_json:
        emit_json({"url": result.url, "replaced": result.replaced, "manifest": m.to_json()})
        return EXIT_OK
    verb = "re-indexed" if result.replaced else "indexed"
    click.echo(
        f"{verb} {result.url}: layout {m.layout}, step {m.step if m.step is not None else '-'}, "
        f"{len(m.files)} files, {format_bytes(m.total_size)}; committed {m.checkpoint_id}"
    )
    return EXIT_OK


@cli.command("gc")
@click.argument("root")
@click.option("--grace", default=f"{int(DEFAULT_GRACE_SECONDS)}s", show_default=True,
              help="Keep debris younger than this (e.g. 30m, 1h, 0 for all).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@click.pass_context
@handles_errors
def gc_command(ctx: click.Context, root: str, grace: str, dry_run: bool, as_json: bool) -> int:
    """Remove staging leftovers and orphaned objects of interrupted saves under ROOT."""
    report = collect_garbage(_store(ctx, root), grace_seconds=_parse_duration(grace), dry_run=dry_run)
    if as_json:
        emit_json({"url": report.url, "dry_run": dry_run, "removed": report.removed,
                   "kept_young": report.kept_young, "bytes_removed": report.bytes_removed})
        return EXIT_OK
    verb = "would remove" if dry_run else "removed"
    rows = [
        [d.prefix, d.reason, d.objects, format_bytes(d.size), f"{d.age_seconds:.0f}s"]
        for d in report.removed
    ]
    if rows:
        click.echo(table(rows, ["path", "what", "objects", "size", "age"]))
    click.echo(f"{verb} {len(report.removed)} item(s), {format_bytes(report.bytes_removed)}")
    if report.kept_young:
        click.echo(f"kept {len(report.kept_young)} item(s) younger than the grace period ({grace})")
    return EXIT_OK


def main() -> None:
    cli(prog_name="ckptkit")
