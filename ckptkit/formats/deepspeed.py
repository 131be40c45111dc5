"""DeepSpeed checkpoint file names: the one place that knows them.

A tag directory (``global_stepN`` or a custom tag) holds ``mp_rank_{mp:02d}_model_states.pt``
(ZeRO 0-2) or ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt`` (ZeRO-3), and one optimizer
file per data-parallel rank, ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``
(see shared/reference/formats.md §10). Match against a file's base name with ``search``.
"""

from __future__ import annotations

import re

# groups: (zero_pp_rank or None, mp_rank)
MODEL_STATES = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
# groups: (prefix such as "bf16_", dp rank, mp rank)
OPTIM_STATES = re.compile(r"(\w*?)zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# The default tag DeepSpeed gives a checkpoint: global_step<global_steps>.
GLOBAL_STEP_TAG = re.compile(r"global_step(\d+)")
