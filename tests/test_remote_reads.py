"""The one remote read path (storage/ranged.py): request counts, coalescing, the concurrency
bound, faults on ranged GETs and the memory a stream holds, against moto behind the fault proxy."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from ckptkit.errors import StorageError
from ckptkit.ops.structural import verify_structure
from ckptkit.storage import Store, open_store, ranged
from ckptkit.storage.ranged import COALESCE_GAP, MIN_BLOCK, REQUEST_SIZE, RequestSlots, coalesce


@pytest.fixture
def counted() -> Iterator[RequestSlots]:
    ranged.REQUEST_SLOTS.reset_counters()
    yield ranged.REQUEST_SLOTS


def put_direct(s3_endpoint: str, bucket_url: str, key: str, data: bytes) -> None:
    """Place an object behind the proxy's back, so its counters see only the reads."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket_url.removeprefix("s3://"), Key=key, Body=data)


def through_proxy(bucket_url: str, proxy_url: str) -> Store:
    return open_store(bucket_url, endpoint_url=proxy_url)


# --- coalescing (pure) -------------------------------------------------------------------------


def test_coalesce_merges_neighbours_within_the_gap_and_keeps_far_ranges_apart() -> None:
    ranges = [(1000, 2000), (0, 100), (100, 200), (200 + COALESCE_GAP, 300 + COALESCE_GAP), (50, 60), (7, 7)]
    spans = [(s.start, s.end, sorted(s.members)) for s in coalesce(ranges)]
    # (0,100) (100,200) (50,60) touch; (1000,2000) is 800 bytes on; the fourth starts exactly
    # COALESCE_GAP after the span's end (2000 + gap would merge, this one starts earlier);
    # the empty range needs no bytes.
    assert spans == [(0, 300 + COALESCE_GAP, [0, 1, 2, 3, 4])]
    far = [(0, 10), (10 + COALESCE_GAP + 1, 20 + COALESCE_GAP)]
    assert [(s.start, s.end) for s in coalesce(far)] == [(0, 10), (11 + COALESCE_GAP, 20 + COALESCE_GAP)]
    assert [(s.start, s.end) for s in coalesce([(0, 10), (10 + COALESCE_GAP, 20 + COALESCE_GAP)])] == [
        (0, 20 + COALESCE_GAP)
    ]


# --- S3 through the counting proxy --------------------------------------------------------------


