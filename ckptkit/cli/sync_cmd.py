"""``ckptkit sync``: copy committed checkpoints between local disk and object stores."""

from __future__ import annotations

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes, table

_STATUS_TEXT = {
    "committed": "copied, committed",
    "up-to-date": "up to date",
    "deleted": "deleted",
    "skipped": "skipped",
    "copied-uncommitted": "INCOMPLETE: copied, not committed",
    "refused": "refused",
    "conflict": "conflict",
    "failed": "FAILED",
}
_PLANNED_TEXT = {
    "copy": "would copy",
    "up-to-date": "up to date",
    "delete": "would delete",
    "skip-incomplete": "would skip",
    "copy-incomplete": "would copy raw (INCOMPLETE, not committed)",
    "refuse": "refused",
    "conflict": "conflict",
}


# --jobs defaults to ckptkit.ops.sync.DEFAULT_JOBS, written out: importing that module would slow
# down every command's start (and --help) by ~0.15 s.
@click.command("sync")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=4, show_default=True, help="Files copied at once."
)
@click.option("--verify", is_flag=True, help="Read every copied file back and re-hash it before committing.")
@click.option("--delete", is_flag=True, help="Delete destination checkpoints that are gone from the source.")
@click.option("--dry-run", is_flag=True, help="Print the plan; copy and delete nothing.")
@click.option(
    "--include-incomplete", is_flag=True, help="Also copy uncommitted checkpoints, as is and NOT committed."
)
@click.option(
    "--index", is_flag=True, help="Index checkpoints without a manifest on the fly (source untouched)."
)
@click.option(
    "--no-dedup",
    "no_dedup",
    is_flag=True,
    help="Write every file of a deduplicated checkpoint into the checkpoint at DST, not DST's blob store.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Tries per file on transient errors.",
)
@json_option
@click.pass_context
@handles_errors
def sync_command(
    ctx: click.Context,
    src: str,
    dst: str,
    jobs: int,
    verify: bool,
    delete: bool,
    dry_run: bool,
    include_incomplete: bool,
    index: bool,
    no_dedup: bool,
    retries: int,
    as_json: bool,
) -> int:
    """Copy the committed checkpoints of SRC to DST (a root of checkpoints, or one checkpoint).

    Data first, the manifest last: a checkpoint is committed at DST only once every file is
    there with the right digest. Files already at DST (same size and digest, from an earlier or
    interrupted run) are not sent again. SRC one checkpoint and DST ending in '/': copied into
    DST under the same name. Exit 0 when everything is in place; 1 when a checkpoint was refused
    or failed verification; 2 on a conflict (DST holds a different checkpoint of that name); 4
    when storage kept failing after retries.
    """
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.sync import sync
    from ckptkit.transfer import RetryPolicy

    options = storage_options(ctx)
    report = sync(
        src,
        dst,
        jobs=jobs,
        verify=verify,
        delete=delete,
        dry_run=dry_run,
        include_incomplete=include_incomplete,
        index=index,
        dedup=not no_dedup,
        retry=RetryPolicy(attempts=retries),
        progress=terminal_progress("sync", as_json=as_json),
        src_options=options,
        dst_options=options,
    )
    if as_json:
        emit_json(report.to_json())
        return report.exit_code
    rows = [
        [
            o.name,
            "-" if o.step is None else o.step,
            _PLANNED_TEXT[o.action]
            if o.status in ("planned", "refused", "conflict")
            else _STATUS_TEXT[o.status],
            f"{o.files_sent}/{o.files_total}" if o.files_total else "-",
            format_bytes(o.bytes_sent),
            o.detail,
        ]
        for o in report.outcomes
    ]
    if rows:
        click.echo(table(rows, ["checkpoint", "step", "result", "files sent", "bytes sent", "note"]))
    rate = report.bytes_sent / report.seconds if report.seconds > 0 else 0.0
    verb = "would send" if dry_run else "sent"
    click.echo(
        f"{verb} {format_bytes(report.bytes_sent)} in {report.files_sent} file(s)"
        + ("" if dry_run else f" in {report.seconds:.1f}s ({format_bytes(int(rate))}/s)")
        + f"; {report.count('committed')} committed, {report.count('up-to-date')} up to date, "
        f"{report.count('deleted')} deleted, {report.count('failed')} failed"
        + "".join(f", {report.count(s)} {s}" for s in ("refused", "conflict", "skipped") if report.count(s))
        + (", DRY RUN: nothing changed" if dry_run else "")
    )
    released = report.blobs_released
    if released is not None and released.has_store:
        skipped = f" (skipped: {released.skipped})" if released.skipped else ""
        click.echo(
            f"released {len(released.deleted)} blob(s) no checkpoint uses any more, "
            f"{format_bytes(released.freed_bytes)}{skipped}"
        )
    return report.exit_code
