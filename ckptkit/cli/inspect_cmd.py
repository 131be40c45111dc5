"""``ckptkit inspect``: render :func:`ckptkit.ops.inspect.inspect_path` as tables or JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ckptkit.cli.common import handles_errors, json_option, storage_options
from ckptkit.cli.render import emit_json, format_bytes, table

if TYPE_CHECKING:
    from ckptkit.ops.inspect import InspectReport
    from ckptkit.ops.inspect.resume import Check

_VIEW_FLAGS = {
    "model": "Tensors: dtype, shape, size; totals by dtype; parameter count.",
    "optimizer": "Optimizer kind, param groups, state sizes; DeepSpeed ZeRO stage and rank files.",
    "scheduler": "LR scheduler class, last_epoch, step count, base and last LRs.",
    "scaler": "fp16 loss scaling: torch GradScaler, DeepSpeed loss scalers.",
    "rng": "Which RNG states (python, numpy, torch, cuda) each rank saved.",
    "trainer_state": "Hugging Face trainer_state.json: progress, best checkpoint, last logs.",
}


def _view_options(command: Any) -> Any:
    for view, help_text in reversed(_VIEW_FLAGS.items()):
        command = click.option(f"--{view.replace('_', '-')}", view, is_flag=True, help=help_text)(command)
    return command


@click.command("inspect")
@click.argument("path")
@_view_options
@click.option("--all", "all_views", is_flag=True, help="Every view plus the resume check (the default).")
@click.option(
    "--stats",
    "stats",
    metavar="NAME_GLOB",
    help="Read the matching tensors' bytes: min, max, mean, norm, NaN and Inf counts.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=40,
    show_default=True,
    help="Tensors listed per model in tables (0: all; --json lists all).",
)
@json_option
@click.pass_context
@handles_errors
def inspect_command(
    ctx: click.Context,
    path: str,
    all_views: bool,
    stats: str | None,
    limit: int,
    as_json: bool,
    **flags: bool,
) -> int:
    """Show what a checkpoint holds without loading tensors or running pickle code.

    PATH is a file (torch .pt/.bin, safetensors, a DeepSpeed rank file), a checkpoint directory
    (HF checkpoint-N/, DeepSpeed global_stepN/ or its root with 'latest', DCP, ckptkit native)
    or a URL such as s3://bucket/run/checkpoint-2500.

    With no view flag (or --all) every view is shown, followed by a resume check: the step and
    learning rate as the trainer, scheduler, optimizer and DeepSpeed recorded them, side by side.
    Known offsets (DeepSpeed's skipped overflow steps, GradScaler-skipped steps, HF logging the
    LR before the scheduler steps) are marked "benign" and explained.

    Exit 0 normally; 1 if the resume check finds a disagreement it cannot explain, or a file is
    damaged; 3 if a pickle names a global that is not vetted (as 'ckptkit scan'); 2 and 4 for
    usage and storage errors.
    """
    views = [view for view, on in flags.items() if on]
    from ckptkit.ops.inspect import inspect_path

    selected = None if all_views or not views else views
    report = inspect_path(path, selected, stats=stats, **storage_options(ctx))
    if as_json:
        emit_json(report.to_json())
        return report.exit_code
    click.echo("\n\n".join(part for part in _sections(report, limit) if part))
    return report.exit_code


def _sections(report: InspectReport, limit: int) -> list[str]:
    head = [f"{report.url} ({report.layout})", *(f"note: {n}" for n in report.notes)]
    parts = ["\n".join(head)]
    if "model" in report.views:
        parts += [_model(m, limit) for m in report.models] or ["model: no model tensors found"]
    if "optimizer" in report.views:
        parts += [_optimizer(o) for o in report.optimizers]
        if report.zero is not None:
            parts.append(_zero(report))
        if not report.optimizers and report.zero is None:
            parts.append("optimizer: no optimizer state found")
    if "scheduler" in report.views:
        parts += [_scheduler(report)] if report.schedulers else ["scheduler: no scheduler state found"]
    if "scaler" in report.views:
        parts += [_scaler(report)] if report.scalers else ["scaler: no loss scaler state found"]
    if "rng" in report.views:
        parts += [_rng(report)] if report.rng else ["rng: no RNG states found"]
    if "trainer_state" in report.views and report.trainer_state is not None:
        parts.append(_trainer_state(report))
    if report.stats is not None:
        parts.append(_stats(report))
    if report.resume is not None:
        parts.append(_resume(report))
    parts += [f"problem: {p}" for p in report.problems]
    if report.unsafe:
        parts.append(_unsafe(report))
    return parts


def _unsafe(report: InspectReport) -> str:
    lines = [
        f"unsafe: {u.file}: names {u.name} ({u.classification}) at byte {u.offset} of {u.pickle}"
        for u in report.unsafe
    ]
    lines.append(
        "UNSAFE: torch.load(weights_only=False) would import and call what is named above; "
        "ckptkit ran nothing ('ckptkit scan' lists every global)"
    )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    from ckptkit.ops.inspect.values import printable_int

    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if type(value) is int:
        return str(printable_int(value))
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    return str(value)


def _model(m: Any, limit: int) -> str:
    shown = m.tensors if limit == 0 else m.tensors[:limit]
    rows = [
        [t.name, t.dtype, "×".join(map(str, t.shape)) or "scalar", t.numel, format_bytes(t.bytes), t.role]
        for t in shown
    ]
    lines = [f"model: {m.label}", table(rows, ["tensor", "dtype", "shape", "numel", "bytes", "role"])]
    if len(shown) < len(m.tensors):
        lines.append(f"... {len(m.tensors) - len(shown)} more (--limit 0 lists all)")
    totals = [[d, t.tensors, t.numel, format_bytes(t.bytes)] for d, t in m.by_dtype.items()]
    lines += ["", table(totals, ["dtype", "tensors", "numel", "bytes"])]
    trainable = f", {m.num_trainable:,} trainable" if m.num_trainable is not None else ""
    lines.append(f"parameters: {m.num_parameters:,}{trainable}; {format_bytes(m.total_bytes)}")
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)


def _groups_table(groups: list[Any]) -> str:
    rows = [
        [
            g.index,
            _fmt(g.lr),
            _fmt(g.betas),
            _fmt(g.eps),
            _fmt(g.weight_decay),
            _fmt(g.momentum),
            _fmt(g.num_params),
            _fmt(g.step if g.step is not None else g.steps),
        ]
        for g in groups
    ]
    return table(rows, ["group", "lr", "betas", "eps", "weight_decay", "momentum", "params", "step"])


def _optimizer(o: Any) -> str:
    where = f"{o.file}:{o.path}" if o.path else o.file
    slots = [[s.name, ", ".join(s.dtypes), s.tensors, s.numel, format_bytes(s.bytes)] for s in o.slots]
    return "\n".join(
        [
            f"optimizer: {where}: {o.kind} ({o.reason})",
            _groups_table(o.groups),
            "",
            table(slots, ["state", "dtype", "tensors", "numel", "bytes"]),
            f"state: {o.num_state_entries} entries, {format_bytes(o.state_bytes)}",
        ]
    )


def _zero(report: InspectReport) -> str:
    z = report.zero
    lines = [
        f"deepspeed zero: stage {_fmt(z.stage)}, partition count {_fmt(z.partition_count)}, "
        f"dp world size {_fmt(z.dp_world_size)}, mp world size {_fmt(z.mp_world_size)}, "
        f"{z.rank_files} rank file(s), deepspeed {_fmt(z.ds_version)}"
    ]
    if z.optimizer is not None:
        lines += [
            f"wrapped optimizer: {z.optimizer.kind} ({z.optimizer.reason})",
            _groups_table(z.optimizer.groups),
        ]
    rows = [
        [
            r.rank,
            r.file,
            _fmt(r.fp32_partition_numel),
            _fmt(r.group_paddings),
            _fmt(r.overflow),
            _fmt(r.clip_grad),
            _fmt(r.lr),
            _fmt(r.steps),
            format_bytes(r.state_bytes),
        ]
        for r in z.ranks
    ]
    lines += [
        "",
        table(
            rows,
            ["rank", "file", "fp32 partition", "padding", "overflow", "clip_grad", "lr", "step", "bytes"],
        ),
    ]
    lines.append(f"fp32 master elements over all ranks: {z.fp32_elements:,}")
    if z.loads_at_dp_world_size is not None:
        lines.append(
            f"loads as is at data-parallel world size {z.loads_at_dp_world_size} only; at any other: "
            f"'ckptkit reshard {report.url} DST --world-size M', or load it through use_ckptkit "
            "(reshards on load)"
        )
    if z.resharded is not None:
        lines.append(_resharded(z.resharded))
    lines += [f"problem: {p}" for p in z.problems]
    return "\n".join(lines)


def _resharded(info: dict[str, Any]) -> str:
    line = (
        f"resharded by ckptkit from {_fmt(info.get('from_world_size'))} to {_fmt(info.get('world_size'))} "
        f"ranks (source {_fmt(info.get('source'))}); conservation certificate in the manifest"
    )
    rng = info.get("rng_states")
    if isinstance(rng, dict) and rng:
        rule = ", ".join(f"{new} <- {old}" for new, old in rng.items())
        line += f"\nRNG states per new rank (new <- saved: r keeps its own, a new rank takes r mod N): {rule}"
    return line


def _scheduler(report: InspectReport) -> str:
    rows = []

    def add(s: Any, depth: int) -> None:
        fields = ", ".join(f"{k}={_fmt(v)}" for k, v in s.fields.items() if k != "phases")
        rows.append(
            [
                "  " * depth + s.cls,
                f"{s.file}:{s.path}" if s.path else s.file,
                _fmt(s.last_epoch),
                _fmt(s.step_count),
                _fmt(s.base_lrs),
                _fmt(s.last_lr),
                fields,
            ]
        )
        for child in s.children:
            add(child, depth + 1)

    for s in report.schedulers:
        add(s, 0)
    reasons = [f"{s.cls}: {s.reason}" for s in report.schedulers]
    return "\n".join(
        [
            "scheduler:",
            table(rows, ["class", "where", "last_epoch", "_step_count", "base_lrs", "_last_lr", "fields"]),
            *reasons,
        ]
    )


def _scaler(report: InspectReport) -> str:
    rows = [
        [
            _fmt(s.rank),
            s.kind,
            s.file,
            _fmt(s.enabled),
            _fmt(s.dynamic),
            _fmt(s.scale),
            ", ".join(f"{k}={_fmt(v)}" for k, v in s.fields.items()),
        ]
        for s in report.scalers
    ]
    notes = sorted({s.note for s in report.scalers if s.note})
    return "\n".join(
        [
            "scaler:",
            table(rows, ["rank", "kind", "file", "enabled", "dynamic", "scale", "fields"]),
            *(f"note: {n}" for n in notes),
        ]
    )


def _rng(report: InspectReport) -> str:
    rows = [
        [
            _fmt(r.rank),
            f"{r.file}:{r.path}" if r.path else r.file,
            ", ".join(r.present),
            _fmt(r.details.get("python", {}).get("fingerprint")),
            _fmt(r.details.get("numpy", {}).get("fingerprint")),
        ]
        for r in report.rng
    ]
    return "rng:\n" + table(rows, ["rank", "where", "states", "python fingerprint", "numpy fingerprint"])


def _trainer_state(report: InspectReport) -> str:
    t = report.trainer_state
    rows = [[k, _fmt(v)] for k, v in t.fields.items()]
    rows.append(["log entries", t.log_entries])
    logs = [
        [
            _fmt(e.get("step")),
            _fmt(e.get("epoch")),
            _fmt(e.get("loss")),
            _fmt(e.get("learning_rate")),
            _fmt(e.get("grad_norm")),
        ]
        for e in t.last_logs
    ]
    return "\n".join(
        [
            f"trainer state: {t.file}",
            table(rows, ["field", "value"]),
            "",
            table(logs, ["step", "epoch", "loss", "learning_rate", "grad_norm"]),
        ]
    )


def _stats(report: InspectReport) -> str:
    rows = [
        [
            f"{s.file}:{s.name}",
            s.dtype,
            "×".join(map(str, s.shape)) or "scalar",
            _fmt(s.min),
            _fmt(s.max),
            _fmt(s.mean),
            _fmt(s.norm),
            s.nan,
            s.inf,
        ]
        for s in report.stats
    ]
    if not rows:
        return "stats: no tensor matches"
    return "stats:\n" + table(rows, ["tensor", "dtype", "shape", "min", "max", "mean", "norm", "nan", "inf"])


def _resume(report: InspectReport) -> str:
    lines = ["resume check:"]
    for check in report.resume.checks:
        lines.append(_check(check))
    verdict = (
        "OK: every component agrees (offsets marked benign are explained)"
        if report.resume.ok
        else "DISAGREEMENT: resuming would not continue exactly where training stopped"
    )
    return "\n".join([*lines, verdict])


def _check(check: Check) -> str:
    rows = [[r.source, _fmt(r.value), r.status, r.note or ""] for r in check.readings]
    return f"{check.quantity}: {check.status}\n" + table(rows, ["recorded by", "value", "status", "note"])
