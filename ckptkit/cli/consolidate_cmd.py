"""``ckptkit consolidate``: a DeepSpeed ZeRO checkpoint as one HF-style fp32/bf16/fp16 state dict."""

from __future__ import annotations

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes, table
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK


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
    as_json: bool,
) -> int:
    """Consolidate the ZeRO checkpoint at PATH into OUT (committed atomically, then verified).

    Reads each rank's flat fp32 partitions with ranged reads (nothing is unpickled) and writes
    one tensor at a time. Frozen params (also at stage 1), buffers and tied params are included.
    Exit 0 when every tensor read back matches, 1 on a mismatch or an inconsistent checkpoint.
    """
    # The library (and torch) load only when the command runs.
    from ckptkit.ops.consolidate import consolidate_zero

    result = consolidate_zero(
        path, out, tag=tag, dtype=dtype, max_shard_size=max_shard_size, fmt=fmt, **storage_options(ctx)
    )
    code = EXIT_OK if result.ok else EXIT_FINDINGS
    if as_json:
        emit_json(result.to_json())
        return code
    rows = [
        [c.name, c.kind, c.dtype, "x".join(map(str, c.shape)) or "()", c.file, "ok" if c.ok else c.problem]
        for c in result.checks
    ]
    click.echo(table(rows, ["tensor", "kind", "dtype", "shape", "file", "read back"]))
    for note in result.notes:
        click.echo(f"note: {note}")
    verdict = "OK" if result.ok else "FAILED"
    click.echo(
        f"{verdict}: ZeRO-{result.stage} x{result.world_size} ({result.tag}) -> {result.url}: "
        f"{len(result.checks)} tensors, {len(result.files)} file(s), {format_bytes(result.total_size)}, "
        f"{result.seconds:.2f}s"
    )
    return code
