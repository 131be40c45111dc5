"""The commit protocol on every store: visibility, conflicts, aborts, retention-safe deletes."""

from __future__ import annotations

import threading

import pytest

from ckptkit.catalog import latest_checkpoint, list_checkpoints, read_manifest
from ckptkit.commit import CheckpointTransaction, delete_checkpoint, step_dir_name
from ckptkit.errors import CommitConflictError, NotCommittedError
from ckptkit.hashing import digest_bytes
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.storage import Store
from tests.helpers import commit_files, sample_files


def test_commit_makes_checkpoint_visible_with_digests(any_store: Store) -> None:
    files = sample_files(1)
    manifest = commit_files(any_store, "step-00000001", files, step=1)
    assert manifest.step == 1 and manifest.layout == "files"
    reread = read_manifest(any_store.child("step-00000001"))
    assert reread == manifest
    assert len(reread.files) == 3
    for entry in reread.files:
        logical = entry.path.split("/", 1)[1] if entry.path.startswith("ckptkit-") else entry.path
        assert entry.size == len(files[logical])
        assert entry.digest == digest_bytes(files[logical]).digest
        assert any_store.get(f"step-00000001/{entry.path}") == files[logical]


def test_uncommitted_transaction_is_invisible(any_store: Store) -> None:
    txn = CheckpointTransaction(any_store, "step-00000005")
    txn.write("model.bin", b"x" * 1000)
    infos = list_checkpoints(any_store)
    assert all(c.status != "committed" for c in infos)
    assert latest_checkpoint(any_store) is None
    with pytest.raises(NotCommittedError):
        read_manifest(any_store.child("step-00000005"))
    txn.commit(step=5, layout="files")
    assert latest_checkpoint(any_store).name == "step-00000005"


def test_abort_on_exception_removes_written_data(any_store: Store) -> None:
    with pytest.raises(RuntimeError), CheckpointTransaction(any_store, "step-00000002") as txn:
        txn.write("a.bin", b"a" * 100)
        raise RuntimeError("training crashed")
    assert list(any_store.list("")) == []


def test_second_commit_of_same_name_conflicts(any_store: Store) -> None:
    commit_files(any_store, "step-00000003", {"a": b"first"}, step=3)
    with pytest.raises(CommitConflictError):
        commit_files(any_store, "step-00000003", {"a": b"second"}, step=3)
    assert read_manifest(any_store.child("step-00000003")).files[0].size == len(b"first")


def test_concurrent_writers_exactly_one_commits(any_store: Store) -> None:
    # Both transactions start before either commits: the data of one must never clobber the
    # data of the other's committed manifest.
    txns = [CheckpointTransaction(any_store, "step-00000009") for _ in range(2)]
    for i, txn in enumerate(txns):
        txn.write("weights.bin", bytes([i]) * 50_000)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def commit(txn: CheckpointTransaction) -> None:
        barrier.wait()
        try:
            txn.commit(step=9, layout="files")
            outcomes.append("won")
        except CommitConflictError:
            outcomes.append("lost")

    threads = [threading.Thread(target=commit, args=(t,)) for t in txns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost", "won"]
    from ckptkit.ops.verify import verify_checkpoint

    report = verify_checkpoint(any_store.child("step-00000009"))
    assert report.ok, report.findings


def test_latest_is_highest_committed_step(any_store: Store) -> None:
    for step in (1, 10, 2):
        commit_files(any_store, step_dir_name(step), {"f": str(step).encode()}, step=step)
    # An incomplete newer one must not count.
    CheckpointTransaction(any_store, step_dir_name(99)).write("f", b"partial")
    assert latest_checkpoint(any_store).step == 10
    names = [c.name for c in list_checkpoints(any_store) if c.committed]
    assert names == ["step-00000001", "step-00000002", "step-00000010"]


def test_delete_uncommits_first(any_store: Store) -> None:
    commit_files(any_store, "step-00000001", {"f": b"1"}, step=1)
    commit_files(any_store, "step-00000002", {"f": b"2"}, step=2)
    delete_checkpoint(any_store, "step-00000001")
    assert [c.name for c in list_checkpoints(any_store)] == ["step-00000002"]
    assert not any(i.key.startswith("step-00000001") for i in any_store.list(""))


def test_nothing_at_the_final_name_looks_committed_before_commit(any_store: Store) -> None:
    txn = CheckpointTransaction(any_store, "step-00000004")
    txn.write("f", b"data")
    assert not any_store.exists(f"step-00000004/{MANIFEST_NAME}")
    if any_store.capabilities.atomic_rename:
        # Local disk: the data sits in a hidden staging sibling until the rename.
        assert "step-00000004" not in any_store.list_dirs("")
    txn.commit(step=4, layout="files")
    assert any_store.exists(f"step-00000004/{MANIFEST_NAME}")


def test_hashing_works_in_a_forked_child(tmp_path) -> None:
    import multiprocessing

    from ckptkit.hashing import digest_bytes, hashing_pool

    data = b"x" * (200 << 10)
    hashing_pool().submit(int).result()  # the parent's pool exists, with its threads
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_digest_into_file, args=(data, str(tmp_path / "digest")))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the child hung or failed hashing"
    assert (tmp_path / "digest").read_text() == digest_bytes(data).digest


def _digest_into_file(data: bytes, path: str) -> None:
    from ckptkit.hashing import digest_bytes

    with open(path, "w") as f:
        f.write(digest_bytes(data).digest)


def test_store_without_an_atomic_commit_is_refused_before_anything_is_written(tmp_path) -> None:
    """An fsspec store with neither an atomic rename nor a create-only write (here fsspec's own
    "file" filesystem, which ckptkit's LocalStore normally replaces) cannot commit safely: a
    concurrent writer's check-then-write could replace the manifest. It is refused, nothing is
    written."""
    import fsspec

    from ckptkit.errors import PermanentStorageError
    from ckptkit.storage.fsspec_store import FsspecStore

    store = FsspecStore(fsspec.filesystem("file"), "file", str(tmp_path / "root"))
    with pytest.raises(PermanentStorageError, match="cannot commit a checkpoint here"):
        CheckpointTransaction(store, step_dir_name(1))
    assert not (tmp_path / "root").exists()
