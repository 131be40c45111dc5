"""Hugging Face index files against real shards written by huggingface_hub, and every inconsistency."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from ckptkit.errors import FormatError
from ckptkit.formats.hf_index import read_hf_index
from ckptkit.storage import LocalStore

INDEX = "model.safetensors.index.json"


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 16),
        "layers.0.weight": torch.randn(16, 16),
        "layers.0.bias": torch.randn(16),
        "layers.1.weight": torch.randn(16, 16, dtype=torch.float64),
        "head.weight": torch.randn(8, 16).to(torch.bfloat16),
    }


def tensor_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


@pytest.fixture
def store(tmp_path: Any) -> LocalStore:
    return LocalStore(tmp_path, fsync=False)


def save_sharded(store: LocalStore, *, safe: bool = True) -> dict[str, Any]:
    save_torch_state_dict(state_dict(), store.root, max_shard_size=3000, safe_serialization=safe)
    name = INDEX if safe else "pytorch_model.bin.index.json"
    return json.loads(store.get(name))


def rewrite(store: LocalStore, document: dict[str, Any], key: str = INDEX) -> None:
    store.put(key, json.dumps(document).encode())


def test_real_safetensors_index_is_consistent(store: LocalStore) -> None:
    document = save_sharded(store)
    index = read_hf_index(store, INDEX)
    assert index.problems == []
    assert index.weight_map == document["weight_map"] and len(index.shards) >= 3
    assert index.tensor_bytes == tensor_bytes(state_dict())
    assert index.file_bytes == sum(store.head(path).size for path in index.shards.values())
    assert index.total_size_meaning == "tensor-bytes" and index.total_size == index.tensor_bytes
    found = {name for names in index.shard_tensors.values() for name in names}
    assert found == set(state_dict())


def test_real_bin_index_is_consistent(store: LocalStore) -> None:
    document = save_sharded(store, safe=False)
    index = read_hf_index(store, "pytorch_model.bin.index.json")
    assert index.problems == []
    assert index.weight_map == document["weight_map"]
    assert index.tensor_bytes == tensor_bytes(state_dict())
    assert index.total_size_meaning == "tensor-bytes"


def test_index_in_a_subdirectory_resolves_shards_beside_it(tmp_path: Any) -> None:
    root = LocalStore(tmp_path, fsync=False)
    (tmp_path / "ckpt").mkdir()
    save_torch_state_dict(state_dict(), tmp_path / "ckpt", max_shard_size=3000)
    index = read_hf_index(root, f"ckpt/{INDEX}")
    assert index.problems == [] and all(key.startswith("ckpt/model-") for key in index.shards.values())


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../x.safetensors", "escapes the checkpoint directory ('..')"),
        ("a/../../x.safetensors", "escapes the checkpoint directory ('..')"),
        ("/etc/passwd", "is absolute"),
        ("C:/model.safetensors", "is absolute"),
        ("a\\b.safetensors", "contains a backslash or NUL"),
        ("./model.safetensors", "is not a normalised relative path"),
    ],
)
def test_unsafe_shard_paths(store: LocalStore, path: str, reason: str) -> None:
    document = save_sharded(store)
    document["weight_map"]["head.weight"] = path
    rewrite(store, document)
    index = read_hf_index(store, INDEX)
    assert f"shard path {path!r} {reason}" in index.problems
    assert path not in index.shards  # never opened


def test_missing_shard(store: LocalStore) -> None:
    document = save_sharded(store)
    victim = document["weight_map"]["head.weight"]
    store.delete(victim)
    index = read_hf_index(store, INDEX)
    assert f"shard {victim!r} is missing" in index.problems
    assert index.file_bytes is None and index.total_size_meaning is None


def test_tensor_listed_in_the_wrong_shard(store: LocalStore) -> None:
    document = save_sharded(store)
    # move a tensor out of a shard that keeps others, so the index still names that shard
    counts = {
        shard: list(document["weight_map"].values()).count(shard) for shard in document["weight_map"].values()
    }
    shards = sorted(counts, key=lambda shard: -counts[shard])
    assert counts[shards[0]] >= 2
    moved = next(name for name, shard in document["weight_map"].items() if shard == shards[0])
    document["weight_map"][moved] = shards[1]
    rewrite(store, document)
    problems = read_hf_index(store, INDEX).problems
    assert any(
        p.startswith(f"shard {shards[1]!r} lacks 1 tensors the index assigns it: {moved!r}") for p in problems
    )
    assert any(
        p.startswith(f"shard {shards[0]!r} holds 1 tensors the index does not list: {moved!r}")
        for p in problems
    )


def test_tensor_in_two_shards_and_missing_from_index(store: LocalStore) -> None:
    document = save_sharded(store)
    save_file({"head.weight": torch.zeros(2)}, str(store.root / "extra.safetensors"))
    document["weight_map"]["ghost"] = "extra.safetensors"
    rewrite(store, document)
    problems = read_hf_index(store, INDEX).problems
    first = document["weight_map"]["head.weight"]
    assert f"tensor 'head.weight' is in two shards: {first!r} and 'extra.safetensors'" in problems
    assert "shard 'extra.safetensors' lacks 1 tensors the index assigns it: 'ghost'" in problems


def test_total_size_meanings_and_mismatch(store: LocalStore) -> None:
    document = save_sharded(store)
    index = read_hf_index(store, INDEX)
    document["metadata"]["total_size"] = index.file_bytes
    rewrite(store, document)
    assert read_hf_index(store, INDEX).total_size_meaning == "file-bytes"
    document["metadata"]["total_size"] = 12345
    rewrite(store, document)
    again = read_hf_index(store, INDEX)
    assert again.total_size_meaning is None
    assert again.problems == [
        f"metadata.total_size is 12345, but the shards hold {index.tensor_bytes} tensor bytes in "
        f"{index.file_bytes} file bytes"
    ]


def test_shard_header_problems_are_reported(store: LocalStore) -> None:
    document = save_sharded(store)
    shard = document["weight_map"]["head.weight"]
    store.put(shard, store.get(shard) + b"trailing")
    problems = read_hf_index(store, INDEX).problems
    assert any(p.startswith(f"{shard}: header accounts for") and "(8 trailing bytes)" in p for p in problems)


def test_shard_that_is_an_impostor(store: LocalStore) -> None:
    document = save_sharded(store)
    shard = document["weight_map"]["head.weight"]
    store.put(shard, b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 3\n")
    problems = read_hf_index(store, INDEX).problems
    assert any(
        p.startswith(f"shard {shard!r} cannot be read: ") and "run git lfs pull" in p for p in problems
    )


def test_non_standard_weight_map_values(store: LocalStore) -> None:
    document = save_sharded(store)
    document["weight_map"]["head.weight"] = {"file": "x"}
    rewrite(store, document)
    problems = read_hf_index(store, INDEX).problems
    assert "weight_map['head.weight'] is {'file': 'x'}, not a shard file name" in problems


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not a valid JSON index file"),
        (b"[1, 2]", "index is not a JSON object"),
        (b'{"metadata": {}}', "index has no weight_map object"),
    ],
)
def test_malformed_index(store: LocalStore, content: bytes, message: str) -> None:
    store.put(INDEX, content)
    with pytest.raises(FormatError, match=f"^{INDEX}: {message}"):
        read_hf_index(store, INDEX)
