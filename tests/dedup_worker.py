"""Deduplicated roots for the blob protocol's tests: states whose tensors recur across steps,
the child-process bodies of the crash and concurrency tests, and the checks they end with."""

from __future__ import annotations

import time

import torch

from ckptkit import CheckpointManager
from ckptkit.blobs import digest_of_key, referenced_blobs
from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.commit import delete_checkpoint
from ckptkit.manifest import BLOB_DIR
from ckptkit.ops.gc import collect_garbage, find_debris
from ckptkit.ops.verify import verify_tree
from ckptkit.storage import Store, open_store

MIB_FLOATS = (256, 1024)  # 1 MiB of float32: a tensor of its own shard, so a blob of its own


def state_for_step(step: int) -> dict[str, object]:
    """A frozen base (the same bytes every step), a tensor that recurs every 3 steps (so a save
    reuses a blob whose last checkpoint retention may just have deleted), and per-step state."""
    return {
        "step": step,
        "model": {
            "base.0": torch.full(MIB_FLOATS, 0.5),
            "base.1": torch.full(MIB_FLOATS, 1.5),
            "cycle": torch.full(MIB_FLOATS, float(step % 3)),
            "adapter": torch.full((16, 16), float(step)),
        },
        "optimizer": {"exp_avg": torch.full(MIB_FLOATS, float(-step)), "lr": 1e-3 * step},
    }


def assert_same_state(loaded: dict[str, object], expected: dict[str, object], where: str) -> None:
    assert loaded["step"] == expected["step"], where
    for group in ("model", "optimizer"):
        for key, value in expected[group].items():  # type: ignore[union-attr]
            got = loaded[group][key]  # type: ignore[index]
            if isinstance(value, torch.Tensor):
                assert torch.equal(got, value), (where, group, key)
            else:
                assert got == value, (where, group, key)


def blob_keys(root: Store) -> set[str]:
    return {i.key for i in root.child(BLOB_DIR).list("") if digest_of_key(i.key) is not None}


def assert_root_whole(root_url: str) -> list[int]:
    """Every committed checkpoint verifies and loads bit for bit; returns their steps."""
    store = open_store(root_url)
    committed = [c for c in list_checkpoints(store) if c.committed]
    if committed:
        bad = [r for r in verify_tree(store) if not r.ok]
        assert not bad, [(r.url, [f.message for f in r.findings]) for r in bad]
    manager = CheckpointManager(store)
    for info in committed:
        assert info.step is not None
        assert_same_state(manager.restore(info.step), state_for_step(info.step), info.name)
    return [c.step for c in committed if c.step is not None]


def assert_blobs_of_committed_exist(store: Store) -> None:
    """Each blob a committed manifest names is in the blob store (a cheap check, no hashing).
    Manifests first, blobs after: a save committing meanwhile wrote its blobs before its manifest."""
    named = {}
    for info in list_checkpoints(store):
        if info.committed:
            named[info.name] = {e.blob for e in read_manifest(store.child(info.name)).blobs}
    present = blob_keys(store)
    missing = {name: sorted(blobs - present) for name, blobs in named.items() if blobs - present}
    assert not missing, missing


def assert_clean_after_gc(root_url: str) -> None:
    """After ``gc --grace 0``: no debris, no pin, no lock, and no blob that nothing references."""
    store = open_store(root_url)
    collect_garbage(store, grace_seconds=0)
    assert find_debris(store) == []
    assert blob_keys(store) == referenced_blobs(store)
    leftovers = [i.key for i in store.child(BLOB_DIR).list("") if digest_of_key(i.key) is None]
    assert leftovers == [], leftovers  # pins (under PIN_DIR) and gc.lock


# --- child processes -----------------------------------------------------------------------------


def save_forever(root: str, first_step: int, ready, gc_every: int = 0) -> None:
    """Save step after step into a dedup root until killed; retention keeps the newest three
    (and sweeps); with ``gc_every``, a ``gc --grace 0`` runs after every that many saves."""
    manager = CheckpointManager(root, keep_last=3, dedup=True)
    ready.set()
    step = first_step
    while True:
        manager.save(step, state_for_step(step))
        if gc_every and step % gc_every == 0:
            collect_garbage(manager.root, grace_seconds=0)
        step += 1


def save_steps(root: str, steps: list[int], errors) -> None:
    """Save ``steps`` into a dedup root (no retention: another process deletes)."""
    manager = CheckpointManager(root, dedup=True)
    try:
        for step in steps:
            manager.save(step, state_for_step(step))
    except BaseException as exc:  # the parent asserts there were none
        errors.put(f"save: {type(exc).__name__}: {exc}")
        raise


def retain_and_sweep(root: str, stop, errors, rounds) -> None:
    """Until ``stop``: delete all but the newest two committed checkpoints, run ``gc`` (default
    grace: the savers' pins are live), and check every committed checkpoint still has its blobs.
    Only this process deletes, so what it sees committed must be whole."""
    store = open_store(root)
    done = 0
    try:
        while not stop.is_set() or done == 0:
            committed = [c for c in list_checkpoints(store) if c.committed]
            for info in committed[:-2]:
                delete_checkpoint(store, info.name)
            collect_garbage(store)
            assert_blobs_of_committed_exist(store)
            done += 1
            time.sleep(0.01)
    except BaseException as exc:
        errors.put(f"sweeper: {type(exc).__name__}: {exc}")
        raise
    finally:
        rounds.put(done)
