"""The Hugging Face Trainer layout: ``checkpoint-N/`` directories with ``trainer_state.json``.

The Trainer writes a run directory of ``checkpoint-N/`` siblings; resuming takes the highest N
(``transformers.trainer_utils.get_last_checkpoint``). Inside one, ``trainer_state.json`` marks the
layout and records the step; ``training_args.bin`` is a pickle only transformers' code can load
and that resuming never reads. Torch-free.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable

from ckptkit.errors import NotFoundError
from ckptkit.storage.base import Store

TRAINER_STATE = "trainer_state.json"
# HF's own pattern (transformers.trainer_utils._re_checkpoint): only these names are resumable.
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
# Files resuming never reads and that only their own code can load.
NOT_READ = {
    "training_args.bin": "a pickled TrainingArguments: loading it needs transformers' code, "
    "and resuming does not read it",
}


def is_hf_trainer(names: Iterable[str]) -> bool:
    """Whether a listing holds a Trainer checkpoint's state file (at any depth)."""
    return any(posixpath.basename(n) == TRAINER_STATE for n in names)


def trainer_step(checkpoint: Store) -> int | None:
    """``global_step`` from the checkpoint's ``trainer_state.json``; None if absent or not a step."""
    try:
        state = json.loads(checkpoint.get(TRAINER_STATE))
    except (NotFoundError, ValueError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def newest_checkpoint(dirs: Iterable[str]) -> str | None:
    """The ``checkpoint-N`` directory with the highest N among ``dirs``: the one resume takes."""
    steps = {int(m.group(1)): d for d in dirs if (m := CHECKPOINT_DIR.fullmatch(d))}
    return steps[max(steps)] if steps else None


# The files only resuming reads, by the state they hold (weights, config, tokenizer and
# trainer_state.json are the model's): thinning drops them to leave a weights-only checkpoint.
# The optimizer's include DeepSpeed's rank files in ``global_step*/`` and FSDP's ``optimizer_0/``.
RESUME_STATES = {
    "optimizer": re.compile(
        r"optimizer\.(?:pt|bin)|optimizer_\d+/.+|global_step\d+/\w*zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt"
    ),
    "scheduler": re.compile(r"scheduler\.pt"),
    "scaler": re.compile(r"scaler\.pt"),
    "rng": re.compile(r"rng_state(?:_\d+)?\.pth"),
}


def resume_state(path: str) -> str | None:
    """Which of :data:`RESUME_STATES` the file at ``path`` (relative to ``checkpoint-N``) holds;
    None for a file of the model's own."""
    return next((state for state, pattern in RESUME_STATES.items() if pattern.fullmatch(path)), None)
