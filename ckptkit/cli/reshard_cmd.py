"""``ckptkit reshard``: a DeepSpeed ZeRO checkpoint rewritten for another number of ranks."""

from __future__ import annotations

import click

from ckptkit.cli.common import digest_option, handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes
from ckptkit.errors import EXIT_OK


@click.command("reshard")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--world-size",
    "world_size",
    type=click.IntRange(min=1),
    required=True,
    help="Data-parallel ranks the checkpoint is rewritten for.",
)
@click.option("--tag", default=None, help="Tag directory to read (default: the content of 'latest').")
@digest_option
@json_option
@click.pass_context
@handles_errors
def reshard_command(
    ctx: click.Context,
    src: str,
    dst: str,
    world_size: int,
    tag: str | None,
    digest: str | None,
    as_json: bool,
) -> int:
    """Rewrite the DeepSpeed ZeRO-1/2/3 checkpoint at SRC for --world-size ranks, committed at DST.

    DST is a plain DeepSpeed save dir (DST/latest, DST/<tag>/ with one file per new rank):
    engine.load_checkpoint(DST) loads it at the new world size, optimizer state included, with
    no universal-checkpoint mode. Only the byte ranges each new partition needs are read; nothing
    is unpickled. Every parameter's fp32 master and optimizer moments are digested from the
    source and again from what was written; DST is committed only if they are equal, and the
    certificate is kept in its manifest for `ckptkit verify`. Exit 1 (nothing written) for an
    incomplete, inconsistent or unsupported checkpoint (tensor/pipeline parallel, MoE).
    """
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.reshard import reshard_zero

    result = reshard_zero(
        src,
        dst,
        world_size=world_size,
        tag=tag,
        digest=digest,
        progress=terminal_progress("reshard", as_json=as_json),
        **storage_options(ctx),
    )
    if as_json:
        emit_json(result.to_json())
        return EXIT_OK
    click.echo(
        f"OK: ZeRO-{result.stage} {result.tag}: {result.from_world_size} -> {result.world_size} ranks, "
        f"{len(result.files)} rank file(s), {format_bytes(result.total_size)}, {result.seconds:.2f}s"
    )
    states = ", ".join(result.states)
    click.echo(f"certificate: {result.params} parameters conserved ({states}), recorded in {result.url}")
    if result.rng_states:
        rule = ", ".join(f"{new}<-{old}" for new, old in result.rng_states.items())
        click.echo(f"RNG states (new rank <- saved rank): {rule}")
    if result.carried:
        click.echo(f"carried from the save dir: {', '.join(result.carried)}")
    return EXIT_OK
