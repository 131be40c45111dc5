"""Uploads to S3 through the threaded data path (ckptkit/storage/s3_client.py, s3_multipart.py):
what goes over the wire (seen at the proxy), which credentials sign it, how parts overlap, and
that a failed or interrupted upload leaves neither an object nor a multipart upload behind."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from ckptkit.errors import AccessDeniedError, NotFoundError, StorageError
from ckptkit.ops.sync import sync, sync_attempt_id
from ckptkit.storage import open_store
from ckptkit.storage.s3_client import data_path
from ckptkit.storage.s3_multipart import PARTS_IN_FLIGHT, PARTS_PER_SIZE, part_size
from ckptkit.transfer import DIGEST_METADATA_KEY, RetryPolicy
from tests.helpers import commit_files

MiB = 1 << 20


def body(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def data_requests(proxy, key: str) -> list:
    """The PUT/POST requests the proxy saw for ``key`` (object writes and multipart calls)."""
    return [e for e in proxy.log if e.method in ("PUT", "POST") and key in e.path]


def uploads_in_progress(endpoint: str, bucket_url: str) -> list[dict]:
    bucket = bucket_url.removeprefix("s3://")
    return boto3.client("s3", endpoint_url=endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def raw_object(endpoint: str, bucket_url: str, key: str) -> tuple[bytes, dict[str, str]]:
    answer = boto3.client("s3", endpoint_url=endpoint).get_object(
        Bucket=bucket_url.removeprefix("s3://"), Key=key
    )
    return answer["Body"].read(), answer["Metadata"]


@pytest.mark.slow  # moto over HTTP
@pytest.mark.parametrize("chunk", [3 * MiB, 8 * MiB])  # parts joined from chunks; chunks that are parts
def test_uploads_send_unsigned_payloads_without_checksums(
    faulty_s3, faulty_bucket: str, s3_endpoint: str, chunk: int
) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    data = body(20 * MiB + 5)
    store.put("small.bin", b"s" * 1000)
    store.put("big.bin", chunks(data, chunk), metadata={DIGEST_METADATA_KEY: "blake3-tree:00"})

    small, big = data_requests(faulty_s3, "/run/small.bin"), data_requests(faulty_s3, "/run/big.bin")
    assert [e.method for e in small] == ["PUT"]
    # Create, three parts (8 + 8 + 4 MiB), complete.
    assert [e.method for e in big] == ["POST", "PUT", "PUT", "PUT", "POST"]
    parts = sorted(big[1:4], key=lambda e: int(e.path.split("partNumber=")[1].split("&")[0]))
    assert [int(e.headers["content-length"]) for e in parts] == [8 * MiB, 8 * MiB, 4 * MiB + 5]
    for entry in small + big:
        assert entry.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD", entry.path
        assert not [h for h in entry.headers if h.startswith("x-amz-checksum")], entry.headers
    stored = raw_object(s3_endpoint, faulty_bucket, "run/big.bin")
    assert stored == (data, {DIGEST_METADATA_KEY: "blake3-tree:00"})
    assert raw_object(s3_endpoint, faulty_bucket, "run/small.bin")[0] == b"s" * 1000


@pytest.mark.slow  # moto over HTTP
def test_a_body_of_exactly_one_part_is_one_put_and_one_byte_more_is_two_parts(
    faulty_s3, faulty_bucket: str, s3_endpoint: str
) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    one = body(8 * MiB)
    store.put("one.bin", iter([one]))
    store.put("more.bin", iter([one[: 4 * MiB], one[4 * MiB :], b"!"]))
    assert [e.method for e in data_requests(faulty_s3, "/run/one.bin")] == ["PUT"]
    assert [e.method for e in data_requests(faulty_s3, "/run/more.bin")] == ["POST", "PUT", "PUT", "POST"]
    assert raw_object(s3_endpoint, faulty_bucket, "run/one.bin")[0] == one
    assert raw_object(s3_endpoint, faulty_bucket, "run/more.bin")[0] == one + b"!"


@pytest.mark.slow  # moto over HTTP
def test_signing_and_checksum_settings_given_by_the_user_win(faulty_s3, faulty_bucket: str) -> None:
    store = open_store(
        f"{faulty_bucket}/run",
        endpoint_url=faulty_s3.url,
        config_kwargs={
            "request_checksum_calculation": "when_supported",
            "s3": {"payload_signing_enabled": True},
        },
    )
    store.put("signed.bin", b"payload")
    (put,) = data_requests(faulty_s3, "/run/signed.bin")
    assert put.headers["x-amz-content-sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert "x-amz-checksum-crc32" in put.headers


@pytest.mark.slow  # moto over HTTP
def test_parts_go_up_side_by_side_from_the_pool_and_no_more_than_the_bound(
    faulty_s3, faulty_bucket: str
) -> None:
    faulty_s3.set_latency(0.1)  # each part waits at the proxy, so overlapping parts are seen
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    client = data_path(store.fs).client
    lock, in_flight, most, threads = threading.Lock(), [0], [0], set()

    def started(**_: object) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            threads.add(threading.current_thread().name)

    def ended(**_: object) -> None:
        with lock:
            in_flight[0] -= 1

    client.meta.events.register("before-send.s3.UploadPart", started)
    client.meta.events.register("after-call.s3.UploadPart", ended)
    store.put("big.bin", chunks(body(6 * 8 * MiB), 8 * MiB))

    assert most[0] == PARTS_IN_FLIGHT
    assert all(name.startswith("ckptkit-s3") for name in threads) and len(threads) >= PARTS_IN_FLIGHT
    assert len(data_requests(faulty_s3, "/run/big.bin")) == 1 + 6 + 1


@pytest.mark.slow  # moto over HTTP
def test_part_bodies_are_sent_from_the_callers_buffers_without_copies(faulty_s3, faulty_bucket: str) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    sent: list[object] = []
    data_path(store.fs).client.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append(request.body) if request.method == "PUT" else None
    )
    parts = list(chunks(body(3 * 8 * MiB), 8 * MiB))
    small = body(1000)
    store.put("big.bin", iter(parts))
    store.put("small.bin", small)
    # The very bytes objects given to put: neither joined nor wrapped in a BytesIO and re-read.
    assert len(sent) == 4
    assert all(any(b is p for p in parts) for b in sent[:3]) and sent[3] is small


@pytest.mark.slow  # moto over HTTP
def test_request_wide_parameters_of_the_filesystem_reach_the_operations_that_take_them(
    faulty_s3, faulty_bucket: str
) -> None:
    store = open_store(
        f"{faulty_bucket}/run",
        endpoint_url=faulty_s3.url,
        s3_additional_kwargs={"ServerSideEncryption": "AES256"},
    )
    store.put("big.bin", chunks(body(9 * MiB), 8 * MiB))
    create, part1, part2, complete = data_requests(faulty_s3, "/run/big.bin")
    assert create.headers.get("x-amz-server-side-encryption") == "AES256"
    # UploadPart and CompleteMultipartUpload take no such parameter: it is left out, not refused.
    assert all("x-amz-server-side-encryption" not in e.headers for e in (part1, part2, complete))


@pytest.mark.slow  # moto over HTTP
def test_a_failing_producer_aborts_the_upload(faulty_s3, faulty_bucket: str, s3_endpoint: str) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)

    def producer() -> Iterator[bytes]:
        yield from chunks(body(16 * MiB), 8 * MiB)
        raise ValueError("the source went away")

    with pytest.raises(ValueError, match="the source went away"):  # the caller's own error
        store.put("big.bin", producer())
    with pytest.raises(NotFoundError):
        store.head("big.bin")
    assert uploads_in_progress(s3_endpoint, faulty_bucket) == []
    assert [e.method for e in faulty_s3.log if "uploadId=" in e.path][-1] == "DELETE"  # the abort


@pytest.mark.slow  # moto over HTTP
def test_a_failing_part_aborts_the_upload_and_publishes_nothing(
    faulty_s3, faulty_bucket: str, s3_endpoint: str
) -> None:
    store = open_store(
        f"{faulty_bucket}/run",
        endpoint_url=faulty_s3.url,
        config_kwargs={"retries": {"total_max_attempts": 1}},  # botocore's retries off: fail now
    )
    faulty_s3.set_faults(
        reset_before=1.0, predicate=lambda method, path: method == "PUT" and "partNumber=2" in path
    )
    with pytest.raises(StorageError):
        store.put("big.bin", chunks(body(24 * MiB), 8 * MiB))
    faulty_s3.clear_faults()
    with pytest.raises(NotFoundError):
        store.head("big.bin")
    assert uploads_in_progress(s3_endpoint, faulty_bucket) == []


@pytest.mark.slow  # moto over HTTP
def test_botocore_retries_a_reset_part_and_the_upload_completes(
    faulty_s3, faulty_bucket: str, s3_endpoint: str
) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    faulty_s3.set_faults(
        reset_before=1.0, limit=1, predicate=lambda method, path: method == "PUT" and "partNumber=2" in path
    )
    data = body(24 * MiB)
    store.put("big.bin", chunks(data, 8 * MiB))
    assert faulty_s3.faults["reset_before"] == 1
    assert raw_object(s3_endpoint, faulty_bucket, "run/big.bin")[0] == data


@pytest.mark.slow  # moto over HTTP
def test_a_completion_that_landed_before_its_answer_was_lost_is_not_an_error(
    faulty_s3, faulty_bucket: str, s3_endpoint: str
) -> None:
    """A CompleteMultipartUpload that the server carried out but whose answer never arrived (a
    read timeout while a large object is assembled; here every attempt is reset after the server
    finished it) fails on the client's side however often botocore retries. The object is ours
    (its multipart ETag matches our parts), so the upload succeeded; before, the put failed, and
    the benchmark's 1 GB save to moto died with "Internal Server Error"."""
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    faulty_s3.set_faults(
        reset_after=1.0, predicate=lambda method, path: method == "POST" and "uploadId=" in path
    )
    data = body(24 * MiB, seed=5)
    store.put("big.bin", chunks(data, 8 * MiB))
    assert faulty_s3.faults["reset_after"] >= 1
    faulty_s3.clear_faults()
    assert raw_object(s3_endpoint, faulty_bucket, "run/big.bin")[0] == data


