"""kvstore serve as an operator runs it: the default disk budget, a store on a
read-only volume, a budget at startup that keeps the system prompt.

Real ``kvstore serve`` processes on 127.0.0.1 driven over HTTP, a real
read-only folder (see ``tests/readonly.py``).
"""

from pathlib import Path

import kvstore
from kvstore_cli.demo import LocalServer as Server, cached
from readonly import read_only


def files_of(root):
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def test_read_only_store_serves_hits_and_budget_keeps_the_system_prompt(tmp_path, tiny_model):
    folder = tmp_path / "vol"
    folder.mkdir()
    store, model = folder / "store", tiny_model("llama")
    with Server(store, model) as s:
        assert cached(s.chat("Do you sell hammers?")) == 0
        log = s.stop()
    assert "disk budget" in log and "(auto: half the free disk space, at most 50.0 GB)" in log
    with kvstore.SnapshotStore(store, readonly=True) as st:
        tiers = {e.tier: e for e in st.entries()}
    assert set(tiers) >= {"system", "user"}
    n_sys = tiers["system"].tokens

    # 1. the warmed store shipped on a read-only volume: hits, and nothing written
    with read_only(folder) as (ro, how):
        before = files_of(ro)
        with Server(ro, model) as s:
            resp = s.chat("What time do you open tomorrow?")
            log = s.stop()
        assert cached(resp) >= n_sys, (how, cached(resp), log[-2000:])
        assert log.count("opened read-only") == 1 and "read-only, no budget" in log, log[-2000:]
        assert "Traceback" not in log
        assert files_of(ro) == before, how

    # 2. a budget at startup with room for the system prompt only: the user snapshots go, it stays
    with Server(store, model, "--disk-max-bytes", str(tiers["system"].bytes)) as s:
        resp = s.chat("Where is the paint aisle?")
        log = s.stop()
    assert cached(resp) >= n_sys
    removed = [ln for ln in log.splitlines() if "disk budget" in ln and "removed" in ln]
    assert removed and "user" in removed[0] and "System prompts went" not in log, log[-2000:]


def test_a_damaged_system_prompt_heals_with_no_operator_action(tmp_path, tiny_model):
    """One flipped byte in the stored system prompt: the next request misses
    (a fault, not a hit), the blob is quarantined with what reads it, the
    server stores a good copy, and one restart later the prefix hits again."""
    store, model = tmp_path / "store", tiny_model("llama")
    with Server(store, model) as s:
        s.chat("Do you sell hammers?")
    with kvstore.SnapshotStore(store, readonly=True) as st:
        system = next(e for e in st.entries() if e.tier == "system")
    blob = system.blobs[0]
    path = store / "blobs" / blob[:2] / f"{blob}.safetensors"
    data = bytearray(path.read_bytes())
    data[-64] ^= 0xFF
    path.write_bytes(bytes(data))
    with Server(store, model, "--cache-log-interval", "0.01") as s:
        assert cached(s.chat("What time do you open?")) == 0
        s.chat("Where is the paint aisle?")  # counters are logged on the next request
        log = s.stop()
    assert "load failed" in log and f"quarantined blob {blob}" in log, log[-3000:]
    counts = [ln for ln in log.splitlines() if "kvstore cache:" in ln][-1]
    assert " 0 disk hits" in counts and " 0 faults" not in counts, counts
    assert (store / "quarantine" / f"{blob}.safetensors").exists()
    with kvstore.SnapshotStore(store, readonly=True) as st:
        assert st.verify() == [] and any(e.tier == "system" for e in st.entries())
        assert all(blob not in e.blobs for e in st.entries())
    with Server(store, model) as s:
        assert cached(s.chat("Do you deliver?")) >= system.tokens
