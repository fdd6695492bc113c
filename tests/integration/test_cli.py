"""The installed ``kvstore`` command, run in subprocesses against real stores.

Snapshots are real prompt caches of tiny llama (plain KV) and qwen3_5 (linear
attention + KV) models, prefilled here with MLX; the command under test never
loads MLX itself.
"""

import json
import os
import pty
import random
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

import kvstore
from kvstore.backends.files import blob_relpath
from kvstore_cli.fmt import size

KVSTORE = shutil.which("kvstore") or str(Path(sys.executable).with_name("kvstore"))
SYSTEM = ("You are a careful assistant for a shipping company. Answer in short sentences, "
          "name your sources, and ask before you guess. ") * 2
QUESTIONS = (" What is the capital of France?", " How many days are in a week?")
ANSWER = " The capital of France is Paris."
EXTRA = 7  # a token appended to requests so a stored snapshot is the best prefix


@dataclass
class Snap:
    name: str
    family: str
    fp: str
    tier: str
    tokens: list
    cache: list
    state: list  # evaluated arrays of the cold prefill


@dataclass
class Seed:
    path: Path
    snaps: dict  # key -> Snap
    made: float

    def key(self, name):
        return next(k for k, s in self.snaps.items() if s.name == name)


def prefill(model, tokens):
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    state = [a for _, a in tree_flatten([c.state for c in cache])]
    mx.eval(state)
    return cache, state


@pytest.fixture(scope="module")
def seed(tmp_path_factory, load_tiny, tiny_model):
    """A store with 7 snapshots: llama system/user/user/assistant, qwen3_5 system/user/assistant.

    The users and the assistant extend the system prompt (they share its segments)."""
    path = tmp_path_factory.mktemp("seed") / "store"
    snaps = {}
    with kvstore.SnapshotStore(path, fsync=False) as store:
        for family, n_users in (("llama", 2), ("qwen3_5", 1)):
            model, tok = load_tiny(family)
            fp = kvstore.fingerprint(tiny_model(family))
            sys_toks = tok.encode(SYSTEM)
            assert len(sys_toks) > 64  # spans a full block: its segment is shared
            prompts = [("system", "system", sys_toks)]
            prompts += [(f"user{i}", "user", sys_toks + tok.encode(q)) for i, q in enumerate(QUESTIONS[:n_users])]
            prompts.append(("assistant", "assistant", prompts[1][2] + tok.encode(ANSWER)))
            for name, tier, toks in prompts:
                cache, state = prefill(model, toks)
                key = store.put(fp, toks, cache, tier=tier)
                assert key is not None
                snaps[key] = Snap(f"{family}.{name}", family, fp, tier, toks, cache, state)
    return Seed(path, snaps, time.time())


@pytest.fixture
def store(seed, tmp_path):
    """A private copy of the seed store."""
    dest = tmp_path / "store"
    shutil.copytree(seed.path, dest)
    return dest


def start(*args, store=None, env=None, stdin=subprocess.DEVNULL):
    """Start the installed kvstore command (text pipes).

    ``env`` defaults to this process's environment without $KVSTORE_DIR."""
    env = env or {k: v for k, v in os.environ.items() if k != "KVSTORE_DIR"}
    argv = [KVSTORE] + (["--store", str(store)] if store else []) + [str(a) for a in args]
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p, timeout=60):
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def kv(*args, **kw):
    """Run the installed kvstore command; return the CompletedProcess."""
    return finish(start(*args, **kw))


def kv_all(*calls, store=None):
    """Run several commands at once (readers only); return their CompletedProcess in order."""
    return [finish(p) for p in [start(*c, store=store) for c in calls]]


def ok(*args, **kw):
    p = kv(*args, **kw)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def rows(store, *args):
    return json.loads(ok("ls", "--format", "json", *args, store=store).stdout)


def keys(store, *args):
    return ok("ls", "-q", *args, store=store).stdout.split()


