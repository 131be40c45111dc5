"""Deep nesting (issue 11, item 8): one broken manifest is that checkpoint's problem only, and
the native format refuses, with a clear error, what it cannot write or read back."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptkit
from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.errors import FormatError, ManifestError, UnstorableValueError
from ckptkit.manager import CheckpointManager
from ckptkit.manifest import MANIFEST_NAME, MAX_NESTING, Manifest, parse_manifest
from ckptkit.nesting import MAX_TREE_DEPTH
from ckptkit.ops.gc import collect_garbage
from ckptkit.storage import open_store

CLI = [sys.executable, "-c", "from ckptkit.cli.main import main; main()"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


def break_manifest(store_url: str, name: str, how: str) -> None:
    """Rewrite checkpoint ``name``'s manifest: metadata nested 5000 deep, or truncated JSON."""
    checkpoint = open_store(store_url).child(name)
    text = checkpoint.get(MANIFEST_NAME).decode()
    if how == "deep":
        document = json.loads(text)
        document["metadata"] = {"x": "@"}
        text = json.dumps(document).replace('"@"', nested_lists(5000))
    else:
        text = text[: len(text) // 2]
    checkpoint.put(MANIFEST_NAME, text.encode())


@pytest.fixture(params=["deep", "corrupt"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """step 1 valid, step 2 (the newest) with a broken manifest."""
    for step in (1, 2):
        ckptkit.save({"w": torch.full((4,), float(step))}, tmp_path / "run" / f"step-{step:08d}", step=step)
    break_manifest(str(tmp_path / "run"), "step-00000002", request.param)
    return tmp_path / "run"


def test_a_broken_manifest_is_that_checkpoints_problem(root: Path) -> None:
    with pytest.raises(ManifestError):
        read_manifest(open_store(root).child("step-00000002"))
    listed = {c.name: c.status for c in list_checkpoints(open_store(root))}
    assert listed == {"step-00000001": "committed", "step-00000002": "invalid"}

    # restore() and load() fall back to the newest valid checkpoint, as for any corrupt manifest
    assert torch.equal(CheckpointManager(root).restore()["w"], torch.full((4,), 1.0))
    assert torch.equal(ckptkit.load(root)["w"], torch.full((4,), 1.0))

    ls = run("ls", "-l", str(root))
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    row = next(line for line in ls.stdout.splitlines() if "step-00000002" in line)
    assert "invalid" in row

    verify = run("verify", str(root))
    assert verify.returncode == 1 and "Traceback" not in verify.stderr, verify.stderr
    assert "invalid manifest" in verify.stdout
    report = json.loads(run("verify", str(root), "--json").stdout)
    by_name = {c["url"].rsplit("/", 1)[-1]: c for c in report["checkpoints"]}
    assert by_name["step-00000001"]["ok"] and not by_name["step-00000002"]["ok"]

    inspect = run("inspect", str(root))
    assert inspect.returncode == 0 and "Traceback" not in inspect.stderr, inspect.stderr
    assert "step-00000001" in inspect.stdout + inspect.stderr


def test_gc_on_s3_survives_a_deeply_nested_manifest(s3_bucket: str) -> None:
    url = f"{s3_bucket}/run"
    for step in (1, 2):
        ckptkit.save({"w": torch.ones(3)}, f"{url}/step-{step:08d}", step=step)
    break_manifest(url, "step-00000002", "deep")
    store = open_store(url)
    before = sorted(o.key for o in store.list("step-00000002"))

    report = collect_garbage(store, grace_seconds=0)
    assert report.removed == []  # an unreadable manifest: its data is left for a human to look at
    assert sorted(o.key for o in store.list("step-00000002")) == before
    cli = run("gc", "--grace", "0", url)
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr


def manifest_with_metadata(metadata_json: str) -> bytes:
    manifest = Manifest.create(step=1, layout="files", files=[])
    return json.dumps(manifest.to_json()).replace('"metadata": {}', f'"metadata": {metadata_json}').encode()


def test_manifest_nesting_limit_on_read_and_write() -> None:
    # The manifest object is level 1 and metadata level 2: metadata may nest MAX_NESTING - 1 deep.
    at_limit = "{\"a\": " * (MAX_NESTING - 2) + "{}" + "}" * (MAX_NESTING - 2)
    assert parse_manifest(manifest_with_metadata(at_limit)).metadata
    with pytest.raises(ManifestError, match=f"nested {MAX_NESTING + 1} levels deep.*limit is {MAX_NESTING}"):
        parse_manifest(manifest_with_metadata("[" + at_limit + "]"))
    with pytest.raises(ManifestError, match=f"limit is {MAX_NESTING}"):
        parse_manifest(manifest_with_metadata(nested_lists(100_000)))

    deep: dict[str, Any] = {}
    for _ in range(5000):
        deep = {"a": deep}
    for metadata in (deep, json.loads("{\"a\": " * 150 + "{}" + "}" * 150)):
        with pytest.raises(ManifestError, match=f"limit is {MAX_NESTING}"):
            Manifest.create(step=1, layout="files", files=[], metadata=metadata)


def test_save_with_too_deep_metadata_commits_nothing(tmp_path: Path) -> None:
    deep: dict[str, Any] = {}
    for _ in range(1000):
        deep = {"a": deep}
    with pytest.raises(ManifestError, match=f"limit is {MAX_NESTING}"):
        ckptkit.save({"w": torch.ones(2)}, tmp_path / "run" / "step-00000001", metadata=deep)
    assert list_checkpoints(open_store(tmp_path / "run")) == []


# --- property: whatever the nesting, a manifest parses or is a ManifestError ------------------

OPENERS = st.lists(st.sampled_from(["[", "{\"k\": "]), min_size=1, max_size=4)
DEPTHS = st.integers(1, 3000) | st.integers(MAX_NESTING - 3, MAX_NESTING + 3)


def nested_json(pattern: list[str], depth: int) -> str:
    opening = [pattern[i % len(pattern)] for i in range(depth)]
    return "".join(opening) + "0" + "".join("]" if o == "[" else "}" for o in reversed(opening))


@SETTINGS
@given(pattern=OPENERS, depth=DEPTHS, field=st.sampled_from(["metadata", "topology", "producer", "files"]))
def test_any_nesting_in_any_manifest_field_parses_or_is_a_manifest_error(
    pattern: list[str], depth: int, field: str
) -> None:
    document = Manifest.create(step=1, layout="files", files=[]).to_json()
    document[field] = "@"
    data = json.dumps(document).replace('"@"', nested_json(pattern, depth)).encode()
    levels = depth + 1  # the manifest object itself is the first level
    try:
        parsed = parse_manifest(data)
    except ManifestError as exc:
        assert levels <= MAX_NESTING or f"limit is {MAX_NESTING}" in str(exc)
        assert levels > MAX_NESTING or not (field == "metadata" and pattern[0] != "[")
    else:
        assert levels <= MAX_NESTING
        assert parse_manifest(parsed.to_bytes()) == parsed  # what parses writes back out


# --- the native format: a documented depth limit, the same on write and read -----------------


def nest(depth: int, kinds: list[str], leaf: Any) -> Any:
    """``depth`` containers, kinds cycled, with ``leaf`` at the bottom."""
    value = leaf
    for level in range(depth):
        kind = kinds[level % len(kinds)]
        if kind == "dict":
            value = {"k": value}
        elif kind == "list":
            value = [value]
        elif kind == "tuple":
            value = (value,)
        elif kind == "odict":
            value = OrderedDict([("k", value)])  # a tagged node of [key, value] pairs
        else:
            value = {level: value}  # a non-string key makes a plain dict tagged too
    return value


KINDS = st.lists(st.sampled_from(["dict", "list", "tuple", "odict", "tagged"]), min_size=1, max_size=5)


@SETTINGS
@given(kinds=KINDS, depth=st.integers(1, MAX_TREE_DEPTH))
def test_what_save_accepts_load_reads_back(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], depth: int
) -> None:
    # complex leaves take the most JSON levels of any leaf (node, "v" list, tagged float)
    value = nest(depth, kinds, complex(float("nan"), 1.5))
    url = tmp_path_factory.mktemp("deep") / "ckpt"
    ckptkit.save(value, url)
    loaded = ckptkit.load(url)
    assert repr(loaded) == repr(value)  # repr: NaN != NaN, but prints the same
    assert type(loaded) is type(value)


@SETTINGS
@given(kinds=KINDS, depth=st.integers(MAX_TREE_DEPTH + 1, 3000))
def test_deeper_than_the_limit_is_refused_on_save(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], depth: int
) -> None:
    url = tmp_path_factory.mktemp("deep") / "ckpt"
    with pytest.raises(UnstorableValueError, match=f"more than {MAX_TREE_DEPTH} levels"):
        ckptkit.save(nest(depth, kinds, torch.ones(1)), url)
    assert not url.exists()


def test_a_deeply_nested_dict_key_is_refused_on_save(tmp_path: Path) -> None:
    key: Any = ()
    for _ in range(5000):
        key = (key,)
    with pytest.raises(UnstorableValueError, match=f"more than {MAX_TREE_DEPTH} levels"):
        ckptkit.save({key: 1}, tmp_path / "ckpt")


def write_tree(tmp_path: Path, tree_json: str) -> Path:
    """A committed native checkpoint whose tree.json then gets ``tree_json`` as its tree."""
    url = tmp_path / "run" / "step-00000001"
    ckptkit.save({"x": 1}, url, step=1)
    document = json.loads((url / "tree.json").read_text())
    document["tree"] = "@"
    (url / "tree.json").write_text(json.dumps(document).replace('"@"', tree_json))
    return url


@pytest.mark.parametrize("depth", [MAX_TREE_DEPTH + 4, 400, 100_000])
def test_a_too_deep_tree_json_is_a_format_error(tmp_path: Path, depth: int) -> None:
    checkpoint = write_tree(tmp_path, nested_lists(depth))
    with pytest.raises(FormatError, match=r"tree\.json: .*nested"):
        ckptkit.load(checkpoint)
    inspect = run("inspect", str(checkpoint))
    assert inspect.returncode == 1 and "Traceback" not in inspect.stderr, inspect.stderr
    assert "tree.json" in inspect.stdout + inspect.stderr


@SETTINGS
@given(pattern=OPENERS, depth=st.integers(1, 3000) | st.integers(MAX_TREE_DEPTH - 2, MAX_TREE_DEPTH + 5))
def test_any_tree_json_nesting_loads_or_is_a_format_error(
    tmp_path_factory: pytest.TempPathFactory, pattern: list[str], depth: int
) -> None:
    checkpoint = write_tree(tmp_path_factory.mktemp("tree"), nested_json(pattern, depth))
    try:
        ckptkit.load(checkpoint)
    except FormatError:
        assert depth > MAX_TREE_DEPTH  # the writer never writes deeper
    else:
        assert depth <= MAX_TREE_DEPTH + 3  # room for a leaf's own levels (a complex number: 3)


def test_the_deepest_tree_saves_and_loads_from_a_deep_call_stack(tmp_path: Path) -> None:
    # 100 tagged dicts (3 JSON levels each) and a complex leaf: the most JSON the writer makes,
    # written and read by a caller already 500 frames deep (a trainer inside callbacks).
    value: Any = complex(float("nan"), 1.0)
    for level in range(MAX_TREE_DEPTH):
        value = OrderedDict([(level, value)])

    def at_depth(frames: int, call: Any) -> Any:
        return call() if frames == 0 else at_depth(frames - 1, call)

    at_depth(500, lambda: ckptkit.save(value, tmp_path / "ckpt"))
    assert repr(at_depth(500, lambda: ckptkit.load(tmp_path / "ckpt"))) == repr(value)
    inspect = run("inspect", str(tmp_path / "ckpt"))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
