"""``ckptkit`` commands. Each one is a library call plus rendering; exit codes per docs/cli.md."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import click

from ckptkit.cli.common import digest_option, handles_errors, json_option, storage_options
from ckptkit.cli.consolidate_cmd import consolidate_command
from ckptkit.cli.convert_cmd import convert_command
from ckptkit.cli.diff_cmd import diff_command
from ckptkit.cli.inspect_cmd import inspect_command
from ckptkit.cli.log_cmd import log_command
from ckptkit.cli.plan_cmd import plan_command
from ckptkit.cli.render import emit_json, format_bytes, table
from ckptkit.cli.reshard_cmd import reshard_command
from ckptkit.cli.safety_cmds import doctor_command, scan_command
from ckptkit.cli.sync_cmd import sync_command
from ckptkit.cli.thin_cmd import thin_command
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_STORAGE

if TYPE_CHECKING:
    from ckptkit.blobs import SweepReport
    from ckptkit.catalog import CheckpointInfo
    from ckptkit.ops.verify import VerifyReport
    from ckptkit.storage import Store

# Each command imports the library it calls when it runs, so `ckptkit --help` and every
# command pay only for what they use.
DEFAULT_GRACE = "3600s"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

def _store(ctx: click.Context, url: str) -> Store:
    from ckptkit.storage import open_store

    return open_store(url, **storage_options(ctx))


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
    "-o", "--option", "option_pairs", multiple=True, metavar="KEY=VALUE",
    help="Storage option for the backend, e.g. -o endpoint_url=http://127.0.0.1:9000 (repeatable).",
)
@click.version_option(package_name="ckptkit")
@click.pass_context
def cli(ctx: click.Context, option_pairs: tuple[str, ...]) -> None:
    """Atomic, verifiable checkpoints: list, verify, index and clean them on disk or S3."""
    ctx.obj = {"storage_options": _parse_options(option_pairs)}


@cli.command("ls")
@click.argument("root")
@click.option("-l", "--long", "read_manifests", is_flag=True,
              help="Read and validate every manifest (layout, id, exact step); one GET each.")
@json_option
@click.pass_context
@handles_errors
def ls_command(ctx: click.Context, root: str, read_manifests: bool, as_json: bool) -> int:
    """List the checkpoints under ROOT, committed and incomplete, newest last.

    Without --long only the listing is read: a few requests however many checkpoints there are.
    """
    from ckptkit.catalog import list_checkpoints
    from ckptkit.commit import is_ckptkit_debris_dir

    store = _store(ctx, root)
    unreadable: list[tuple[str, str]] = []
    checkpoints = list_checkpoints(store, read_manifests=read_manifests, unreadable=unreadable)
    # What could be read is shown; what could not is named, and the exit code says it.
    for path, reason in unreadable:
        click.echo(f"ckptkit: error: could not list {path}: {reason}", err=True)
    exit_code = EXIT_STORAGE if unreadable else EXIT_OK
    if as_json:
        emit_json([
            {"name": c.name, "url": c.url, "step": c.step, "status": c.status, "files": c.files,
             "size": c.size, "created": c.created,
             "layout": c.manifest.layout if c.manifest else None,
             "checkpoint_id": c.manifest.checkpoint_id if c.manifest else None,
             "resumable": c.resumable}
            for c in checkpoints
        ])
        return exit_code
    leftovers = [name for name in store.list_dirs("") if is_ckptkit_debris_dir(name)]
    if not checkpoints:
        click.echo(f"no {'readable ' if unreadable else ''}checkpoints under {root}")
    if leftovers:
        click.echo(
            f"note: {len(leftovers)} leftover staging or trash director(ies) of interrupted saves; "
            f"'ckptkit gc {root}' removes them",
            err=True,
        )
    if not checkpoints:
        return exit_code
    rows = [
        [c.name, "-" if c.step is None else c.step, c.status, c.manifest.layout if c.manifest else "-",
         *([_contents(c)] if read_manifests else []), c.files, format_bytes(c.size), c.created or "-"]
        for c in checkpoints
    ]
    contents = ["contents"] if read_manifests else []  # from the manifests, which only --long reads
    click.echo(table(rows, ["checkpoint", "step", "status", "layout", *contents, "files", "size", "created"]))
    return exit_code


def _contents(checkpoint: CheckpointInfo) -> str:
    """Whether training can resume from a committed checkpoint, or it was thinned (``ckptkit thin``)."""
    if not checkpoint.committed or checkpoint.resumable is None:
        return "-"
    return "resumable" if checkpoint.resumable else "weights-only"


@cli.command("verify")
@click.argument("path")
@click.option("--quick", is_flag=True, help="Check presence and sizes only, not digests.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Hashing threads.")
@json_option
@click.pass_context
@handles_errors
def verify_command(ctx: click.Context, path: str, quick: bool, jobs: int | None, as_json: bool) -> int:
    """Verify a checkpoint (or every checkpoint under a root) against its manifest.

    A checkpoint or file without a ckptkit manifest gets every structural check its format
    allows (zip CRCs, record sizes, safetensors rules, index files, DeepSpeed completeness).
    Exit 0 if everything holds, 1 if anything is missing, truncated, corrupt or uncommitted.
    """
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.verify import verify_path

    progress = terminal_progress("verify", as_json=as_json)
    reports = verify_path(path, quick=quick, jobs=jobs, progress=progress, **storage_options(ctx))
    code = EXIT_OK if all(r.ok for r in reports) else EXIT_FINDINGS
    if as_json:
        emit_json({"ok": code == EXIT_OK, "checkpoints": [r.to_json() for r in reports]})
        return code
    click.echo(_verify_table(reports))
    problems = [f for r in reports for f in r.findings]
    for finding in problems:
        click.echo(f"{finding.severity}: {finding.message}")
    verdict = "OK" if code == EXIT_OK else "FAILED"
    if any(r.checkpoint_files is not None for r in reports):
        how = "structure only (no manifest, so no digests)"
    else:
        how = "sizes only (--quick)" if quick else "sizes and content digests"
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
@digest_option
@json_option
@click.pass_context
@handles_errors
def index_command(
    ctx: click.Context,
    path: str,
    force: bool,
    step: int | None,
    jobs: int | None,
    digest: str | None,
    as_json: bool,
) -> int:
    """Hash a checkpoint directory another tool wrote and commit a manifest for it."""
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.index import index_checkpoint

    progress = terminal_progress("index", as_json=as_json)
    result = index_checkpoint(
        _store(ctx, path), force=force, step=step, jobs=jobs, progress=progress, digest=digest
    )
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
@click.option("--grace", default=DEFAULT_GRACE, show_default=True,
              help="Keep debris younger than this (e.g. 30m, 1h, 0 for all).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@json_option
@click.pass_context
@handles_errors
def gc_command(ctx: click.Context, root: str, grace: str, dry_run: bool, as_json: bool) -> int:
    """Remove staging leftovers and orphaned objects of interrupted saves under ROOT, and the
    blobs of a deduplicated ROOT that no checkpoint and no save in flight references."""
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.gc import collect_garbage

    report = collect_garbage(
        _store(ctx, root),
        grace_seconds=_parse_duration(grace),
        dry_run=dry_run,
        progress=terminal_progress("gc", as_json=as_json),
    )
    if as_json:
        emit_json({"url": report.url, "dry_run": dry_run, "removed": report.removed,
                   "kept_young": report.kept_young, "skipped": report.skipped,
                   "bytes_removed": report.bytes_removed, "blobs": _blob_sweep_json(report.blobs)})
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
    if report.skipped:
        click.echo(f"skipped {len(report.skipped)} key(s) left in place:")
        for item in report.skipped:
            click.echo(f"  {item.key!r}: {item.reason}")
    if report.blobs is not None:
        _echo_blob_sweep(report.blobs, verb)
    return EXIT_OK


def _blob_sweep_json(swept: SweepReport | None) -> dict[str, Any] | None:
    if swept is None:
        return None
    return {"deleted": swept.deleted, "freed_bytes": swept.freed_bytes, "kept": swept.kept,
            "stale_pins": swept.stale_pins, "skipped": swept.skipped}


def _echo_blob_sweep(swept: SweepReport, verb: str) -> None:
    if swept.skipped and not swept.deleted:  # the lock was another gc's: nothing was looked at
        click.echo(f"blobs: skipped: {swept.skipped}")
        return
    if verb == "would remove":
        for key in swept.deleted:
            click.echo(f"  blob {key}")
    click.echo(
        f"blobs: {verb} {len(swept.deleted)} unreferenced, {format_bytes(swept.freed_bytes)}; "
        f"kept {swept.kept}; {verb} {len(swept.stale_pins)} stale pin(s)"
    )
    if swept.skipped:
        click.echo(f"blobs: stopped: {swept.skipped}")


for command in (
    inspect_command, scan_command, doctor_command, consolidate_command, reshard_command, sync_command,
    convert_command, diff_command, plan_command, log_command, thin_command,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="ckptkit")
