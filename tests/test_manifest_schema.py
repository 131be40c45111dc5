"""The shipped JSON Schemas agree with ``parse_manifest``: real manifests pass, bad ones fail.

Every test runs for schema version 1 (SHA-256 files only, what ckptkit writes for
``digest="sha256"``), version 2 (per-file algorithms; BLAKE3 by default) and version 3 (files
deduplicated into the root's blob store), each against its own schema file. Each bad manifest
is checked against both the parser and the schema, so the two
cannot drift apart unnoticed. A few rules cannot be written in JSON Schema (unique paths, the chunk count,
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ckptkit.commit import CheckpointTransaction
from ckptkit.errors import ManifestError, UnsafePathError, UnsupportedSchemaError
from ckptkit.hashing import BLAKE3_TREE, CHUNK_SIZE, SHA256_TREE, FileDigest, digest_bytes
from ckptkit.manifest import MANIFEST_NAME, FileEntry, Manifest, blob_key, parse_manifest
from ckptkit.ops.index import index_checkpoint
from ckptkit.storage import open_store

SCHEMA_FILES = {1: "manifest-v1.schema.json", 2: "manifest-v2.schema.json", 3: "manifest-v3.schema.json"}
ALGORITHM_OF_VERSION = {1: SHA256_TREE, 2: BLAKE3_TREE, 3: BLAKE3_TREE}
BLOB_STORE = "../.ckptkit-blobs"
REPO = Path(__file__).resolve().parent.parent


def load_schema(version: int) -> dict[str, Any]:
    resource = resources.files("ckptkit").joinpath("schema", SCHEMA_FILES[version])
    return json.loads(resource.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Case:
    """One schema version: its validator, and manifests whose files use its algorithm."""

    version: int
    validator: jsonschema.Draft202012Validator

    @property
    def algorithm(self) -> str:
        return ALGORITHM_OF_VERSION[self.version]

    def digest(self, data: bytes) -> FileDigest:
        return digest_bytes(data, algorithm=self.algorithm)

    @property
    def dedup(self) -> bool:
        return self.version == 3

    def entry(self, path: str, data: bytes = b"x") -> FileEntry:
        digest = self.digest(data)
        return FileEntry.from_digest(path, digest, blob=blob_key(digest.digest) if self.dedup else None)

    def manifest(self, **overrides: Any) -> Manifest:
        files = [
            self.entry("model.safetensors", b"weights" * 100),
            self.entry("optim/rank_0.bin", b"optimizer state"),
            self.entry("empty.txt", b""),
        ]
        args: dict[str, Any] = {"step": 1200, "layout": "files", "files": files, "blob_store": BLOB_STORE}
        args.update(overrides)
        manifest = Manifest.create(**args)
        assert manifest.schema_version == (self.version if manifest.files else 1)
        return manifest


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["v1", "v2", "v3"])
def case(request: pytest.FixtureRequest) -> Case:
    schema = load_schema(request.param)
    jsonschema.Draft202012Validator.check_schema(schema)
    return Case(request.param, jsonschema.Draft202012Validator(schema))


def validator_of(version: int) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(version))


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
def test_created_manifests_are_valid(case: Case, overrides: dict) -> None:
    doc = as_json(case.manifest(**overrides))
    # A manifest without files uses no algorithm but SHA-256's: version 1, which every reader reads.
    validator = case.validator if doc["files"] else validator_of(1)
    assert list(validator.iter_errors(doc)) == []


def test_multi_chunk_file_is_valid(case: Case) -> None:
    entry = case.entry("big.bin", bytes(CHUNK_SIZE + 1))
    doc = as_json(case.manifest(files=[entry]))
    assert len(doc["files"][0]["chunks"]) == 2
    case.validator.validate(doc)


def test_committed_and_indexed_manifests_are_valid(case: Case, tmp_path: Path) -> None:
    root = open_store(tmp_path / "run")
    with CheckpointTransaction(root, "step-00000007", digest=case.algorithm, dedup=case.dedup) as txn:
        txn.write("model.bin", b"\x01" * 5000)
        txn.write("sub/dir/state.bin", b"\x02" * 10)
        txn.commit(step=7, layout="files", metadata={"note": "x"}, metrics={"loss": 1.5})
    committed = json.loads((tmp_path / "run" / "step-00000007" / MANIFEST_NAME).read_bytes())
    case.validator.validate(committed)
    assert committed["schema_version"] == case.version

    foreign = tmp_path / "checkpoint-30"
    (foreign / "nested").mkdir(parents=True)
    (foreign / "trainer_state.json").write_text('{"global_step": 30}')
    (foreign / "nested" / "weights.bin").write_bytes(b"w" * 64)
    index_checkpoint(open_store(foreign), digest=case.algorithm)
    indexed = json.loads((foreign / MANIFEST_NAME).read_bytes())
    assert indexed["layout"] == "hf-trainer" and indexed["step"] == 30
    validator_of(min(case.version, 2)).validate(indexed)  # index deduplicates nothing
    assert {f["digest"].split(":")[0] for f in indexed["files"]} == {case.algorithm}


def test_optional_and_unknown_fields_accepted_by_both(case: Case) -> None:
    doc = as_json(case.manifest())
    for name in ("step", "topology", "metrics"):
        del doc[name]
    doc["future_field"] = {"x": 1}
    doc["files"][0]["future_field"] = "y"
    doc["digest"]["future_field"] = 3
    assert parses(doc)
    case.validator.validate(doc)


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


# What one version forbids and the other allows.
BAD_FIELDS_OF_VERSION = {
    1: {
        "digest-algorithm": _set(("digest", "algorithm"), "sha256"),
        "no-digest-algorithm": lambda d: d["digest"].pop("algorithm"),
        "blake3-file-in-v1": _set(("files", 0, "digest"), "blake3-tree:" + HEX),
    },
    2: {
        "unknown-file-algorithm": _set(("files", 0, "digest"), "md5-tree:" + HEX),
        "no-chunk-size": lambda d: d["digest"].pop("chunk_size"),
    },
}


@pytest.mark.parametrize("mutate", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_manifest_rejected_by_parser_and_schema(case: Case, mutate) -> None:
    doc = as_json(case.manifest())
    assert case.validator.is_valid(doc) and parses(doc)
    mutate(doc)
    assert not parses(doc)
    assert not case.validator.is_valid(doc)


@pytest.mark.parametrize(
    ("version", "name"), [(v, n) for v, bad in BAD_FIELDS_OF_VERSION.items() for n in bad]
)
def test_version_specific_rules_rejected_by_parser_and_schema(version: int, name: str) -> None:
    case = Case(version, validator_of(version))
    doc = as_json(case.manifest())
    assert case.validator.is_valid(doc) and parses(doc)
    BAD_FIELDS_OF_VERSION[version][name](doc)
    assert not parses(doc)
    assert not case.validator.is_valid(doc)


def test_unknown_algorithm_is_named() -> None:
    doc = as_json(Case(2, validator_of(2)).manifest())
    doc["files"][1]["digest"] = "md5-tree:" + HEX
    with pytest.raises(ManifestError, match=r"model.safetensors: unknown digest algorithm 'md5-tree'"):
        parse_manifest(json.dumps(doc).encode())
    v1 = as_json(Case(1, validator_of(1)).manifest())
    v1["files"][0]["digest"] = "blake3-tree:" + HEX
    with pytest.raises(ManifestError, match="'blake3-tree' in a schema version 1 manifest"):
        parse_manifest(json.dumps(v1).encode())


def test_version_follows_the_files_algorithms() -> None:
    """All SHA-256: version 1, so a ckptkit from before BLAKE3 reads it. Any BLAKE3 file:
    version 2, which such a ckptkit refuses as newer instead of misreading it."""
    v1, v2 = Case(1, validator_of(1)), Case(2, validator_of(2))
    sha = as_json(v1.manifest())
    assert sha["schema_version"] == 1
    assert sha["digest"] == {"algorithm": "sha256-tree", "chunk_size": CHUNK_SIZE}
    mixed = as_json(v2.manifest(files=[v1.entry("a"), v2.entry("b")]))
    assert (mixed["schema_version"], mixed["digest"]) == (2, {"chunk_size": CHUNK_SIZE})
    assert [f["digest"].split(":")[0] for f in mixed["files"]] == ["sha256-tree", "blake3-tree"]
    validator_of(2).validate(mixed)
    assert not validator_of(1).is_valid(mixed)
    # Re-read and re-written, each keeps its version and its files' algorithms.
    for doc in (sha, mixed):
        again = parse_manifest(json.dumps(doc).encode())
        assert json.loads(again.to_bytes()) == doc


@pytest.mark.parametrize(
    "path", ["../x", "/abs", "C:/x", "a\x00b"], ids=["parent", "absolute", "drive", "nul"]
)
def test_unsafe_paths_raise_unsafe_path_error(case: Case, path: str) -> None:
    doc = as_json(case.manifest())
    doc["files"][0]["path"] = path
    with pytest.raises(UnsafePathError) as caught:
        parse_manifest(json.dumps(doc).encode())
    assert caught.value.path == path
    errors = list(case.validator.iter_errors(doc))
    assert errors and all(list(e.absolute_path)[:3] == ["files", 0, "path"] for e in errors)
    # Writing is validated like reading: such a path never gets into a manifest.
    with pytest.raises(UnsafePathError):
        case.entry(path)


def test_future_schema_version_is_a_clear_error(case: Case) -> None:
    doc = as_json(case.manifest())
    doc["schema_version"] = 4
    doc["some_v4_field"] = {"new": True}
    with pytest.raises(UnsupportedSchemaError, match="newer than this ckptkit supports"):
        parse_manifest(json.dumps(doc).encode())
    assert not case.validator.is_valid(doc)


def test_safe_unusual_paths_accepted_by_both(case: Case) -> None:
    paths = ["...", "..a", "a..", ".hidden/x", "a/.b/c", "1:x", "é/ü 1.bin", "x/" + MANIFEST_NAME, "a" * 4096]
    doc = as_json(case.manifest(files=[case.entry(p) for p in paths]))
    assert parses(doc)
    case.validator.validate(doc)


def test_rules_only_the_parser_enforces(case: Case) -> None:
    """JSON Schema cannot express these; the parser rejects them, the schema lets them through.

    If the schema ever learns one of them, move that case into BAD_FIELDS.
    """
    base = as_json(case.manifest())

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
        assert case.validator.is_valid(doc)


# --- the schema ships with the package ---------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_schema_is_readable_as_package_resource(version: int) -> None:
    schema = load_schema(version)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema_version"]["const"] == version
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
        for version, name in SCHEMA_FILES.items():
            assert json.loads(archive.read(f"ckptkit/schema/{name}")) == load_schema(version)


# --- version 3: deduplicated files ---------------------------------------------------------


def _v3_doc() -> dict[str, Any]:
    return as_json(Case(3, validator_of(3)).manifest())


def _other_blob(doc: dict[str, Any]) -> None:
    doc["files"][0]["blob"] = doc["files"][1]["blob"]  # another file's bytes under this path


def _no_blob_store(doc: dict[str, Any]) -> None:
    del doc["blob_store"]


def _blob_store_elsewhere(doc: dict[str, Any]) -> None:
    doc["blob_store"] = "../other-blobs"


def _blob_store_absolute(doc: dict[str, Any]) -> None:
    doc["blob_store"] = "/tmp/.ckptkit-blobs"


def _blob_not_a_key(doc: dict[str, Any]) -> None:
    doc["files"][0]["blob"] = "../../etc/passwd"


@pytest.mark.parametrize(
    ("mutate", "message", "schema_catches"),
    [
        (_other_blob, "does not name the file's digest", False),
        (_no_blob_store, "blob_store", True),
        (_blob_store_elsewhere, "blob_store", True),
        (_blob_store_absolute, "blob_store", True),
        (_blob_not_a_key, "is not '<algorithm>/<2 hex>/<64 hex>", True),
    ],
    ids=["other-files-blob", "no-blob-store", "blob-store-elsewhere", "blob-store-absolute", "not-a-key"],
)
def test_bad_blob_references_are_refused(mutate, message: str, schema_catches: bool) -> None:
    """A blob key names its own file's digest, and the blob store is the root's: a manifest
    cannot point a path at another file's bytes, or outside the root."""
    doc = _v3_doc()
    mutate(doc)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(doc).encode())
    assert validator_of(3).is_valid(doc) is not schema_catches


def test_blobs_need_version_3_and_version_3_needs_blobs() -> None:
    doc = _v3_doc()
    doc["schema_version"] = 2
    with pytest.raises(ManifestError, match="'blob' in a schema version 2 manifest"):
        parse_manifest(json.dumps(doc).encode())
    # Without a deduplicated file, a manifest is written at the lowest version that says it.
    entry = Case(2, validator_of(2)).entry("a")
    plain = Manifest.create(step=1, layout="files", files=[entry], blob_store=BLOB_STORE)
    assert plain.schema_version == 2 and "blob_store" not in as_json(plain)
    stray = as_json(plain)
    stray["blob_store"] = BLOB_STORE
    with pytest.raises(ManifestError, match="blob_store but no file in it"):
        parse_manifest(json.dumps(stray).encode())
