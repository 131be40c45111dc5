"""The report of a command that wrote tensors through the write pipeline (``convert``,
``consolidate``): one table of tensors as read back, the notes and a verdict line; or ``--json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ckptkit.cli.render import emit_json, format_bytes, table
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK

if TYPE_CHECKING:  # the ops modules load only when a command runs
    from ckptkit.ops.pipeline import TensorCheck, WriteReport

HEADERS = ["tensor", "kind", "dtype", "shape", "file", "tie", "read back"]


def emit_write_report(report: WriteReport, as_json: bool) -> int:
    """Print ``report``; the exit code: 0 when every tensor read back equal, else 1."""
    code = EXIT_OK if report.ok else EXIT_FINDINGS
    if as_json:
        emit_json(report.to_json())
        return code
    click.echo(table([_row(c) for c in report.checks], HEADERS))
    for note in report.notes:
        click.echo(f"note: {note}")
    verdict = "OK" if report.ok else "FAILED"
    click.echo(
        f"{verdict}: {report.source_label} -> {report.to} {report.url}: {len(report.checks)} tensors "
        f"compared, {len(report.files)} file(s), {format_bytes(report.total_size)}, {report.seconds:.2f}s"
    )
    return code


def _row(c: TensorCheck) -> list[str]:
    return [
        c.name,
        c.kind,
        c.dtype if c.src_dtype == c.dtype else f"{c.src_dtype} -> {c.dtype}",
        "x".join(map(str, c.shape)) or "()",
        c.file or "-",
        f"tied to {c.alias_of}" if c.alias_of else "",
        "equal" if c.ok else str(c.problem),
    ]
