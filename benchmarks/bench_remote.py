"""Remote tier: a hit from Redis against a cold prefill, a local disk hit and
a raw pipelined GET of the same bytes from the same server, side by side.

One run starts its own redis-server on 127.0.0.1 and, for each prompt size
(KV of the llama-135m shape, random bf16: a restore does not care how the
KV was computed), interleaves with the order rotating every repeat:

- ``remote``: ``SnapshotStore.fetch`` on a host whose local store lacks the
  snapshot (lookup, chunk GETs, checks, load into fresh MLX arrays)
- ``raw_get``: one pipeline of GETs of the same chunk keys (redis-py, the
  bytes only: the floor for moving these bytes through this client)
- ``disk``: a local disk hit of the same snapshot (page cache warm)

The remote hit is split into ``lookup`` (one script call) and ``read``
(the chunk pipeline received into the cache's buffers, digests and row
checksums included; ``alloc``, the part of it that allocates and zeroes
those buffers). Then: 1, 2 and 4 concurrent readers (threads,
each its own host and connection) against the same number of raw GET
readers; the chunk size sweep; and a first request on a fresh host (empty
local store, new connection) with and without the remote, with a real cold
prefill of the model for the latter. Last, lookups of a system prompt that
0 to 20,000 conversations continue (the script's time, and whether the
prompt's own snapshot is still found).

Run: ``python benchmarks/bench_remote.py --quick`` (or ``--full``).
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log, now  # noqa: E402

MODEL = "llama-135m"
MODES = {
    "quick": {"sizes": [512, 2048, 8192], "repeats": 5, "readers": [1, 2, 4], "reader_size": 2048,
              "chunks": [1 << 20, 4 << 20, 16 << 20], "chunk_size": 2048, "cold": [512],
              "popular": [0, 10, 100, 1000, 5000], "lookups": 200},
    "full": {"sizes": [512, 2048, 8192], "repeats": 9, "readers": [1, 2, 4], "reader_size": 8192,
             "chunks": [256 << 10, 1 << 20, 4 << 20, 16 << 20], "chunk_size": 8192, "cold": [512, 2048],
             "popular": [0, 10, 100, 1000, 5000, 20000], "lookups": 200},
}
FP = "bench-remote"


def start_redis(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    password = "bench"
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder),
                             "--requirepass", password], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"redis://:{password}@127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


class Timed:
    """Seconds spent in the remote tier's stages (its functions wrapped in this process)."""

    def __init__(self):
        import kvstore.loader as L
        import kvstore.remote as R

        self.t = {}
        self._wrap(R.RedisPlace, "lookup", "lookup")
        self._wrap(R.RemoteTier, "_read", "read")
        self._wrap(L, "alloc", "alloc")

    def _wrap(self, owner, name, stage):
        real = getattr(owner, name)

        def timed(*a, **k):
            t0 = now()
            try:
                return real(*a, **k)
            finally:
                self.t[stage] = self.t.get(stage, 0.0) + now() - t0

        setattr(owner, name, timed)

    def take(self):
        out, self.t = self.t, {}
        return out


def tokens(n, seed=0):
    import numpy as np

    return [int(t) for t in np.random.RandomState(seed).randint(5, 40000, n)]


def raw_get(place, specs):
    c = place.open()
    pipe = c.pipeline(transaction=False)
    for blob, count in specs:
        for i in range(count):
            pipe.get(place.chunk_key(blob, i))
    return sum(len(x) for x in pipe.execute())


