"""``ckptkit log``: a root's checkpoint history as a tree (:mod:`ckptkit.ops.log`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json
from ckptkit.errors import EXIT_OK

if TYPE_CHECKING:
    from ckptkit.ops.log import LogNode, LogReport


@click.command("log")
@click.argument("root")
@json_option
@click.pass_context
@handles_errors
def log_command(ctx: click.Context, root: str, as_json: bool) -> int:
    """Show the history of the checkpoints under ROOT as a tree, from their manifests alone.

    A run's checkpoints follow one another; a run that resumed from a checkpoint hangs under
    it, so a resume from an older checkpoint is a branch. Each line: name, step, creation time,
    metrics, run id, and whether the checkpoint can still be resumed from. --json gives the
    nodes and the edges (kind "run" or "resume").
    """
    from ckptkit.ops.log import checkpoint_log
    from ckptkit.storage import open_store

    report = checkpoint_log(open_store(root, **storage_options(ctx)))
    if as_json:
        emit_json(report.to_json())
        return EXIT_OK
    if not report.nodes:
        click.echo(f"{report.root}: no checkpoints")
    for line in render_tree(report):
        click.echo(line)
    for path, reason in report.unreadable:
        click.echo(f"warning: could not list {path}: {reason}", err=True)
    return EXIT_OK


def render_tree(report: LogReport) -> list[str]:
    """The tree in box characters: a chain of one child each stays at its level; where a
    checkpoint has several children, each is a branch (├─ / └─) indented under it."""
    nodes = {n.name: n for n in report.nodes}
    children = report.children()
    resumed_from = {e.child: e.parent for e in report.edges if e.kind == "resume"}
    lines: list[str] = []

    def chain(name: str, first: str, rest: str) -> None:
        # Iterative along a chain (runs are long), recursive only at branches (rare).
        while True:
            lines.append(first + _label(nodes[name], resumed_from.get(name)))
            kids = children[name]
            if len(kids) == 1:
                name, first = kids[0], rest
                continue
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                chain(kid, rest + ("└─ " if last else "├─ "), rest + ("   " if last else "│  "))
            return

    for root in report.roots():
        chain(root, "", "")
    return lines


def _label(node: LogNode, resumed_from: str | None) -> str:
    parts = [node.name]
    if node.step is not None:
        parts.append(f"step {node.step}")
    if node.created:
        parts.append(node.created[:19] + "Z")  # to the second: the manifest has the rest
    if node.metrics:
        parts.append(" ".join(f"{k}={v:g}" for k, v in sorted(node.metrics.items())))
    if node.run_id:
        parts.append(f"run {node.run_id[:12]}")
    parts.append("resumable" if node.resumable else "NOT resumable")
    if resumed_from is not None:
        parts.append(f"(resumed from {resumed_from})")
    if node.note:
        parts.append(f"({node.note})")
    return "  ".join(parts)
