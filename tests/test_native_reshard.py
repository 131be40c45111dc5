"""FlatShard, and per-rank native checkpoints resharded on load at another world size.

The multi-rank tests fork real gloo ranks (the harness of tests/test_distributed_save.py): a
state of a replicated model plus optimizer partitions saved as FlatShards at 2 ranks is loaded
at 1 (this process), 3 and 4 ranks, and each rank's slices are compared bit for bit with the
slice of the logical tensor that the rule gives it.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit import FlatShard
from ckptkit.catalog import read_manifest
from ckptkit.distributed import TopologyMismatchError
from ckptkit.errors import FormatError, TruncatedError, UnstorableValueError
from ckptkit.native import document as native_document
from ckptkit.storage import open_store
from tests.test_distributed_save import run_ranks

NUMEL = 1001  # odd: at 2 ranks the tail rank holds 500, at 3 ranks 333 (the last: 335 - 1)
MASTER_SHAPE = (7, 11, 13)  # 1001 elements
SMALL_SHARD = 3000  # bytes: several shard files per rank, so slices cross files


def bits(tensor: torch.Tensor) -> bytes:
    """Every byte of a tensor's elements in order: bit-for-bit comparison, NaNs included."""
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


def logical() -> dict[str, torch.Tensor]:
    """The whole tensors the ranks partition, the same in every process."""
    gen = torch.Generator().manual_seed(14)
    master = torch.randn(MASTER_SHAPE, generator=gen)
    master.view(-1)[5] = float("nan")  # a NaN payload must survive too
    return {
        "master": master,
        "exp_avg": torch.randn(NUMEL, generator=gen),
        "exp_avg_sq": torch.rand(NUMEL, generator=gen).to(torch.bfloat16),
    }


def replica() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"fc.weight": torch.randn(5, 9, generator=gen), "fc.bias": torch.randn(5, generator=gen)}


def training_state(rank: int, world: int) -> dict[str, Any]:
    """What a hand-written ZeRO-1 loop saves on rank ``rank`` of ``world``."""
    model = replica()
    return {
        "model": model,
        "optim": {name: FlatShard.cut(whole, rank, world) for name, whole in logical().items()},
        # A FlatShard that views a replica tensor: its bytes lie inside the weight's entry.
        "weight_part": FlatShard.cut(model["fc.weight"], rank, world),
        "step": 7,
    }


def expected_slice(whole: torch.Tensor, rank: int, world: int) -> bytes:
    start, end = FlatShard.span(whole.numel(), rank, world)
    return bits(whole.reshape(-1)[start:end])


def check_rank(state: dict[str, Any], rank: int, world: int) -> list[str]:
    """What in ``state`` is not what rank ``rank`` of ``world`` should hold; [] when all is."""
    problems = []
    wholes = {**logical(), "weight_part": replica()["fc.weight"]}
    shards = {**state["optim"], "weight_part": state["weight_part"]}
    for name, shard in shards.items():
        whole = wholes[name]
        start, _ = FlatShard.span(whole.numel(), rank, world)
        if not isinstance(shard, FlatShard):
            problems.append(f"{name}: {type(shard).__name__}, not a FlatShard")
        elif (shard.shape, shard.offset, shard.tensor.dtype) != (tuple(whole.shape), start, whole.dtype):
            problems.append(f"{name}: {shard!r} {shard.tensor.dtype}")
        elif bits(shard.tensor) != expected_slice(whole, rank, world):
            problems.append(f"{name}: the elements differ")
    model = replica()
    if state["model"].keys() != model.keys() or any(bits(state["model"][k]) != bits(model[k]) for k in model):
        problems.append("model: the replica differs")
    if state["step"] != 7:
        problems.append(f"step: {state['step']!r}")
    return problems


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _watch_warnings() -> Warnings:
    handler = Warnings()
    logging.getLogger("ckptkit").addHandler(handler)
    return handler


# --- scenarios, run in every forked rank -------------------------------------------------------


