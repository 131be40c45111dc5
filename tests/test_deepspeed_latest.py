"""DeepSpeed's ``latest``: one set of rules, whichever command reads it.

``index``, ``consolidate``, ``inspect`` and the DeepSpeed integration's resolver each follow a
save dir's ``latest`` to its tag. A ``latest`` that is oversized, names something outside the
save dir or names a tag with no files is the same FormatError through each of them; a valid one
(surrounding whitespace is stripped, as DeepSpeed strips it) leads each to the same tag.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkit.errors import FormatError
from ckptkit.storage import open_store


def _index(root: Path) -> str:
    from ckptkit.ops.index import index_checkpoint

    # force: the fixture committed the tag already; re-indexing it shows which tag was chosen.
    return index_checkpoint(open_store(root), force=True).url.rsplit("/", 1)[-1]


def _consolidate(root: Path) -> str:
    from ckptkit.ops.consolidate import plan_zero

    return plan_zero(root).tag


def _inspect(root: Path) -> str:
    from ckptkit.ops.inspect.resolve import inspect_target

    tag = inspect_target(root).deepspeed
    assert tag is not None
    return tag.tag


def _integration(root: Path) -> str:
    from ckptkit.integrations.deepspeed import resolve_tag

    tag = resolve_tag(open_store(root))
    assert tag is not None
    return tag


CALLERS: dict[str, Callable[[Path], str]] = {
    "index": _index,
    "consolidate": _consolidate,
    "inspect": _inspect,
    "integration": _integration,
}


@pytest.fixture
def save_dir(deepspeed_checkpoints, tmp_path: Path) -> tuple[Path, str]:
    """A copy of a real ZeRO-2 save dir whose tag is committed (the integration loads only
    committed tags; the other callers do not care)."""
    from ckptkit.ops.index import index_checkpoint

    case = deepspeed_checkpoints["z2_fp16_overflow"]
    root = shutil.copytree(case.save_dir, tmp_path / "ckpt")
    index_checkpoint(open_store(root / case.tag))
    return root, case.tag


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Over the 1 KiB cap, even though it would strip down to the real tag.
        (lambda tag: tag.encode() + b" " * 1100, "is over 1024 bytes"),
        (lambda tag: b"../../etc", "latest names '../../etc', not a tag directory"),
        (lambda tag: b"/abs/" + tag.encode(), "not a tag directory"),
        (lambda tag: tag.encode() + b"/..", "not a tag directory"),
        (lambda tag: b"..", "not a tag directory"),
        (lambda tag: b"", "not a tag directory"),
        (lambda tag: b"\xff\xfe", "not UTF-8"),
        (lambda tag: b"global_step999", "latest names tag 'global_step999', which has no files"),
    ],
    ids=["oversized", "parent", "absolute", "path", "dotdot", "empty", "not-utf8", "missing-dir"],
)
def test_a_bad_latest_is_the_same_error_through_every_caller(
    save_dir: tuple[Path, str], caller: str, content: Callable[[str], bytes], message: str
) -> None:
    root, tag = save_dir
    (root / "latest").write_bytes(content(tag))
    with pytest.raises(FormatError, match=message) as raised:
        CALLERS[caller](root)
    assert str(root / "latest") in str(raised.value)  # says which file broke the rule


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    "padding", [("", ""), ("", "\n"), ("  ", " \r\n")], ids=["bare", "newline", "spaces"]
)
def test_a_valid_latest_leads_every_caller_to_its_tag(
    save_dir: tuple[Path, str], caller: str, padding: tuple[str, str]
) -> None:
    root, tag = save_dir
    (root / "latest").write_text(padding[0] + tag + padding[1])
    assert CALLERS[caller](root) == tag


def test_an_empty_tag_directory_does_not_count_as_existing(tmp_path: Path) -> None:
    from ckptkit.formats.deepspeed import resolve_latest

    (tmp_path / "global_step3").mkdir()  # an object store could not even hold this
    (tmp_path / "latest").write_text("global_step3")
    with pytest.raises(FormatError, match="which has no files"):
        resolve_latest(open_store(tmp_path))
    (tmp_path / "latest").unlink()
    assert resolve_latest(open_store(tmp_path)) is None  # no `latest`: nothing to resolve


def test_consolidate_of_a_file_says_it_reads_a_directory(deepspeed_checkpoints) -> None:
    from ckptkit.ops.consolidate import plan_zero

    case = deepspeed_checkpoints["z2_fp16_overflow"]
    with pytest.raises(FormatError, match="a file; consolidate reads a DeepSpeed save dir"):
        plan_zero(case.save_dir / case.tag / "mp_rank_00_model_states.pt")
