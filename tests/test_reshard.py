"""``reshard``: every real ZeRO fixture case rewritten for other world sizes, checked without DeepSpeed
running, against an independent implementation of DeepSpeed's partition layout in this file
(shared/reference/resharding.md §1.1, §1.2), against DeepSpeed's own ``zero_to_fp32`` and by
round trips; then the manifest and its certificate, the CLI, refusals, a SIGKILL, S3 and RNG states.

The live-engine proof (DeepSpeed loading DST at M ranks and training on) is
tests/test_reshard_deepspeed.py.
"""

from __future__ import annotations

import copy
import enum
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckptkit.catalog import read_manifest
from ckptkit.cli.main import cli
from ckptkit.errors import CommitConflictError, NotFoundError
from ckptkit.ops.gc import find_debris
from ckptkit.ops.index import index_checkpoint
from ckptkit.ops.reshard import reshard_zero
from ckptkit.storage import open_store
from tests.fixtures._common import jsonable
from tests.fixtures.gen_deepspeed import ALL_CASES

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES_2 = [c.name for c in ALL_CASES if c.world == 2]
CASE_4 = "z3_bf16_warmuplr_4rank"
EXACT = [(name, m) for name in CASES_2 for m in (1, 3, 4)] + [(CASE_4, m) for m in (1, 2, 3)]
STATES = ("exp_avg", "exp_avg_sq")


# --- DeepSpeed's layout, written out independently of ckptkit.formats.zero -------------------------


def flat_layout(n: int, dp: int, rank: int) -> tuple[int, int, int]:
    """ZeRO-1/2, a group of ``n`` elements at ``dp`` ranks: (partition size p, left = rank·p,
    group_paddings on ``rank``), by the three cases of stage_1_and_2.py (resharding.md §1.1 step 5)."""
    aligned = math.ceil(n / (2 * dp)) * 2 * dp
    p = aligned // dp
    left = rank * p
    if n <= left:
        padding = p
    elif left + p > n:
        padding = left + p - n
    else:
        padding = 0
    return p, left, padding


def param_layout(numel: int, dp: int, rank: int) -> tuple[int, int, int]:
    """ZeRO-3, one param: (partition size, first element of ``rank``, real elements it holds)."""
    part = math.ceil(numel / dp)
    start = rank * part
    return part, start, max(0, min(part, numel - start))


def _numel(shape: Any) -> int:
    return math.prod(int(d) for d in shape)