def save_at_two(rank: int, world: int, root: str) -> dict[str, Any]:
    ckptkit.save(training_state(rank, world), f"{root}/two", step=7, max_shard_size=SMALL_SHARD)
    return {}


def load_then_save(rank: int, world: int, root: str) -> dict[str, Any]:
    handler = _watch_warnings()
    state = ckptkit.load(f"{root}/two")
    result = {"problems": check_rank(state, rank, world), "warnings": handler.messages}
    # Saved again at this world size as it was loaded: the round trip back to 2 ranks.
    ckptkit.save(state, f"{root}/at-{world}", step=7, max_shard_size=SMALL_SHARD)
    return result


def load_round_trip(rank: int, world: int, root: str) -> dict[str, Any]:
    state = ckptkit.load(f"{root}/at-3")
    original = ckptkit.load(f"{root}/two")
    same = [  # by bytes: FlatShard equality is torch.equal's, for which a NaN equals nothing
        name
        for name, saved in original["optim"].items()
        if (state["optim"][name].shape, state["optim"][name].offset) == (saved.shape, saved.offset)
        and bits(state["optim"][name].tensor) == bits(saved.tensor)
    ]
    # At the saved world size each rank gets back the FlatShards it saved.
    return {"problems": check_rank(state, rank, world) + check_rank(original, rank, world), "same": same}


def save_bad_partitions(rank: int, world: int, root: str) -> dict[str, Any]:
    """Per-rank checkpoints that cannot be resharded, each wrong in one way."""
    whole = torch.arange(7, dtype=torch.float32)
    good = FlatShard.cut(whole, rank, world)  # [0, 4) and [4, 7)
    tail = {"overlap": 3, "gap": 5}
    cases: dict[str, Any] = {
        name: {"m": torch.ones(2), "p": good if rank == 0 else FlatShard(whole[at:], shape=(7,), offset=at)}
        for name, at in tail.items()
    }
    cases["short"] = {"p": good if rank == 0 else FlatShard(whole[4:6], shape=(7,), offset=4)}
    cases["structure"] = {"m": torch.ones(2), "p": good, **({"extra": 1} if rank == 1 else {})}
    cases["replica-shape"] = {"m": torch.ones(2 + rank), "p": good}
    cases["dtype"] = {"p": good if rank == 0 else FlatShard(whole[4:].double(), shape=(7,), offset=4)}
    cases["no-flat-shard"] = {"m": torch.full((3,), float(rank)), "rank": rank}
    # "tiny": one element, so rank 1 saves an empty slice (a tensor without bytes).
    cases["good"] = {"m": torch.ones(2), "p": good, "tiny": FlatShard.cut(torch.tensor([5.0]), rank, world)}
    for name, state in cases.items():
        ckptkit.save(state, f"{root}/{name}")
    return {}


# --- FlatShard itself --------------------------------------------------------------------------


