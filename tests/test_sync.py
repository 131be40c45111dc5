"""``sync`` between local disk and a real S3 server (moto over HTTP, behind a counting proxy)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptkit.catalog import list_checkpoints, read_manifest
from ckptkit.cli.main import cli
from ckptkit.commit import CheckpointTransaction
from ckptkit.manifest import MANIFEST_NAME
from ckptkit.ops.sync import sync, sync_attempt_id
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from ckptkit.transfer import DIGEST_METADATA_KEY, RetryPolicy
from tests.helpers import commit_files, sample_files

FAST_RETRY = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05)


def make_root(path: Path, steps: tuple[int, ...] = (1, 2, 3)) -> Path:
    root = open_store(path)
    for step in steps:
        commit_files(root, f"step-{step:08d}", sample_files(step), step=step)
    return path


def committed(url: str, **options) -> dict[str, object]:
    store = open_store(url, **options)
    return {c.name: c.manifest for c in list_checkpoints(store) if c.committed}


def assert_verified(url: str, names, **options) -> None:
    store = open_store(url, **options)
    for name in names:
        report = verify_checkpoint(store.child(name))
        assert report.ok, report


@pytest.mark.slow  # several syncs against moto S3
def test_root_round_trip_local_s3_local(tmp_path: Path, faulty_s3, faulty_bucket: str) -> None:
    src = make_root(tmp_path / "src")
    remote = f"{faulty_bucket}/run"
    options = {"endpoint_url": faulty_s3.url}

    report = sync(src, remote, dst_options=options)
    assert report.ok and report.count("committed") == 3
    assert report.bytes_sent == sum(len(d) for s in (1, 2, 3) for d in sample_files(s).values())
    assert_verified(remote, ["step-00000001", "step-00000002", "step-00000003"], **options)
    # The remote manifests are the source's, paths moved under a sync attempt prefix.
    local = committed(str(src))
    for name, manifest in committed(remote, **options).items():
        assert manifest.checkpoint_id == local[name].checkpoint_id
        assert {f.digest for f in manifest.files} == {f.digest for f in local[name].files}
        assert all(f.path.startswith(f"ckptkit-{sync_attempt_id(manifest)}/") for f in manifest.files)

    back = tmp_path / "back"
    report = sync(remote, back, src_options=options, verify=True)
    assert report.ok and report.count("committed") == 3
    for step in (1, 2, 3):
        for path, data in sample_files(step).items():
            assert (back / f"step-{step:08d}" / path).read_bytes() == data
    assert not [p for p in back.iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.slow  # several syncs against moto S3
def test_unchanged_resync_sends_no_data(tmp_path: Path, faulty_s3, faulty_bucket: str) -> None:
    src = make_root(tmp_path / "src")
    remote = f"{faulty_bucket}/run"
    sync(src, remote, dst_options={"endpoint_url": faulty_s3.url})
    faulty_s3.reset_counters()

    report = sync(src, remote, dst_options={"endpoint_url": faulty_s3.url})
    assert report.ok and report.count("up-to-date") == 3 and report.bytes_sent == 0
    assert faulty_s3.bytes_to_upstream == 0  # counted at the server side of the wire
    assert set(faulty_s3.requests) <= {"GET", "HEAD"}


@pytest.mark.slow  # several syncs against moto S3
def test_interrupted_sync_resumes_with_only_the_missing_files(
    tmp_path: Path, faulty_s3, faulty_bucket: str
) -> None:
    src = make_root(tmp_path / "src", steps=(7,))
    manifest = read_manifest(open_store(src).child("step-00000007"))
    remote = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    # What a killed run leaves: two of three files uploaded into the attempt place, no manifest.
    txn = CheckpointTransaction(remote, "step-00000007", attempt=sync_attempt_id(manifest))
    files = sample_files(7)
    for entry in manifest.files:
        if entry.path != "model.bin":
            txn.files.put(entry.path, files[entry.path], metadata={DIGEST_METADATA_KEY: entry.digest})
    assert not committed(remote.url, endpoint_url=faulty_s3.url)
    faulty_s3.reset_counters()

    report = sync(src, remote)
    assert report.ok
    (outcome,) = report.outcomes
    assert (outcome.status, outcome.files_sent, outcome.bytes_sent) == (
        "committed",
        1,
        len(files["model.bin"]),
    )
    assert faulty_s3.bytes_to_upstream < len(files["model.bin"]) + 10_000  # the one file + the manifest
    assert_verified(remote.url, ["step-00000007"], endpoint_url=faulty_s3.url)


def test_a_stale_object_at_the_destination_is_sent_again(
    tmp_path: Path, faulty_s3, faulty_bucket: str
) -> None:
    src = make_root(tmp_path / "src", steps=(2,))
    manifest = read_manifest(open_store(src).child("step-00000002"))
    remote = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    txn = CheckpointTransaction(remote, "step-00000002", attempt=sync_attempt_id(manifest))
    size = len(sample_files(2)["model.bin"])
    txn.files.put("model.bin", b"\0" * size)  # right size, wrong bytes, no digest metadata

    report = sync(src, remote)
    assert report.ok and report.outcomes[0].files_sent == 3
    assert_verified(remote.url, ["step-00000002"], endpoint_url=faulty_s3.url)


def test_local_destination_resume_rehashes_instead_of_trusting_sizes(tmp_path: Path) -> None:
    src = make_root(tmp_path / "src", steps=(4,))
    manifest = read_manifest(open_store(src).child("step-00000004"))
    dst = open_store(tmp_path / "dst")
    txn = CheckpointTransaction(dst, "step-00000004", attempt=sync_attempt_id(manifest))
    files = sample_files(4)
    txn.files.put("model.bin", files["model.bin"])  # complete
    txn.files.put("optim/state.bin", b"x" * len(files["optim/state.bin"]))  # right size, wrong bytes

    report = sync(src, dst)
    assert report.ok and report.outcomes[0].files_sent == 2
    assert (tmp_path / "dst/step-00000004/optim/state.bin").read_bytes() == files["optim/state.bin"]


@pytest.mark.slow  # several syncs against moto S3
def test_single_checkpoint_and_trailing_slash(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src")
    report = sync(src / "step-00000002", f"{s3_bucket}/other/renamed")
    assert report.ok and list(committed(f"{s3_bucket}/other")) == ["renamed"]
    report = sync(f"{s3_bucket}/other/renamed", str(tmp_path / "into") + "/")
    assert report.ok and (tmp_path / "into/renamed" / MANIFEST_NAME).is_file()


def test_corrupt_source_is_not_committed(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src", steps=(1, 2))
    target = src / "step-00000002/model.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))

    report = sync(src, f"{s3_bucket}/run", retry=FAST_RETRY)
    by_name = {o.name: o for o in report.outcomes}
    assert by_name["step-00000001"].status == "committed"
    assert by_name["step-00000002"].status == "failed"
    assert "digest mismatch" in by_name["step-00000002"].detail
    assert report.exit_code == 1
    assert list(committed(f"{s3_bucket}/run")) == ["step-00000001"]


@pytest.mark.slow  # several syncs against moto S3
def test_foreign_directory_is_refused_or_indexed_in_memory(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src", steps=(1,))
    foreign = src / "checkpoint-500"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"\1" * 5000)
    (foreign / "trainer_state.json").write_text(json.dumps({"global_step": 500}))

    report = sync(src, f"{s3_bucket}/run")
    outcome = {o.name: o for o in report.outcomes}["checkpoint-500"]
    assert outcome.status == "refused" and "ckptkit index" in outcome.detail
    assert report.exit_code == 1
    assert list(committed(f"{s3_bucket}/run")) == ["step-00000001"]

    report = sync(src, f"{s3_bucket}/run", index=True)
    assert report.ok
    assert set(committed(f"{s3_bucket}/run")) == {"step-00000001", "checkpoint-500"}
    assert not (foreign / MANIFEST_NAME).exists()  # the source was not written to


@pytest.mark.slow  # several syncs against moto S3
def test_incomplete_save_is_skipped_or_copied_raw(tmp_path: Path, s3_bucket: str) -> None:
    src = open_store(f"{s3_bucket}/src")
    commit_files(src, "step-00000001", sample_files(1), step=1)
    txn = CheckpointTransaction(src, "step-00000002")
    txn.write("model.bin", b"partial")  # a save killed before its commit

    report = sync(src.url, f"{s3_bucket}/dst")
    outcome = {o.name: o for o in report.outcomes}["step-00000002"]
    assert outcome.status == "skipped" and report.ok
    report = sync(src.url, f"{s3_bucket}/dst2", include_incomplete=True)
    outcome = {o.name: o for o in report.outcomes}["step-00000002"]
    assert outcome.status == "copied-uncommitted"
    listing = {c.name: c.status for c in list_checkpoints(open_store(f"{s3_bucket}/dst2"))}
    assert listing == {"step-00000001": "committed", "step-00000002": "incomplete"}


@pytest.mark.slow  # several syncs against moto S3
def test_conflicting_checkpoint_at_destination(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src", steps=(1,))
    theirs = commit_files(open_store(f"{s3_bucket}/run"), "step-00000001", sample_files(99), step=1)
    report = sync(src, f"{s3_bucket}/run")
    assert report.outcomes[0].status == "conflict" and report.exit_code == 2
    assert "different checkpoint" in report.outcomes[0].detail
    assert read_manifest(open_store(f"{s3_bucket}/run/step-00000001")).checkpoint_id == theirs.checkpoint_id


@pytest.mark.slow  # several syncs against moto S3
def test_delete_mirrors_retention_and_refuses_an_empty_source(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src")
    sync(src, f"{s3_bucket}/run")
    shutil.rmtree(src / "step-00000001")

    plan = sync(src, f"{s3_bucket}/run", delete=True, dry_run=True)
    assert [(o.name, o.action) for o in plan.outcomes if o.action == "delete"] == [
        ("step-00000001", "delete")
    ]
    assert len(committed(f"{s3_bucket}/run")) == 3  # a dry run changes nothing

    report = sync(src, f"{s3_bucket}/run", delete=True)
    assert report.ok and set(committed(f"{s3_bucket}/run")) == {"step-00000002", "step-00000003"}

    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "empty"), f"{s3_bucket}/run", "--delete"])
    assert result.exit_code == 2 and "refusing --delete" in result.output
    assert len(committed(f"{s3_bucket}/run")) == 2


def test_dry_run_writes_nothing(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src")
    result = CliRunner().invoke(cli, ["sync", str(src), f"{s3_bucket}/run", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would copy" in result.output and "DRY RUN" in result.output
    assert list(open_store(f"{s3_bucket}/run").list("")) == []


def test_cli_json_and_exit_codes(tmp_path: Path, s3_bucket: str) -> None:
    src = make_root(tmp_path / "src", steps=(1, 2))
    result = CliRunner().invoke(cli, ["sync", str(src), f"{s3_bucket}/run", "--json", "--verify"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and [c["status"] for c in data["checkpoints"]] == ["committed", "committed"]
    assert data["bytes_sent"] == sum(c["bytes_sent"] for c in data["checkpoints"]) > 0

    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "nope"), f"{s3_bucket}/run"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["sync", str(src), "s3://no-such-bucket-ckptkit/run"])
    assert result.exit_code == 4 and "bucket does not exist" in result.output


def test_progress_is_drawn_on_a_terminal_only(tmp_path: Path) -> None:
    import io

    from ckptkit.cli.progress import TerminalProgress

    stream = io.StringIO()
    progress = TerminalProgress(stream)
    report = sync(make_root(tmp_path / "src"), tmp_path / "dst", progress=progress)
    assert report.ok
    text = stream.getvalue()
    assert "files 9/9" in text and "100.0%" in text and "/s" in text
    result = CliRunner().invoke(cli, ["sync", str(tmp_path / "src"), str(tmp_path / "dst2")])
    assert "\r" not in result.output and "ETA" not in result.output  # CliRunner is not a TTY


@pytest.mark.slow  # several syncs against moto S3
def test_deepspeed_latest_follows_its_tag(tmp_path: Path, s3_bucket: str) -> None:
    src = open_store(tmp_path / "ds")
    commit_files(src, "global_step3", sample_files(3), step=3)
    src.put("latest", b"global_step3")
    assert sync(src.url, f"{s3_bucket}/ds").ok
    assert open_store(f"{s3_bucket}/ds").get("latest") == b"global_step3"


def test_local_to_local(tmp_path: Path) -> None:
    src = make_root(tmp_path / "src")
    assert sync(src, tmp_path / "dst", jobs=1).ok
    assert set(committed(str(tmp_path / "dst"))) == {"step-00000001", "step-00000002", "step-00000003"}
    assert os.listdir(tmp_path / "dst/step-00000001") != []


def test_cli_jobs_default_is_the_library_default() -> None:
    from ckptkit.cli.sync_cmd import sync_command
    from ckptkit.ops.sync import DEFAULT_JOBS

    (jobs,) = [p for p in sync_command.params if p.name == "jobs"]
    assert jobs.default == DEFAULT_JOBS


def test_an_uncommitted_directory_at_a_local_destination_is_a_conflict(tmp_path: Path) -> None:
    src = make_root(tmp_path / "src", steps=(5,))
    (tmp_path / "dst/step-00000005").mkdir(parents=True)
    (tmp_path / "dst/step-00000005/leftover.bin").write_bytes(b"raw")
    report = sync(src, tmp_path / "dst")
    (outcome,) = report.outcomes
    assert outcome.status == "conflict" and "uncommitted directory" in outcome.detail
    assert report.exit_code == 2 and outcome.bytes_sent == 0  # refused before copying anything
