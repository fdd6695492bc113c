"""The remote tier under real faults: redis killed mid-transfer, restarted
empty, a chunk's bytes flipped with SETRANGE, a wrong password, values evicted
under maxmemory, expired, signed with another secret or of another format.
Every fault is a miss or a dropped push, logged once and counted; nothing
local is lost and no request fails."""

import logging
import threading
import time

import msgpack
import pytest

import kvstore
from kvstore.remote import RemoteTier, attach, ns_id
from redis_server import RedisServer, free_port
from workers import check_synthetic, seed_tokens, synthetic_cache


def open_host(path, url, **opts):
    store = kvstore.SnapshotStore(path, block_tokens=16, fsync=False)
    attach(store, RemoteTier(url, **opts))
    return store


def put(store, seed, n=64, tier="system"):
    toks = seed_tokens(seed, n)
    key = store.put("synthetic", toks, synthetic_cache(seed, n), tier)
    return toks, key


def remote_keys(server, pattern):
    return [k.decode() for k in server.client().scan_iter(match=pattern)]


def complete(client, tier, nsx, key):
    """True if the snapshot's bundle and every chunk it names are still on the server."""
    from kvstore.transfer import decode_bundle

    raw = client.get(f"kvstore:v1:{{{nsx}}}:r:{key}")
    if raw is None:
        return False
    bundle = decode_bundle(raw, bytes.fromhex(key), nsx)
    names = [tier.place.chunk_key(s.blob, i) for s in bundle.blobs for i in range(s.chunks())]
    return client.exists(*names) == len(names)


def warnings(caplog, text):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_killed_mid_transfer_and_restarted_empty(redis_server, tmp_path, caplog):
    a = open_host(tmp_path / "a", redis_server.url, chunk_bytes=4096)
    toks, key = put(a, 1, n=400)
    assert a.remote.flush(30)
    b = open_host(tmp_path / "b", redis_server.url, chunk_bytes=4096)
    req = toks + [5]
    seen, errors = [], []
    stop = threading.Event()

    def reader():
        reader_store = open_host(tmp_path / "c", redis_server.url, chunk_bytes=4096, push=())
        while not stop.is_set():
            try:
                cache, rest, match = reader_store.fetch("synthetic", req)
                seen.append(match.source if match else None)
                if cache is not None:
                    assert check_synthetic(cache, 1, 400)
                reader_store.remote._held.clear()  # every hit fetches its chunks again
                if match and match.source == "disk":  # written locally: forget it to ask the remote again
                    reader_store.delete(match.key)
            except Exception as exc:  # noqa: BLE001 - any escape is the failure under test
                errors.append(exc)
        reader_store.close()

    with caplog.at_level(logging.WARNING, logger="kvstore"):
        t = threading.Thread(target=reader)
        t.start()
        deadline = time.monotonic() + 20
        while "remote" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        redis_server.kill()  # mid-transfer: the reader is fetching chunks in a loop
        time.sleep(0.3)
        stop.set()
        t.join(30)
        assert not errors and "remote" in seen and seen[-1] is None
        # a request while it is down costs a skipped lookup, not a timeout
        t0 = time.perf_counter()
        assert b.fetch("synthetic", req)[2] is None
        assert time.perf_counter() - t0 < 0.5
        redis_server.start()  # empty: nothing was persisted
        # nothing local was lost
        cache, _rest, match = a.fetch("synthetic", req)
        assert match.source == "disk" and check_synthetic(cache, 1, 400)
        time.sleep(1.1)  # past the first back-off
        toks2, _ = put(a, 2, n=64)
        assert a.remote.flush(30)
        assert a.remote.stats().get("remote.pushed", 0) == 2
    cache, _rest, match = b.fetch("synthetic", toks2 + [5])
    assert match is not None and match.source == "remote" and check_synthetic(cache, 2, 64)
    # one line per outage per process, and one when it is back
    assert len(warnings(caplog, "unavailable")) <= 3
    assert warnings(caplog, "is back")
    a.close()
    b.close()


def test_flipped_chunk_bytes_are_a_miss(redis_server, tmp_path, caplog):
    a = open_host(tmp_path / "a", redis_server.url, chunk_bytes=4096)
    toks, key = put(a, 3, n=200)
    assert a.remote.flush(30)
    chunk = sorted(remote_keys(redis_server, "kvstore:v1:*:c:*"))[0]
    c = redis_server.client()
    byte = c.getrange(chunk, 100, 100)
    c.setrange(chunk, 100, bytes([byte[0] ^ 0x40]))
    b = open_host(tmp_path / "b", redis_server.url)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        cache, rest, match = b.fetch("synthetic", toks + [7])
    assert cache is None and match is None and len(rest) == len(toks) + 1
    assert b.remote.stats()["remote.corrupt"] == 1
    assert warnings(caplog, "checksum mismatch")
    a.close()
    b.close()


def test_wrong_password_warns_once_and_serves_locally(redis_server, tmp_path, caplog):
    bad = redis_server.url.replace(redis_server.password, "not-the-password")
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        a = open_host(tmp_path / "a", bad)
        toks, key = put(a, 4)
        for _ in range(20):
            cache, rest, match = a.fetch("synthetic", toks + [1])
            assert match.source == "disk" and check_synthetic(cache, 4, 64)
        a.remote.flush(30)
    lines = warnings(caplog, "unavailable")
    assert len(lines) == 1 and "not-the-password" not in lines[0].getMessage()
    stats = a.remote.stats()
    assert stats["remote.faults"] >= 1 and stats["remote.skipped"] >= 1
    a.close()