def test_span_is_zero3s_rule_and_tiles_every_tensor() -> None:
    assert [FlatShard.span(1001, r, 2) for r in range(2)] == [(0, 501), (501, 1001)]
    assert [FlatShard.span(1001, r, 3) for r in range(3)] == [(0, 334), (334, 668), (668, 1001)]
    assert [FlatShard.span(5, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]  # the last: none
    assert [FlatShard.span(0, r, 2) for r in range(2)] == [(0, 0), (0, 0)]
    for numel in (0, 1, 6, 7, 1001):
        for world in range(1, 9):
            spans = [FlatShard.span(numel, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == numel
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    with pytest.raises(ValueError, match="no rank 2 of 2"):
        FlatShard.span(10, 2, 2)


def test_a_flat_shard_checks_what_it_holds() -> None:
    whole = torch.arange(12.0).reshape(3, 4)
    shard = FlatShard.cut(whole, 1, 2)
    assert (shard.shape, shard.offset, shard.stop, shard.numel) == ((3, 4), 6, 12, 12)
    assert shard.tensor.data_ptr() == whole.data_ptr() + 6 * 4  # a view, not a copy
    assert shard == FlatShard(torch.arange(6.0, 12.0), shape=torch.Size([3, 4]), offset=6)
    assert shard != FlatShard(torch.arange(6.0, 12.0).double(), shape=(3, 4), offset=6)  # dtype counts
    assert shard != FlatShard(torch.arange(6.0, 12.0), shape=(12,), offset=6)
    with pytest.raises(ValueError, match="must be 1-D"):
        FlatShard(whole, shape=(3, 4), offset=0)
    with pytest.raises(ValueError, match=r"elements \[8, 14\) lie outside a tensor of shape \[3, 4\]"):
        FlatShard(torch.zeros(6), shape=(3, 4), offset=8)
    with pytest.raises(ValueError, match="offset must be a non-negative int"):
        FlatShard(torch.zeros(1), shape=(3,), offset=-1)


def test_a_flat_shard_round_trips_and_marks_the_tree_as_version_2(tmp_path: Path) -> None:
    whole = torch.randn(4, 5)
    state = {"p": FlatShard.cut(whole, 1, 3), "q": FlatShard(whole.reshape(-1)[::2], shape=(20,), offset=0)}
    ckptkit.save(state, tmp_path / "ckpt")
    document = json.loads((tmp_path / "ckpt" / "tree.json").read_text())
    assert document["version"] == 2
    assert document["tree"]["p"] == {"t": "flatshard", "i": 0, "shape": [4, 5], "offset": 7}
    loaded = ckptkit.load(tmp_path / "ckpt")
    assert loaded == state  # FlatShard equality: shape, offset, dtype and elements
    # The strided slice (every other element) was stored contiguous: a resharding load reads ranges.
    assert loaded["q"].tensor.stride() == (1,) and bits(loaded["q"].tensor) == bits(whole.reshape(-1)[::2])

    ckptkit.save({"w": whole}, tmp_path / "plain")
    # Without a FlatShard the tree stays version 1, which older readers read.
    assert json.loads((tmp_path / "plain" / "tree.json").read_text())["version"] == 1


def test_a_reader_of_version_1_refuses_a_flat_shard_tree_as_newer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckptkit.save({"p": FlatShard(torch.ones(2), shape=(4,), offset=2)}, tmp_path / "ckpt")
    monkeypatch.setattr(native_document, "FORMAT_VERSION", 1)  # the check as ckptkit 0.1.0 has it
    message = "tree.json: format version 2; this ckptkit reads up to 1 (a newer ckptkit wrote it"
    with pytest.raises(FormatError, match=re.escape(message)):
        ckptkit.load(tmp_path / "ckpt")


def test_only_a_tensor_is_storable_in_a_flat_shard(tmp_path: Path) -> None:
    import numpy as np

    with pytest.raises(UnstorableValueError, match=r"state\[\"p\"\].*FlatShard of numpy.ndarray"):
        ckptkit.save({"p": FlatShard(np.zeros(2), shape=(2,), offset=0)}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"offset": 3}, "'flatshard' node: elements [3, 5) lie outside its shape [4]"),
        ({"shape": [1.5]}, "'flatshard' node: malformed shape"),
        ({"i": 1}, "'flatshard' node: tensor 1 is [2, 2] stride [2, 1], not a contiguous 1-D slice"),
    ],
)
def test_a_damaged_flat_shard_node_is_refused(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    ckptkit.save({"p": FlatShard(torch.ones(2), shape=(4,), offset=2), "m": torch.ones(2, 2)}, tmp_path / "c")
    tree = tmp_path / "c" / "tree.json"
    document = json.loads(tree.read_text())
    document["tree"]["p"].update(edit)
    tree.write_text(json.dumps(document))
    with pytest.raises(FormatError, match=re.escape(message)):
        ckptkit.load(tmp_path / "c")


# --- the plan and the reader alone, on rank directories written by one process ----------------------


def _rank_stores(tmp_path: Path, states: list[Any]) -> list[Any]:
    for rank, state in enumerate(states):
        ckptkit.save(state, tmp_path / f"rank-{rank:05d}", max_shard_size=SMALL_SHARD)
    return [open_store(tmp_path / f"rank-{rank:05d}") for rank in range(len(states))]


def test_each_new_rank_reads_its_span_from_the_saved_slices(tmp_path: Path) -> None:
    from ckptkit.native.repartition import plan_repartition
    from ckptkit.native.repartition_reader import read_repartitioned

    stores = _rank_stores(tmp_path, [training_state(rank, 2) for rank in range(2)])
    for world in (1, 3, 4):
        for rank in range(world):
            plan = plan_repartition(stores, rank, world)
            assert plan is not None
            assert check_rank(read_repartitioned(plan, mmap=False), rank, world) == []
    # Rank 1 of 3 holds [334, 668) of the 1001 elements: 167 from each saved slice, [0, 501) and
    # [501, 1001).
    plan = plan_repartition(stores, 1, 3)
    wanted = ((NUMEL,), "float32")  # exp_avg: the only float32 FlatShard of NUMEL elements
    (exp_avg,) = [n for n in plan.slices.values() if (n.like.shape, n.like.record.dtype) == wanted]
    assert [(p.rank, p.start, p.count, p.at) for p in exp_avg.pieces] == [(0, 334, 167, 0), (1, 0, 167, 167)]


def test_a_list_of_another_length_is_named(tmp_path: Path) -> None:
    from ckptkit.native.repartition import plan_repartition

    whole = torch.arange(6.0)
    states = [{"p": FlatShard.cut(whole, r, 2), "ids": list(range(2 + r))} for r in range(2)]
    message = 'state["ids"] has 2 items on rank 0 but 3 items on rank 1'
    with pytest.raises(FormatError, match=re.escape(message)):
        plan_repartition(_rank_stores(tmp_path, states), 0, 3)
    assert plan_repartition(_rank_stores(tmp_path / "plain", [{"w": torch.ones(1)}] * 2), 0, 3) is None


# --- resharding on load, real gloo ranks ---------------------------------------------------------


def _ok(codes: list[Any], results: list[Any]) -> list[dict[str, Any]]:
    assert codes == [0] * len(codes), results
    return results


@pytest.mark.slow
def test_saved_at_2_loads_at_1_3_and_4_and_round_trips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "run")
    _ok(*run_ranks(save_at_two, 2, root, tmp_path / "out2"))
    assert read_manifest(open_store(root).child("two")).topology["world_size"] == 2

    # This process is a job of one rank: it gets every element, and one warning says why.
    with caplog.at_level(logging.WARNING, logger="ckptkit"):
        whole = ckptkit.load(f"{root}/two")
    assert check_rank(whole, 0, 1) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{open_store(root).url}/two: saved by 2 ranks, loaded by 1: resharding on load (each rank "
        "reads its slice of every FlatShard, and rank 0's copy of the rest)"
    ]
    # rank= still reads a saved rank's own state; with world_size= what a rank of that job gets.
    assert check_rank(ckptkit.load(f"{root}/two", rank=1), 1, 2) == []
    assert check_rank(ckptkit.load(f"{root}/two", rank=2, world_size=3), 2, 3) == []
    assert check_rank(ckptkit.load(f"{root}/two", rank=3, world_size=4), 3, 4) == []
    assert list(ckptkit.load(f"{root}/two", keys=["optim"], rank=0, world_size=3)) == ["optim"]

    for world in (3, 4):
        results = _ok(*run_ranks(load_then_save, world, root, tmp_path / f"out{world}"))
        assert [r["problems"] for r in results] == [[]] * world
        assert len(results[0]["warnings"]) == 1 and "saved by 2 ranks, loaded by" in results[0]["warnings"][0]
        assert all(r["warnings"] == [] for r in results[1:])  # rank 0 alone says it

    back = _ok(*run_ranks(load_round_trip, 2, root, tmp_path / "back"))
    assert [r["problems"] for r in back] == [[], []]
    assert all(r["same"] == ["master", "exp_avg", "exp_avg_sq"] for r in back)  # 2 -> 3 -> 2, bit for bit


