"""Matching on an in-memory index: no files, no MLX (and on LMDB where its index
answers a question its own way: the ends of a popular link).

Every rule of DESIGN.md that decides a hit: the exact entry (trimmable
only, served one token short), the longest stored prefix, the shared prefix
of a longer trimmable entry; a non-trimmable snapshot is never trimmed;
the remainder is never empty; stored tokens are compared on every hit; and
the dedup base only shares segments of the same model and layout.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.backends.inmemory import InMemoryIndex
from kvstore.keys import TokenChain, as_tokens, namespace
from kvstore.matching import MAX_PLANS, dedup_base, plan_fetch
from kvstore.records import Extent, Snapshot, encode_snapshot, pack, unpack
from kvstore.transactions import index_snapshot

FP = "model-a"
BLOCK = 4


def chain(tokens, fp=FP, tenant=None, block=BLOCK):
    return TokenChain(namespace(fp, tenant), as_tokens(tokens), block)


def add(index, tokens, *, trimmable=True, fp=FP, tier="user", layout_id="L", extents=None, tenant=None):
    """Index a snapshot record of ``tokens`` (no blobs: matching never reads them); return its key."""
    c = chain(tokens, fp, tenant)
    n = len(c)
    snap = Snapshot(fp, tier, n, c.tokens.tobytes(), [], layout_id,
                    extents if extents is not None else [Extent(bytes([n % 256]) * 16, n)], None, trimmable,
                    0, 0.0, tenant is not None, b"".join(c.links[1 : n // BLOCK + 1]), c.links[n // BLOCK])
    key = c.key(n)
    index.write(lambda w: index_snapshot(w, key, snap))
    return key


def plans(index, tokens, min_tokens=0, **kw):
    with index.read() as r:
        return plan_fetch(r, chain(tokens, **kw), kw.get("fp", FP), min_tokens=min_tokens).plans


def best(index, tokens, **kw):
    found = plans(index, tokens, **kw)
    return (found[0].kind, found[0].tokens) if found else None


SYS = list(range(100, 118))  # 18 tokens: four full blocks and a bit


def test_an_exact_trimmable_entry_is_served_one_token_short():
    idx = InMemoryIndex()
    add(idx, SYS)
    assert best(idx, SYS) == ("exact", len(SYS) - 1)


def test_an_exact_checkpoint_that_cannot_be_trimmed_falls_back_to_a_shorter_one():
    idx = InMemoryIndex()
    add(idx, SYS, trimmable=False)
    assert plans(idx, SYS) == []  # nothing shorter stored: a miss, never the whole prompt
    add(idx, SYS[:10], trimmable=False)
    assert best(idx, SYS) == ("shorter", 10)


def test_the_longest_stored_prefix_wins_across_blocks():
    idx = InMemoryIndex()
    for n in (3, 6, 9, 13, 16):
        add(idx, SYS[:n], trimmable=False)
    request = SYS + [7, 8]
    assert best(idx, request) == ("shorter", 16)
    assert best(idx, SYS[:15]) == ("shorter", 13)
    assert best(idx, SYS[:4]) == ("shorter", 3)
    assert plans(idx, SYS[:3]) == []  # a stored prefix equal to the request is not "shorter"


def test_a_longer_trimmable_entry_serves_the_shared_prefix():
    idx = InMemoryIndex()
    add(idx, SYS + [1, 2, 3, 4, 5])
    assert best(idx, SYS + [1, 2, 9]) == ("longer", len(SYS) + 2)
    # never the whole request: one token is always left to prefill
    assert best(idx, SYS + [1, 2]) == ("longer", len(SYS) + 1)


def test_a_longer_entry_that_cannot_be_trimmed_is_never_cut():
    idx = InMemoryIndex()
    add(idx, SYS + [1, 2, 3, 4, 5], trimmable=False)
    assert plans(idx, SYS + [1, 2, 9]) == []
    add(idx, SYS, trimmable=False)
    assert best(idx, SYS + [1, 2, 9]) == ("shorter", len(SYS))


def test_ties_prefer_an_exact_length_checkpoint():
    idx = InMemoryIndex()
    add(idx, SYS[:12])           # stored prefix of 12 tokens
    add(idx, SYS[:12] + [9, 9])  # longer entry sharing 12 tokens too
    found = plans(idx, SYS[:12] + [5])
    assert [(p.kind, p.tokens) for p in found][:2] == [("shorter", 12), ("longer", 12)]
    assert len(plans(idx, SYS[:12] + [5])) <= MAX_PLANS


def test_stored_tokens_are_compared_not_only_hashes():
    """A record planted under the request's key (or found through its links)
    holding other tokens is never a plan."""
    idx = InMemoryIndex()
    key = add(idx, SYS)
    forged = unpack(idx.tables["snap"][key])
    forged["tok"] = as_tokens(list(range(200, 218))).tobytes()
    idx.tables["snap"][key] = pack(forged)
    assert plans(idx, SYS) == [] and plans(idx, SYS + [1]) == []


def test_other_models_other_versions_and_other_tenants_are_not_candidates():
    idx = InMemoryIndex()
    add(idx, SYS, fp="model-b")
    add(idx, SYS, tenant="acme")
    assert plans(idx, SYS + [1]) == []
    assert best(idx, SYS + [1], fp="model-b") == ("shorter", len(SYS))
    assert best(idx, SYS + [1], tenant="acme") == ("shorter", len(SYS))
    key = chain(SYS, "model-b").key(len(SYS))
    rec = unpack(idx.tables["snap"][key])
    idx.tables["snap"][key] = pack({**rec, "v": 99})
    assert plans(idx, SYS + [1], fp="model-b") == []


def test_damaged_records_are_reported_not_raised_and_can_be_skipped():
    idx = InMemoryIndex()
    key = add(idx, SYS)
    add(idx, SYS[:8])
    idx.tables["snap"][key] = pack({"v": 1, "fp": FP, "n": "many"})
    with idx.read() as r:
        got = plan_fetch(r, chain(SYS + [1]), FP)
    assert [(p.kind, p.tokens) for p in got.plans] == [("shorter", 8)]
    assert [k for k, _ in got.corrupt] == [key]
    with idx.read() as r:
        got = plan_fetch(r, chain(SYS[:9]), FP, skip=lambda k: True)
    assert got.plans == [] and got.corrupt == []


def test_dedup_base_shares_only_the_same_model_and_layout():
    idx = InMemoryIndex()
    seg_a, seg_b = b"\x01" * 16, b"\x02" * 16
    add(idx, SYS, extents=[Extent(seg_a, 10), Extent(seg_b, 8)])
    with idx.read() as r:
        base = dedup_base(r, chain(SYS[:14] + [1, 2, 3]), 17, FP, "L")
        assert base.tokens == 14 and base.extents == (Extent(seg_a, 10), Extent(seg_b, 4))
        assert dedup_base(r, chain(SYS[:14] + [1, 2, 3]), 17, FP, "quantised").tokens == 0
        assert dedup_base(r, chain(SYS[:14] + [1, 2, 3], fp="model-b"), 17, "model-b", "L").tokens == 0
        assert dedup_base(r, chain([1, 2, 3]), 3, FP, "L").tokens == 0


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 3), st.booleans()), min_size=1, max_size=8),
       st.integers(1, 30), st.integers(0, 3))
def test_every_plan_is_safe_and_the_longest_prefix_is_found(stored, n, variant):
    """Random stores of sequences drawn from a few branches: every plan serves
    tokens the record holds, leaves at least one token, trims only trimmable
    snapshots, and serves at least the longest stored strict prefix."""
    rng = np.random.default_rng(0)
    base = [int(t) for t in rng.integers(1, 50, 40)]

    def seq(length, v):
        s = base[:length]
        if v and length > 5:
            s[5 + v % max(1, length - 5) - 1] = 60 + v  # a branch that diverges
        return s

    idx = InMemoryIndex()
    records = {}
    for length, v, trim in stored:
        s = seq(length, v)
        records[tuple(s)] = trim
        add(idx, s, trimmable=trim)
    request = seq(n, variant)
    found = plans(idx, request)
    for p in found:
        held = p.record.token_ids().tolist()
        assert 1 <= p.tokens <= len(request) - 1
        assert held[: p.tokens] == request[: p.tokens]
        if not p.record.trimmable:
            assert p.kind == "shorter" and p.record.n_tokens == p.tokens
    prefixes = [len(s) for s in records if len(s) < len(request) and list(s) == request[: len(s)]]
    if prefixes:
        assert found and found[0].tokens >= max(prefixes)
    # what a caller already holding some tokens is offered: the same best plan, if it serves more
    for held in (0, 3, 4, 7, n // 2, n - 2):
        beyond = [(p.kind, p.tokens) for p in found if p.tokens > held]
        got = [(p.kind, p.tokens) for p in plans(idx, request, min_tokens=held)]
        assert got[:1] == beyond[:1], (held, got, beyond)


def test_a_link_many_snapshots_end_after_is_matched_alike_by_stepping_and_by_seeking(tmp_path, monkeypatch):
    """A prompt 300 conversations continue: LMDB seeks once per distinct length at the link
    they all end after (more ends than ENDS_SCAN) instead of stepping through them; every
    request gets the same plans as by stepping, and as from the in-memory index."""
    from kvstore.backends import lmdb_index
    from kvstore.backends.lmdb_index import LmdbIndex

    rng = np.random.default_rng(7)
    mem, lm = InMemoryIndex(), LmdbIndex(tmp_path / "index", 1 << 26)
    head = SYS[:16]  # four full blocks: 17 to 19 tokens end in the block after the fourth link
    stored = [head] + [head + [int(t) for t in rng.integers(1, 400, 1 + i % 3)] for i in range(300)]
    stored += [head + [int(t) for t in rng.integers(1, 400, 4 + i % 4)] for i in range(20)]  # the next block
    stored = list({tuple(x): x for x in stored}.values())
    for s in stored:
        for idx in (mem, lm):
            add(idx, s, trimmable=bool(len(s) % 2))
    with lm.read() as r:
        assert len(r.ends_at(chain(head).links[4], None)) > lmdb_index.ENDS_SCAN
    requests = ([s + [999] for s in stored[:80]] + [s[:-1] + [999, 998] for s in stored[1:80]]
                + [s + [999] for s in stored[-20:]] + [head[:9] + [999]])

    def found(idx):
        return [[(p.kind, p.tokens, p.key) for p in plans(idx, q)] for q in requests]

    seeking = found(lm)
    monkeypatch.setattr(lmdb_index, "ENDS_SCAN", 10**9)
    assert found(lm) == seeking == found(mem)
    shorter = [x[0][1] for x in seeking if x and x[0][0] == "shorter"]
    assert len(shorter) >= 100 and {17, 18, 19} <= set(shorter)  # the stored prefixes are found, at each length
    lm.close()


def test_a_one_token_request_gets_no_plan():
    """Serving anything would leave nothing to prefill."""
    idx = InMemoryIndex()
    add(idx, [5])
    assert plans(idx, [5]) == [] and plans(idx, []) == []


def test_encoded_records_round_trip():
    idx = InMemoryIndex()
    key = add(idx, SYS, tier="system")
    raw = idx.tables["snap"][key]
    from kvstore.records import decode_snapshot

    snap = decode_snapshot(raw)
    assert snap.tier == "system" and snap.n_tokens == len(SYS) and snap.token_ids().tolist() == SYS
    assert encode_snapshot(snap) == raw