def test_unreachable_at_startup_is_a_warning(tmp_path, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        a = open_host(tmp_path / "a", url)
        toks, _ = put(a, 5)
        assert a.fetch("synthetic", toks + [1])[2].source == "disk"
    assert len(warnings(caplog, "unavailable")) == 1
    a.close()


def test_evicted_under_maxmemory_is_a_miss_and_cleaned(tmp_path):
    server = RedisServer(tmp_path / "redis", extra=["--maxmemory", "3mb", "--maxmemory-policy", "volatile-lru"])
    server.start()
    try:
        a = open_host(tmp_path / "a", server.url, ttl=3600, chunk_bytes=64 << 10)
        stored = [put(a, 100 + i, n=400) for i in range(12)]  # about 400 KB each
        assert a.remote.flush(60)
        assert server.client().info("stats")["evicted_keys"] > 0
        b = open_host(tmp_path / "b", server.url, push=())
        nsx = ns_id("synthetic", 16)
        client = server.client()
        misses = 0
        for i, (toks, key) in enumerate(stored):
            whole = complete(client, b.remote, nsx, key)
            cache, _rest, match = b.fetch("synthetic", toks + [1])
            assert (match is not None) == whole  # whatever Redis kept whole is served, nothing else
            if match is None:
                misses += 1
                # a snapshot that cannot be served leaves nothing behind that a lookup would find
                assert not client.exists(f"kvstore:v1:{{{nsx}}}:r:{key}")
                assert not any(client.hexists(name, key) for name in remote_keys(server, f"*{nsx}*:e:*"))
            else:
                assert check_synthetic(cache, 100 + i, 400)
        assert misses >= 1
        a.close()
        b.close()
    finally:
        server.kill()


def test_expired_snapshot_is_a_miss(redis_server, tmp_path):
    a = open_host(tmp_path / "a", redis_server.url, ttl=1)
    toks, key = put(a, 6)
    assert a.remote.flush(30)
    assert redis_server.client().ttl(remote_keys(redis_server, "*:r:*")[0]) >= 0
    time.sleep(2.1)
    b = open_host(tmp_path / "b", redis_server.url)
    assert b.fetch("synthetic", toks + [1])[2] is None
    assert not remote_keys(redis_server, "*:e:*")  # the stale index entry went with the miss
    a.close()
    b.close()


def test_a_hit_renews_the_expiry(redis_server, tmp_path):
    a = open_host(tmp_path / "a", redis_server.url, ttl=2)
    toks, key = put(a, 9)
    assert a.remote.flush(30)
    time.sleep(1.2)
    b = open_host(tmp_path / "b", redis_server.url, ttl=2)
    assert b.fetch("synthetic", toks + [1])[2].source == "remote"
    assert b.remote.flush(30)
    time.sleep(1.2)  # past the first expiry, within the renewed one
    c = open_host(tmp_path / "c", redis_server.url)
    assert c.fetch("synthetic", toks + [1])[2].source == "remote"
    for s in (a, b, c):
        s.close()


@pytest.mark.parametrize("writer,reader,served", [
    ("s3cret-one", "s3cret-two", False),  # signed with another secret
    (None, "s3cret-two", False),  # unsigned, and the reader requires a signature
    ("s3cret-one", "s3cret-one", True),
])
def test_shared_secret(redis_server, tmp_path, writer, reader, served):
    a = open_host(tmp_path / "a", redis_server.url, secret=writer)
    toks, _ = put(a, 7)
    assert a.remote.flush(30)
    b = open_host(tmp_path / "b", redis_server.url, secret=reader)
    cache, _rest, match = b.fetch("synthetic", toks + [1])
    assert (match is not None) == served
    if served:
        assert check_synthetic(cache, 7, 64)
    else:
        assert b.remote.stats()["remote.refused"] == 1
    a.close()
    b.close()


def test_secret_from_environment_and_file(redis_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTORE_REMOTE_SECRET", "from-env")
    assert RemoteTier(redis_server.url).secret == b"from-env"
    f = tmp_path / "secret"
    f.write_text("from-file\n")
    assert RemoteTier(redis_server.url, secret_file=f).secret == b"from-file"
    with pytest.raises(kvstore.InvalidInput):
        RemoteTier(redis_server.url, secret_file=tmp_path / "missing")


def test_another_format_version_is_a_miss(redis_server, tmp_path):
    a = open_host(tmp_path / "a", redis_server.url)
    toks, key = put(a, 8)
    assert a.remote.flush(30)
    c = redis_server.client()
    name = remote_keys(redis_server, "*:r:*")[0]
    outer = msgpack.unpackb(c.get(name))
    body = msgpack.unpackb(outer["b"])
    body["v"] = 99
    c.set(name, msgpack.packb({"b": msgpack.packb(body, use_bin_type=True), "m": None}, use_bin_type=True))
    b = open_host(tmp_path / "b", redis_server.url)
    assert b.fetch("synthetic", toks + [1])[2] is None
    assert b.remote.stats()["remote.other_version"] == 1
    a.close()
    b.close()
