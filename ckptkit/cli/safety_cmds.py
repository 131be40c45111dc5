"""``ckptkit scan`` and ``ckptkit doctor``: library calls (ops.scan, ops.doctor) plus rendering.

Neither imports torch: both read pickles symbolically. Exit codes per docs/cli.md: 0 clean,
1 findings (a pickle that could not be read to its end; allowlist entries ckptkit has not vetted),
3 unsafe content, 4 storage errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, table

if TYPE_CHECKING:
    from ckptkit.ops.doctor import DoctorReport
    from ckptkit.ops.scan import ScanReport


@click.command("scan")
@click.argument("path")
@click.option("--all", "show_all", is_flag=True, help="List tensor-rebuild and vetted globals too.")
@json_option
@click.pass_context
@handles_errors
def scan_command(ctx: click.Context, path: str, show_all: bool, as_json: bool) -> int:
    """List every global the pickles in PATH (file, directory or URL) reference; run nothing.

    Exit 0 if all are tensor rebuilds or vetted, 3 if any is unknown or dangerous (or a pickle
    hides behind a pickle-free name), 1 if a pickle could not be read to its end.
    """
    from ckptkit.ops.scan import scan

    report = scan(path, **storage_options(ctx))
    if as_json:
        emit_json(report.to_json())
        return report.exit_code
    click.echo(_scan_text(report, show_all))
    return report.exit_code


def _scan_text(report: ScanReport, show_all: bool) -> str:
    lines = []
    rows = [
        [f.path, use.pickle_name, use.offset, use.ref.qualname, use.classification]
        for f in report.files
        for use in f.globals
        if show_all or use.classification in ("unknown", "dangerous")
    ]
    if rows:
        lines.append(table(rows, ["file", "pickle", "offset", "global", "class"]))
    for f in report.files:
        if f.disguised:
            lines.append(f"unsafe: {f.path} is named as {f.claimed} but holds a pickle ({f.detail})")
        elif f.claimed:
            lines.append(f"note: {f.path} is named as {f.claimed}, but by content: {f.detail}")
        if f.code:
            lines.append(f"unsafe: {f.path}: {f.code}")
        lines += [f"incomplete: {f.path}: {reason}" for reason in f.incomplete]
        lines += [f"problem: {f.path}: {problem}" for problem in f.problems]
    counts: dict[str, int] = {}
    for f in report.files:
        for use in f.globals:
            counts[use.classification] = counts.get(use.classification, 0) + 1
    summary = ", ".join(f"{n} {c}" for c, n in sorted(counts.items())) or "no globals"
    lines.append(f"{report.verdict.upper()}: {len(report.files)} file(s) scanned; {summary}; nothing was run")
    return "\n".join(lines)


@click.command("doctor")
@click.argument("path")
@json_option
@click.pass_context
@handles_errors
def doctor_command(ctx: click.Context, path: str, as_json: bool) -> int:
    """Say what torch.load(weights_only=True) needs to load PATH, as code to paste.

    Exit 0 when only vetted entries are needed, 3 if the file needs a global that must never be
    allowed, 1 if it needs globals ckptkit has not vetted or cannot load with any allowlist.
    """
    from ckptkit.ops.doctor import doctor

    report = doctor(path, **storage_options(ctx))
    if as_json:
        emit_json(report.to_json())
        return report.exit_code
    click.echo(_doctor_text(report))
    return report.exit_code


def _doctor_text(report: DoctorReport) -> str:
    lines = []
    rows = [
        [f.path, "yes" if f.loads_by_default else "no", ", ".join(e.qualname for e in f.needed) or "-"]
        for f in report.files
    ]
    if rows:
        lines.append(table(rows, ["file", "loads by default", "needs beyond torch's defaults"]))
    else:
        lines.append("no file here is read with torch.load")
    snippet = report.snippet()
    if snippet:
        lines += ["", "# vetted by ckptkit; add before torch.load(..., weights_only=True):", snippet, ""]
    for entry in report.entries("never-allow"):
        lines.append(f"never allow: {entry.qualname}: {entry.reason}")
    for entry in report.entries("unvetted"):
        lines.append(f"not vetted: {entry.qualname}: {entry.reason}")
    for f in report.files:
        lines += [f"cannot fix: {f.path}: {blocker}" for blocker in f.blockers]
        if f.error:
            lines.append(f"error: {f.path}: {f.error}")
    if any(f.blockers or not f.loads_by_default for f in report.files):
        lines.append(
            "ckptkit.safe.safe_load(path) reads these files without torch.load and runs nothing; "
            "ckptkit.safe.safe_globals() registers the vetted entries for you"
        )
    return "\n".join(lines)