@pytest.mark.slow
def test_what_cannot_be_resharded_is_refused_naming_the_problem(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _ok(*run_ranks(save_bad_partitions, 2, root, tmp_path / "out"))
    url = open_store(root).url
    refusals = {
        "overlap": (
            'state["p"]: the FlatShards of the 2 ranks overlap: elements [3, 4) are held by rank 0 and rank 1'
        ),
        "gap": 'state["p"]: the FlatShards of the 2 ranks leave elements [4, 5) of 7 uncovered',
        "short": 'state["p"]: the FlatShards of the 2 ranks leave elements [6, 7) of 7 uncovered',
        "structure": "state has the key 'extra' on rank 1 but not on rank 0",
        "replica-shape": 'state["m"] is a tensor of float32 [2] on rank 0 but float32 [3] on rank 1',
        "dtype": 'state["p"] is a FlatShard of float32 [7] on rank 0 but float64 [7] on rank 1',
    }
    for name, message in refusals.items():
        with pytest.raises(FormatError) as caught:
            ckptkit.load(f"{root}/{name}")
        assert str(caught.value).startswith(f"{url}/{name}: cannot reshard on load: {message}"), caught.value

    # Per-rank state without a FlatShard: refused as before, pointing at FlatShard.
    with pytest.raises(TopologyMismatchError) as caught:
        ckptkit.load(f"{root}/no-flat-shard")
    refusal = f"{url}/no-flat-shard: saved by 2 ranks, each with its own state; this job has 1 rank(s)."
    assert str(caught.value).startswith(refusal)
    assert "save what is partitioned across ranks as ckptkit.FlatShard" in str(caught.value)
    assert ckptkit.load(f"{root}/no-flat-shard", rank=1)["rank"] == 1
    with pytest.raises(TopologyMismatchError, match="world_size=3 was asked for"):
        ckptkit.load(f"{root}/no-flat-shard", rank=0, world_size=3)

    good = ckptkit.load(f"{root}/good", rank=0, world_size=1)
    assert bits(good["p"].tensor) == bits(torch.arange(7, dtype=torch.float32))
    assert good["tiny"] == FlatShard(torch.tensor([5.0]), shape=(1,), offset=0)
    last = ckptkit.load(f"{root}/good", rank=7, world_size=8)  # ceil(7/8) = 1: rank 7 holds none
    assert last["p"] == FlatShard(torch.zeros(0), shape=(7,), offset=7)
    assert last["tiny"] == FlatShard(torch.zeros(0), shape=(1,), offset=1)
    # A saved slice whose shard lost its end: the rank that needs those bytes says so.
    shard = next((tmp_path / "run" / "good" / "rank-00001").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(TruncatedError, match=r"^rank 1: tensors-\d+-of-\d+\.safetensors"):
        ckptkit.load(f"{root}/good", rank=0, world_size=1)
    # A rank whose slice lies in the intact rank 0 alone reads no byte of rank 1's shard.
    assert bits(ckptkit.load(f"{root}/good", rank=0, world_size=3)["p"].tensor) == bits(torch.arange(3.0))


BIG = 300_001  # elements of each partitioned tensor in the S3 case: 1.2 MB of float32


def big_logical() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {name: torch.randn(BIG, generator=gen) for name in ("master", "exp_avg", "exp_avg_sq")}


def save_big_at_two(rank: int, world: int, root: str) -> dict[str, Any]:
    state = {
        "model": replica(),
        "optim": {name: FlatShard.cut(whole, rank, world) for name, whole in big_logical().items()},
    }
    ckptkit.save(state, f"{root}/big", step=1)
    return {}


@pytest.mark.slow
def test_on_s3_a_rank_reads_only_the_ranges_of_its_slices(s3_bucket: str, faulty_s3, tmp_path: Path) -> None:
    import s3fs  # noqa: F401  (imported once here rather than in every forked rank)

    root = f"{s3_bucket}/run"
    _ok(*run_ranks(save_big_at_two, 2, root, tmp_path / "out"))
    faulty_s3.reset_counters()
    # Rank 1 of 3, through the counting proxy: its slice [100001, 200002) of each tensor lies
    # across both saved ranks' slices ([0, 150001) and [150001, 300001)).
    state = ckptkit.load(f"{root}/big", rank=1, world_size=3, endpoint_url=faulty_s3.url)
    stats = faulty_s3.stats()
    for name, whole in big_logical().items():
        assert state["optim"][name].offset == 100_001
        assert bits(state["optim"][name].tensor) == expected_slice(whole, 1, 3), name
    # A third of the 3.6 MB of slices, plus the replica and metadata (kilobytes).
    needed = 3 * 100_001 * 4
    assert needed <= stats.bytes_from_upstream < needed + 16_000, stats
    shard_reads = [e for e in faulty_s3.log if e.method == "GET" and ".safetensors" in e.path]
    assert shard_reads and all("range" in e.headers for e in shard_reads)  # never a whole shard


# --- the guide's ZeRO-1 loop, run as written ----------------------------------------------------------

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "distributed.md"


def _guide_loop(root: str) -> str:
    """The example of docs/guides/distributed.md's resharding section, saving under ``root``."""
    example = r"```python\n(import torch\nimport torch.distributed as dist\n.*?)```"
    found = re.search(example, GUIDE.read_text(), re.S)
    assert found is not None, "the guide lost its ZeRO-1 example"
    return found.group(1).replace('dist.init_process_group("gloo")\n', "").replace("s3://bucket/run", root)


def run_guide(steps: int) -> Any:
    """A scenario: the guide's loop trains ``steps`` steps from scratch and saves, or (0) resumes
    from the latest checkpoint and trains one step; reports the weights and moment slices."""

    def scenario(rank: int, world: int, root: str) -> dict[str, Any]:
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))

        def build_model() -> torch.nn.Module:
            torch.manual_seed(0)
            return torch.nn.Linear(5, 3)

        names: dict[str, Any] = {"build_model": build_model, "loss_fn": lambda m: (m(x) ** 2).sum()}
        exec(_guide_loop(root), names)  # the documented example, as written
        if steps:
            for _ in range(steps):
                names["train_step"]()
            names["save"](steps)
            return {}
        step = names["resume"]()
        resumed = names["moments"]["weight"]["exp_avg"].tolist()
        names["train_step"]()
        return {"step": step, "exp_avg": resumed, "weight": names["model"].weight.reshape(-1).tolist()}

    return scenario


@pytest.mark.slow
def test_the_guides_zero1_loop_resumes_on_another_number_of_ranks(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    _ok(*run_ranks(run_guide(2), 2, root, tmp_path / "train"))
    at_two = _ok(*run_ranks(run_guide(0), 2, root, tmp_path / "two"))
    at_three = _ok(*run_ranks(run_guide(0), 3, root, tmp_path / "three"))
    assert [r["step"] for r in at_three] == [2, 2, 2]
    # Each of the 3 ranks resumed with its third of the moments the 2 ranks hold halves of ...
    assert [len(r["exp_avg"]) for r in at_two] == [8, 7]
    assert [len(r["exp_avg"]) for r in at_three] == [5, 5, 5]
    assert [x for r in at_three for x in r["exp_avg"]] == [x for r in at_two for x in r["exp_avg"]]
    # ... and the step after resuming moves the weights as it does at 2 ranks (the gradient's
    # all-reduce over 3 ranks rounds differently, hence approx).
    assert at_three[0]["weight"] == pytest.approx(at_two[0]["weight"], rel=1e-6)
    assert all(r["weight"] == at_three[0]["weight"] for r in at_three)
