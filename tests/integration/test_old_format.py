"""A store written before the code was split into backends, records and
matching still opens and hits: the on-disk format (format version 1) is
the same bytes.

``tests/fixtures/store-format1.tar.gz`` was written by the code as of
commit 81fcd2f (block_tokens=16), with the helpers of tests/workers.py:

    a = seed_tokens(11, 100); b = a[:80] + seed_tokens(12, 30)[1:]
    h = seed_tokens(13, 40); t = seed_tokens(14, 50)
    put("synthetic", a, prefix_cache(a, 2), tier="system")
    put("synthetic", b, prefix_cache(b, 2), tier="user")          # shares a's first 80 rows
    put("synthetic-hybrid", h, hybrid_cache(h), tier="user")      # recurrent state + KV
    put("synthetic", t, prefix_cache(t, 2), tier="assistant", tenant="acme")
    fetch_nearest("synthetic", a + [1])                           # one hit recorded
"""

import shutil
import tarfile
from pathlib import Path

import pytest

import kvstore
from workers import HYBRID, check_hybrid, check_prefix_layers, prefix_cache, seed_tokens

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "store-format1.tar.gz"
A = seed_tokens(11, 100)
B = A[:80] + seed_tokens(12, 30)[1:]
H = seed_tokens(13, 40)
T = seed_tokens(14, 50)


@pytest.fixture
def old_store(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    path = tmp_path / "store"
    path.chmod(0o700)
    store = kvstore.SnapshotStore(path)
    yield store
    store.close()


def test_an_old_store_lists_verifies_and_hits(old_store):
    s = old_store
    assert s.block == 16
    entries = {e.tier: e for e in s.entries()}
    assert len(s.entries()) == 4 and set(entries) == {"system", "user", "assistant"}
    system = entries["system"]
    assert system.tokens == 100 and system.hits == 1 and system.shared_bytes > 0
    assert s.verify() == [] and s.gc(grace=0) == []
    cache, rest = s.fetch_nearest("synthetic", A + [5])
    assert rest == [5] and check_prefix_layers(cache, A)
    cache, rest = s.fetch_nearest("synthetic", B + [6, 7])
    assert rest == [6, 7] and check_prefix_layers(cache, B)
    cache, rest = s.fetch_nearest(HYBRID, H + [3])
    assert rest == [3] and check_hybrid(cache, H)
    # a longer trimmable snapshot serves the shared prefix, from the old segments
    assert s.lookup("synthetic", B[:90] + [1]) == kvstore.Match(s.lookup("synthetic", B + [1]).key, 90, "longer",
                                                                 "user")
    # tenants: the old tenant namespace is the current one
    cache, rest = s.fetch_nearest("synthetic", T + [2], tenant="acme")
    assert rest == [2] and check_prefix_layers(cache, T)
    assert s.fetch_nearest("synthetic", T + [2]) == (None, T + [2])


def test_an_old_store_takes_new_snapshots_and_deletes(old_store, tmp_path):
    s = old_store
    c = A[:80] + seed_tokens(15, 20)[1:]
    assert s.put("synthetic", c, prefix_cache(c, 2), tier="user") is not None
    assert s.counters["put_tokens_shared"] == 80  # shares the old segments
    cache, rest = s.fetch_nearest("synthetic", c + [4])
    assert rest == [4] and check_prefix_layers(cache, c)
    for e in s.entries():
        if e.tier == "user":
            s.delete(e.key)
    cache, rest = s.fetch_nearest("synthetic", A + [5])
    assert rest == [5] and check_prefix_layers(cache, A)
    assert s.verify() == [] and s.gc(grace=0) == []
    s.export_archive(str(tmp_path / "old.tar"))
    with kvstore.SnapshotStore(tmp_path / "copy", block_tokens=16) as copy:
        added, _, problems = copy.import_archive(str(tmp_path / "old.tar"))
        assert (added, problems) == (2, [])
        cache, rest = copy.fetch_nearest("synthetic", A + [5])
        assert rest == [5] and check_prefix_layers(cache, A)
    shutil.rmtree(tmp_path / "copy")
