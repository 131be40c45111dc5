"""``ckptkit thin``: a committed checkpoint made weights-only in place (:mod:`ckptkit.ops.thin`)."""

from __future__ import annotations

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes
from ckptkit.errors import EXIT_OK


@click.command("thin")
@click.argument("path")
@click.option("--keep", "keep", multiple=True, default=("model",), show_default=True,
              help="Top-level key of the state to keep (repeatable). For an HF checkpoint-N or a "
                   "DeepSpeed tag: model, and optimizer, scheduler, scaler or rng to keep those too.")
@click.option("--dry-run", is_flag=True, help="Say what would be dropped; change nothing.")
@json_option
@click.pass_context
@handles_errors
def thin_command(ctx: click.Context, path: str, keep: tuple[str, ...], dry_run: bool, as_json: bool) -> int:
    """Thin the committed checkpoint PATH to the kept keys (weights only, by default).

    A smaller manifest replaces the checkpoint's own in one atomic write, then the dropped files
    are deleted (in a deduplicated root, the blobs nothing else needs). The checkpoint still
    verifies and loads (the kept keys), but no longer resumes training: 'ls -l' shows it as
    weights-only. Exit 2 if it cannot be thinned so (a key it lacks, a ZeRO-3 tag).
    """
    from ckptkit.ops.thin import thin_checkpoint
    from ckptkit.storage import open_store, split_parent

    parent, name = split_parent(path)
    report = thin_checkpoint(open_store(parent, **storage_options(ctx)), name, keep=keep, dry_run=dry_run)
    if as_json:
        emit_json(report.to_json())
        return EXIT_OK
    if not report.dropped:
        click.echo(f"{report.url}: nothing to drop; it holds only {', '.join(report.kept)}")
        return EXIT_OK
    verb = "would drop" if dry_run else "dropped"
    click.echo(
        f"{report.url}: {verb} {len(report.dropped)} file(s), {format_bytes(report.bytes_dropped)}; "
        f"kept {', '.join(report.kept)}"
    )
    for dropped in report.dropped:
        click.echo(f"  - {dropped}")
    if report.written:  # a dry run writes nothing, so it cannot say how large they will be
        size = "" if dry_run else f" ({format_bytes(report.bytes_written)})"
        click.echo(f"{'would write' if dry_run else 'wrote'} {len(report.written)} file(s){size}: "
                   f"{', '.join(report.written)}")
    if report.changed and not dry_run:
        click.echo(f"committed {report.checkpoint_id} (was {report.from_checkpoint_id})")
    if report.sweep is not None:
        freed = f"released {len(report.sweep.deleted)} blob(s), {format_bytes(report.sweep.freed_bytes)}"
        click.echo(freed + (f"; {report.sweep.skipped}" if report.sweep.skipped else ""))
    return EXIT_OK
