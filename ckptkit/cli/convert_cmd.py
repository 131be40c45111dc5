"""``ckptkit convert``: a state dict between torch, safetensors, DCP and ckptkit native, then verified."""

from __future__ import annotations

import click

from ckptkit.cli.common import digest_option, handles_errors, json_option, storage_options
from ckptkit.cli.write_report import emit_write_report


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--to", "to", type=click.Choice(["safetensors", "torch", "dcp", "native"]), required=True,
    help="Output format. safetensors/torch: DST ending .safetensors/.bin/.pt is one file, else a directory.",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16", "fp64", "float32", "bfloat16", "float16", "float64"]),
    default=None, help="Cast floating tensors (float16/bfloat16/float32/float64 only) to this dtype.",
)
@click.option(
    "--max-shard-size", default=None,
    help="Largest output shard, HF convention (5GB = 5e9 bytes, 5GiB = 5*2**30). Default 5GB.",
)
@digest_option
@json_option
@click.pass_context
@handles_errors
def convert_command(
    ctx: click.Context,
    src: str,
    dst: str,
    to: str,
    dtype: str | None,
    max_shard_size: str | None,
    digest: str | None,
    as_json: bool,
) -> int:
    """Convert the state dict at SRC into DST, then re-read DST and compare every tensor with SRC.

    SRC: a torch .bin/.pt (read without running its pickle), a .safetensors file, an HF sharded
    directory (*.index.json), a DCP directory, or a ckptkit native checkpoint. Tensors stream
    through ranged reads. DST appears only complete and verified. Exit 0 when every tensor
    matches, 1 on a mismatch or a broken source, 3 when SRC holds code ckptkit would not run.
    """
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.convert import convert

    progress = terminal_progress("convert", as_json=as_json)
    result = convert(
        src, dst, to=to, dtype=dtype, max_shard_size=max_shard_size, progress=progress, digest=digest,
        **storage_options(ctx),
    )
    return emit_write_report(result, as_json)