def test_read_ranges_coalesces_and_splits_into_large_requests(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, counted: RequestSlots
) -> None:
    data = random.Random(1).randbytes(40 << 20)
    put_direct(s3_endpoint, faulty_bucket, "blob", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    near = [(0, 100), (100, 200), (300, 400), (500, 600)]  # one request
    far = [(30 << 20, (30 << 20) + 10)]  # another
    assert store.read_ranges("blob", near + far) == [data[s:e] for s, e in near + far]
    assert faulty_s3.requests == {"GET": 2}
    assert counted.bytes_asked == 600 + 10

    faulty_s3.reset_counters()
    whole = [(1, (40 << 20) - 1)]  # 40 MiB: three requests of at most 16 MiB
    assert store.read_ranges("blob", whole) == [data[1:-1]]
    assert faulty_s3.requests == {"GET": -(-(40 << 20) // REQUEST_SIZE)}
    # get() of a large range takes the same path: no HEAD, the same three requests.
    faulty_s3.reset_counters()
    assert store.get("blob", 1, (40 << 20) - 1) == data[1:-1]
    assert faulty_s3.requests == {"GET": 3}


def test_open_read_learns_the_size_without_a_head_and_reads_ahead_only_when_sequential(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, counted: RequestSlots
) -> None:
    data = random.Random(2).randbytes(24 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    rng = random.Random(3)
    with store.open_read("obj") as f:  # one GET: its Content-Range gives the size
        assert faulty_s3.requests == {"GET": 1}
        for _ in range(5):  # inspect-like: seek, read a little
            at = rng.randrange(len(data) - 100)
            f.seek(at)
            assert f.read(100) == data[at : at + 100]
        assert f.seek(0, io.SEEK_END) == len(data)
    assert faulty_s3.requests == {"GET": 6}  # no HEAD, no read-ahead on random reads
    assert counted.bytes_asked <= 6 * MIN_BLOCK

    faulty_s3.reset_counters()
    counted.reset_counters()
    with store.open_read("obj", size=len(data)) as f:  # sequential: blocks grow, a few requests
        assert b"".join(iter(lambda: f.read(1 << 20), b"")) == data
    assert faulty_s3.requests["GET"] <= 6 and "HEAD" not in faulty_s3.requests
    assert counted.bytes_asked == len(data)  # each byte asked for once, none past the end
    with store.open_read("obj", size=1000) as f:  # the end of what will be read bounds the reader
        assert f.read() == data[:1000]


def test_requests_in_flight_never_exceed_the_process_bound(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(4).randbytes(8 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    slots = RequestSlots(3)
    monkeypatch.setattr(ranged, "REQUEST_SLOTS", slots)
    far = [(i * (256 << 10), i * (256 << 10) + 1000) for i in range(30)]  # 30 requests per call
    results: list[bool] = []

    def reader() -> None:
        results.append(store.read_ranges("obj", far) == [data[s:e] for s, e in far])

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6
    assert slots.requests == faulty_s3.requests["GET"] == 6 * 30
    assert slots.peak == 3  # six readers of eight requests each met the bound, and kept to it
    assert slots.in_flight == 0


def test_structural_verify_of_a_remote_pt_reads_it_once_in_few_requests(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, counted: RequestSlots, tmp_path
) -> None:
    import torch

    torch.manual_seed(0)
    state = {f"layer{i}": torch.randn(1 << 20) for i in range(10)}  # ~40 MB
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    put_direct(s3_endpoint, faulty_bucket, "run/model.pt", data)
    (tmp_path / "model.pt").write_bytes(data)

    report = verify_structure(through_proxy(f"{faulty_bucket}/run", faulty_s3.url))
    assert report.status == "structural-ok", report.findings
    assert report.bytes_checked >= len(data) * 0.99  # every record's CRC-32 was checked
    assert "HEAD" not in faulty_s3.requests  # sizes come from the listing, not a HEAD per read
    asked = [(e.path.split("?")[0][-8:], e.headers.get("range")) for e in faulty_s3.log]
    # The listing, then the file's head and tail (sniffing, the zip directory), then every
    # record as one streamed GET.
    assert faulty_s3.requests["GET"] == 1 + len(_file_gets(faulty_s3, "model.pt")) <= 4, asked
    assert len(_file_gets(faulty_s3, "model.pt")) <= 3, asked
    assert counted.bytes_asked <= 1.05 * len(data)
    local = verify_structure(open_store(tmp_path))
    assert [f.message for f in report.findings] == [f.message for f in local.findings]


def test_the_read_cache_fetches_a_files_ends_together_and_answers_the_directory_from_memory(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    from ckptkit.storage.read_cache import ReadCache

    data = random.Random(13).randbytes(3 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    cache = ReadCache(through_proxy(faulty_bucket, faulty_s3.url), {"obj": len(data)})
    size = len(data)
    # Sniffing's head and tail, then a zip directory 20 KB long before the tail, then a record.
    reads = [(0, 4096), (size - 4096, size), (size - 24_000, size - 4000), (30_000, 50_000)]
    assert [cache.get("obj", s, e) for s, e in reads] == [data[s:e] for s, e in reads]
    widen = 64 << 10
    both_ends = [f"bytes=0-{widen - 1}", f"bytes={size - widen}-{size - 1}"]
    assert sorted(_file_gets(faulty_s3, "obj")) == both_ends


def test_a_flipped_byte_in_a_remote_pt_is_still_found(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(300_000, dtype=torch.float32)}, buffer)
    data = bytearray(buffer.getvalue())
    data[len(data) // 2] ^= 0x40
    put_direct(s3_endpoint, faulty_bucket, "run/model.pt", bytes(data))
    report = verify_structure(through_proxy(f"{faulty_bucket}/run", faulty_s3.url))
    assert report.status == "failed"
    assert [f.kind for f in report.findings if f.severity == "error"] == ["crc"]


# --- faults on ranged GETs ----------------------------------------------------------------------


def _gets_of(name: str):
    return lambda method, path: method == "GET" and name in path


def _file_gets(proxy, name: str) -> list[str | None]:
    """The Range header of each GET of object ``name`` (None: the whole object), in order."""
    gets = [e for e in proxy.log if e.method == "GET" and e.path.split("?")[0].endswith(name)]
    return [e.headers.get("range") for e in gets]


# --- streamed GETs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_of_a_remote_checkpoint_reads_each_chunk_as_one_get(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    from ckptkit.commit import CheckpointTransaction
    from ckptkit.hashing import CHUNK_SIZE
    from ckptkit.ops.verify import verify_checkpoint

    rng = random.Random(8)
    files = {"a.bin": rng.randbytes(CHUNK_SIZE + (3 << 20)), "b.bin": rng.randbytes(5 << 20), "c.json": b"{}"}
    txn = CheckpointTransaction(open_store(faulty_bucket), "step-1")  # straight to moto, unseen
    for name, data in files.items():
        txn.write(name, data)
    txn.commit(step=1, layout="files")

    report = verify_checkpoint(through_proxy(f"{faulty_bucket}/step-1", faulty_s3.url))
    assert report.ok and report.status == "ok", report.findings
    assert "HEAD" not in faulty_s3.requests
    # One GET per 64 MiB chunk, each exactly the chunk's range: no first block to learn a size.
    assert sorted(_file_gets(faulty_s3, "a.bin")) == [
        f"bytes=0-{CHUNK_SIZE - 1}", f"bytes={CHUNK_SIZE}-{CHUNK_SIZE + (3 << 20) - 1}"
    ]
    assert _file_gets(faulty_s3, "b.bin") == [f"bytes=0-{(5 << 20) - 1}"]
    assert len(_file_gets(faulty_s3, "c.json")) == 1


def test_sequential_reads_stream_one_get_per_segment_and_seeks_stay_small(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, counted: RequestSlots
) -> None:
    data = random.Random(9).randbytes(12 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    with store.open_read("obj", size=len(data)) as f:
        assert f.read(2 << 20) == data[: 2 << 20]  # a large read: the rest is one streamed GET
        f.seek(300_000, io.SEEK_CUR)  # a short gap inside the stream is read past, not asked for
        assert f.read(1000) == data[(2 << 20) + 300_000 :][:1000]
        buffer = bytearray(3 << 20)
        at = f.tell()
        assert f.readinto(buffer) == len(buffer) and buffer == data[at : at + len(buffer)]
        assert _file_gets(faulty_s3, "obj") == [f"bytes=0-{len(data) - 1}"]
        f.seek(100)  # backwards: a small ranged block, the stream closed
        assert f.read(10) == data[100:110]
        assert f.read() == data[110:]  # a large read from there: a new stream
    gets = _file_gets(faulty_s3, "obj")
    assert len(gets) == 3 and gets[1].startswith("bytes=100-") and gets[2].startswith("bytes=")
    assert counted.in_flight == 0

    # A size past the object's end (an upper bound) ends the stream where the object ends.
    with store.open_read("obj", size=len(data) + (5 << 20)) as f:
        f.seek(len(data) - (2 << 20))
        assert f.read() == data[-(2 << 20) :]
        assert f.read(10) == b""


def test_a_reader_closed_early_drops_its_stream_and_the_next_reads_work(
    s3_endpoint: str, faulty_s3, faulty_bucket: str, counted: RequestSlots
) -> None:
    data = random.Random(10).randbytes(64 << 20)
    put_direct(s3_endpoint, faulty_bucket, "big", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    with store.open_read("big", size=len(data)) as f:
        assert f.read(1 << 20) == data[: 1 << 20]
    assert _file_gets(faulty_s3, "big") == [f"bytes=0-{len(data) - 1}"]
    deadline = time.monotonic() + 5
    while counted.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counted.in_flight == 0  # the stream's connection was given up, its slot too
    time.sleep(0.5)
    sent = faulty_s3.stats().bytes_from_upstream
    time.sleep(0.5)
    # The proxy stopped relaying once the client hung up: far less than the 64 MiB asked for.
    assert faulty_s3.stats().bytes_from_upstream == sent < 32 << 20
    assert store.get("big", 5, 10) == data[5:10]
    with store.open_read("big", size=len(data)) as f:
        f.seek(40 << 20)
        assert f.read(3 << 20) == data[40 << 20 : 43 << 20]
    far = [(0, 10), (60 << 20, (60 << 20) + 10)]
    assert store.read_ranges("big", far) == [data[s:e] for s, e in far]


def test_a_streamed_get_cut_off_resumes_where_it_broke(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    data = random.Random(11).randbytes(16 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    faulty_s3.set_faults(truncate=1.0, limit=3, predicate=_gets_of("obj"))
    with store.open_read("obj", size=len(data)) as f:
        assert b"".join(iter(lambda: f.read(4 << 20), b"")) == data
    assert faulty_s3.faults["truncate"] == 3
    gets = [e for e in faulty_s3.log if e.method == "GET"]
    starts = [int(e.headers["range"].removeprefix("bytes=").split("-")[0]) for e in gets]
    # Each answer was cut at half its body: the next asks from there, for the same object.
    assert starts == [0, 8 << 20, 12 << 20, 14 << 20]
    assert "if-match" not in gets[0].headers and all(e.headers.get("if-match") for e in gets[1:])

    faulty_s3.reset_counters()
    faulty_s3.set_faults(reset_after=1.0, limit=2, predicate=_gets_of("obj"))
    with store.open_read("obj", size=len(data)) as f:  # no answer at all: the request is retried
        assert f.read() == data
    assert faulty_s3.faults["reset_after"] == 2


def test_a_changed_object_is_never_stitched_into_a_resumed_stream(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    data = random.Random(12).randbytes(16 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    gets: list[str] = []

    def cut_first_then_rewrite(method: str, path: str) -> bool:
        if method == "GET" and "obj" in path:
            gets.append(path)
            if len(gets) == 2:  # the resume: the object is rewritten just before it is asked for
                put_direct(s3_endpoint, faulty_bucket, "obj", bytes(len(data)))
        return len(gets) == 1

    faulty_s3.set_faults(truncate=1.0, predicate=cut_first_then_rewrite)
    with store.open_read("obj", size=len(data)) as f:
        assert f.read(1 << 20) == data[: 1 << 20]
        with pytest.raises(StorageError, match="changed while it was read"):
            f.read()
    assert len(gets) == 2


def test_cut_and_reset_ranged_gets_still_give_the_right_bytes(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    data = random.Random(5).randbytes(20 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    faulty_s3.set_faults(truncate=0.2, reset_before=0.1, reset_after=0.1, predicate=_gets_of("obj"), seed=7)
    with store.open_read("obj") as f:
        assert b"".join(iter(lambda: f.read(3 << 20), b"")) == data
    ranges = [(i << 20, (i << 20) + 777) for i in range(0, 20, 3)] + [(0, 20 << 20)]
    assert store.read_ranges("obj", ranges) == [data[s:e] for s, e in ranges]
    assert store.get("obj", 12345, 9_000_000) == data[12345:9_000_000]
    assert faulty_s3.faults["truncate"] >= 2 and sum(faulty_s3.faults.values()) >= 4


def test_a_body_always_cut_short_is_a_clear_error_never_short_bytes(
    s3_endpoint: str, faulty_s3, faulty_bucket: str
) -> None:
    data = random.Random(6).randbytes(2 << 20)
    put_direct(s3_endpoint, faulty_bucket, "obj", data)
    store = through_proxy(faulty_bucket, faulty_s3.url)
    faulty_s3.set_faults(truncate=1.0, predicate=_gets_of("obj"))
    with pytest.raises(StorageError, match="broke off 5 times") as caught:
        store.get("obj", 0, 1 << 20)
    assert "s3://" in str(caught.value) and "obj" in str(caught.value)
    with store.open_read("obj", size=len(data)) as f, pytest.raises(StorageError, match="broke off"):
        f.read()
    with pytest.raises(StorageError, match="broke off"):
        store.read_ranges("obj", [(0, 10), (1 << 20, (1 << 20) + 10)])


# --- memory ------------------------------------------------------------------------------------

MEASURE_STREAM = """
import sys
from ckptkit.storage import open_store

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

store = open_store(sys.argv[1])
store.get("big", 0, 10)  # the session, the connection pool and their imports, before measuring
before = hwm()
total = 0
with store.open_read("big") as f:
    while block := f.read(8 << 20):
        total += len(block)
print(total, before, hwm())
"""


@pytest.mark.slow
def test_a_sequential_stream_holds_at_most_64_mb(s3_endpoint: str, faulty_bucket: str) -> None:
    size = 256 << 20
    put_direct(s3_endpoint, faulty_bucket, "big", os.urandom(1 << 20) * (size >> 20))
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_STREAM, faulty_bucket],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    total, before, after = map(int, result.stdout.split())
    assert total == size
    growth = (after - before) >> 20
    assert growth <= 64, f"peak RSS grew by {growth} MiB while streaming {size >> 20} MiB"


def test_a_remote_verify_hashes_more_chunks_at_once_than_there_are_cores(tmp_path) -> None:
    """Locally one hashing thread per core is fastest; a remote chunk is a streamed GET that
    waits on the network, so a remote verify keeps more of them in flight by default."""
    import uuid

    from ckptkit.ops.verify import REMOTE_JOBS, default_jobs

    cores = os.cpu_count() or 1
    assert default_jobs(open_store(tmp_path)) == cores
    remote = open_store(f"memory://ckptkit-test-{uuid.uuid4().hex[:12]}/root")
    assert default_jobs(remote) == max(REMOTE_JOBS, cores) > 2
