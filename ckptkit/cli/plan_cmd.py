"""``ckptkit plan PATH``: render :func:`ckptkit.ops.resume_plan.plan_resume` (docs/cli.md)."""

from __future__ import annotations

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes, table


def _version(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A version the table can compare, or a usage error (exit 2)."""
    from ckptkit.ops.resume_plan_versions import parse_version

    if value is not None:
        try:
            parse_version(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command("plan")
@click.argument("path")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Ranks that will resume (default: as saved).")
@click.option("--weights-only/--no-weights-only", "weights_only", default=None,
              help="What the loader passes to torch.load (default: what the trainer does).")
@click.option("--ckptkit-globals", "safe_globals", is_flag=True,
              help="The loader runs inside ckptkit.safe_globals() (or use_ckptkit).")
@click.option("--torch-version", default=None, metavar="V", callback=_version,
              help="torch of the resuming job (default: installed).")
@click.option("--deepspeed-version", default=None, metavar="V", callback=_version,
              help="DeepSpeed of the resuming job (default: installed).")
@click.option("--zero-stage", type=click.IntRange(0, 3), default=None,
              help="ZeRO stage of the resuming engine, if it may differ from the saved one.")
@click.option("--verify", is_flag=True, help="Hash every committed file (default: presence and sizes).")
@json_option
@click.pass_context
@handles_errors
def plan_command(
    ctx: click.Context,
    path: str,
    world_size: int | None,
    weights_only: bool | None,
    safe_globals: bool,
    torch_version: str | None,
    deepspeed_version: str | None,
    zero_stage: int | None,
    verify: bool,
    as_json: bool,
) -> int:
    """Predict what a resume from PATH will meet, without loading tensors or running pickles.

    Exit 0 when the resume is predicted to work (warnings allowed), 1 when it will fail.
    """
    from ckptkit.ops.resume_plan import plan_resume

    plan = plan_resume(
        path, world_size=world_size, weights_only=weights_only, safe_globals=safe_globals,
        torch_version=torch_version, deepspeed_version=deepspeed_version, zero_stage=zero_stage,
        verify=verify, **storage_options(ctx),
    )
    if as_json:
        emit_json(plan.to_json())
        return plan.exit_code
    errors = sum(f.severity == "error" for f in plan.findings)
    warnings = len(plan.findings) - errors
    verdict = "RESUME OK" if plan.ok else "RESUME WILL FAIL"
    where = f"{plan.checkpoint}" if plan.checkpoint else plan.url
    per_rank = max(plan.rank_bytes.values(), default=0)
    saved = plan.saved_world_size
    click.echo(
        f"{verdict}: {plan.layout} {where} at world size {plan.world_size}"
        f"{'' if saved in (None, plan.world_size) else f' (saved at {saved})'}, "
        f"weights_only={plan.weights_only}; {errors} error(s), {warnings} warning(s); "
        f"up to {format_bytes(per_rank)} read per rank"
    )
    if plan.ckptkit_choice is not None and plan.ckptkit_choice != plan.checkpoint:
        click.echo(f"ckptkit's choice: {plan.ckptkit_choice} (newest committed)")
    if plan.findings:
        rows = [[f.severity, f.kind, f.file or "-", f.message, f.fix] for f in plan.findings]
        click.echo(table(rows, ["severity", "kind", "file", "finding", "fix"]))
    return plan.exit_code
