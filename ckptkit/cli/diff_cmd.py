"""``ckptkit diff``: render :func:`ckptkit.ops.diff.diff_paths` as tables or JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, table

if TYPE_CHECKING:
    from ckptkit.ops.diff import DiffReport
    from ckptkit.ops.diff_tensors import TensorDiff

_VALUE_WIDTH = 60  # a field's value in the table; --json has it whole


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--stats", is_flag=True, help="Changed tensors: max |a-b| and ||a-b||/||a|| (reads values).")
@click.option("-v", "--verbose", is_flag=True, help="List identical tensors too.")
@json_option
@click.pass_context
@handles_errors
def diff_command(ctx: click.Context, a: str, b: str, stats: bool, verbose: bool, as_json: bool) -> int:
    """Show what differs between checkpoints A and B, without running pickle code.

    A and B are files or checkpoint directories of any format inspect reads (torch .pt/.bin,
    safetensors, HF checkpoint-N/, DeepSpeed tags, DCP, ckptkit native), local or URLs, and
    need not share a format: a checkpoint and its 'ckptkit convert'ed copy compare identical.

    Tensors are added, removed, reshaped, dtype-changed, changed or identical: by the manifests'
    file digests where both sides are committed, else by hashing both sides' bytes. Then the
    differing optimizer, scheduler, scaler, RNG, trainer-state and config fields.

    Exit 0 if identical, 1 if anything differs, 3 if either side names a global ckptkit has
    not vetted (nothing is run), 2 and 4 for usage and storage errors.
    """
    from ckptkit.ops.diff import diff_paths

    report = diff_paths(a, b, stats=stats, **storage_options(ctx))
    if as_json:
        emit_json(report.to_json())
        return report.exit_code
    _render(report, stats, verbose)
    return report.exit_code


def _render(report: DiffReport, stats: bool, verbose: bool) -> None:
    counts = report.counts
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    verdict = "identical" if report.identical else "different"
    click.echo(f"{verdict}: {report.a} vs {report.b}")
    click.echo(f"tensors: {summary or 'none'}; {len(report.fields)} non-tensor field(s) differ")
    shown = [t for t in report.tensors if verbose or t.status != "identical"]
    if shown:
        headers = ["tensor", "status", "dtype", "shape"] + (["max |a-b|", "rel. change"] if stats else [])
        click.echo()
        click.echo(table([_tensor_row(t, stats) for t in shown], headers))
    if report.fields:
        rows = [[f.section, f.path, _value(f.a), _value(f.b)] for f in report.fields]
        click.echo()
        click.echo(table(rows, ["section", "field", "A", "B"]))
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")


def _tensor_row(t: TensorDiff, stats: bool) -> list[Any]:
    row = [t.name, t.status, _pair(t.dtype_a, t.dtype_b), _pair(t.shape_a, t.shape_b)]
    if stats:
        row += ["-", "-"] if t.stats is None else [_number(t.stats.max_abs), _number(t.stats.relative)]
    return row


def _pair(a: Any, b: Any) -> str:
    """One value where both sides agree, ``a -> b`` where they differ, ``-`` for a missing side."""
    text_a, text_b = ("-" if v is None else str(v) for v in (a, b))
    return text_a if text_a == text_b else f"{text_a} -> {text_b}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"