def chunk_specs(tier, store, key):
    from kvstore.records import decode_segment, decode_snapshot

    with store.index.read() as r:
        snap = decode_snapshot(r.snapshot(bytes.fromhex(key)))
        sizes = [(e.segment.hex(), decode_segment(r.segment(e.segment)).size) for e in snap.extents]
    return [(b, max(1, -(-size // tier.chunk_bytes))) for b, size in sizes], sum(s for _b, s in sizes)


def remote_hit(store, req):
    """One remote hit on a host without the snapshot; the local copy made behind it is removed untimed."""
    t0 = now()
    cache, _rest, match = store.fetch(FP, req)
    dt = now() - t0
    assert match is not None and match.source == "remote", match
    store.remote.flush(60)
    store.delete(match.key)
    store.remote._held.clear()
    del cache
    return dt


def host(folder, url, **opts):
    import kvstore
    from kvstore.remote import RemoteTier, attach

    store = kvstore.SnapshotStore(folder, fsync=False)
    if url:
        attach(store, RemoteTier(url, **opts))
    return store


def bench_size(cfg, url, tmp, n, timed):
    import mlx.core as mx

    log(f"size {n}")
    writer = host(tmp / f"w{n}", url)
    toks = tokens(n, seed=n)
    key = writer.put(FP, toks, C.shape_cache(MODEL, n), "system")
    writer.remote.flush(120)
    specs, nbytes = chunk_specs(writer.remote, writer, key)
    reader = host(tmp / f"r{n}", url, push=())
    req = toks + [7]
    rows = {"remote": [], "raw_get": [], "disk": []}
    stages = []
    runs = {
        "remote": lambda: remote_hit(reader, req),
        "raw_get": lambda: _timed(lambda: raw_get(reader.remote.place, specs)),
        "disk": lambda: _timed(lambda: writer.fetch(FP, req, record=False)),
    }
    for name in runs:  # warm-up: connections, scripts, page cache
        runs[name]()
    timed.take()
    for r in range(cfg["repeats"]):
        for name in C.rotated(list(runs), r):
            C.fresh_memory()
            rows[name].append(runs[name]())
            if name == "remote":
                stages.append(timed.take())
            timed.take()
    med = {k: C.median(v) for k, v in rows.items()}
    st = {s: C.median([x.get(s, 0.0) for x in stages]) for s in ("lookup", "read", "alloc")}
    out = {"tokens": n, "bytes": nbytes, "chunks": sum(c for _b, c in specs), "seconds": rows, "median": med,
           "remote_stages": st, "remote_over_raw_get": med["remote"] / med["raw_get"],
           "remote_over_disk": med["remote"] / med["disk"]}
    log(f"  remote {med['remote']*1e3:.1f} ms, raw GET {med['raw_get']*1e3:.1f} ms "
        f"({out['remote_over_raw_get']:.2f}x), disk {med['disk']*1e3:.1f} ms; stages "
        + ", ".join(f"{k} {v*1e3:.1f}" for k, v in st.items()))
    mx.clear_cache()
    writer.close()
    reader.close()
    return out


def _timed(fn):
    t0 = now()
    fn()
    return now() - t0


def bench_readers(cfg, url, tmp):
    """``k`` threads each doing remote hits (own host, own connection) against ``k`` raw GET threads."""
    n = cfg["reader_size"]
    writer = host(tmp / "rw", url)
    toks = tokens(n, seed=99)
    key = writer.put(FP, toks, C.shape_cache(MODEL, n), "system")
    writer.remote.flush(120)
    specs, nbytes = chunk_specs(writer.remote, writer, key)
    out = []
    for k in cfg["readers"]:
        hosts = [host(tmp / f"rr{k}-{i}", url, push=()) for i in range(k)]
        res = {}
        for name in ("remote", "raw_get"):
            times = [[] for _ in range(k)]

            def work(i, name=name, times=times):
                for _ in range(max(2, cfg["repeats"] // 2)):
                    if name == "remote":
                        times[i].append(remote_hit(hosts[i], toks + [7]))
                    else:
                        times[i].append(_timed(lambda: raw_get(hosts[i].remote.place, specs)))

            threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
            t0 = now()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = now() - t0
            flat = [x for ts in times for x in ts]
            # throughput of k readers each taking the median time per restore
            res[name] = {"median_s": C.median(flat), "wall_s": wall, "seconds": flat,
                         "gb_per_s": k * nbytes / C.median(flat) / 1e9}
        res["readers"], res["remote_over_raw_get"] = k, res["remote"]["median_s"] / res["raw_get"]["median_s"]
        log(f"  {k} readers: remote {res['remote']['median_s']*1e3:.1f} ms, raw GET "
            f"{res['raw_get']['median_s']*1e3:.1f} ms ({res['remote_over_raw_get']:.2f}x)")
        out.append(res)
        for h in hosts:
            h.close()
    writer.close()
    return {"tokens": n, "bytes": nbytes, "rows": out}


def bench_chunks(cfg, url, tmp):
    """The remote hit at each chunk size (separate key prefixes on the same server)."""
    n = cfg["chunk_size"]
    toks = tokens(n, seed=7)
    cache = C.shape_cache(MODEL, n)
    out = []
    for cb in cfg["chunks"]:
        prefix = f"chunks{cb}"
        writer = host(tmp / f"cw{cb}", url, prefix=prefix, chunk_bytes=cb)
        writer.put(FP, toks, cache, "system")
        writer.remote.flush(120)
        reader = host(tmp / f"cr{cb}", url, prefix=prefix, chunk_bytes=cb, push=())
        remote_hit(reader, toks + [7])
        times = [remote_hit(reader, toks + [7]) for _ in range(cfg["repeats"])]
        out.append({"chunk_bytes": cb, "median_s": C.median(times), "seconds": times})
        log(f"  chunks of {cb >> 10} KB: {C.median(times)*1e3:.1f} ms")
        writer.close()
        reader.close()
    return {"tokens": n, "rows": out}


def bench_fresh(cfg, url, tmp):
    """A first request on a fresh host: empty local store, new connection; with the remote
    (connect + remote hit + suffix prefill) and without it (cold prefill of the whole prompt)."""
    import mlx_lm

    model, _ = mlx_lm.load(str(C.model_dir(MODEL)))
    out = []
    for n in cfg["cold"]:
        toks = tokens(n, seed=n + 1)
        cache, _ = C.prefill(model, toks)
        writer = host(tmp / f"fw{n}", url)
        writer.put(FP, toks, cache, "system")
        writer.remote.flush(120)
        writer.close()
        req = toks + tokens(16, seed=5)
        with_remote, without = [], []
        for r in range(max(2, cfg["repeats"] // 3)):
            t0 = now()
            h = host(tmp / f"fresh{n}-{r}", url, push=())
            c, rest, match = h.fetch(FP, req)
            assert match is not None and match.source == "remote"
            C.prefill(model, rest, cache=c)
            with_remote.append(now() - t0)
            h.close()
            t0 = now()
            h = host(tmp / f"cold{n}-{r}", None)
            c, rest, match = h.fetch(FP, req)
            C.prefill(model, rest, cache=c)
            without.append(now() - t0)
            h.close()
        row = {"tokens": n, "with_remote_s": C.median(with_remote), "without_s": C.median(without)}
        row["speedup"] = row["without_s"] / row["with_remote_s"]
        log(f"  fresh host, {n} tokens: with remote {row['with_remote_s']*1e3:.0f} ms, "
            f"without {row['without_s']*1e3:.0f} ms ({row['speedup']:.1f}x)")
        out.append(row)
    return out


def bench_popular(cfg, url):
    """Lookups of a system prompt that N conversations continue, all ending in the block
    right after it (their first turns): the script's time and whether the prompt's own
    snapshot is found, as N grows. Index entries and bundles of 2 KB written through
    ``RedisPlace`` (the script's work does not depend on what a bundle holds)."""
    import os
    import statistics

    from kvstore.backends.redis_index import ENDS_EAGER, ENDS_LISTED, MAX_RECORDS, RedisPlace

    place = RedisPlace(url, prefix="popular")
    links = [f"{i:032x}" for i in range(1, 8)]  # levels 0..6 of the requests
    raw, prompt_key = os.urandom(2048), "ab" * 16
    place.put_bundle("ns", prompt_key, raw, 64, links[3], links[1:4], b"i")  # the prompt: 64 tokens
    rows, have = [], 0
    for n in cfg["popular"]:
        for i in range(have, n):  # first turns: 65-80 tokens, ending after the block after the prompt
            place.put_bundle("ns", f"{i:032x}", raw, 65 + i % 16, links[4], links[1:5], b"i")
        have = n
        times, found, calls = [], False, 0
        own = {n: os.urandom(16).hex() for n in range(65, 81)}  # the request's own keys of those lengths
        for _ in range(cfg["lookups"]):
            t = now()
            _k, ends, _through, bundles = place.lookup("ns", links[:6], "ff" * 16, 0, 90, 8)
            got, calls = set(bundles), 1
            # what the client does next, deepest level first: the conversations' level asks for the
            # request's own key of each length listed there (none is stored), then the prompt's
            listed = ends.get(4, [])
            # listed by keys: none is the request's own, nothing to ask; by lengths: ask for each
            asked = sorted({own[n] for n, key in listed if not key})
            if asked:
                place.resolve("ns", links[4], asked)
                calls += 1
            if prompt_key not in bundles:
                bundles = place.resolve("ns", links[3], [prompt_key])
                calls += 1
            times.append(now() - t)
            found = prompt_key in bundles
        rows.append({"conversations": n, "p50_s": statistics.median(times), "p99_s": C.summary(times, p99=True)["p99"],
                     "found": found, "calls": calls,
                     "listed": "lengths" if any(not key for _n, key in ends.get(4, [])) else
                               "bundles" if ends.get(4) and all(key in got for _n, key in ends[4]) else
                               "keys" if ends.get(4) else "-"})
        log(f"  popular prompt, {n} conversations: lookup p50 {rows[-1]['p50_s'] * 1e3:.2f} ms, found {found}")
    place.close()
    return {"rows": rows, "ends_eager": ENDS_EAGER, "ends_listed": ENDS_LISTED, "max_records": MAX_RECORDS,
            "lookups": cfg["lookups"]}


def main(argv=None):
    parser = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    cfg = MODES[args.mode]
    result = C.header("remote", args.mode, argv)
    import redis

    result["client"] = {"redis": redis.__version__, "hiredis": bool(redis.utils.HIREDIS_AVAILABLE)}
    tmp = Path(tempfile.mkdtemp(prefix="kvstore-bench-remote-"))
    proc, url = start_redis(tmp)
    timed = Timed()
    try:
        result["sizes"] = [bench_size(cfg, url, tmp, n, timed) for n in cfg["sizes"]]
        result["readers"] = bench_readers(cfg, url, tmp)
        result["chunks"] = bench_chunks(cfg, url, tmp)
        result["fresh_host"] = bench_fresh(cfg, url, tmp)
        result["popular"] = bench_popular(cfg, url)
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    path = C.finish(result, out=args.out)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
