"""The malicious corpus: each payload proven live under a real loader, then inert under ckptkit.

For every payload: a copy built for sentinel A, loaded by plain pickle / torch.load(weights_only=
False) / zipfile / numpy in a subprocess, creates A (so the payload is real). A copy built for
sentinel B then goes through every ckptkit path that reads it: the symbolic reader, ``scan``
(names the global, exits 3), ``doctor`` (never-allow, exits 3), ``safe_load``
(UnsafeContentError); B is never created.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptkit.cli.safety_cmds import doctor_command, scan_command
from ckptkit.errors import EXIT_UNSAFE, FormatError, UnsafeContentError
from ckptkit.formats.torchfile import read_torch_file
from ckptkit.ops.scan import scan, scan_file
from ckptkit.ops.structural import verify_structure
from ckptkit.pickle import PickleFormatError, load_symbolic
from ckptkit.safe import safe_load
from ckptkit.storage import open_store
from tests.fixtures.real_checkpoints import SLOW_FIXTURES
from tests.malicious.corpus import PAYLOADS, Payload, run_loader

# A payload built from a generated checkpoint pays for the generation: slow, like every test that
# uses that fixture (it is requested at run time, where the marking by fixture cannot see it).
CASES = [
    pytest.param(name, marks=pytest.mark.slow) if PAYLOADS[name].needs in SLOW_FIXTURES else name
    for name in sorted(PAYLOADS)
]


def _build(payload: Payload, directory: Path, sentinel: Path, request: pytest.FixtureRequest) -> Path:
    sources = request.getfixturevalue(payload.needs) if payload.needs else None
    directory.mkdir()
    path = directory / payload.filename
    payload.build(path, sentinel, sources)
    return path


def _appears(path: Path, seconds: float = 10.0) -> bool:
    # subprocess.Popen's child may touch the sentinel just after the loader exits.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def test_corpus_is_large_enough() -> None:
    assert len(PAYLOADS) >= 20
    assert {f"reduce_posix_system_p{p}" for p in range(6)} <= PAYLOADS.keys()


@pytest.mark.slow  # a fresh interpreter per payload (torch.load, numpy.load)
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_is_live(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    payload = PAYLOADS[name]
    sentinel = tmp_path / "sentinel-live"
    path = _build(payload, tmp_path / "live", sentinel, request)
    proc = run_loader(payload, path)
    assert _appears(sentinel), f"{name} did not run under {payload.loader}: {proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", CASES)
def test_payload_is_inert_under_ckptkit(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    payload = PAYLOADS[name]
    sentinel = tmp_path / "sentinel-ckptkit"
    path = _build(payload, tmp_path / "inert", sentinel, request)
    store = open_store(path.parent)

    # The symbolic readers: the payload's global is listed, never resolved.
    data = path.read_bytes()
    if payload.loader == "pickle":
        try:
            names = {g.ref.qualname for g in load_symbolic(data).globals}
        except FormatError as exc:  # the bomb: refused, still naming what it read
            assert payload.bomb, exc
            names = {g.ref.qualname for g in exc.globals}
        assert payload.names in names
    if payload.loader == "torch":
        try:
            names = {g.ref.qualname for g in read_torch_file(store, payload.filename).globals}
        except PickleFormatError as exc:
            names = {g.ref.qualname for g in exc.globals}
        except FormatError:  # not a torch file by its looks: scan probes it from byte 0 instead
            names = {g.ref.qualname for g in scan_file(store, payload.filename).globals}
        assert payload.names in names

    # scan, as a library call and as the CLI.
    report = scan(path)
    assert report.verdict == "unsafe"
    assert payload.names in {g.ref.qualname for f in report.files for g in f.unsafe_globals}
    result = CliRunner().invoke(scan_command, [str(path)])
    assert result.exit_code == EXIT_UNSAFE, result.output
    assert payload.names in result.output

    # doctor: torch.load would meet the global, and it must never be allowed.
    if payload.torch_reads:
        result = CliRunner().invoke(doctor_command, ["--json", str(path)])
        assert result.exit_code == EXIT_UNSAFE, result.output
        assert payload.names in result.output

    with pytest.raises(UnsafeContentError) as refused:
        safe_load(path)
    assert payload.names in str(refused.value)

    verify_structure(store)  # structural checks read the pickles too, and run nothing either
    time.sleep(0.2)
    assert not sentinel.exists()


def test_memo_bomb_fails_fast_with_format_error(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    path = _build(PAYLOADS["memo_fanout_bomb"], tmp_path / "bomb", tmp_path / "sentinel", request)
    started = time.perf_counter()
    with pytest.raises(FormatError, match="nodes"):
        load_symbolic(path.read_bytes())
    with pytest.raises(FormatError):
        read_torch_file(open_store(path.parent), path.name)
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "sentinel").exists()


def test_swapped_data_pkl_passes_crc_yet_is_caught(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # The attacker fixed the CRCs: structural verification finds nothing wrong, scan still does.
    path = _build(PAYLOADS["torch_zip_swapped_data_pkl"], tmp_path / "z", tmp_path / "s", request)
    report = verify_structure(open_store(path.parent))
    assert not [f for f in report.findings if f.kind == "crc"]
    assert scan(path).verdict == "unsafe"


def test_disguised_pickle_is_reported_by_name(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    path = _build(PAYLOADS["pickle_named_safetensors"], tmp_path / "d", tmp_path / "s", request)
    (scanned,) = scan(path).files
    assert scanned.disguised and scanned.claimed == "a safetensors file"
    result = CliRunner().invoke(scan_command, [str(path)])
    assert "named as a safetensors file but holds a pickle" in result.output
