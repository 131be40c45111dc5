"""Reading a damaged native ``tree.json``: a clear FormatError and exit 1, never a raw error.

``inspect`` reads the tree without torch (:mod:`ckptkit.ops.inspect.native`), ``ckptkit.load``
with it (:mod:`ckptkit.native.reader`); both must refuse the same damage the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli.main import cli
from ckptkit.errors import FormatError
from ckptkit.ops.inspect import inspect_path


def _edit_tree(directory: Path, edit: Any) -> None:
    tree = directory / "tree.json"
    document = json.loads(tree.read_text())
    edit(document)
    tree.write_text(json.dumps(document))


def _inspect(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(cli, ["inspect", *args])
    # An unhandled exception would also exit 1 under CliRunner: only SystemExit is a clean exit.
    return result.exit_code, result.output, result.exception


@pytest.mark.parametrize(
    "shard",
    [5, None, {"a": 1}, ["x"], "", "../outside.safetensors", "/etc/passwd", "a/./b.safetensors"],
    ids=["int", "null", "object", "list", "empty", "dotdot", "absolute", "unnormalised"],
)
def test_bad_shard_entry_is_a_format_error(tmp_path: Path, shard: Any) -> None:
    directory = tmp_path / "ckpt"
    ckptkit.save({"w": torch.ones(3), "n": 1}, directory)
    _edit_tree(directory, lambda d: d.__setitem__("shards", [shard]))
    code, out, exc = _inspect(str(directory))
    assert isinstance(exc, SystemExit) and code == 1, (out, exc)
    assert f"tree.json: shard 0 {shard!r} is not a file inside the checkpoint" in out
    with pytest.raises(FormatError, match=r"tree\.json: shard 0 .* is not a file inside the checkpoint"):
        ckptkit.load(directory)


def _slices(tmp_path: Path) -> Path:
    """``a`` and ``b`` are two halves of one storage (one entry, offsets 0 and 16); ``c`` is
    the entry stored after it."""
    base = torch.arange(8.0)
    directory = tmp_path / "ckpt"
    ckptkit.save({"a": base[:4], "b": base[4:], "c": torch.full((4,), 9.0)}, directory)
    return directory


def test_slices_of_one_entry_are_read_at_their_offsets(tmp_path: Path) -> None:
    """Before, every tensor of an entry was described at element 0 of it, so two different
    slices of one storage showed as tied aliases."""
    report = inspect_path(_slices(tmp_path), ["model"], stats="*")
    roles = {t.name: t.role for m in report.models for t in m.tensors}
    assert roles == {"a": "parameter", "b": "parameter", "c": "parameter"}
    stats = {s.name: (s.min, s.max) for s in report.stats}
    assert stats == {"a": (0.0, 3.0), "b": (4.0, 7.0), "c": (9.0, 9.0)}


def test_view_past_its_entry_is_refused(tmp_path: Path) -> None:
    """``b`` widened to reach past its entry into ``c``'s bytes: before, ``--stats`` reported
    ``c``'s values as part of ``b``; ``ckptkit.load`` already refused it."""
    directory = _slices(tmp_path)
    _edit_tree(directory, lambda d: d["tensors"][1].update(shape=[8]))
    with pytest.raises(FormatError, match=r"reaches byte 48 of storage 'a@storage', which holds 32"):
        inspect_path(directory, ["model"], stats="b")
    with pytest.raises(FormatError, match="lies outside entry 'a@storage'"):
        ckptkit.load(directory)


@pytest.mark.parametrize("offset", [-4, 2, "16"], ids=["negative", "misaligned", "string"])
def test_bad_tensor_offset_is_refused(tmp_path: Path, offset: Any) -> None:
    directory = _slices(tmp_path)
    _edit_tree(directory, lambda d: d["tensors"][1].update(offset=offset))
    code, out, exc = _inspect(str(directory))
    assert isinstance(exc, SystemExit) and code == 1 and "malformed tensor record" in out, (out, exc)
