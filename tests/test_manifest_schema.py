"""The shipped JSON Schema agrees with ``parse_manifest``: real manifests pass, bad ones fail.

Each bad manifest is checked against both the parser and the schema, so the two cannot drift
apart unnoticed. A few rules cannot be written in JSON Schema (unique paths, the chunk count,
integers spelled ``1.0``); those are listed in ``test_rules_only_the_parser_enforces`` and in the
schema's description.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import ManifestError, UnsafePathError, UnsupportedSchemaError
from ckptkit.hashing import CHUNK_SIZE, digest_bytes
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from ckptkit.ops.index import index_checkpoint
from ckptkit.storage import open_store

SCHEMA_RESOURCE = ("schema", "manifest-v1.schema.json")
REPO = Path(__file__).resolve().parent.parent


def load_schema() -> dict[str, Any]:
    resource = resources.files("ckptkit").joinpath(*SCHEMA_RESOURCE)
    return json.loads(resource.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def make_manifest(**overrides: Any) -> Manifest:
    files = [
        FileEntry.from_digest("model.safetensors", digest_bytes(b"weights" * 100)),
        FileEntry.from_digest("optim/rank_0.bin", digest_bytes(b"optimizer state")),
        FileEntry.from_digest("empty.txt", digest_bytes(b"")),
    ]
    args: dict[str, Any] = {"step": 1200, "layout": "files", "files": files}
    args.update(overrides)
    return Manifest.create(**args)


def as_json(manifest: Manifest) -> dict[str, Any]:
    return json.loads(manifest.to_bytes())


def parses(doc: dict[str, Any]) -> bool:
    try:
        parse_manifest(json.dumps(doc).encode())
    except ManifestError:
        return False
    return True


# --- real manifests are valid ------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"step": None},
        {"step": 0},
        {"layout": "deepspeed", "topology": {"framework": "deepspeed", "dp_world_size": 2}},
        {"layout": "native", "metadata": {"run": "a", "nested": {"lr": [1e-4, None, True]}}},
        {"layout": "hf-trainer", "metrics": {"loss": 0.25, "tokens": 123456789}},
        {"layout": "dcp", "files": []},
    ],
    ids=["plain", "no-step", "step-0", "topology", "metadata", "metrics", "no-files"],
)
def test_created_manifests_are_valid(validator: jsonschema.Draft202012Validator, overrides: dict) -> None:
    doc = as_json(make_manifest(**overrides))
    assert list(validator.iter_errors(doc)) == []


def test_multi_chunk_file_is_valid(validator: jsonschema.Draft202012Validator) -> None:
    entry = FileEntry.from_digest("big.bin", digest_bytes(bytes(CHUNK_SIZE + 1)))
    doc = as_json(make_manifest(files=[entry]))
    assert len(doc["files"][0]["chunks"]) == 2
    validator.validate(doc)


def test_committed_and_indexed_manifests_are_valid(
    validator: jsonschema.Draft202012Validator, tmp_path: Path
) -> None:
    root = open_store(tmp_path / "run")
    with CheckpointTransaction(root, "step-00000007") as txn:
        txn.write("model.bin", b"\x01" * 5000)
        txn.write("sub/dir/state.bin", b"\x02" * 10)
        txn.commit(step=7, layout="files", metadata={"note": "x"}, metrics={"loss": 1.5})
    committed = json.loads((tmp_path / "run" / "step-00000007" / MANIFEST_NAME).read_bytes())
    validator.validate(committed)

    foreign = tmp_path / "checkpoint-30"
    (foreign / "nested").mkdir(parents=True)
    (foreign / "trainer_state.json").write_text('{"global_step": 30}')
    (foreign / "nested" / "weights.bin").write_bytes(b"w" * 64)
    index_checkpoint(open_store(foreign))
    indexed = json.loads((foreign / MANIFEST_NAME).read_bytes())
    assert indexed["layout"] == "hf-trainer" and indexed["step"] == 30
    validator.validate(indexed)


def test_optional_and_unknown_fields_accepted_by_both(validator: jsonschema.Draft202012Validator) -> None:
    doc = as_json(make_manifest())
    for name in ("step", "topology", "metrics"):
        del doc[name]
    doc["future_field"] = {"x": 1}
    doc["files"][0]["future_field"] = "y"
    doc["digest"]["future_field"] = 3
    assert parses(doc)
    validator.validate(doc)


# --- bad manifests are rejected by both --------------------------------------------------


def _set(path: tuple, value: Any):
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(name: str):
    def mutate(doc: dict[str, Any]) -> None:
        del doc[name]

    return mutate


def _file_path(value: Any):
    return _set(("files", 0, "path"), value)


HEX = "ab" * 32
REQUIRED_FIELDS = (
    "schema_version",
    "checkpoint_id",
    "created",
    "layout",
    "producer",
    "digest",
    "files",
    "metadata",
)

BAD_PATHS = {
    "parent": "../x",
    "parent-inside": "a/../../x",
    "absolute": "/etc/passwd",
    "drive": "C:/x",
    "drive-relative": "c:x",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "newline": "a\n",
    "control": "a\x1fb",
    "empty": "",
    "dot": "./a",
    "dot-inside": "a/./b",
    "double-slash": "a//b",
    "trailing-slash": "a/",
    "too-long": "a" * 4097,
    "not-a-string": 7,
}

BAD_FIELDS = {
    "digest-algorithm-prefix": _set(("files", 0, "digest"), "sha256:" + HEX),
    "digest-uppercase": _set(("files", 0, "digest"), "sha256-tree:" + HEX.upper()),
    "digest-short": _set(("files", 0, "digest"), "sha256-tree:" + HEX[:-1]),
    "chunk-not-hex": _set(("files", 0, "chunks"), ["zz" * 32]),
    "chunk-not-string": _set(("files", 0, "chunks"), [1]),
    "no-chunks": _set(("files", 0, "chunks"), []),
    "negative-size": _set(("files", 0, "size"), -1),
    "string-size": _set(("files", 0, "size"), "700"),
    "bool-size": _set(("files", 0, "size"), True),
    "missing-size": lambda d: d["files"][0].pop("size"),
    "file-not-object": _set(("files", 0), "model.bin"),
    "manifest-lists-itself": _file_path(MANIFEST_NAME),
    "negative-step": _set(("step",), -1),
    "bool-step": _set(("step",), True),
    "string-step": _set(("step",), "5"),
    "unknown-layout": _set(("layout",), "pytorch"),
    "wrong-format": _set(("format",), "other.manifest"),
    "missing-format": _delete("format"),
    "schema-version-0": _set(("schema_version",), 0),
    "schema-version-string": _set(("schema_version",), "1"),
    "digest-algorithm": _set(("digest", "algorithm"), "sha256"),
    "chunk-size-0": _set(("digest", "chunk_size"), 0),
    "chunk-size-bool": _set(("digest", "chunk_size"), True),
    "topology-list": _set(("topology",), [1, 2]),
    "metrics-string": _set(("metrics",), {"loss": "low"}),
    "metrics-bool": _set(("metrics",), {"done": True}),
    "metadata-list": _set(("metadata",), []),
    "producer-string": _set(("producer",), "ckptkit"),
    "checkpoint-id-int": _set(("checkpoint_id",), 5),
    **{f"missing-{name}": _delete(name) for name in REQUIRED_FIELDS},
    **{f"path-{name}": _file_path(value) for name, value in BAD_PATHS.items()},
}


@pytest.mark.parametrize("mutate", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_manifest_rejected_by_parser_and_schema(
    validator: jsonschema.Draft202012Validator, mutate
) -> None:
    doc = as_json(make_manifest())
    assert validator.is_valid(doc) and parses(doc)
    mutate(doc)
    assert not parses(doc)
    assert not validator.is_valid(doc)


@pytest.mark.parametrize(
    "path", ["../x", "/abs", "C:/x", "a\x00b"], ids=["parent", "absolute", "drive", "nul"]
)
def test_unsafe_paths_raise_unsafe_path_error(validator: jsonschema.Draft202012Validator, path: str) -> None:
    doc = as_json(make_manifest())
    doc["files"][0]["path"] = path
    with pytest.raises(UnsafePathError) as caught:
        parse_manifest(json.dumps(doc).encode())
    assert caught.value.path == path
    errors = list(validator.iter_errors(doc))
    assert errors and all(list(e.absolute_path)[:3] == ["files", 0, "path"] for e in errors)
    # Writing is validated like reading: such a path never gets into a manifest.
    with pytest.raises(UnsafePathError):
        FileEntry.from_digest(path, digest_bytes(b"x"))


def test_future_schema_version_is_a_clear_error(validator: jsonschema.Draft202012Validator) -> None:
    doc = as_json(make_manifest())
    doc["schema_version"] = 2
    doc["some_v2_field"] = {"new": True}
    with pytest.raises(UnsupportedSchemaError, match="newer than this ckptkit supports"):
        parse_manifest(json.dumps(doc).encode())
    assert not validator.is_valid(doc)


def test_safe_unusual_paths_accepted_by_both(validator: jsonschema.Draft202012Validator) -> None:
    paths = ["...", "..a", "a..", ".hidden/x", "a/.b/c", "1:x", "é/ü 1.bin", "x/" + MANIFEST_NAME, "a" * 4096]
    doc = as_json(make_manifest(files=[FileEntry.from_digest(p, digest_bytes(b"x")) for p in paths]))
    assert parses(doc)
    validator.validate(doc)


def test_rules_only_the_parser_enforces(validator: jsonschema.Draft202012Validator) -> None:
    """JSON Schema cannot express these; the parser rejects them, the schema lets them through.

    If the schema ever learns one of them, move that case into BAD_FIELDS.
    """
    base = as_json(make_manifest())

    duplicate = copy.deepcopy(base)  # uniqueItems compares whole objects, not one key of them
    duplicate["files"].append({**duplicate["files"][0], "size": 1, "chunks": [HEX]})
    wrong_chunk_count = copy.deepcopy(base)  # the count depends on size and digest.chunk_size
    wrong_chunk_count["files"][0]["chunks"].append(HEX)
    float_size = copy.deepcopy(base)  # JSON Schema's "integer" includes 700.0
    float_size["files"][0]["size"] = float(float_size["files"][0]["size"])

    for doc, message in [
        (duplicate, "twice"),
        (wrong_chunk_count, "chunk digests for"),
        (float_size, "has type float"),
    ]:
        with pytest.raises(ManifestError, match=message):
            parse_manifest(json.dumps(doc).encode())
        assert validator.is_valid(doc)


# --- the schema ships with the package ---------------------------------------------------


def test_schema_is_readable_as_package_resource() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == 1
    assert schema["properties"]["layout"]["enum"] == ["native", "deepspeed", "hf-trainer", "dcp", "files"]


@pytest.mark.slow  # pip builds a wheel
def test_schema_is_in_the_built_wheel(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "ckptkit", src / "ckptkit", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (wheel,) = out.glob("ckptkit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("ckptkit/" + "/".join(SCHEMA_RESOURCE))
    assert json.loads(shipped) == load_schema()
