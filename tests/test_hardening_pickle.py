"""Issue 11, items 2, 10 (first two cases) and 11 (inspect of a payload): hostile pickles and
damaged files get a verdict, never silence and never a traceback.

Item 2's real payloads (300 MARKs, a hash-flooded dict, a SETITEM on a list, in bare pickles and
in torch zip and legacy files) live in the malicious corpus, where each is first proven live under
pickle / torch.load(weights_only=False) and then shown to be reported UNSAFE by scan, doctor and
safe_load. Here: every other limit of the interpreter, how STACK_GLOBAL operands are resolved
after a fault, where the walk stops, and ``inspect`` on the same files.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import random
import shutil
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptkit.cli.inspect_cmd import inspect_command
from ckptkit.cli.safety_cmds import doctor_command, scan_command
from ckptkit.errors import EXIT_FINDINGS, EXIT_OK, EXIT_UNSAFE, UnsafeContentError
from ckptkit.ops.scan import scan
from ckptkit.pickle import Limits, PickleFormatError, load_symbolic
from ckptkit.pickle.recovery import RECOVERY_FACTOR, recover_globals
from ckptkit.safe import safe_load
from tests.malicious.corpus import PAYLOADS

COMMAND = b"touch /nonexistent/ckptkit-never-run"
# GLOBAL posix.system, the command, TUPLE1, REDUCE: what CPython would import and call.
PAYLOAD = b"cposix\nsystem\nX" + struct.pack("<I", len(COMMAND)) + COMMAND + b"\x85R"


def _names(data: bytes, limits: Limits) -> tuple[set[str], str]:
    with pytest.raises(PickleFormatError) as fault:
        load_symbolic(data, limits=limits)
    return {use.ref.qualname for use in fault.value.globals}, str(fault.value)


# --- every limit: a payload behind it is still named --------------------------------------------

_SMALL = Limits(max_memo=16, max_depth=8, max_stack=1000, max_ops=4096)
_LIMIT_CASES = {
    # 20 memo entries where 16 are allowed.
    "memo": (b"\x80\x02" + b"N\x940" * 20 + PAYLOAD + b".", "memo entries"),
    # 1500 values on the stack at the 4096th opcode, where 1000 are allowed.
    "stack": (b"\x80\x02" + b"N" * 1500 + b"N0" * 1300 + PAYLOAD + b".", "on the stack"),
    # 5000 opcodes where 4096 are allowed.
    "opcodes": (b"\x80\x02" + b"N0" * 2500 + PAYLOAD + b".", "opcodes"),
    # MARKs nested 9 deep where 8 are allowed.
    "mark-depth": (b"\x80\x02" + b"(" * 9 + PAYLOAD + b".", "MARKs nest"),
    # A set element nested 10 tuples deep, measured before it is hashed.
    "key-depth": (b"\x80\x02\x8f(N" + b"\x85" * 10 + b"\x90" + PAYLOAD + b"\x86.", "nest deeper"),
    # BUILD twice on one object: CPython calls __setstate__ twice, ckptkit refuses.
    "build-twice": (b"\x80\x02cargparse\nNamespace\n)\x81}b}b" + PAYLOAD + b"\x86.", "BUILD applied twice"),
}


@pytest.mark.parametrize("case", sorted(_LIMIT_CASES))
def test_a_fault_does_not_hide_the_globals_after_it(case: str) -> None:
    data, why = _LIMIT_CASES[case]
    pickle.loads(data.replace(PAYLOAD, b"N"))  # CPython reads past the point ckptkit stops at
    names, message = _names(data, _SMALL)
    assert "posix.system" in names
    assert why in message and "the stream names posix.system" in message


@pytest.mark.parametrize("protocol", range(6))
def test_the_walk_names_what_the_interpreter_names(protocol: int) -> None:
    # On pickles the interpreter reads whole, the walk meets the same globals at the same offsets
    # and reaches STOP: its model of the stack and memo is in step with the real one.
    import argparse
    import datetime
    from collections import Counter

    shared = [1, 2]
    value = {
        "scalars": [1, 2.0, "x", b"y", (1,), {1, 2}, frozenset({3}), None, True, 10**30, bytearray(b"z")],
        "od": OrderedDict(a=1),
        "counter": Counter("ab"),
        "ns": argparse.Namespace(x=shared, y=shared),
        "date": datetime.date(2020, 1, 2),
        "text": "é",
    }
    data = pickle.dumps(value, protocol=protocol)
    walked = recover_globals(data, 0, Limits())
    assert walked.complete and walked.stopped_at == len(data) - 1
    expected = [(use.offset, use.ref) for use in load_symbolic(data).globals]
    assert [(use.offset, use.ref) for use in walked.globals] == expected


def test_stack_global_operands_are_followed_through_the_memo_after_a_fault() -> None:
    # "os" and "system" memoized before the fault, fetched with BINGET after it.
    head = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94"
    data = head + b"(" * 300 + b"h\x00h\x01\x93" + b"\x8c\x04true\x85R."
    names, _ = _names(data, Limits())
    assert "os.system" in names


def test_a_stack_global_of_computed_names_is_reported_unresolved(tmp_path: Path) -> None:
    # The module name is the result of a call (str("os")): not knowable without running it.
    computed = b"cbuiltins\nstr\n\x8c\x02os\x85R"
    data = b"\x80\x04" + b"(" * 300 + computed + b"\x8c\x06system\x93\x8c\x04true\x85R."
    names, _ = _names(data, Limits())
    assert "<unresolved>.system" in names
    path = tmp_path / "computed.pkl"
    path.write_bytes(data)
    report = scan(path)
    assert report.verdict == "unsafe"
    assert "<unresolved>.system" in {use.ref.qualname for use in report.files[0].unsafe_globals}


def test_the_walk_has_bounds_and_says_where_it_stopped() -> None:
    limits = Limits(max_ops=4096)
    padding = b"N0" * (4096 * RECOVERY_FACTOR)  # past the walk's own opcode budget
    data = b"\x80\x02" + padding + PAYLOAD + b"."
    names, message = _names(data, limits)
    assert "posix.system" not in names
    assert "it was not searched for globals past byte" in message


def test_the_walk_stops_where_cpython_fails_too(tmp_path: Path) -> None:
    # A text file: pickle.load fails at "I like cats"; the GLOBAL-shaped lines after it never run.
    path = tmp_path / "notes.txt"
    path.write_bytes(b"I like cats\ncos\nsystem\n(S'true'\ntR.")
    with pytest.raises(ValueError):
        pickle.loads(path.read_bytes())
    assert scan(path).verdict == "clean"
    # A truncated real pickle: incomplete, never unsafe.
    data = pickle.dumps({"step": 3, "lr": [0.1, 0.2], "name": "run"}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(data[:-5])
    report = scan(tmp_path / "cut.pkl")
    assert report.verdict == "incomplete" and not report.files[0].globals


# --- the CLI verdicts on a payload behind a limit -----------------------------------------------


def _build(name: str, tmp_path: Path) -> Path:
    payload = PAYLOADS[name]
    path = tmp_path / payload.filename
    payload.build(path, tmp_path / "sentinel", None)
    return path


@pytest.mark.parametrize("name", ["mark_flood", "hash_flood_dict", "torch_zip_mark_flood"])
def test_every_verdict_names_a_payload_behind_a_limit(name: str, tmp_path: Path) -> None:
    path = _build(name, tmp_path)
    for command in (scan_command, doctor_command, inspect_command):
        result = CliRunner().invoke(command, [str(path)])
        assert result.exit_code == EXIT_UNSAFE, (command.name, result.output)
        assert "posix.system" in result.output
        assert "Traceback" not in result.output
    with pytest.raises(UnsafeContentError, match=r"posix\.system"):
        safe_load(path)
    assert not (tmp_path / "sentinel").exists()


# --- item 11: inspect names what scan names -----------------------------------------------------


@pytest.mark.parametrize("name", ["reduce_posix_system_p2", "torch_zip_payload", "torch_legacy_payload"])
def test_inspect_of_a_payload_says_unsafe_and_exits_3(name: str, tmp_path: Path) -> None:
    path = _build(name, tmp_path)
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert result.exit_code == EXIT_UNSAFE, result.output
    assert "unsafe:" in result.output and "posix.system (dangerous)" in result.output
    assert "UNSAFE: torch.load(weights_only=False) would import and call" in result.output
    result = CliRunner().invoke(inspect_command, ["--json", str(path)])
    assert result.exit_code == EXIT_UNSAFE
    report = json.loads(result.output)
    assert report["ok"] is False
    assert [(u["name"], u["classification"]) for u in report["unsafe"]] == [("posix.system", "dangerous")]


def test_inspect_of_a_clean_torch_file_stays_ok(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "state.pt"
    torch.save({"step": 7, "model": torch.nn.Linear(2, 2).state_dict()}, path)
    result = CliRunner().invoke(inspect_command, ["--json", str(path)])
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.output)["unsafe"] == []


# --- item 10: values and damage that used to end in a traceback ---------------------------------


def test_inspect_of_an_int_too_long_to_print(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "big.pt"
    torch.save({"step": 10**5000}, path)
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == EXIT_OK
    assert "<int of 5001 digits>" in result.output
    result = CliRunner().invoke(inspect_command, ["--json", str(path)])
    assert result.exit_code == EXIT_OK
    readings = json.loads(result.output)["resume"]["checks"][0]["readings"]
    assert readings[0]["value"] == "<int of 5001 digits>"


def _model_states(param_shapes: object) -> dict[str, object]:
    import torch

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()
    declared = [OrderedDict((k, v.shape) for k, v in module.items())]
    shapes = param_shapes if param_shapes is not None else declared
    return {
        "module": module,
        "buffer_names": [],
        "param_shapes": shapes,
        "frozen_param_shapes": None,
        "shared_params": {},
        "global_steps": 5,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {"train_batch_size": 8, "zero_optimization": {"stage": 1}},
        "ds_version": "0.16.0",
    }


def _rewrite_data_pkl(path: Path, change: object) -> None:
    original = path.read_bytes()
    source = zipfile.ZipFile(io.BytesIO(original))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            target.writestr(info.filename, change(data) if info.filename.endswith("/data.pkl") else data)
    path.write_bytes(out.getvalue())


def test_model_states_whose_torch_size_was_damaged(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(_model_states(None), path)
    _rewrite_data_pkl(path, lambda data: data.replace(b"torch\nSize\n", b"torch\nSizf\n", 1))
    result = CliRunner().invoke(inspect_command, [str(path)])
    assert "Traceback" not in result.output and not isinstance(result.exception, TypeError), result.exception
    assert "param_shapes entry '0.weight' is not a shape but torch.Sizf" in result.output
    assert "torch.Sizf (unknown)" in result.output
    assert result.exit_code == EXIT_UNSAFE  # an unknown global, as scan says


def test_model_states_with_shapes_that_are_not_shapes(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "mp_rank_00_model_states.pt"
    state = _model_states([{"0.weight": 5, "0.bias": [3]}, "not a table"])
    state["buffer_names"] = [["nested"], "1.bias"]
    torch.save(state, path)
    result = CliRunner().invoke(inspect_command, ["--json", str(path)])
    assert result.exit_code == EXIT_FINDINGS, result.output
    report = json.loads(result.output)
    assert any("'0.weight' is not a shape but int" in p for p in report["problems"])
    tensors = {t["name"]: t for t in report["models"][0]["tensors"]}
    assert tensors["0.weight"]["shape"] == [3, 4] and tensors["0.bias"]["shape"] == [3]
    assert tensors["1.bias"]["role"] == "buffer"


def test_a_flipped_bit_in_a_global_of_model_states_never_ends_in_a_traceback(tmp_path: Path) -> None:
    import torch

    clean = tmp_path / "clean.pt"
    torch.save(_model_states(None), clean)
    data_pkl = next(n for n in zipfile.ZipFile(clean).namelist() if n.endswith("/data.pkl"))
    original = zipfile.ZipFile(clean).read(data_pkl)
    # The names of globals are where a flip changes meaning (torch.Size becomes an unknown class).
    names = [
        i
        for op, arg, pos in pickletools.genops(original)
        if op.name == "GLOBAL"
        for i in range(pos + 1, pos + 2 + len(arg))
        if original[i] != ord("\n")
    ]
    rng = random.Random(11)
    path = tmp_path / "mp_rank_00_model_states.pt"
    for _ in range(60):
        flipped = bytearray(original)
        flipped[rng.choice(names)] ^= 1 << rng.randrange(7)
        shutil.copy(clean, path)
        _rewrite_data_pkl(path, lambda _, flipped=bytes(flipped): flipped)
        result = CliRunner().invoke(inspect_command, [str(path)])
        assert result.exit_code in (EXIT_OK, EXIT_FINDINGS, EXIT_UNSAFE), result.exception
        assert not result.exception or isinstance(result.exception, SystemExit), result.exception