@pytest.mark.slow  # moto over HTTP, botocore's backoff between tries
def test_client_and_ckptkit_retries_add_up_to_a_few_tries_not_a_product_of_three_layers(
    tmp_path: Path, faulty_s3, faulty_bucket: str
) -> None:
    root = open_store(tmp_path / "src")
    commit_files(root, "step-00000001", {"shard.bin": b"x" * 1000}, step=1)
    faulty_s3.set_faults(
        reset_before=1.0, predicate=lambda method, path: method == "PUT" and "shard.bin" in path
    )
    report = sync(
        tmp_path / "src", f"{faulty_bucket}/run", dst_options={"endpoint_url": faulty_s3.url},
        retry=RetryPolicy(2, 0.01, 0.02),
    )
    faulty_s3.clear_faults()
    assert report.exit_code == 4 and "failed 2 time(s), giving up" in report.outcomes[0].detail
    # Each of ckptkit's 2 tries is botocore's 3 (standard mode); s3fs's own retry loop is not
    # in the data path to multiply them again.
    assert len(data_requests(faulty_s3, "shard.bin")) == 2 * 3


INTERRUPTED = """
import os, signal, sys
from ckptkit.storage import open_store

store = open_store(sys.argv[1])

def producer():
    for i in range(8):
        if i == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C with two parts on the wire
        yield bytes([i]) * (8 << 20)

try:
    store.put("big.bin", producer())
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.slow  # moto over HTTP
def test_ctrl_c_mid_upload_leaves_no_object_and_no_multipart_upload(
    faulty_bucket: str, s3_endpoint: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, f"{faulty_bucket}/run"],
        env={**os.environ, "AWS_ENDPOINT_URL": s3_endpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    with pytest.raises(NotFoundError):
        open_store(f"{faulty_bucket}/run").head("big.bin")
    assert uploads_in_progress(s3_endpoint, faulty_bucket) == []


@pytest.mark.slow  # moto over HTTP
def test_sync_of_a_corrupt_source_publishes_nothing(
    tmp_path: Path, faulty_s3, faulty_bucket: str, s3_endpoint: str
) -> None:
    root = open_store(tmp_path / "src")
    manifest = commit_files(root, "step-00000001", {"big.bin": body(20 * MiB)}, step=1)
    source = tmp_path / "src" / "step-00000001" / manifest.files[0].path
    damaged = bytearray(source.read_bytes())
    damaged[-1] ^= 0xFF  # the last byte: detected only after every part was sent
    source.write_bytes(bytes(damaged))

    report = sync(
        tmp_path / "src", f"{faulty_bucket}/run", dst_options={"endpoint_url": faulty_s3.url},
        retry=RetryPolicy(2, 0.01, 0.02),
    )
    assert report.exit_code == 1 and report.outcomes[0].status == "failed"
    assert "digest mismatch" in report.outcomes[0].detail
    attempt = f"run/step-00000001/ckptkit-{sync_attempt_id(manifest)}/"
    bucket = boto3.client("s3", endpoint_url=s3_endpoint)
    listed = bucket.list_objects_v2(Bucket=faulty_bucket.removeprefix("s3://"), Prefix=attempt)
    assert listed.get("KeyCount", 0) == 0
    assert uploads_in_progress(s3_endpoint, faulty_bucket) == []


# --- credentials ---------------------------------------------------------------------------------


def signer(entry) -> str:
    """The access key a request was signed with (from its Authorization header)."""
    return entry.headers["authorization"].split("Credential=", 1)[1].split("/", 1)[0]


@pytest.mark.slow  # moto over HTTP
def test_credentials_from_the_environment_sign_the_data_path(faulty_s3, faulty_bucket: str) -> None:
    # The session's moto fixture put AWS_ACCESS_KEY_ID=testing into the environment.
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    store.put("big.bin", chunks(body(9 * MiB), 8 * MiB))
    store.put("small.bin", b"x")
    requests = data_requests(faulty_s3, "/run/")
    assert len(requests) == 5 and {signer(e) for e in requests} == {os.environ["AWS_ACCESS_KEY_ID"]}


@pytest.mark.slow  # moto over HTTP
def test_credentials_from_storage_options_sign_the_data_path(faulty_s3, faulty_bucket: str) -> None:
    store = open_store(
        f"{faulty_bucket}/run",
        endpoint_url=faulty_s3.url,
        key="option-key",
        secret="option-secret",
        token="tok",
    )
    store.put("big.bin", chunks(body(9 * MiB), 8 * MiB))
    requests = data_requests(faulty_s3, "/run/big.bin")
    assert len(requests) == 4
    assert {signer(e) for e in requests} == {"option-key"}
    assert {e.headers.get("x-amz-security-token") for e in requests} == {"tok"}


@pytest.mark.slow  # moto over HTTP
def test_a_named_profile_signs_the_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faulty_s3, faulty_bucket: str
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text("[trainer]\naws_access_key_id = profile-key\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url, profile="trainer")
    store.put("small.bin", b"x")
    (put,) = data_requests(faulty_s3, "/run/small.bin")
    assert signer(put) == "profile-key"


@pytest.mark.slow  # moto over HTTP
def test_anonymous_access_sends_unsigned_requests(faulty_s3, faulty_bucket: str) -> None:
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url, anon=True)
    store.put("small.bin", b"x")
    (put,) = data_requests(faulty_s3, "/run/small.bin")
    assert "authorization" not in put.headers


@pytest.mark.slow  # moto over HTTP
@pytest.mark.parametrize("streamed", [False, True])
def test_missing_credentials_are_access_denied_with_the_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faulty_s3, faulty_bucket: str, streamed: bool
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    data = chunks(body(9 * MiB), 8 * MiB) if streamed else b"x"
    with pytest.raises(AccessDeniedError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID") as caught:
        store.put("object.bin", data)
    assert f"{faulty_bucket}/run/object.bin" in str(caught.value)
    assert data_requests(faulty_s3, "/run/object.bin") == []  # refused before anything was sent


# --- part sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "size"),
    [(1, 8 * MiB), (PARTS_PER_SIZE, 8 * MiB), (PARTS_PER_SIZE + 1, 16 * MiB), (10_000, 8 * MiB << 9)],
)
def test_part_sizes_double_every_thousand_parts(number: int, size: int) -> None:
    assert part_size(number) == size


def test_ten_thousand_parts_hold_more_than_eight_terabytes() -> None:
    assert sum(part_size(n) for n in range(1, 10_001)) > 8 * 10**12


# --- memory ----------------------------------------------------------------------------------------

# VmHWM, not ru_maxrss: on Linux ru_maxrss keeps the forking parent's high-water mark across exec.
MEASURE_STREAMS = """
import sys, threading
from ckptkit.storage import open_store

