"""kvstore serve and warm: a real mlx-lm server on 127.0.0.1, driven over HTTP."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import kvstore

from kvstore_cli.demo import SYSTEM, LocalServer as Server, cached

KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"
FAMILIES = ("llama", "qwen3_5")


def system_tokens(model_dir):
    """Length of the system segment mlx_lm.server cuts for SYSTEM."""
    import mlx_lm

    from kvstore.warm import system_segment

    _, tok = mlx_lm.load(str(model_dir))
    return len(system_segment(tok, [{"role": "system", "content": SYSTEM}]))


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_survives_a_restart(tmp_path, tiny_model, family):
    store, model = tmp_path / "store", tiny_model(family)
    n_sys = system_tokens(model)
    with Server(store, model) as s:
        first = s.chat("Do you sell hammers?")
        assert cached(first) == 0
        log = s.stop()
    assert "Traceback" not in log
    with Server(store, model) as s:
        second = s.chat("What time do you open tomorrow?")
    assert cached(second) >= n_sys, (cached(second), n_sys)
    entries = kvstore.SnapshotStore(store).entries()
    assert {e.tier for e in entries} >= {"system", "user"}


@pytest.mark.parametrize("family", FAMILIES)
def test_warm_then_first_request_hits(tmp_path, tiny_model, family):
    store, model = tmp_path / "store", tiny_model(family)
    out = subprocess.run([KVSTORE, "--store", str(store), "warm", "--model", str(model), "--system", SYSTEM,
                          "--format", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (snap,) = json.loads(out.stdout)["snapshots"]
    assert snap["key"] and snap["tokens"] == system_tokens(model)
    with Server(store, model) as s:
        resp = s.chat("Do you sell nails?")
    assert cached(resp) >= snap["tokens"]
    # warming again finds it stored and prefills nothing
    again = subprocess.run([KVSTORE, "--store", str(store), "warm", "--model", str(model), "--system", SYSTEM,
                            "--format", "json"], capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout)["snapshots"][0]["existing"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_uncached_answers_are_the_same(tmp_path, tiny_model, family):
    store, model = tmp_path / "store", tiny_model(family)
    questions = ["Do you sell hammers?", "Where is the paint aisle?", "Do you sell hammers?"]
    with Server(store, model) as s:
        s.chat("Warm-up question about screws?")  # stores the system segment
        warm = [s.chat(q) for q in questions]
    with Server(None, model, "--no-disk", "--prompt-cache-size", "0") as s:
        cold = [s.chat(q) for q in questions]
    assert all(cached(r) > 0 for r in warm)
    assert all(cached(r) == 0 for r in cold)
    for a, b in zip(warm, cold):
        assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_two_servers_share_one_store(tmp_path, tiny_model):
    store, model = tmp_path / "store", tiny_model("qwen3_5")
    n_sys = system_tokens(model)
    with Server(store, model) as a, Server(store, model) as b:
        assert cached(a.chat("Do you sell hammers?")) == 0
        # the first server writes its checkpoints behind the request; give it a moment
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                e.tier == "system" for e in kvstore.SnapshotStore(store).entries()):
            time.sleep(0.2)
        resp = b.chat("What time do you open?")
    assert cached(resp) >= n_sys


def test_exact_hit_on_the_batched_path(tmp_path, tiny_model):
    """A completion whose whole prompt is stored: mlx-lm's own cache would hand
    the batched server an empty remainder and crash; kvstore serves one token."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    store, model = tmp_path / "store", tiny_model("llama")
    m, tok = mlx_lm.load(str(model))
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    cache = make_prompt_cache(m)
    mx.eval(m(mx.array(ids)[None], cache=cache))
    with kvstore.SnapshotStore(store) as st:
        st.put(kvstore.fingerprint(model), ids, cache, tier="user")
    with Server(store, model) as s:
        r1 = s.post("/v1/completions", {"prompt": text, "max_tokens": 4, "temperature": 0})
        r2 = s.post("/v1/completions", {"prompt": text, "max_tokens": 4, "temperature": 0})
        log = s.stop()
    assert cached(r1) == len(ids) - 1 and cached(r2) == len(ids) - 1
    assert r1["choices"][0]["text"] == r2["choices"][0]["text"]
    assert "Traceback" not in log


def test_unusable_store_serves_without_disk(tmp_path, tiny_model):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store should be")
    with Server(blocker, tiny_model("llama")) as s:
        resp = s.chat("Hello?")
        log = s.stop()
    assert resp["usage"]["completion_tokens"] > 0 and resp["choices"][0]["finish_reason"]
    assert "serving without the disk tier" in log


def test_disk_budget_enforced_at_startup(tmp_path, tiny_model):
    store, model = tmp_path / "store", tiny_model("llama")
    with Server(store, model) as s:
        for q in ("one?", "two?", "three?"):
            s.chat(q, system=q * 30)
    before = kvstore.SnapshotStore(store).total_bytes()
    assert before > 0
    with Server(store, model, "--disk-max-bytes", f"{before // 2}B") as s:
        log = s.stop()
    assert kvstore.SnapshotStore(store).total_bytes() <= before // 2
    assert "disk budget" in log and "removed" in log


def test_help_lists_both_option_sets():
    out = subprocess.run([KVSTORE, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "--disk-max-bytes" in out.stdout and "--prompt-cache-size" in out.stdout


def test_demo_runs_end_to_end(tmp_path):
    """The README's first command: warm, serve, restart, compare with --no-disk."""
    out = subprocess.run([KVSTORE, "--format", "json", "demo", "--demo-store", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    first, _, after_restart, no_disk = report["requests"]
    assert report["ok"] and first["cached_tokens"] >= report["system_tokens"] > 0
    assert after_restart["cached_tokens"] >= report["system_tokens"] and no_disk["cached_tokens"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_user_turn_is_one_prefill_pass_where_the_cache_can_be_trimmed(tmp_path, tiny_model, family):
    """mlx_lm.server cuts a user turn from its short generation-prompt tail (``<think>``)
    and prefills them in two passes. Where the cache can be trimmed, kvstore serve makes
    them one: the user turn's checkpoint is the one one token short of the prompt, and a
    trimmed copy of it serves the shorter prefixes. A hybrid model keeps the cut: its
    checkpoints serve only their exact length."""
    store, model = tmp_path / "store", tiny_model(family)
    with Server(store, model) as s:
        first = s.chat("Do you sell hammers?")
        again = s.chat("Do you sell hammers?")
        log = s.stop()
    assert "Traceback" not in log
    prompt = first["usage"]["prompt_tokens"]
    users = sorted(e.tokens for e in kvstore.SnapshotStore(store).entries() if e.tier == "user")
    assert users, "no user checkpoint written"
    if family == "llama":
        assert users == [prompt - 1]
        assert cached(again) == prompt - 1
    else:
        assert max(users) < prompt - 1  # the cut before the generation-prompt tail stays