def one_line_error(p, code, text):
    assert p.returncode == code, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert text in p.stderr, p.stderr


def blob_path(store, blob_id):
    return Path(store) / "blobs" / blob_relpath(blob_id)


def blob_bytes(store):
    return sum(f.stat().st_size for f in (Path(store) / "blobs").rglob("*") if f.is_file())


def restore(st, snap):
    """Fetch ``snap`` back from an open store; return its cache arrays."""
    cache, rest = st.fetch_nearest(snap.fp, snap.tokens + [EXTRA])
    assert cache is not None and rest == [EXTRA], snap.name
    return [a for _, a in tree_flatten([c.state for c in cache])]


def assert_same_kv(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if not isinstance(a, mx.array):  # e.g. an offset
            assert a == b
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert mx.array_equal(a, b).item()


def touch(store, seed, order):
    """Use the snapshots in ``order`` (names), each one a hit, the last the most recent."""
    with kvstore.SnapshotStore(store, fsync=False) as st:
        for name in order:
            snap = seed.snaps[seed.key(name)]
            assert st.lookup(snap.fp, snap.tokens + [EXTRA])[0] == seed.key(name)
            restore(st, snap)
            time.sleep(0.002)


# ------------------------------------------------------------------- basics
def test_help_version_and_usage_errors(store):
    p = ok("--help")
    for name in ("ls", "stats", "rm", "prune", "gc", "verify", "export", "import", "serve", "warm"):
        assert f"\n  {name} " in p.stdout
    assert ok("--version").stdout.startswith("kvstore ")
    assert kv().returncode == 2
    bad = {
        ("frobnicate",): "unknown command",
        ("ls", "-f", "size>>1"): "invalid size",
        ("ls", "-f", "colour=red"): "unknown filter field",
        ("ls", "-f", "tier=bogus"): "tiers are",
        ("ls", "-f", "tokens>many"): "not a whole number",
        ("ls", "--sort", "colour"): "cannot sort by",
        ("prune", "--older-than", "7x"): "invalid duration",
        ("prune", "--max-size", "lots"): "invalid size",
        ("prune", "--tier", "system,bogus"): "invalid tier",
    }
    for p, text in zip(kv_all(*bad, store=store), bad.values()):
        one_line_error(p, 2, text)
    assert len(os.listdir(Path(store) / "blobs")) > 0 and len(keys(store)) == 7


def test_missing_store_is_never_created(tmp_path):
    missing = tmp_path / "nope"
    calls = (["verify"], ["export", tmp_path / "a.tar"], ["rm", "-y", "abcd"],
             ["prune", "--tier", "user", "-y"], ["gc"])
    for p in kv_all(*calls, store=missing):
        one_line_error(p, 1, f"no kvstore store at {missing}")
    # a fresh machine: ls and stats show an empty store (and still create nothing)
    ls, js, stats = kv_all(["ls"], ["--format", "json", "ls"], ["stats"], store=missing)
    assert ls.returncode == js.returncode == stats.returncode == 0, (ls.stderr, js.stderr, stats.stderr)
    assert ls.stdout.splitlines()[0].split()[:5] == ["KEY", "MODEL", "TIER", "TOKENS", "SIZE"]
    assert "0 snapshots" in ls.stdout and f"no store at {missing}" in ls.stderr
    assert json.loads(js.stdout) == [] and "not created yet" in stats.stdout
    assert not missing.exists()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    one_line_error(kv("gc", store=tmp_path / "plain"), 1, "is not a kvstore store")
    one_line_error(kv("import", tmp_path / "a.tar", store=tmp_path / "plain"), 1, "no archive at")
    assert sorted(os.listdir(tmp_path / "plain")) == ["notes.txt"]


def test_store_location_from_env_and_platform(store, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KVSTORE_DIR"}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    default = (tmp_path / "Library" / "Caches" / "kvstore" if sys.platform == "darwin"
               else tmp_path / "xdg" / "kvstore")
    one_line_error(kv("gc", env=env), 1, f"no kvstore store at {default}")
    assert f"no store at {default}" in kv("ls", env=env).stderr
    for args in (["--help"], ["ls", "--help"]):  # the real path, not "the user cache folder"
        # (argparse wraps a long path anywhere)
        assert f"default:{default}," in "".join(kv(*args, env=env).stdout.split())
    assert not default.exists()
    assert len(ok("ls", "-q", env=env | {"KVSTORE_DIR": str(store)}).stdout.split()) == 7


# ----------------------------------------------------------------------- ls
def test_ls_human_json_quiet(store, seed):
    p = ok("ls", store=store)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["KEY", "MODEL", "TIER", "TOKENS", "SIZE", "OWN", "SHARED", "HITS", "ACCESSED", "AGE"]
    assert len(lines) == 9 and lines[-1].startswith("total: 7 snapshots") and lines[-1].endswith("(the whole store)")
    for key, snap in seed.snaps.items():
        line = next(ln for ln in lines if ln.startswith(key[:12]))
        assert f" {snap.tier} " in line and f" {len(snap.tokens)} " in line
        assert any(u in line for u in (" kB", " MB"))
    # global options before or after the command
    data = rows(store)
    assert data == json.loads(ok("--format", "json", "ls", store=store).stdout)
    assert {r["key"] for r in data} == set(seed.snaps)
    for r in data:
        snap = seed.snaps[r["key"]]
        assert r["model"] == Path(r["model"]).name and r["fingerprint"] == snap.fp
        assert (r["tier"], r["tokens"]) == (snap.tier, len(snap.tokens))
        assert r["bytes"] > 0 and r["shared_bytes"] > 0 and r["hits"] == 0
        for t in ("created", "accessed"):
            assert abs(datetime.fromisoformat(r[t]).timestamp() - seed.made) < 120
    assert sorted(keys(store)) == sorted(seed.snaps)
    assert ok("-q", "ls", store=store).stdout == ok("ls", "-q", store=store).stdout


def test_ls_filters_sort_limit(store, seed):
    snaps = seed.snaps
    with kvstore.SnapshotStore(store, readonly=True) as st:
        sizes = {e.key: e.bytes for e in st.entries()}
    cut = sorted(sizes.values())[3]
    n_sys = len(snaps[seed.key("llama.system")].tokens)
    where = lambda pred: sorted(k for k, s in snaps.items() if pred(s))  # noqa: E731
    expect = {
        ("-f", "tier=system"): where(lambda s: s.tier == "system"),
        ("-f", "tier=user,assistant"): where(lambda s: s.tier != "system"),
        ("-f", "tier!=system"): where(lambda s: s.tier != "system"),
        ("-f", "model=llama"): where(lambda s: s.family == "llama"),  # fingerprint prefix
        ("-f", f"model={snaps[seed.key('qwen3_5.user0')].fp.name}"): where(lambda s: s.family == "qwen3_5"),
        ("-f", "model=llama", "-f", "tier=assistant"): [seed.key("llama.assistant")],
        ("-f", f"key={seed.key('qwen3_5.user0')[:6]}"): [seed.key("qwen3_5.user0")],
        ("-f", f"tokens>{n_sys}"): where(lambda s: len(s.tokens) > n_sys),
        ("-f", f"size>={cut}B"): sorted(k for k, b in sizes.items() if b >= cut),
        ("-f", f"size<{cut / 1000}kB"): sorted(k for k, b in sizes.items() if b < cut),
        ("-f", "size>1GB"): [],
        ("-f", "accessed>7d"): [],
        ("-f", "hits=0", "-f", "created<1h", "-f", "accessed<7d"): sorted(snaps),
    }
    for p, want in zip(kv_all(*(("ls", "-q") + a for a in expect), store=store), expect.values()):
        assert p.returncode == 0 and sorted(p.stdout.split()) == want, (p.args, p.stderr)
    # sort, descending with '-' or --reverse, limit
    calls = [("ls", "--format", "json", "--sort") + a for a in (
        ("tokens",), ("-tokens",), ("tokens", "--reverse"), ("tier",), ("key", "--limit", "3"), ("-size", "-n", "1"))]
    by_tokens, desc, rev, by_tier, first3, biggest = (json.loads(p.stdout) for p in kv_all(*calls, store=store))
    toks = [r["tokens"] for r in by_tokens]
    assert toks == sorted(toks) and len(toks) == 7
    assert [r["tokens"] for r in desc] == [r["tokens"] for r in rev] == sorted(toks, reverse=True)
    assert [r["tier"] for r in by_tier] == ["assistant"] * 2 + ["user"] * 3 + ["system"] * 2
    assert [r["key"] for r in first3] == sorted(snaps)[:3]
    assert [r["key"] for r in biggest] == [max(sizes, key=sizes.get)]


def test_ls_decode(store, seed, tmp_path, tiny_model):
    for r in rows(store, "--decode"):
        assert r["text"].startswith("You are a careful assistant"), r
    assert "You are a careful" in ok("ls", "--decode", store=store).stdout
    # a model whose tokenizer is gone: "?" and one warning
    model_dir = tmp_path / "llama-copy"
    shutil.copytree(tiny_model("llama"), model_dir)
    fp = kvstore.fingerprint(model_dir)
    other = tmp_path / "other"
    with kvstore.SnapshotStore(other, fsync=False) as st:
        for snap in seed.snaps.values():
            if snap.family == "llama" and snap.tier == "user":
                st.put(fp, snap.tokens, snap.cache, tier="user")
    (model_dir / "tokenizer.json").unlink()
    p = ok("ls", "--decode", "--format", "json", store=other)
    assert [r["text"] for r in json.loads(p.stdout)] == ["?", "?"]
    assert p.stderr.count("warning") == 1 and "tokenizer" in p.stderr


def test_access_age_filters_and_older_than(store, seed):
    # untouched snapshots are at least 4 s old, touched ones younger than 3 s
    # for the two commands right after the touch
    time.sleep(max(0.0, seed.made + 4.0 - time.time()))
    touch(store, seed, ["llama.user0", "qwen3_5.system"])
    stale = keys(store, "-f", "accessed>3s")
    p = ok("prune", "--older-than", "3s", "--dry-run", "--format", "json", store=store)
    fresh = {seed.key("llama.user0"), seed.key("qwen3_5.system")}
    assert set(stale) == set(seed.snaps) - fresh
    assert {r["key"] for r in json.loads(p.stdout)["snapshots"]} == set(seed.snaps) - fresh
    assert set(keys(store, "-f", "accessed<1h", "-f", "hits>0")) == fresh
    assert [r["hits"] for r in rows(store, "--sort", "-hits", "-n", "3")] == [1, 1, 0]


# -------------------------------------------------------------------- stats
def test_stats(store, seed):
    s = json.loads(ok("stats", "--format", "json", store=store).stdout)
    assert s["snapshots"] == 7 and s["tokens"] == sum(len(x.tokens) for x in seed.snaps.values())
    assert sorted(m["snapshots"] for m in s["by_model"].values()) == [3, 4]
    assert {t: d["snapshots"] for t, d in s["by_tier"].items()} == {"system": 2, "user": 3, "assistant": 2}
    assert s["bytes"] == s["disk_bytes"]["blobs"] == blob_bytes(store)
    assert 0 < s["map_used"] <= s["index_file_bytes"] and s["map_size"] >= s["map_used"]
    assert s["hits"] == 0 and s["gc"] == {}
    p = ok("stats", store=store)
    assert "snapshots  7 " in p.stdout and "nothing to clean" in p.stdout
    assert "MODEL" in p.stdout and "assistant" in p.stdout
    old = time.time() - 7200
    (Path(store) / "tmp" / "stale.part").write_bytes(b"x" * 10)
    os.utime(Path(store) / "tmp" / "stale.part", (old, old))
    s = json.loads(ok("stats", "--format", "json", store=store).stdout)
    assert s["gc"] == {"temp": 1}
    assert "1 item to clean (1 temp)" in ok("stats", store=store).stdout


# ----------------------------------------------------------------------- rm
def test_rm(store, seed):
    before = blob_bytes(store)
    sys_key = seed.key("llama.system")
    # the system prompt's segment is still used by its conversations: nothing freed
    p = ok("rm", "-y", "--format", "json", sys_key[:8], store=store)
    out = json.loads(p.stdout)
    assert out["deleted"] == 1 and out["freed_bytes"] == 0 == out["planned_bytes"]
    assert blob_bytes(store) == before and sys_key not in keys(store)
    rest = [seed.key(n) for n in ("llama.user0", "llama.user1", "llama.assistant")]
    p = ok("rm", "-y", *(k[:10] for k in rest), store=store)
    freed = before - blob_bytes(store)
    assert "About to delete 3 snapshots" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == f"Deleted 3 snapshots, freed {size(freed)}."
    assert set(keys(store)) == {k for k, s in seed.snaps.items() if s.family == "qwen3_5"}
    with kvstore.SnapshotStore(store, readonly=True) as st:
        assert st.total_bytes() == blob_bytes(store)


def test_rm_refuses_without_confirmation_and_bad_keys(store, seed):
    key = seed.key("qwen3_5.assistant")
    one_line_error(kv("rm", key, store=store), 2, "pass -y")
    one_line_error(kv("rm", "-y", "abcdef0123", store=store), 1, "matches no snapshots")
    one_line_error(kv("rm", "-y", "0" * 32, store=store), 1, f"no snapshot {'0' * 32}")
    one_line_error(kv("rm", "-y", key, "not-hex", store=store), 1, "not a snapshot key")
    first = sorted(seed.snaps)
    shared = next((a[0] for a, b in zip(first, first[1:]) if a[0] == b[0]), None)
    if shared:
        one_line_error(kv("rm", "-y", shared, store=store), 1, "matches several snapshots")
    assert kv("rm", store=store).returncode == 2
    assert len(keys(store)) == 7
    # on a terminal the answer decides
    assert tty("rm", key, store=store, answer="n\n").returncode == 1
    assert len(keys(store)) == 7
    p = tty("rm", key, store=store, answer="y\n")
    assert p.returncode == 0 and "Deleted 1 snapshot" in p.stdout
    assert key not in keys(store)


def tty(*args, store, answer):
    """Run kvstore with a pseudo-terminal as stdin and type ``answer``."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([KVSTORE, "--store", str(store), *args], stdin=slave, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        os.close(slave)
        os.write(master, answer.encode())
        out, err = p.communicate(timeout=30)
    finally:
        os.close(master)
    assert "Proceed? [y/N]" in err
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# -------------------------------------------------------------------- prune
def test_prune_order_policies_and_dry_run(store, seed):
    one_line_error(kv("prune", "-y", store=store), 2, "prune needs a policy")
    names = [s.name for s in seed.snaps.values()]
    random.Random(5).shuffle(names)
    touch(store, seed, names)  # access order = this order
    rank = {"assistant": 0, "user": 1, "system": 2}
    expected = sorted(names, key=lambda n: (rank[seed.snaps[seed.key(n)].tier], names.index(n)))
    files = sorted((Path(store) / "blobs").rglob("*"))
    plan = json.loads(ok("prune", "--older-than", "0s", "--dry-run", "--format", "json", store=store).stdout)
    assert [seed.snaps[r["key"]].name for r in plan["snapshots"]] == expected
    assert plan["deleted"] == 0 and plan["planned_bytes"] == blob_bytes(store)
    p = ok("prune", "--older-than", "0s", "--dry-run", store=store)
    assert "Would delete 7 snapshots" in p.stdout and "nothing deleted" in p.stdout
    assert sorted((Path(store) / "blobs").rglob("*")) == files and len(keys(store)) == 7
    # selections
    def dry(*policy):
        p = ok("prune", *policy, "--dry-run", "--format", "json", store=store)
        return [seed.snaps[r["key"]].name for r in json.loads(p.stdout)["snapshots"]]

    assert dry("--tier", "user") == [n for n in expected if ".user" in n]
    assert dry("--tier", "system", "--tier", "assistant") == [n for n in expected if ".user" not in n]
    assert dry("--model", "qwen3_5") == [n for n in expected if n.startswith("qwen3_5")]
    kept = {f: [n for n in reversed(names) if n.startswith(f)][:2] for f in ("llama", "qwen3_5")}
    assert dry("--keep-last", "2") == [n for n in expected if n not in kept["llama"] + kept["qwen3_5"]]
    assert dry("--older-than", "1h") == []
    one_line_error(kv("prune", "--model", "gpt", "-y", store=store), 1, "no snapshot in the store is of model")
    # --max-size: lower tiers and older snapshots go first, until the store fits
    total = blob_bytes(store)
    plan = json.loads(ok("prune", "--max-size", f"{total // 2}B", "--dry-run", "--format", "json",
                         store=store).stdout)
    assert [seed.snaps[r["key"]].name for r in plan["snapshots"]] == expected[: len(plan["snapshots"])]
    # minimal: without its last snapshot the plan would not make the store fit
    assert total - plan["planned_bytes"] <= total // 2 < total - plan["planned_bytes"] + plan["snapshots"][-1]["frees_bytes"]
    out = json.loads(ok("prune", "--max-size", f"{total - 1}B", "-y", "--format", "json", store=store).stdout)
    assert [seed.snaps[r["key"]].name for r in out["snapshots"]] == expected[:1]
    assert out["freed_bytes"] == total - blob_bytes(store) > 0
    assert set(keys(store)) == {seed.key(n) for n in expected[1:]}
    p = ok("prune", "--tier", "assistant,user", "-y", store=store)
    assert p.stdout.strip().splitlines()[-1].startswith("Deleted 4 snapshots, freed ")
    assert {seed.snaps[k].tier for k in keys(store)} == {"system"}
    assert "Nothing to delete." in ok("prune", "--tier", "user", "-y", store=store).stdout
    assert ok("verify", store=store).returncode == 0


# ----------------------------------------------------------------------- gc
def test_gc(store, seed):
    root = Path(store)
    old = time.time() - 7200
    stale_tmp, fresh_tmp = root / "tmp" / "stale.tmp", root / "tmp" / "fresh.tmp"
    stale_tmp.write_bytes(b"partial")
    fresh_tmp.write_bytes(b"in flight")
    os.utime(stale_tmp, (old, old))
    # an orphan: a blob file no record references, as a crash between write and index leaves
    victim = seed.key("llama.assistant")
    blobs = rows_blobs(store)
    own = [b for b in blobs[victim] if sum(b in bl for bl in blobs.values()) == 1]
    orphan = blob_path(store, "ab" + "0" * 30)
    orphan.parent.mkdir(exist_ok=True)
    shutil.copyfile(blob_path(store, own[0]), orphan)
    os.utime(orphan, (old, old))
    # a record whose blob is gone
    blob_path(store, own[0]).unlink()
    p = ok("gc", "--dry-run", "--format", "json", store=store)
    kinds = sorted(x["kind"] for x in json.loads(p.stdout)["problems"])
    assert kinds == ["missing", "orphan", "temp"]
    assert stale_tmp.exists() and orphan.exists() and victim in keys(store)
    p = ok("gc", store=store)
    assert "Cleaned 3 items (1 missing, 1 orphan, 1 temp)." in p.stdout
    assert not stale_tmp.exists() and not orphan.exists() and fresh_tmp.exists()
    assert set(keys(store)) == set(seed.snaps) - {victim}
    assert "Nothing to clean." in ok("gc", store=store).stdout
    p = ok("gc", "--grace", "0s", "--dry-run", store=store)
    assert "fresh.tmp" in p.stdout
    assert ok("verify", store=store).returncode == 0
    with kvstore.SnapshotStore(store, fsync=False) as st:
        for key in keys(store):
            assert_same_kv(restore(st, seed.snaps[key]), seed.snaps[key].state)


def rows_blobs(store):
    with kvstore.SnapshotStore(store, readonly=True) as st:
        return {e.key: e.blobs for e in st.entries()}


def test_gc_compact_writes_a_copy(store):
    p = ok("gc", "--compact", store=store)
    assert "stop every process" in p.stdout
    copy = Path(store) / "index.compact" / "data.mdb"
    assert copy.is_file() and copy.stat().st_size <= (Path(store) / "index" / "data.mdb").stat().st_size
    assert len(keys(store)) == 7


# ------------------------------------------------------------------- verify
def test_verify_corruption_and_fix(store, seed):
    p = ok("verify", store=store)
    assert "Verified 7 snapshots: no problems." in p.stdout
    victim = seed.key("llama.user1")
    blobs = rows_blobs(store)
    own = [b for b in blobs[victim] if sum(b in bl for bl in blobs.values()) == 1][0]
    with open(blob_path(store, own), "r+b") as f:  # flip one byte of tensor data
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 0x40]))
    p = kv("verify", store=store)
    assert p.returncode == 1 and victim in p.stdout and "checksum" in p.stdout
    assert kv("verify", victim[:8], store=store).returncode == 1
    assert kv("verify", seed.key("llama.user0"), store=store).returncode == 0
    p = kv("verify", "--fix", store=store)
    assert p.returncode == 1 and "quarantined 1 blob" in p.stdout
    assert (Path(store) / "quarantine" / f"{own}.safetensors").is_file() and not blob_path(store, own).exists()
    assert ok("verify", store=store).returncode == 0
    assert set(keys(store)) == set(seed.snaps) - {victim}
    with kvstore.SnapshotStore(store, fsync=False) as st:
        for key in keys(store):
            assert_same_kv(restore(st, seed.snaps[key]), seed.snaps[key].state)


# ------------------------------------------------------------ export/import
def test_export_import(store, seed, tmp_path):
    archive = tmp_path / "llama.tar"
    p = ok("export", archive, "-f", "model=llama", "-f", "tier!=assistant", store=store)
    assert p.stdout.startswith("Exported 3 snapshots (")
    p = ok("export", tmp_path / "all.tar", "--format", "json", store=store)
    assert json.loads(p.stdout)["snapshots"] == 7
    fresh = tmp_path / "fresh"
    p = ok("import", tmp_path / "all.tar", store=fresh)
    assert p.stdout.startswith("Imported 7 snapshots (")
    assert sorted(keys(fresh)) == sorted(seed.snaps)
    assert ok("verify", store=fresh).returncode == 0
    with kvstore.SnapshotStore(fresh, fsync=False) as st:
        for key, snap in seed.snaps.items():
            assert_same_kv(restore(st, snap), snap.state)
    assert ok("import", tmp_path / "all.tar", store=fresh).stdout.startswith("Imported 0 snapshots")
    other = tmp_path / "other"
    ok("import", archive, store=other)
    assert {seed.snaps[k].name for k in keys(other)} == {"llama.system", "llama.user0", "llama.user1"}
    one_line_error(kv("export", tmp_path / "x.tar", "-f", "model=gpt", store=store), 1, "no snapshot matches")
    assert not (tmp_path / "x.tar").exists()
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 64)
    one_line_error(kv("import", junk, store=other), 1, "cannot read archive")


# ------------------------------------------------------------------ no MLX
def test_admin_commands_do_not_import_mlx(store, tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        from kvstore_cli.main import main
        store = {str(store)!r}
        rcs = [main(["--store", store] + a) for a in (
            ["ls"], ["ls", "--decode"], ["stats"], ["verify"], ["gc", "--dry-run"],
            ["prune", "--tier", "assistant", "--dry-run"], ["export", {str(tmp_path / "a.tar")!r}],
            ["import", {str(tmp_path / "a.tar")!r}])]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "transformers"))
        print(json.dumps([rcs, heavy]), file=sys.stderr)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rcs, heavy = json.loads(p.stderr.strip().splitlines()[-1])
    assert rcs == [0] * 8 and heavy == []


# ---------------------------------------------------------------- dispatch
def test_serve_and_warm_are_dispatched_with_their_arguments(tmp_path):
    import importlib.util

    for name in ("serve", "warm"):
        if importlib.util.find_spec(f"kvstore_cli.{name}") is None:
            one_line_error(kv(name, "--model", "x"), 1, f"'kvstore {name}' is not available")
    # A stub stands in for the module (written elsewhere) to check what the
    # dispatcher hands over: everything after the command, untouched.
    code = textwrap.dedent("""
        import json, sys, types
        seen = {}
        stub = types.ModuleType("kvstore_cli.serve")
        stub.main = lambda argv, store_dir, **kw: seen.update(argv=argv, store=store_dir, kw=kw) or 3
        sys.modules["kvstore_cli.serve"] = stub
        from kvstore_cli.main import main
        rc = main(["--store", "/some/store", "serve", "--model", "m", "-q", "--format", "json", "--", "x"])
        print(json.dumps([rc, seen]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    rc, seen = json.loads(p.stdout)
    assert rc == 3 and seen == {"argv": ["--model", "m", "-q", "--format", "json", "--", "x"], "store": "/some/store",
                                "kw": {"fmt": None, "quiet": False}}


# ------------------------------------------------------------- concurrency
WRITER = """
import sys, time
import mlx.core as mx, mlx_lm
from mlx_lm.models.cache import make_prompt_cache
import kvstore

store_path, model_dir, seconds, system = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
model, tok = mlx_lm.load(model_dir)
fp = kvstore.fingerprint(model_dir)
base = tok.encode(system)
with kvstore.SnapshotStore(store_path, fsync=False) as store:
    print("ready", flush=True)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        toks = base + tok.encode(f" Question {i}: what is {i} plus {i}?")
        cache = make_prompt_cache(model)
        model(mx.array(toks)[None], cache=cache)
        mx.eval([c.state for c in cache])
        if store.put(fp, toks, cache, tier=("user", "assistant")[i % 2]) is None:
            sys.exit("put failed")
        i += 1
print(i, flush=True)
"""


def test_prune_and_gc_while_another_process_writes(store, seed, tmp_path, tiny_model, load_tiny):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(store), str(tiny_model("llama")), "3", SYSTEM],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        runs = 0
        while writer.poll() is None:
            for args in (["prune", "--tier", "assistant", "-y"], ["gc"], ["prune", "--max-size", "400kB", "-y"],
                         ["ls"], ["prune", "--older-than", "0s", "--model", "llama", "--keep-last", "3", "-y"]):
                ok(*args, store=store)
                runs += 1
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err
    assert int(out.split()[-1]) > 3 and runs >= 5
    assert ok("verify", store=store).returncode == 0
    ok("gc", store=store)
    model, tok = load_tiny("llama")
    with kvstore.SnapshotStore(store, fsync=False) as st:
        entries = st.entries()
        assert entries
        for e in entries:
            toks = st.tokens_of(e.key)
            cache, rest = st.fetch_nearest(e.fingerprint, toks + [EXTRA])
            assert cache is not None and rest == [EXTRA]
            if e.key in seed.snaps:
                assert_same_kv([a for _, a in tree_flatten([c.state for c in cache])], seed.snaps[e.key].state)
            elif e.fingerprint.startswith("llama"):
                assert_same_kv([a for _, a in tree_flatten([c.state for c in cache])], prefill(model, toks)[1])
