"""``ckptkit consolidate``: a DeepSpeed ZeRO checkpoint as one HF-style fp32/bf16/fp16 state dict."""

from __future__ import annotations

import click

from ckptkit.cli.common import digest_option, handles_errors, json_option, storage_options
from ckptkit.cli.write_report import emit_write_report


@click.command("consolidate")
@click.argument("path")
@click.argument("out")
@click.option("--tag", default=None, help="Tag directory to read (default: the content of 'latest').")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="dtype of every floating tensor in the output.",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard (HF convention: 5GB = 5e9 bytes, 5GiB = 5*2**30).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch"]),
    default="safetensors",
    show_default=True,
    help="model.safetensors or pytorch_model.bin (sharded with an index).",
)
@digest_option
@json_option
@click.pass_context
@handles_errors
def consolidate_command(
    ctx: click.Context,
    path: str,
    out: str,
    tag: str | None,
    dtype: str,
    max_shard_size: str,
    fmt: str,
    digest: str | None,
    as_json: bool,
) -> int:
    """Consolidate the ZeRO checkpoint at PATH into OUT (committed atomically, then verified).

    Reads each rank's flat fp32 partitions with ranged reads (nothing is unpickled) and writes
    one tensor at a time. Frozen params (also at stage 1), buffers and tied params are included.
    Exit 0 when every tensor read back matches, 1 on a mismatch or an inconsistent checkpoint.
    """
    # The library (and torch) load only when the command runs.
    from ckptkit.cli.progress import terminal_progress
    from ckptkit.ops.consolidate import consolidate_zero

    result = consolidate_zero(
        path, out, tag=tag, dtype=dtype, max_shard_size=max_shard_size, fmt=fmt,
        progress=terminal_progress("consolidate", as_json=as_json), digest=digest, **storage_options(ctx),
    )
    return emit_write_report(result, as_json)