def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

def blocks(n):  # fresh 8 MiB buffers, as reads of a file give them
    return (bytes([i % 256]) * (8 << 20) for i in range(n))

store = open_store(sys.argv[1])
streams = int(sys.argv[2])
store.put("warm.bin", b"x")  # the client and its service model are loaded before the baseline
before = peak()
threads = [threading.Thread(target=store.put, args=(f"big-{i}.bin", blocks(32))) for i in range(streams)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(before, peak())
"""


@pytest.mark.slow  # 512 MiB through moto
@pytest.mark.parametrize("streams", [1, 2])
def test_peak_memory_is_bounded_per_stream_not_by_the_object_size(
    s3_endpoint: str, faulty_bucket: str, streams: int
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_STREAMS, f"{faulty_bucket}/run", str(streams)],
        env={**os.environ, "AWS_ENDPOINT_URL": s3_endpoint},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    growth = (after - before) >> 20
    # Each stream holds the part it is filling and PARTS_IN_FLIGHT parts on the wire (8 MiB each),
    # whatever the size of the object (256 MiB here).
    assert growth <= 64 * streams, f"peak RSS grew by {growth} MiB for {streams} stream(s) of 256 MiB"
    store = open_store(f"{faulty_bucket}/run")
    assert [store.head(f"big-{i}.bin").size for i in range(streams)] == [256 * MiB] * streams


def test_completions_wait_for_the_store_to_assemble_the_object(faulty_bucket: str) -> None:
    """Parts keep s3fs's read timeout (15 s: a stalled part is retried soon), but a completion
    waits up to COMPLETE_READ_TIMEOUT: S3 may take minutes to assemble a large object, and a
    completion sent again while the first still runs made moto fail both (a 1 GB save)."""
    from ckptkit.storage.s3_client import COMPLETE_READ_TIMEOUT

    store = open_store(f"{faulty_bucket}/run")
    path = data_path(store.fs)
    assert path.client.meta.config.read_timeout == store.fs.read_timeout < COMPLETE_READ_TIMEOUT
    assert path._completer().meta.config.read_timeout == COMPLETE_READ_TIMEOUT
