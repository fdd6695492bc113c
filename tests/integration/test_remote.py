"""The remote tier on a real redis-server: two hosts (two processes with
separate local stores) sharing snapshots, the match rules on a remote hit,
the layers of TieredPromptCache, one round trip per lookup, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore import tiny
from kvstore.remote import RemoteTier, attach

HOST = Path(__file__).resolve().parent.parent / "remote_host.py"


def prompt(n, seed=0):
    return [int(t) for t in np.random.RandomState(seed).randint(5, tiny.VOCAB_SIZE, n)]


def host(**args):
    """Run one host process to the end; return what it saw."""
    proc = subprocess.run([sys.executable, str(HOST), json.dumps(args)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["result"]


def prefill(model, toks):
    cache = make_prompt_cache(model)
    logits = model(mx.array(toks)[None], cache=cache)[0, -1]
    mx.eval(logits)
    return cache, logits


def test_two_hosts_share_a_system_prompt(tiny_model, redis_server, tmp_path):
    path = str(tiny_model("llama"))
    system = prompt(90, seed=1)
    a = host(model=path, store=str(tmp_path / "a"), url=redis_server.url, put=[system])
    assert a["remote"]["remote.pushed"] == 1 and a["puts"][0]
    request = system + prompt(7, seed=2)
    b = host(model=path, store=str(tmp_path / "b"), url=redis_server.url, fetch=[request])
    first = b["fetches"][0]
    assert first["source"] == "remote" and first["tokens"] == len(system)
    assert first["max_diff"] == 0.0
    # the remote hit was written into host b's own store: the next request is local
    assert b["local"] == 1 and b["remote"]["remote.adopted"] == 1
    again = host(model=path, store=str(tmp_path / "b"), url=redis_server.url, fetch=[request])
    second = again["fetches"][0]
    assert second["source"] == "disk" and second["max_diff"] == 0.0 and "remote.hits" not in again["remote"]
    assert not (tmp_path / "a").samefile(tmp_path / "b")


@pytest.mark.parametrize("family", ["qwen3_5", "mamba"])
def test_non_trimmable_served_only_at_exact_length(tiny_model, load_tiny, redis_server, tmp_path, family):
    model, _ = load_tiny(family)
    fp = "fp-" + family
    toks = prompt(40, seed=3)
    a = kvstore.SnapshotStore(tmp_path / "a", block_tokens=16)
    attach(a, redis_server.url)
    a.put(fp, toks, prefill(model, toks)[0], "system")
    assert a.remote.flush(30)
    b = kvstore.SnapshotStore(tmp_path / "b", block_tokens=16)
    attach(b, redis_server.url)
    # a shorter request shares a prefix of the snapshot: it cannot be trimmed, so a miss
    cache, rest, match = b.fetch(fp, toks[:30])
    assert cache is None and match is None
    # the exact snapshot plus one token: served whole, one token left to prefill
    req = toks + [9]
    cache, rest, match = b.fetch(fp, req)
    assert match.source == "remote" and match.tokens == 40 and rest == [9]
    warm = model(mx.array(rest)[None], cache=cache)[0, -1]
    assert float(mx.abs(warm - prefill(model, req)[1]).max()) == 0.0
    # the exact length alone: never an empty remainder, so no hit
    cache, rest, match = b.fetch(fp, toks)
    assert (match is None or match.source == "disk") and len(rest) >= 1
    a.close()
    b.close()


@pytest.mark.parametrize("crowd", [60, 140])
def test_a_prompt_many_conversations_continue_is_still_found(load_tiny, redis_server, tmp_path, crowd):
    """A system prompt and ``crowd`` first turns that continue it, all ending in the block right
    after the prompt, on a model whose caches cannot be trimmed: a new conversation is served
    the prompt's own snapshot (more ends than a lookup returns bundles for, 60, and more than it
    lists, 140), with the prompt's exact logits."""
    model, _ = load_tiny("mamba")
    system = prompt(32, seed=20)
    a = kvstore.SnapshotStore(tmp_path / "a", block_tokens=16)
    attach(a, redis_server.url)
    a.put("fp", system, prefill(model, system)[0], "system")
    for i in range(crowd):
        toks = system + prompt(5, seed=100 + i)
        a.put("fp", toks, prefill(model, toks)[0], "user")
    assert a.remote.flush(60)
    b = kvstore.SnapshotStore(tmp_path / "b", block_tokens=16)
    tier = attach(b, redis_server.url)
    req = system + prompt(10, seed=21)
    cache, rest, match = b.fetch("fp", req)
    assert match is not None and match.source == "remote" and match.tokens == len(system)
    warm = model(mx.array(rest)[None], cache=cache)[0, -1]
    assert float(mx.abs(warm - prefill(model, req)[1]).max()) == 0.0
    # a conversation of the crowd is served its own snapshot as well
    own = system + prompt(5, seed=100 + crowd // 2)
    cache, rest, match = b.fetch("fp", own + [7])
    assert match.source == "remote" and match.tokens == len(own) and rest == [7]
    assert tier.stats()["remote.hits"] == 2
    a.close()
    b.close()


def test_a_crowded_link_is_listed_by_lengths_and_its_counts_heal(redis_server):
    """The index the lookup script keeps on the server: a link's few ends come with their
    bundles, more (past ENDS_EAGER) with their keys only, and past ENDS_LISTED a lookup lists
    the distinct lengths; resolve returns exactly the keys asked for that are there, and the
    per-length counts follow puts, deletes, expired bundles and a lost count key."""
    from kvstore.backends.redis_index import ENDS_EAGER, ENDS_LISTED, RedisPlace

    place = RedisPlace(redis_server.url, prefix="t")
    client = place.open()
    base = place.base("ns")
    links = ["00", "aa", "bb"]  # a request's levels 0..2; the crowd ends after "bb"

    def put(key, n, end="bb"):
        place.put_bundle("ns", key, b"raw-" + key.encode(), n, end, links[1:3], b"info")

    def counts():
        return {int(n): int(c) for n, c in client.hgetall(base + "n:bb").items()}

    def recount():
        got = {}
        for n in client.hvals(base + "e:bb"):
            got[int(n)] = got.get(int(n), 0) + 1
        return got

    put("00" * 16, 40)
    put("01" * 16, 41)
    k, ends, _through, bundles = place.lookup("ns", links, "ff" * 16, 0, 45, 8)
    assert k == 2 and sorted(ends[2]) == [(40, "00" * 16), (41, "01" * 16)]  # few: listed with their keys
    assert set(bundles) == {"00" * 16, "01" * 16}
    for i in range(ENDS_EAGER):
        put(f"{i + 2:032x}", 42 + i % 3)
    k, ends, through, bundles = place.lookup("ns", links, "ff" * 16, 0, 45, 8)
    assert len(ends[2]) == ENDS_EAGER + 2 and all(key for _n, key in ends[2])  # listed with their keys
    assert set(bundles) == set(through)  # but their bundles only on request
    for i in range(ENDS_EAGER, ENDS_LISTED):
        put(f"{i + 2:032x}", 42 + i % 3)
    assert counts() == recount() == {40: 1, 41: 1, 42: 43, 43: 43, 44: 42}
    k, ends, through, bundles = place.lookup("ns", links, "ff" * 16, 0, 45, 8)
    assert k == 2 and sorted(ends[2]) == [(n, "") for n in range(40, 45)]  # many: lengths only
    assert set(bundles) == set(through) and len(through) <= 8  # a few passing through, none for the ends
    got = place.resolve("ns", "bb", ["00" * 16, "ee" * 16, f"{5:032x}"])
    assert got == {"00" * 16: b"raw-" + b"00" * 16, f"{5:032x}": b"raw-" + f"{5:032x}".encode()}
    # a deleted snapshot and an expired bundle both leave the counts equal to the ends
    assert place.delete_bundle("ns", "01" * 16, "bb", links[1:3])
    client.delete(base + "r:" + f"{5:032x}")
    assert place.resolve("ns", "bb", [f"{5:032x}"]) == {}
    assert counts() == recount() and 41 not in counts() and counts()[42] == 42
    # the count key lost (evicted, or written before counts were kept): the next lookup counts again
    put("ef" * 16, 44)  # ENDS_LISTED + 1 ends again
    client.delete(base + "n:bb")
    k, ends, _through, _bundles = place.lookup("ns", links, "ff" * 16, 0, 45, 8)
    assert sorted(n for n, _key in ends[2]) == [40, 42, 43, 44] and counts() == recount()
    place.close()


def test_longer_trimmable_snapshot_serves_the_shared_prefix(load_tiny, redis_server, tmp_path):
    model, _ = load_tiny("llama")
    toks = prompt(80, seed=4)
    a = kvstore.SnapshotStore(tmp_path / "a", block_tokens=16)
    attach(a, redis_server.url)
    a.put("fp", toks, prefill(model, toks)[0], "user")
    assert a.remote.flush(30)
    b = kvstore.SnapshotStore(tmp_path / "b", block_tokens=16)
    attach(b, redis_server.url)
    req = toks[:50] + prompt(5, seed=5)
    cache, rest, match = b.fetch("fp", req)
    assert match.source == "remote" and match.kind == "longer" and match.tokens == 50
    warm = model(mx.array(rest)[None], cache=cache)[0, -1]
    assert float(mx.abs(warm - prefill(model, req)[1]).max()) == 0.0
    a.close()
    b.close()


def test_tenants_and_models_never_cross(load_tiny, redis_server, tmp_path):
    model, _ = load_tiny("llama")
    toks = prompt(48, seed=6)
    a = kvstore.SnapshotStore(tmp_path / "a", block_tokens=16)
    attach(a, redis_server.url)
    a.put("fp", toks, prefill(model, toks)[0], "system", tenant="alice")
    assert a.remote.flush(30)
    b = kvstore.SnapshotStore(tmp_path / "b", block_tokens=16)
    attach(b, redis_server.url)
    req = toks + [5, 6]
    assert b.fetch("fp", req, tenant="bob")[2] is None
    assert b.fetch("fp", req)[2] is None
    assert b.fetch("other-fp", req, tenant="alice")[2] is None
    assert b.fetch("fp", req, tenant="alice")[2].source == "remote"
    a.close()
    b.close()


def test_a_lookup_is_one_round_trip(load_tiny, redis_server, tmp_path):
    """Counts the commands the client writes to the socket (a spy on the real client)."""
    model, _ = load_tiny("llama")
    toks = prompt(200, seed=7)
    a = kvstore.SnapshotStore(tmp_path / "a", block_tokens=16)
    attach(a, redis_server.url)
    a.put("fp", toks, prefill(model, toks)[0], "system")
    assert a.remote.flush(30)
    b = kvstore.SnapshotStore(tmp_path / "b", block_tokens=16)
    tier = attach(b, redis_server.url)
    conn = tier.place.open().connection_pool.get_connection()
    tier.place.client.connection_pool.release(conn)
    sent = []
    real = type(conn).send_packed_command

    def spy(self, command, check_health=True):
        sent.append(command)
        return real(self, command, check_health)

    type(conn).send_packed_command = spy
    try:
        assert b.fetch("fp", prompt(300, seed=8))[2] is None  # a miss: one call
        assert len(sent) == 1
        sent.clear()
        got = b.fetch("fp", toks + [1, 2, 3])[2]  # a hit: the lookup, then one pipeline of chunks
        assert got.source == "remote" and len(sent) == 2
    finally:
        type(conn).send_packed_command = real
    a.close()
    b.close()


def got_key(cache, tokens):
    return cache.store.lookup("fp", tokens).key


def test_tiered_cache_layers(load_tiny, redis_server, tmp_path):
    model, _ = load_tiny("llama")
    toks = prompt(64, seed=9)
    a = kvstore.TieredPromptCache(tmp_path / "a", store_options={"block_tokens": 16}, remote=redis_server.url)
    a.insert_cache("fp", toks, prefill(model, toks)[0], cache_type="system")
    assert a.flush(30) and a.store.remote.flush(30)
    b = kvstore.TieredPromptCache(tmp_path / "b", store_options={"block_tokens": 16}, remote=redis_server.url)
    req = toks + [3, 4]
    got = b.fetch("fp", req)
    assert got.source == "remote" and got.reused == 64
    # written into the local store and, through it, promoted into memory
    again = b.fetch("fp", req)
    assert again.source == "memory" and again.reused == 64
    assert b.store.entries()[0].key == got_key(b, req)
    c = b.counters()
    assert c["hits.remote"] == 1 and c["remote.adopted"] == 1
    a.close()
    b.close()


def test_bad_urls_are_one_line_errors(tmp_path):
    for url in ("http://localhost:6379", "redis://", "redis://host:notaport/0", "redis://h:1/x", "nonsense"):
        with pytest.raises(kvstore.InvalidInput) as exc:
            RemoteTier(url)
        assert "\n" not in str(exc.value)
    out = subprocess.run([sys.executable, "-m", "kvstore_cli.main", "--store", str(tmp_path / "s"), "remote", "list",
                          "--remote", "ftp://x"], capture_output=True, text=True)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1 and "scheme" in out.stderr


def test_cli_push_list_pull_prune(load_tiny, redis_server, tmp_path):
    model, _ = load_tiny("llama")
    src = kvstore.SnapshotStore(tmp_path / "src", block_tokens=16)
    for seed, tier in ((10, "system"), (11, "user"), (12, "assistant")):
        toks = prompt(40, seed=seed)
        src.put("fp", toks, prefill(model, toks)[0], tier)
    src.close()

    def kv(store, *args):
        out = subprocess.run([sys.executable, "-m", "kvstore_cli.main", "--store", str(tmp_path / store), "remote",
                              *args, "--remote", redis_server.url], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "Pushed 2 of 2" in kv("src", "push", "-f", "tier=system,user")
    listed = json.loads(kv("src", "list", "--format", "json"))
    assert sorted(e["tier"] for e in listed) == ["system", "user"]
    assert redis_server.password not in kv("src", "stats")
    assert "Pulled 1 of 1" in kv("dst", "pull", "-f", "tier=system")
    dst = kvstore.SnapshotStore(tmp_path / "dst", readonly=True)
    assert [e.tier for e in dst.entries()] == ["system"]
    dst.close()
    assert "About to delete 1" in kv("src", "prune", "-f", "tier=user", "-y")
    assert [e["tier"] for e in json.loads(kv("src", "list", "--format", "json"))] == ["system"]


def test_redis_cluster_of_three_nodes(load_tiny, tmp_path):
    """A 3-node loopback cluster: a namespace's index in one slot, each blob's chunks in one."""
    from redis_server import RedisCluster

    cluster = RedisCluster(tmp_path / "cluster").start()
    try:
        model, _ = load_tiny("llama")
        stores = []
        for name in ("a", "b"):
            store = kvstore.SnapshotStore(tmp_path / name, block_tokens=16)
            tier = attach(store, cluster.url)
            assert tier.place.cluster
            stores.append(store)
        a, b = stores
        keys = []
        for seed in range(4):  # blobs of several snapshots land on several nodes
            toks = prompt(40, seed=20 + seed)
            keys.append((toks, a.put("fp", toks, prefill(model, toks)[0], "system")))
        assert a.remote.flush(60) and a.remote.stats()["remote.pushed"] == 4
        for toks, _key in keys:
            req = toks + [2, 3]
            cache, rest, match = b.fetch("fp", req)
            assert match.source == "remote"
            warm = model(mx.array(rest)[None], cache=cache)[0, -1]
            assert float(mx.abs(warm - prefill(model, req)[1]).max()) == 0.0
        # blob ids are random, so their slots are too: 4 snapshots' blobs and the index all
        # land on one of the 3 nodes about once in 80 runs; more snapshots until they spread
        # (12 at most: all on one node then about once in 500,000 runs)
        def nodes_used():
            return sum(1 for n in cluster.nodes if n.client().dbsize())

        seed = 24
        while nodes_used() < 2 and seed < 32:
            toks = prompt(40, seed=seed)
            a.put("fp", toks, prefill(model, toks)[0], "system")
            assert a.remote.flush(60)
            seed += 1
        assert nodes_used() >= 2
        a.close()
        b.close()
    finally:
        cluster.kill()


def test_serve_with_remote_second_host_hits(tiny_model, redis_server, tmp_path):
    """Host a warms into its store and pushes; a server on host b (its own empty store) hits
    the system prompt from Redis on its first request. A server whose remote is unreachable
    serves anyway and says so once."""
    from kvstore_cli.demo import SYSTEM, LocalServer, cached
    from redis_server import free_port

    model = tiny_model("llama")
    kv = [sys.executable, "-m", "kvstore_cli.main"]
    out = subprocess.run(kv + ["--store", str(tmp_path / "a"), "warm", "--model", str(model), "--system", SYSTEM,
                               "--remote", redis_server.url, "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (snap,) = json.loads(out.stdout)["snapshots"]
    with LocalServer(tmp_path / "b", model, "--remote", redis_server.url) as s:
        first = s.chat("Do you sell hammers?")
    assert cached(first) >= snap["tokens"]
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with LocalServer(tmp_path / "c", model, "--remote", dead) as s:
        answers = [s.chat(q) for q in ("Do you sell nails?", "And screws?")]
        log = s.stop()
    assert all(a["choices"] for a in answers)
    assert log.count("unavailable") == 1 and "Traceback" not in log
