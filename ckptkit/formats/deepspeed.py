"""The DeepSpeed layout: the one place that knows its file names, its ``latest`` file and its ranks.

A save dir holds one directory per tag (``global_stepN`` or a custom tag) and a ``latest`` file
naming the current tag. A tag directory holds ``mp_rank_{mp:02d}_model_states.pt`` (ZeRO 0-2) or
``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt`` (ZeRO-3), and one optimizer file per
data-parallel rank, ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt`` (see
shared/reference/formats.md §10). Match against a file's base name with ``search``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import FormatError, NotFoundError
from ckptkit.storage.base import Store

# groups: (zero_pp_rank or None, mp_rank)
MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
# groups: (prefix such as "bf16_", dp rank, mp rank)
OPTIM_STATES = re.compile(r"(\w*?)zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# The default tag DeepSpeed gives a checkpoint: global_step<global_steps>.
GLOBAL_STEP_TAG = re.compile(r"global_step(\d+)")
LATEST = "latest"
# DeepSpeed writes a tag name there; anything longer is not one, and must not be read whole.
MAX_LATEST_BYTES = 1024


@dataclass(frozen=True)
class TagFiles:
    """The rank files of one tag directory, as keys, in DeepSpeed's own (natural) rank order."""

    model_states: list[str]
    optim_states: list[str]


def natural_key(name: str) -> list[object]:
    """rank_10 after rank_9, as DeepSpeed's own loader sorts rank files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_deepspeed(names: Iterable[str]) -> bool:
    """Whether a listing holds DeepSpeed rank files (at any depth)."""
    return any(MODEL_STATES.search(n) or OPTIM_STATES.search(n) for n in map(posixpath.basename, names))


def is_tag_directory(names: Iterable[str]) -> bool:
    """Whether a directory's own files (not those below it) make it a tag directory."""
    return any(MODEL_STATES.search(n) for n in names if "/" not in n)


def tag_files(names: Iterable[str], prefix: str = "") -> TagFiles:
    """The model- and optimizer-states files among a tag directory's own file ``names``,
    as keys below ``prefix``."""

    def keys(pattern: re.Pattern[str]) -> list[str]:
        chosen = sorted((n for n in names if "/" not in n and pattern.search(n)), key=natural_key)
        return [f"{prefix}/{n}" if prefix else n for n in chosen]

    return TagFiles(keys(MODEL_STATES), keys(OPTIM_STATES))


def topology(names: Iterable[str]) -> dict[str, Any]:
    """The data- and model-parallel sizes the rank files' names state (dp None without optimizer files)."""
    basenames = [posixpath.basename(n) for n in names]
    models = {m.group(2) for n in basenames if (m := MODEL_STATES.search(n))}
    optims = [m for n in basenames if (m := OPTIM_STATES.search(n))]
    dp = {m.group(2) for m in optims}
    mp = models | {m.group(3) for m in optims}
    return {"framework": "deepspeed", "dp_world_size": len(dp) or None, "mp_world_size": len(mp) or 1}


def rank_files(stage: int, dp: int, mp: int, optim_prefix: str = "") -> dict[tuple[int, int], list[str]]:
    """The files each (dp rank, mp rank) writes and needs to resume, for a ZeRO ``stage`` save:
    model states once per model-parallel rank (per rank at ZeRO-3), optimizer states per rank."""
    needed: dict[tuple[int, int], list[str]] = {}
    for m in range(mp):
        for d in range(dp):
            per_rank = f"zero_pp_rank_{d}_" if stage == 3 else ""
            files = [f"{per_rank}mp_rank_{m:02d}_model_states.pt"]
            if stage:
                files.append(f"{optim_prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt")
            needed[(d, m)] = files
    return needed


def expected_files(stage: int, dp: int, mp: int, optim_prefix: str = "") -> list[str]:
    """Every file a complete tag directory holds, each once, in rank order."""
    seen: dict[str, None] = {}
    for files in rank_files(stage, dp, mp, optim_prefix).values():
        seen.update(dict.fromkeys(files))
    return list(seen)


# --- latest ------------------------------------------------------------------------------------


def check_tag_name(tag: str, where: str) -> str:
    """``tag`` if it is one directory name (DeepSpeed joins it onto the save dir, so anything that
    is a path, empty, ``.`` or ``..`` could lead outside); FormatError naming ``where`` otherwise."""
    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\0"):
        raise FormatError(f"{where} names {tag[:80]!r}, not a tag directory beside it")
    return tag


def resolve_latest(root: Store) -> str | None:
    """The tag DeepSpeed's ``latest`` file in ``root`` names, or None when there is no such file.

    The one set of rules for an untrusted ``latest``: at most :data:`MAX_LATEST_BYTES` of UTF-8
    text, surrounding whitespace stripped (as DeepSpeed strips it), naming one directory inside
    ``root`` that holds files. Anything else is a :class:`FormatError` that says which rule broke.
    """
    where = f"{root.url.rstrip('/')}/{LATEST}"
    try:
        raw = root.get(LATEST, 0, MAX_LATEST_BYTES + 1)
    except NotFoundError:
        return None
    if len(raw) > MAX_LATEST_BYTES:
        raise FormatError(f"{where} is over {MAX_LATEST_BYTES} bytes: not a tag name DeepSpeed wrote")
    try:
        tag = check_tag_name(raw.decode("utf-8").strip(), where)
    except UnicodeDecodeError:
        raise FormatError(f"{where} is not UTF-8 text: not a tag name DeepSpeed wrote") from None
    if next(iter(root.list(tag)), None) is None:
        raise FormatError(
            f"{where} names tag {tag!r}, which has no files: {root.url.rstrip('/')}/{tag}/ does not exist"
        )
    return tag