def optim_name(prefix: str, rank: int) -> str:
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def model_name(stage: int, rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"


class Loaded:
    """A tag directory's rank files, loaded by torch (test side only: these are our fixtures)."""

    def __init__(self, tag_dir: Path) -> None:
        self.dir = tag_dir
        optim = sorted(tag_dir.glob("*optim_states.pt"))
        self.prefix = "bf16_" if optim[0].name.startswith("bf16_") else ""
        self.world = len(optim)
        self.optim = [self.load(optim_name(self.prefix, r)) for r in range(self.world)]
        self.stage = int(self.optim[0]["optimizer_state_dict"]["zero_stage"])
        ranks = range(self.world) if self.stage == 3 else range(1)
        self.model = [self.load(model_name(self.stage, r)) for r in ranks]

    def load(self, name: str) -> Any:
        return torch.load(self.dir / name, map_location="cpu", weights_only=False)

    @property
    def shapes(self) -> list[OrderedDict[str, Any]]:
        return self.model[0]["param_shapes"]

    def osd(self, rank: int) -> dict[str, Any]:
        return self.optim[rank]["optimizer_state_dict"]

    def full(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per trainable param, its fp32 master and moments, whole, cut out of the partitions."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for g, shapes in enumerate(self.shapes):
            numels = [_numel(s) for s in shapes.values()]
            if self.stage == 3:
                vectors = self._params3(g, numels)
            else:
                vectors = self._split(self._group12(g, sum(numels)), numels)
            for name, shape, vector in zip(shapes, shapes.values(), vectors, strict=True):
                out[name] = {k: v.reshape(tuple(shape)) for k, v in vector.items()}
        return out

    def _group12(self, g: int, n: int) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {"fp32": [], **{k: [] for k in STATES}}
        for r in range(self.world):
            p, _, padding = flat_layout(n, self.world, r)
            osd = self.osd(r)
            lean = p - padding
            fp32 = osd["single_partition_of_fp32_groups"][g].detach()
            assert fp32.numel() == lean  # saved lean (§1.1 step 6)
            parts["fp32"].append(fp32)
            for k in STATES:
                moment = osd["base_optimizer_state"]["state"][g][k]
                assert moment.numel() == p  # saved padded (§1.1 step 7)
                parts[k].append(moment[:lean])
        return {k: torch.cat(v) for k, v in parts.items()}

    @staticmethod
    def _split(group: dict[str, torch.Tensor], numels: list[int]) -> list[dict[str, torch.Tensor]]:
        out, offset = [], 0
        for n in numels:
            out.append({k: v[offset : offset + n] for k, v in group.items()})
            offset += n
        return out

    def _params3(self, g: int, numels: list[int]) -> list[dict[str, torch.Tensor]]:
        out, offset = [], 0
        for n in numels:
            part = math.ceil(n / self.world)
            vector = {}
            for key in ("fp32", *STATES):
                pieces = []
                for r in range(self.world):
                    osd = self.osd(r)
                    flat = (
                        osd["fp32_flat_groups"][g]
                        if key == "fp32"
                        else osd["optimizer_state_dict"]["state"][g][key]
                    )
                    pieces.append(flat.detach()[offset : offset + part])
                vector[key] = torch.cat(pieces)[:n]
            out.append(vector)
            offset += part
        return out

    def frozen3(self) -> dict[str, torch.Tensor]:
        """ZeRO-3: each frozen param whole, from the per-rank fragments."""
        shapes = self.model[0].get("frozen_param_shapes") or {}
        return {
            name: torch.cat([m["frozen_param_fragments"][name] for m in self.model])[: _numel(shape)]
            for name, shape in shapes.items()
        }


def expected_rank_files(src: Loaded, world: int) -> dict[str, Any]:
    """What DeepSpeed writes at ``world`` ranks for the state in ``src``: rank 0's trees with the
    partitioned fields re-cut by the layout rules above (resharding.md §1.6 step 3, 4)."""
    full = src.full()
    files: dict[str, Any] = {}
    for r in range(world):
        tree = copy.deepcopy(src.optim[0])
        osd = tree["optimizer_state_dict"]
        if src.stage == 3:
            _expect_optim3(src, full, osd, world, r)
        else:
            _expect_optim12(src, full, osd, world, r)
        files[optim_name(src.prefix, r)] = tree
    if src.stage == 3:
        frozen = src.frozen3()
        for r in range(world):
            tree = copy.deepcopy(src.model[0])
            tree["dp_world_size"] = world
            if r > 0:
                tree["shared_params"] = {}  # DeepSpeed fills it in on rank 0 only (_get_shared_params)
            for name, value in frozen.items():
                part, start, real = param_layout(value.numel(), world, r)
                tree["frozen_param_fragments"][name] = _padded(value[start : start + real], part)
            files[model_name(3, r)] = tree
    else:
        tree = copy.deepcopy(src.model[0])
        tree["dp_world_size"] = world
        files[model_name(1, 0)] = tree
    return files


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([values.reshape(-1), values.new_zeros(length - values.numel())])


def _expect_optim12(src: Loaded, full: dict[str, Any], osd: dict[str, Any], world: int, r: int) -> None:
    from deepspeed.utils.tensor_fragment import fragment_address

    fp32, paddings, mappings = [], [], []
    for g, shapes in enumerate(src.shapes):
        group = {k: torch.cat([full[n][k].reshape(-1) for n in shapes]) for k in ("fp32", *STATES)}
        p, left, padding = flat_layout(group["fp32"].numel(), world, r)
        lean = p - padding
        master = group["fp32"][left : left + lean].clone()
        master.requires_grad_(src.osd(0)["single_partition_of_fp32_groups"][g].requires_grad)
        fp32.append(master)
        for k in STATES:
            osd["base_optimizer_state"]["state"][g][k] = _padded(group[k][left : left + lean], p)
        paddings.append(padding)
        mapping, offset = OrderedDict(), 0
        for name, shape in shapes.items():
            lo, hi = max(offset, left), min(offset + _numel(shape), left + p)
            if lo < hi:
                mapping[name] = fragment_address(numel=hi - lo, start=lo - left)
            offset += _numel(shape)
        mappings.append(mapping)
    osd["single_partition_of_fp32_groups"] = fp32
    osd["group_paddings"] = paddings
    osd["partition_count"] = [world] * len(src.shapes)
    osd["param_slice_mappings"] = mappings


def _expect_optim3(src: Loaded, full: dict[str, Any], osd: dict[str, Any], world: int, r: int) -> None:
    flat = []
    for g, shapes in enumerate(src.shapes):
        cut: dict[str, list[torch.Tensor]] = {k: [] for k in ("fp32", *STATES)}
        for name in shapes:
            for k in cut:
                value = full[name][k].reshape(-1)
                part, start, real = param_layout(value.numel(), world, r)
                cut[k].append(_padded(value[start : start + real], part))
        master = torch.cat(cut["fp32"])
        master.requires_grad_(src.osd(0)["fp32_flat_groups"][g].requires_grad)
        flat.append(master)
        for k in STATES:
            osd["optimizer_state_dict"]["state"][g][k] = torch.cat(cut[k])
    osd["fp32_flat_groups"] = flat
    osd["partition_count"] = world


def padding_mask3(src: Loaded, g: int, rank: int) -> torch.Tensor:
    """ZeRO-3: True at the padding elements of ``rank``'s flat sub-group ``g``."""
    mask = []
    for shape in src.shapes[g].values():
        part, _, real = param_layout(_numel(shape), src.world, rank)
        mask += [False] * real + [True] * (part - real)
    return torch.tensor(mask, dtype=torch.bool)


# --- comparing trees: every value, tensors bit for bit ---------------------------------------------


def canon(value: Any) -> Any:
    """A comparable form of a loaded tree: types, order, tensor bytes, requires_grad, objects' vars."""
    if isinstance(value, torch.Tensor):
        data = value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        return ("tensor", str(value.dtype), tuple(value.shape), value.requires_grad, data)
    if isinstance(value, enum.Enum):
        return ("enum", type(value).__qualname__, value.value)
    if isinstance(value, dict):
        return (type(value).__name__, tuple((k, canon(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(canon(v) for v in value))
    if isinstance(value, torch.dtype):
        return ("dtype", str(value))
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, bool | int | float | str | bytes) or value is None:
        return (type(value).__name__, value)
    return ("object", type(value).__module__, type(value).__qualname__, canon(dict(vars(value))))


def diff(got: Any, expected: Any, path: str = "") -> list[str]:
    """Where two canon() forms differ (for a readable assertion message)."""
    if got == expected:
        return []
    if (
        type(got) is tuple
        and type(expected) is tuple
        and len(got) == len(expected)
        and got[:1] == expected[:1]
    ):
        if got[0] in ("dict", "OrderedDict") and [k for k, _ in got[1]] == [k for k, _ in expected[1]]:
            return [
                d
                for (k, a), (_, b) in zip(got[1], expected[1], strict=True)
                for d in diff(a, b, f"{path}/{k}")
            ]
        if got[0] in ("list", "tuple", "Size") and len(got[1]) == len(expected[1]):
            return [
                d
                for i, (a, b) in enumerate(zip(got[1], expected[1], strict=True))
                for d in diff(a, b, f"{path}/{i}")
            ]
        if got[0] == "object" and got[1:3] == expected[1:3]:
            return diff(got[3], expected[3], path)
    return [f"{path}: {str(got)[:160]} != {str(expected)[:160]}"]


def assert_same_tree(got: Any, expected: Any, where: str) -> None:
    problems = diff(canon(got), canon(expected))
    assert not problems, f"{where}: " + "; ".join(problems[:6])


def zero_to_fp32(save_dir: Path) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save_dir))


def bits(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# --- 1. exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "world"), EXACT, ids=[f"{n}-to{m}" for n, m in EXACT])
def test_reshard_is_exact(deepspeed_checkpoints: Any, tmp_path: Path, name: str, world: int) -> None:
    case = deepspeed_checkpoints[name]
    src = Loaded(case.tag_dir)
    result = reshard_zero(case.save_dir, tmp_path / "dst", world_size=world)
    assert (result.stage, result.from_world_size, result.world_size) == (case.stage, case.world_size, world)
    dst_dir = tmp_path / "dst" / case.tag
    dst = Loaded(dst_dir)

    # The files DeepSpeed writes at M ranks, nothing else.
    expected = expected_rank_files(src, world)
    assert sorted(p.name for p in dst_dir.iterdir()) == sorted(expected)
    assert (tmp_path / "dst" / "latest").read_text() == case.tag
    for file_name, tree in expected.items():
        assert_same_tree(dst.load(file_name), tree, file_name)

    # Per parameter, masters and both moments equal the source's, bit for bit.
    src_full, dst_full = src.full(), dst.full()
    assert list(dst_full) == list(src_full) and set(src_full) == set(case.expected["param_shapes"])
    for param, states in src_full.items():
        for key, value in states.items():
            assert bits(dst_full[param][key]) == bits(value), (param, key)

    # What a resume restores besides the partitions is the source's, as DeepSpeed recorded it live.
    model = dst.model[0]
    live = case.expected
    assert model["dp_world_size"] == world
    assert (model["global_steps"], model["global_samples"], model["skipped_steps"]) == (
        live["global_steps"],
        live["global_samples"],
        live["skipped_steps"],
    )
    assert (model["my_step"], model["case"]) == (
        live["client_state"]["my_step"],
        live["client_state"]["case"],
    )
    assert model["buffer_names"] == live["buffer_names"] and model["shared_params"] == live["shared_params"]
    scheduler = live["lr_scheduler"]["state_dict"] if live["lr_scheduler"] else None
    assert json.loads(json.dumps(jsonable(model["lr_scheduler"]))) == scheduler
    scaler = vars(dst.osd(world - 1)["loss_scaler"])
    assert scaler["cur_scale"] == live["cur_scale"]

    # DeepSpeed's own consolidation reads DST exactly as it read the source.
    ref, got = case.expected_fp32(), zero_to_fp32(tmp_path / "dst")
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key].dtype == value.dtype and bits(got[key]) == bits(value), key

    # N -> M -> N gives back the source's files, tensor for tensor, but the ZeRO-3 fp32 padding:
    # DeepSpeed leaves it uninitialised, reshard writes zeros.
    reshard_zero(tmp_path / "dst", tmp_path / "back", world_size=case.world_size)
    back = Loaded(tmp_path / "back" / case.tag)
    names = sorted(p.name for p in case.tag_dir.iterdir())
    assert sorted(p.name for p in back.dir.iterdir()) == names
    source_files = {n: src.load(n) for n in names}
    if src.stage == 3:
        for r in range(world):
            for g, flat in enumerate(dst.osd(r)["fp32_flat_groups"]):
                assert not flat[padding_mask3(dst, g, r)].any(), f"rank {r} padding is not zero"
        for r in range(src.world):
            for g, flat in enumerate(
                source_files[optim_name(src.prefix, r)]["optimizer_state_dict"]["fp32_flat_groups"]
            ):
                flat.detach()[padding_mask3(src, g, r)] = 0
    for n in names:
        assert_same_tree(back.load(n), source_files[n], f"round trip {n}")


def test_ranks_holding_only_padding(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    """ZeRO-2 at 330 ranks: the 646-element group pads to 660, two per rank, so ranks 323..329 hold
    nothing but padding (the layout where DeepSpeed's universal loader raises IndexError, F2)."""
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    src = Loaded(case.tag_dir)
    reshard_zero(case.save_dir, tmp_path / "dst", world_size=330)
    dst = Loaded(tmp_path / "dst" / case.tag)
    assert dst.world == 330
    expected = expected_rank_files(src, 330)
    for r in (0, 322, 323, 329):
        name = optim_name(src.prefix, r)
        assert_same_tree(dst.load(name), expected[name], name)
    empty = dst.osd(329)
    assert empty["group_paddings"] == [2] and empty["single_partition_of_fp32_groups"][0].numel() == 0
    assert empty["param_slice_mappings"] == [OrderedDict()]
    dst_full = dst.full()
    for param, states in src.full().items():
        assert {k: bits(v) for k, v in dst_full[param].items()} == {k: bits(v) for k, v in states.items()}
    reshard_zero(tmp_path / "dst", tmp_path / "back", world_size=2)
    for path in case.tag_dir.iterdir():
        assert_same_tree(
            torch.load(tmp_path / "back" / case.tag / path.name, weights_only=False),
            src.load(path.name),
            path.name,
        )


# --- 2. the manifest and its certificate ------------------------------------------------------------


def test_manifest_records_the_certificate_and_verify_rechecks_it(
    deepspeed_checkpoints: Any, tmp_path: Path
) -> None:
    from blake3 import blake3

    case = deepspeed_checkpoints["z2_bf16_warmupcosine"]
    dst = tmp_path / "dst"
    reshard_zero(case.save_dir, dst, world_size=3)
    manifest = read_manifest(open_store(dst))
    assert manifest.layout == "deepspeed" and manifest.step == case.expected["global_steps"]
    assert manifest.topology["world_size"] == 3 and manifest.topology["zero_stage"] == 2
    entry = manifest.metadata["reshard"]
    assert (entry["from_world_size"], entry["world_size"], entry["zero_stage"]) == (2, 3, 2)
    assert manifest.metadata["tag"] == case.tag
    # One digest per trainable parameter and state: BLAKE3 of its float32 elements in order,
    # computed here from the source's partitions.
    certificate = entry["certificate"]["params"]
    full = Loaded(case.tag_dir).full()
    assert set(certificate) == set(full)
    for name, states in full.items():
        assert certificate[name] == {k: blake3(bits(v)).hexdigest() for k, v in states.items()}, name
    assert sorted(e.path for e in manifest.files) == sorted(
        ["latest", *(f"{case.tag}/{p.name}" for p in (dst / case.tag).iterdir())]
    )
    assert run_cli("verify", str(dst)).exit_code == 0

    # A changed moment whose file digests were then made consistent again: only the certificate
    # can tell. exp_avg[0] of rank 0 is the first element of the group's first parameter.
    rank0 = next((dst / case.tag).glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    tree = torch.load(rank0, weights_only=False)
    tree["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg"][0] += 1.0
    torch.save(tree, rank0)
    index_checkpoint(open_store(dst), force=True, metadata=manifest.metadata)
    first = next(iter(Loaded(case.tag_dir).shapes[0]))
    result = run_cli("verify", str(dst), "--json")
    assert result.exit_code == 1, result.output
    [checked] = json.loads(result.stdout)["checkpoints"]
    assert [(f["kind"], f["message"]) for f in checked["findings"]] == [
        ("certificate", f"reshard certificate: {first}: exp_avg differ from the certificate")
    ]


# --- 3. the CLI ------------------------------------------------------------------------------------


def test_cli_text_and_json(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z3_fp16_overflow"]
    text = run_cli("reshard", str(case.save_dir), str(tmp_path / "a"), "--world-size", "3")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"OK: ZeRO-3 {case.tag}: 2 -> 3 ranks, 6 rank file(s), ")
    assert lines[1] == (
        f"certificate: 5 parameters conserved (exp_avg, exp_avg_sq, fp32), recorded in {tmp_path / 'a'}"
    )
    result = run_cli("reshard", str(case.save_dir), str(tmp_path / "b"), "--world-size", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    files = [
        f"{case.tag}/zero_pp_rank_0_mp_rank_00_model_states.pt",
        f"{case.tag}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert out["ok"] is True and out["url"] == str(tmp_path / "b")
    assert out["source"] == str(case.tag_dir) and out["tag"] == case.tag
    assert (out["stage"], out["from_world_size"], out["world_size"]) == (3, 2, 1)
    assert out["files"] == files
    assert out["total_size"] == sum((tmp_path / "b" / f).stat().st_size for f in files)
    assert out["params"] == 5 and out["states"] == ["exp_avg", "exp_avg_sq", "fp32"]
    assert out["rng_states"] == {} and out["carried"] == []


def test_cli_usage_errors_and_an_existing_destination(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z1_bf16_none"]
    for bad in ("0", "-2", "two"):
        result = run_cli("reshard", str(case.save_dir), str(tmp_path / "x"), "--world-size", bad)
        assert result.exit_code == 2 and "--world-size" in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="positive integer"):
        reshard_zero(case.save_dir, tmp_path / "x", world_size=0)

    reshard_zero(case.save_dir, tmp_path / "dst", world_size=3)
    before = {p: p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    result = run_cli("reshard", str(case.save_dir), str(tmp_path / "dst"), "--world-size", "1")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"ckptkit: error: {tmp_path / 'dst'} is already committed"
    assert {p: p.read_bytes() for p in (tmp_path / "dst").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging left behind


# --- 4. bad input: exit 1, one line naming the problem, nothing committed ----------------------------


def _tamper_missing_rank(tag: Path) -> None:
    next(tag.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()


def _tamper_truncate(tag: Path) -> None:
    path = next(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tamper_param_shapes(tag: Path) -> None:
    """fc2.bias recorded one element longer: the partitions no longer cover the parameters."""
    for path in tag.glob("*model_states.pt"):
        tree = torch.load(path, weights_only=False)
        tree["param_shapes"][0]["fc2.bias"] = torch.Size([9])
        torch.save(tree, path)


def _tamper_latest(tag: Path) -> None:
    (tag.parent / "latest").write_text("global_step99")


def _tamper_tensor_parallel(tag: Path) -> None:
    shutil.copy(next(tag.glob("*model_states.pt")), tag / "mp_rank_01_model_states.pt")


def _tamper_moe(tag: Path) -> None:
    shutil.copy(next(tag.glob("*model_states.pt")), tag / "layer_0_expert_0_mp_rank_00_model_states.pt")


def _tamper_loss_scaler(tag: Path) -> None:
    path = next(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    tree = torch.load(path, weights_only=False)
    tree["optimizer_state_dict"]["loss_scaler"].cur_scale *= 2
    torch.save(tree, path)


def _tamper_step(tag: Path) -> None:
    """Rank 1's file from a save one step later: a static loss scale leaves only the step to differ."""
    path = next(tag.glob("*zero_pp_rank_1_*optim_states.pt"))
    tree = torch.load(path, weights_only=False)
    osd = tree["optimizer_state_dict"]
    states = (
        osd["optimizer_state_dict"]["state"]
        if "fp32_flat_groups" in osd
        else osd["base_optimizer_state"]["state"]
    )
    states[0]["step"] += 1
    torch.save(tree, path)


def _tamper_sub_group_size(tag: Path) -> None:
    """A ZeRO-3 config whose sub_group_size splits the param group once partitions change size."""
    for path in tag.glob("*optim_states.pt"):
        tree = torch.load(path, weights_only=False)
        tree["ds_config"]["zero_optimization"]["sub_group_size"] = 100
        torch.save(tree, path)


BAD = {
    "missing-rank": ("z2_fp16_overflow", _tamper_missing_rank, "rank file(s) [1] missing"),
    "truncated": ("z2_fp16_overflow", _tamper_truncate, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "uncovered-z2": ("z2_fp16_overflow", _tamper_param_shapes, "the partitions do not cover the parameters"),
    "uncovered-z3": ("z3_bf16_warmuplr", _tamper_param_shapes, "the partitions do not cover the parameters"),
    "latest": ("z1_bf16_none", _tamper_latest, "global_step99"),
    "tensor-parallel": (
        "z1_bf16_none",
        _tamper_tensor_parallel,
        "tensor or pipeline parallelism (mp_rank > 0)",
    ),
    "moe": ("z3_bf16_warmuplr", _tamper_moe, "MoE expert files are not supported"),
    "loss-scaler": ("z2_fp16_overflow", _tamper_loss_scaler, "disagree on loss_scaler"),
    "step-z1": ("z1_bf16_none", _tamper_step, "disagree on the optimizer step"),
    "step-z3": ("z3_bf16_warmuplr", _tamper_step, "disagree on the optimizer step"),
    "sub-groups": (
        "z3_bf16_warmuplr",
        _tamper_sub_group_size,
        "would split param group into sub-groups of [2, 3] params, not [5]",
    ),
}


@pytest.mark.parametrize("size", [None, 1, 50, 100, 250, 10_000])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_sub_group_rule_is_deepspeeds(size: int | None, world: int) -> None:
    """ckptkit's copy of ZeRO-3's sub-group cut gives DeepSpeed's own groups."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from ckptkit.ops.zero_rank_files import _sub_group_sizes
    from ckptkit.ops.zero_source import ParamState

    numels = [128, 240, 30, 240, 8, 1, 77]
    params = [ParamState(f"p{i}", (n,), n) for i, n in enumerate(numels)]
    fakes = [SimpleNamespace(partition_numel=lambda n=n: -(-n // world)) for n in numels]
    optimizer = SimpleNamespace(sub_group_size=size)
    theirs = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(optimizer, fakes)
    assert _sub_group_sizes(params, world, size) == [len(g) for g in theirs]


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_refused_and_nothing_is_committed(
    deepspeed_checkpoints: Any, tmp_path: Path, kind: str
) -> None:
    name, tamper, message = BAD[kind]
    case = deepspeed_checkpoints[name]
    src = tmp_path / "src"
    shutil.copytree(case.save_dir, src)
    tamper(src / case.tag)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("reshard", str(src), str(out / "dst"), "--world-size", "3")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptkit: error: ") and message in lines[0], lines
    assert list(out.iterdir()) == []  # not committed, and no debris either


_STALLING_RESHARD = """
import sys, time
from ckptkit.ops.reshard import reshard_zero

class StallAfterFirstFile:
    def start(self, total_bytes, total_files=0): pass
    def advance(self, nbytes): pass
    def finish(self): pass
    def file_done(self, count=1):
        print("written", flush=True)
        time.sleep(600)

reshard_zero(sys.argv[1], sys.argv[2], world_size=3, progress=StallAfterFirstFile())
"""


def test_sigkill_during_a_reshard_commits_nothing_and_gc_cleans_up(
    deepspeed_checkpoints: Any, tmp_path: Path
) -> None:
    case = deepspeed_checkpoints["z3_bf16_warmuplr"]
    root = tmp_path / "root"
    root.mkdir()
    dst = root / "dst"
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLING_RESHARD, str(case.save_dir), str(dst)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert not dst.exists()  # a rank file was written, but only into staging
    assert find_debris(open_store(root)), (
        "the kill left no staging behind: it landed too late to test anything"
    )
    result = run_cli("verify", str(dst))
    assert result.exit_code != 0

    assert run_cli("gc", str(root), "--grace", "0").exit_code == 0
    assert find_debris(open_store(root)) == [] and list(root.iterdir()) == []
    reshard_zero(case.save_dir, dst, world_size=3)
    assert run_cli("verify", str(dst)).exit_code == 0


class _DeleteSourceMidway:
    """A progress that deletes a source rank file once the first new file is written: the source
    vanishing under a running reshard (a retention job, a sync --delete)."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim
        self.finished = False

    def start(self, total_bytes: int, total_files: int = 0) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def file_done(self, count: int = 1) -> None:
        self.victim.unlink(missing_ok=True)

    def finish(self) -> None:
        self.finished = True


def test_a_source_vanishing_midway_fails_cleanly(deepspeed_checkpoints: Any, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_fp32_steplr"]
    src = tmp_path / "src"
    shutil.copytree(case.save_dir, src)
    out = tmp_path / "out"
    out.mkdir()
    progress = _DeleteSourceMidway(src / case.tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(NotFoundError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        reshard_zero(src, out / "dst", world_size=3, progress=progress)
    assert progress.finished  # the progress display is closed on error too
    assert list(out.iterdir()) == []


# --- 5. stores ----------------------------------------------------------------------------------------


def _upload(save_dir: Path, url: str, **options: Any) -> dict[str, int]:
    store = open_store(url, **options)
    sizes = {}
    for path in sorted(save_dir.rglob("*")):
        if path.is_file():
            key = path.relative_to(save_dir).as_posix()
            store.put(key, path.read_bytes())
            sizes[key] = path.stat().st_size
    return sizes


def _trees(store_url: str, manifest_files: list[str], tmp: Path) -> dict[str, Any]:
    """Each rank file of a committed checkpoint, by its path without the attempt prefix, loaded."""
    store = open_store(store_url)
    out = {}
    for path in manifest_files:
        relative = path.split("/", 1)[1] if path.startswith("ckptkit-") else path
        if relative.endswith(".pt"):
            local = tmp / relative.replace("/", "__")
            local.write_bytes(store.get(path))
            out[relative] = torch.load(local, weights_only=False)
    return out


def test_s3_source_to_s3_and_to_local(deepspeed_checkpoints: Any, s3_bucket: str, tmp_path: Path) -> None:
    case = deepspeed_checkpoints["z2_fp16_overflow"]
    _upload(case.save_dir, f"{s3_bucket}/src")
    reshard_zero(case.save_dir, tmp_path / "local", world_size=3)
    expected = _trees(
        str(tmp_path / "local"),
        [e.path for e in read_manifest(open_store(tmp_path / "local")).files],
        tmp_path,
    )
    assert len(expected) == 4

    reshard_zero(f"{s3_bucket}/src", tmp_path / "from_s3", world_size=3)
    got = _trees(
        str(tmp_path / "from_s3"),
        [e.path for e in read_manifest(open_store(tmp_path / "from_s3")).files],
        tmp_path,
    )
    assert list(got) == list(expected)
    for name in expected:
        assert_same_tree(got[name], expected[name], name)

    result = run_cli("reshard", f"{s3_bucket}/src", f"{s3_bucket}/dst", "--world-size", "3", "--json")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(open_store(f"{s3_bucket}/dst"))
    paths = [e.path for e in manifest.files]
    # No rename on S3: the files live under the attempt prefix the manifest names.
    assert all(p.split("/", 1)[0].startswith("ckptkit-") for p in paths), paths
    got = _trees(f"{s3_bucket}/dst", paths, tmp_path)
    assert list(got) == list(expected)
    for name in expected:
        assert_same_tree(got[name], expected[name], name)
    assert run_cli("verify", f"{s3_bucket}/dst").exit_code == 0


def _asked(proxy: Any, sizes: dict[str, int]) -> int:
    """Bytes of the source asked for through the proxy; every GET of it must name a range."""
    asked = 0
    for entry in proxy.log:
        path = entry.path.split("?")[0]
        if entry.method != "GET" or "/src/" not in path:
            continue
        key = path.split("/src/", 1)[1]
        header = entry.headers.get("range")
        assert header is not None, f"a whole-object GET of {key}"
        start, end = (int(x) for x in header.removeprefix("bytes=").split("-"))
        asked += min(end, sizes[key] - 1) - start + 1
    return asked


def _tensor_bytes(tag_dir: Path) -> int:
    storages = {}
    for path in tag_dir.iterdir():
        for value in _leaves(torch.load(path, weights_only=False)):
            storages[(path.name, value.untyped_storage().data_ptr())] = value.untyped_storage().nbytes()
    return sum(storages.values())


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _leaves(v)]
    return []


def test_s3_source_is_read_by_ranges(
    deepspeed_checkpoints: Any, faulty_s3: Any, faulty_bucket: str, tmp_path: Path
) -> None:
    """Every GET of the source names a range. Beyond the symbolic read of each file's zip
    directory and pickle (a bounded cost per file), the source's tensor bytes are fetched twice:
    once for the certificate and once to copy them, whatever the number of new ranks."""
    from ckptkit.ops.zero_source import read_zero

    case = deepspeed_checkpoints["z3_bf16_warmuplr"]
    sizes = _upload(case.save_dir, f"{faulty_bucket}/src")
    faulty_s3.reset_counters()
    read_zero(f"{faulty_bucket}/src", endpoint_url=faulty_s3.url)
    metadata = _asked(faulty_s3, sizes)
    faulty_s3.reset_counters()
    reshard_zero(f"{faulty_bucket}/src", f"{faulty_bucket}/dst", world_size=3, endpoint_url=faulty_s3.url)
    total = _asked(faulty_s3, sizes)
    files = len(list(case.tag_dir.iterdir()))
    assert metadata <= files * (32 << 10)
    # Coalesced reads may take the few bytes of zip headers between two tensors: 1 KiB per file.
    assert total - metadata <= 2 * _tensor_bytes(case.tag_dir) + files * 1024, (total, metadata)

    # A committed DST is refused before any tensor byte of the source is read.
    faulty_s3.reset_counters()
    with pytest.raises(CommitConflictError):
        reshard_zero(f"{faulty_bucket}/src", f"{faulty_bucket}/dst", world_size=3, endpoint_url=faulty_s3.url)
    assert _asked(faulty_s3, sizes) == metadata


# --- 6. the save dir around the tag: RNG states and other files ------------------------------------


def test_rng_states_follow_the_rule_and_save_dir_files_are_carried(
    deepspeed_checkpoints: Any, tmp_path: Path
) -> None:
    case = deepspeed_checkpoints["z1_fp16_steplr"]
    src = tmp_path / "src"
    shutil.copytree(case.save_dir, src)
    rng = {}
    for r in range(2):
        torch.save(
            {"python": r, "torch": torch.Generator().manual_seed(r).get_state()}, src / f"rng_state_{r}.pth"
        )
        rng[r] = (src / f"rng_state_{r}.pth").read_bytes()
    (src / "trainer_state.json").write_text('{"global_step": 4}')
    assert (src / "zero_to_fp32.py").exists()

    result = run_cli("reshard", str(src), str(tmp_path / "three"), "--world-size", "3", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["rng_states"] == {"0": 0, "1": 1, "2": 0}
    three = tmp_path / "three"
    assert [(three / f"rng_state_{r}.pth").read_bytes() for r in range(3)] == [rng[0], rng[1], rng[0]]
    assert (three / "trainer_state.json").read_bytes() == (src / "trainer_state.json").read_bytes()
    assert not (three / "zero_to_fp32.py").exists() and not (three / "zero_to_torch.py").exists()
    assert sorted(p.name for p in three.iterdir()) == sorted(
        [
            case.tag,
            "latest",
            "ckptkit-manifest.json",
            "trainer_state.json",
            *(f"rng_state_{r}.pth" for r in range(3)),
        ]
    )
    assert read_manifest(open_store(three)).metadata["reshard"]["rng_states"] == {"0": 0, "1": 1, "2": 0}
    text = run_cli("reshard", str(src), str(tmp_path / "text"), "--world-size", "3")
    assert "RNG states (new rank <- saved rank): 0<-0, 1<-1, 2<-0" in text.stdout

    reshard_zero(src, tmp_path / "one", world_size=1)
    one = tmp_path / "one"
    assert sorted(p.name for p in one.glob("rng_state_*")) == ["rng_state_0.pth"]
    assert (one / "rng_state_0.pth").read_bytes() == rng[0]
    assert run_cli("verify", str(one)).exit_code == 0
