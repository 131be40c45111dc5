"""Layouts are told apart in one place (:mod:`ckptkit.formats.layout`), so commands agree on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptkit.formats import deepspeed
from ckptkit.formats.layout import detect_layout
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.structural import verify_structure
from ckptkit.storage import open_store

DS_TAG = [
    "global_step4/mp_rank_00_model_states.pt",
    "global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
]


@pytest.mark.parametrize(
    ("names", "kind"),
    [
        (["trainer_state.json", "model.safetensors", *DS_TAG, "latest"], "hf-trainer"),
        (["latest", *DS_TAG], "deepspeed"),
        (["zero_pp_rank_0_mp_rank_00_model_states.pt"], "deepspeed"),
        ([".metadata", "__0_0.distcp"], "dcp"),
        ([".metadata"], "dcp"),  # DCP writes .metadata last: its data files are the reader's check
        (["rank-00000/tree.json", "rank-00000/shard-00000.safetensors"], "native"),
        (["model.pt", "notes.txt"], "files"),
    ],
)
def test_detect_layout(names: list[str], kind: str) -> None:
    assert detect_layout(names).kind == kind


def test_deepspeed_topology_from_names() -> None:
    layout = detect_layout(["latest", *DS_TAG])
    assert layout.topology == {"framework": "deepspeed", "dp_world_size": 2, "mp_world_size": 1}


def test_which_files_each_rank_needs() -> None:
    assert deepspeed.rank_files(2, 2, 1, "bf16_") == {
        (0, 0): ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        (1, 0): ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    }
    assert deepspeed.expected_files(3, 2, 1) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert deepspeed.expected_files(0, 1, 2) == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]


def test_index_and_verify_agree_on_an_hf_checkpoint_holding_a_deepspeed_tag(tmp_path: Path) -> None:
    # LLaMA-Factory's layout: the Trainer's files plus DeepSpeed's tag directory inside checkpoint-N.
    checkpoint = tmp_path / "checkpoint-4"
    for name in ["trainer_state.json", *DS_TAG]:
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(b'{"global_step": 4}' if name.endswith(".json") else b"x")
    structural = verify_structure(open_store(checkpoint)).layout
    indexed = index_checkpoint(open_store(checkpoint)).manifest.layout
    assert structural == indexed == "hf-trainer"
