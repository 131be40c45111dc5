"""The fault-injecting proxy: transparent when quiet, and every fault kind really happens."""

from __future__ import annotations

import http.client
import io
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, ResponseStreamingError

from ckptkit.ops.sync import sync
from ckptkit.ops.verify import verify_checkpoint
from ckptkit.storage import open_store
from ckptkit.transfer import RetryPolicy
from tests.faulty_proxy import FAULT_KINDS, FaultyProxy, ProxyStats
from tests.helpers import commit_files

MB = 1 << 20


def client(endpoint: str, attempts: int = 3) -> Any:
    """A boto3 S3 client; ``attempts`` counts the first try (1 = no retries)."""
    config = Config(retries={"total_max_attempts": attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def bucket_name(url: str) -> str:
    return url.removeprefix("s3://")


def raw_connection(proxy: FaultyProxy) -> http.client.HTTPConnection:
    parts = urlsplit(proxy.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


# --- transparent with faults off ------------------------------------------------------------


def test_quiet_proxy_is_transparent_for_put_get_list_and_multipart(
    faulty_s3: FaultyProxy, faulty_bucket: str, s3_endpoint: str
) -> None:
    s3, direct, bucket = client(faulty_s3.url), client(s3_endpoint), bucket_name(faulty_bucket)
    small, big = os.urandom(3 * MB), os.urandom(20 * MB)
    s3.put_object(Bucket=bucket, Key="run/small.bin", Body=small)
    # 5 MB parts: a real multipart upload (create, 4 x upload part, complete).
    s3.upload_fileobj(io.BytesIO(big), bucket, "run/big.bin",
                      Config=boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MB,
                                                              multipart_chunksize=5 * MB))

    assert s3.get_object(Bucket=bucket, Key="run/small.bin")["Body"].read() == small
    assert s3.get_object(Bucket=bucket, Key="run/big.bin")["Body"].read() == big
    assert direct.get_object(Bucket=bucket, Key="run/big.bin")["Body"].read() == big
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {"run/small.bin": len(small), "run/big.bin": len(big)}
    assert faulty_s3.requests["PUT"] == 1 + 4  # the small object and four parts
    assert faulty_s3.requests["POST"] == 2  # create and complete the multipart upload
    assert faulty_s3.requests["GET"] == 3
    assert not faulty_s3.faults
    # Request bodies forwarded: both payloads, plus the small CompleteMultipartUpload XML.
    assert len(small) + len(big) <= faulty_s3.bytes_to_upstream < len(small) + len(big) + 4096


def test_reads_send_no_body_bytes_upstream(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)
    faulty_s3.reset_counters()
    s3.head_object(Bucket=bucket, Key="k")
    s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    s3.list_objects_v2(Bucket=bucket)
    assert faulty_s3.bytes_to_upstream == 0
    assert dict(faulty_s3.requests) == {"HEAD": 1, "GET": 2}
    assert [(method, fault) for method, _, fault in faulty_s3.log] == [("HEAD", None), ("GET", None),
                                                                       ("GET", None)]


def test_ckptkit_store_through_proxy_round_trips(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    """s3fs/aiohttp (what ckptkit uses) through the proxy, with connection reuse."""
    store = open_store(faulty_bucket + "/root", endpoint_url=faulty_s3.url)
    payloads = {f"step-{i}/data.bin": os.urandom(256 * 1024 + i) for i in range(5)}
    for key, data in payloads.items():
        store.put(key, data, mode="create")
    assert {info.key: info.size for info in store.list("")} == {k: len(v) for k, v in payloads.items()}
    for key, data in payloads.items():
        assert store.get(key) == data
    store.delete("step-0/data.bin")
    assert not store.exists("step-0/data.bin")
    store.close()
    assert faulty_s3.requests["DELETE"] == 1
    assert faulty_s3.bytes_to_upstream >= sum(map(len, payloads.values()))


def test_chunked_request_body_is_forwarded(faulty_s3: FaultyProxy, faulty_bucket: str,
                                           s3_endpoint: str) -> None:
    bucket = bucket_name(faulty_bucket)
    parts = [os.urandom(70_000), os.urandom(1), os.urandom(300_000)]
    conn = raw_connection(faulty_s3)
    conn.request("PUT", f"/{bucket}/chunked.bin", body=iter(parts), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    # The same connection stays usable (keep-alive) after a chunked request.
    conn.request("PUT", f"/{bucket}/plain.bin", body=b"plain")
    second = conn.getresponse()
    second.read()
    assert second.status == 200
    conn.close()
    direct = client(s3_endpoint)
    assert direct.get_object(Bucket=bucket, Key="chunked.bin")["Body"].read() == b"".join(parts)
    assert direct.get_object(Bucket=bucket, Key="plain.bin")["Body"].read() == b"plain"
    assert faulty_s3.bytes_to_upstream == sum(map(len, parts)) + len(b"plain")
    assert faulty_s3.requests == {"PUT": 2}


# --- slowdown --------------------------------------------------------------------------------


def test_slowdown_is_retried_by_botocore(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    faulty_s3.reset_counters()
    faulty_s3.set_faults(slowdown=1.0, limit=1)
    response = s3.get_object(Bucket=bucket, Key="k")
    assert response["Body"].read() == b"payload"
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    assert faulty_s3.requests["GET"] == 2
    assert faulty_s3.faults == {"slowdown": 1}


def test_persistent_slowdown_surfaces_as_s3_slowdown_error(faulty_s3: FaultyProxy,
                                                           faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url, attempts=2), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload" * 1000)
    faulty_s3.reset_counters()
    faulty_s3.set_faults(slowdown=1.0)
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=bucket, Key="k", Body=b"new" * 1000)
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert faulty_s3.requests["PUT"] == 2 and faulty_s3.faults == {"slowdown": 2}
    assert faulty_s3.bytes_to_upstream == 0  # a throttled request never reaches the server
    faulty_s3.clear_faults()
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload" * 1000


def test_slowdown_keeps_the_connection_alive(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    conn = raw_connection(faulty_s3)
    faulty_s3.set_faults(slowdown=1.0, limit=1)
    conn.request("PUT", f"/{bucket_name(faulty_bucket)}/k", body=b"z" * 5000)
    first = conn.getresponse()
    assert first.status == 503 and b"<Code>SlowDown</Code>" in first.read()
    sock = conn.sock
    conn.request("PUT", f"/{bucket_name(faulty_bucket)}/k", body=b"z" * 5000)
    assert conn.getresponse().status == 200
    assert conn.sock is sock  # no reconnect in between
    conn.close()


# --- resets ----------------------------------------------------------------------------------


def test_reset_before_forwarding_fails_the_request_and_nothing_reaches_the_server(
    faulty_s3: FaultyProxy, faulty_bucket: str, s3_endpoint: str
) -> None:
    s3, bucket = client(faulty_s3.url, attempts=1), bucket_name(faulty_bucket)
    faulty_s3.set_faults(reset_before=1.0)
    with pytest.raises(HTTPClientError):
        s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(100_000))
    assert faulty_s3.faults == {"reset_before": 1}
    assert faulty_s3.bytes_to_upstream == 0
    assert "Contents" not in client(s3_endpoint).list_objects_v2(Bucket=bucket)


def test_reset_is_a_tcp_rst(faulty_s3: FaultyProxy) -> None:
    faulty_s3.set_faults(reset_before=1.0)
    parts = urlsplit(faulty_s3.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)


def test_reset_before_is_retried_by_botocore(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    faulty_s3.set_faults(reset_before=1.0, limit=1, predicate=lambda method, path: method == "GET")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload"
    assert faulty_s3.faults == {"reset_before": 1}
    assert [fault for method, _, fault in faulty_s3.log if method == "GET"] == ["reset_before", None]


def test_reset_after_forwarding_leaves_the_work_done(faulty_s3: FaultyProxy, faulty_bucket: str,
                                                     s3_endpoint: str) -> None:
    s3, bucket = client(faulty_s3.url, attempts=1), bucket_name(faulty_bucket)
    data = os.urandom(200_000)
    faulty_s3.set_faults(reset_after=1.0)
    with pytest.raises(HTTPClientError):
        s3.put_object(Bucket=bucket, Key="k", Body=data)
    assert faulty_s3.faults == {"reset_after": 1}
    assert faulty_s3.bytes_to_upstream == len(data)
    assert client(s3_endpoint).get_object(Bucket=bucket, Key="k")["Body"].read() == data


# --- truncate --------------------------------------------------------------------------------


def test_truncate_sends_full_length_but_short_body(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url), bucket_name(faulty_bucket)
    data = os.urandom(1 * MB)
    s3.put_object(Bucket=bucket, Key="k", Body=data, ACL="public-read")  # for the unsigned GET
    faulty_s3.set_faults(truncate=1.0, truncate_fraction=0.25)
    conn = raw_connection(faulty_s3)
    conn.request("GET", f"/{bucket}/k")
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length")) == len(data)
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    assert caught.value.partial == data[: len(data) // 4]
    conn.close()

    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    assert faulty_s3.faults == {"truncate": 2}


def test_truncate_of_a_bodiless_answer_is_no_fault(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url, attempts=1), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    faulty_s3.reset_counters()
    faulty_s3.set_faults(truncate=1.0)
    assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(b"payload")
    assert not faulty_s3.faults
    assert [fault for _, _, fault in faulty_s3.log] == [None]


# --- control: predicate, limit, seed ---------------------------------------------------------


def test_predicate_restricts_faults(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url, attempts=1), bucket_name(faulty_bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"payload")
    faulty_s3.set_faults(slowdown=1.0, predicate=lambda method, path: method == "PUT")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"payload"
    with pytest.raises(ClientError):
        s3.put_object(Bucket=bucket, Key="k2", Body=b"payload")
    assert faulty_s3.faults == {"slowdown": 1}


def test_same_seed_same_faults(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    def statuses() -> list[int]:
        conn = raw_connection(faulty_s3)
        seen = []
        for _ in range(16):
            conn.request("HEAD", f"/{bucket_name(faulty_bucket)}")
            response = conn.getresponse()
            response.read()
            seen.append(response.status)
        conn.close()
        return seen

    faulty_s3.set_faults(slowdown=0.5, seed=1234)
    first = statuses()
    faulty_s3.set_faults(slowdown=0.5, seed=1234)
    assert statuses() == first
    assert 503 in first and len(set(first)) == 2
    assert faulty_s3.faults["slowdown"] == 2 * first.count(503)


def test_bad_fault_plans_are_refused(faulty_s3: FaultyProxy) -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        faulty_s3.set_faults(explode=0.1)
    with pytest.raises(ValueError, match="sum to at most 1"):
        faulty_s3.set_faults(slowdown=0.7, truncate=0.7)


def test_stop_closes_idle_keep_alive_connections(s3_endpoint: str) -> None:
    proxy = FaultyProxy(s3_endpoint).start()
    conn = raw_connection(proxy)
    conn.request("GET", "/")
    conn.getresponse().read()
    proxy.stop()  # returns although the connection above is idle and open
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()


# --- latency and counters for benchmarks -----------------------------------------------------


def timed_head(proxy: FaultyProxy, bucket: str) -> tuple[int, float]:
    conn = raw_connection(proxy)
    start = time.perf_counter()
    conn.request("HEAD", f"/{bucket}")
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    conn.close()
    return response.status, elapsed


def test_latency_delays_every_request(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    bucket = bucket_name(faulty_bucket)
    faulty_s3.set_latency(0.05)
    assert faulty_s3.latency == 0.05
    for _ in range(3):
        status, elapsed = timed_head(faulty_s3, bucket)
        assert status == 200 and elapsed >= 0.05
    faulty_s3.set_latency(0)
    assert timed_head(faulty_s3, bucket)[0] == 200
    assert faulty_s3.stats().requests == {"HEAD": 4}


def test_concurrent_requests_wait_side_by_side_not_in_a_queue(faulty_s3: FaultyProxy,
                                                              faulty_bucket: str) -> None:
    """Latency models a round trip: 8 requests at once take about one latency, not eight."""
    bucket, latency, n = bucket_name(faulty_bucket), 0.1, 8
    faulty_s3.set_latency(latency)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: timed_head(faulty_s3, bucket), range(n)))
    elapsed = time.perf_counter() - start
    assert all(status == 200 and took >= latency for status, took in results)
    assert elapsed < n * latency / 2, f"{n} concurrent requests took {elapsed:.3f} s"
    assert faulty_s3.stats().requests == {"HEAD": n}


def test_latency_is_validated(faulty_s3: FaultyProxy, s3_endpoint: str) -> None:
    with pytest.raises(ValueError, match="latency"):
        faulty_s3.set_latency(-0.01)
    with pytest.raises(ValueError, match="latency"):
        FaultyProxy(s3_endpoint, latency=float("nan"))


def test_every_fault_kind_still_happens_with_latency(faulty_s3: FaultyProxy, faulty_bucket: str,
                                                     s3_endpoint: str) -> None:
    bucket, data = bucket_name(faulty_bucket), os.urandom(100_000)
    client(s3_endpoint).put_object(Bucket=bucket, Key="k", Body=data, ACL="public-read")
    faulty_s3.set_latency(0.05)

    def get() -> tuple[float, int | BaseException, bytes]:
        conn = raw_connection(faulty_s3)
        start = time.perf_counter()
        try:
            conn.request("GET", f"/{bucket}/k")
            response = conn.getresponse()
            return time.perf_counter() - start, response.status, response.read()
        except (http.client.HTTPException, OSError) as exc:
            return time.perf_counter() - start, exc, b""
        finally:
            conn.close()

    outcomes = {}
    for kind in FAULT_KINDS:
        faulty_s3.set_faults(**{kind: 1.0}, limit=1)
        outcomes[kind] = get()
    assert all(took >= 0.05 for took, _, _ in outcomes.values())
    assert outcomes["slowdown"][1] == 503 and b"SlowDown" in outcomes["slowdown"][2]
    assert isinstance(outcomes["reset_before"][1], ConnectionError)
    assert isinstance(outcomes["reset_after"][1], ConnectionError)
    assert isinstance(outcomes["truncate"][1], http.client.IncompleteRead)
    assert faulty_s3.faults == dict.fromkeys(FAULT_KINDS, 1)


def test_stats_count_requests_and_body_bytes_both_ways(faulty_s3: FaultyProxy, faulty_bucket: str) -> None:
    s3, bucket = client(faulty_s3.url, attempts=1), bucket_name(faulty_bucket)
    data = os.urandom(MB)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == data
    s3.head_object(Bucket=bucket, Key="k")

    first = faulty_s3.stats(reset=True)
    assert first.requests == {"PUT": 1, "GET": 1, "HEAD": 1} and first.total_requests == 3
    assert first.bytes_to_upstream == len(data)
    assert first.bytes_from_upstream == len(data)  # the GET's body; PUT and HEAD answer without one
    assert first.faults == {}
    assert faulty_s3.stats() == ProxyStats({}, {}, 0, 0)  # reset in the same step

    # A truncated answer: the upstream sent every byte, the client got a quarter.
    faulty_s3.set_faults(truncate=1.0, truncate_fraction=0.25)
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        s3.get_object(Bucket=bucket, Key="k")["Body"].read()
    assert faulty_s3.stats() == ProxyStats({"GET": 1}, {"truncate": 1}, 0, len(data))


@pytest.mark.parametrize("latency", [0, 0.02], ids=["0ms", "20ms"])
def test_lost_manifest_reply_is_survived_at_latency(tmp_path, faulty_s3: FaultyProxy, faulty_bucket: str,
                                                    latency: float) -> None:
    """sync's create-only manifest PUT lands but its reply is reset; the retry meets our own
    manifest, which is success, at zero and at real-S3 latency alike."""
    src = open_store(tmp_path / "src")
    commit_files(src, "step-00000001", {"a.bin": b"a" * 1000, "b.bin": b"b" * 10}, step=1)
    faulty_s3.set_latency(latency)
    faulty_s3.set_faults(reset_after=1.0, limit=1,
                         predicate=lambda method, path: method == "PUT" and "ckptkit-manifest" in path)

    report = sync(tmp_path / "src", f"{faulty_bucket}/run", dst_options={"endpoint_url": faulty_s3.url},
                  retry=RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05))

    assert faulty_s3.faults == {"reset_after": 1}
    assert report.ok and [o.status for o in report.outcomes] == ["committed"], report.outcomes
    remote = open_store(f"{faulty_bucket}/run", endpoint_url=faulty_s3.url)
    assert verify_checkpoint(remote.child("step-00000001")).ok
