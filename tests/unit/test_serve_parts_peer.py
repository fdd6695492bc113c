"""benchmarks/bench_serve_parts.py without vllm-mlx: own-time timers, the request window, the
vllm-mlx summary, the side-by-side section, and the run that skips a missing peer."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_serve_parts as P  # noqa: E402


class Work:
    """Stand-ins for a server's functions (timed by ``instrument`` like the real ones)."""

    def outer(self):
        time.sleep(0.02)
        self.inner()
        return "done"

    def inner(self):
        time.sleep(0.03)


def test_instrument_records_whole_and_own_time():
    events = []
    where = f"{__name__}:Work"
    P.instrument(events, {"outer": ("o", where, "outer"), "inner": ("o", where, "inner")})
    assert Work().outer() == "done"
    (inner, t_in, d_in, own_in), (outer, t_out, d_out, own_out) = events
    assert (inner, outer) == ("inner", "outer") and t_out <= t_in
    assert own_in == d_in >= 0.03
    assert d_out >= d_in + 0.02 and abs(own_out - (d_out - d_in)) < 1e-9
    assert Work.outer.__name__ == "outer"


def test_parts_between_cuts_calls_to_the_window():
    events = [("a", 0.5, 1.0, 1.0),      # starts before the request: only 0.5 s inside
              ("b", 1.2, 0.3, 0.1),      # whole time 0.3, own time 0.1
              ("b", 1.8, 0.5, 0.5),      # runs past the first token: 0.2 s inside
              ("c", 2.5, 0.1, 0.1)]      # after the first token: left out
    whole = P.parts_between(events, 1.0, 2.0)
    assert set(whole) == {"a", "b"} and whole["a"] == 0.5 and abs(whole["b"] - 0.5) < 1e-9
    assert P.calls_between(events, 1.0, 2.0) == {"a": 1, "b": 2}
    got = P.parts_between(events, 1.0, 2.0, own_time=True)
    assert got["a"] == 0.5 and abs(got["b"] - 0.3) < 1e-9 and "c" not in got


def peer_req(ttft, fetch, prefill, cached=2017):
    return {"question": "q", "ttft": ttft, "cached": cached,
            "parts": {"fetch": fetch, "store prompt snapshot": 0.001, "chat template": 0.002,
                      "prefix boundary (two tokenizations)": 0.003, "tokenize (encode)": 0.002,
                      "schedule into the batch": 0.0005, "prefill passes": prefill, "first token pass": 0.008,
                      "decode step handing out the first token": 0.009, "detokenize, outputs": 0.0002}}


def kv_req(ttft, fetch, prefill, steps):
    return {"question": "q", "ttft": ttft, "cached": 2019,
            "parts": {"fetch": fetch, "insert_cache": 0.002, "tokenize": 0.003, "prefill passes": prefill,
                      "first token pass": 0.01, "batch steps": steps}}


def test_peer_summary_takes_own_times_as_they_are():
    s = P.summarize([peer_req(0.2, 0.002, 0.15), peer_req(0.1, 0.0004, 0.06, None), peer_req(0.12, 0.0006, 0.08)],
                    "vllm-mlx")
    first, hits = s["first after restart"], s["memory hits"]
    assert hits["n"] == 2 and hits["cached"] == 2017 and first["cached"] == 2017
    assert abs(hits["parts"]["prefill passes"] - 0.07) < 1e-9
    assert hits["parts"]["decode step handing out the first token"] == 0.009
    assert set(hits["owners"]) == {"vllm-mlx prefix cache", "vllm-mlx engine", P.REST}
    assert abs(first["owners"]["vllm-mlx prefix cache"] - 0.003) < 1e-9
    engine = 0.002 + 0.003 + 0.002 + 0.0005 + 0.15 + 0.008 + 0.009 + 0.0002
    assert abs(first["owners"]["vllm-mlx engine"] - engine) < 1e-9
    assert abs(sum(first["owners"].values()) - 0.2) < 1e-9
    unknown = P.summarize([peer_req(0.2, 0.002, 0.15, None), peer_req(0.1, 0.0004, 0.06, None)], "vllm-mlx")
    assert unknown["first after restart"]["cached"] is None and unknown["memory hits"]["cached"] is None


def result(peer=True):
    kv = [kv_req(0.3, 0.005, 0.2, 0.25), kv_req(0.14, 0.0005, 0.09, 0.11), kv_req(0.13, 0.0005, 0.09, 0.11)]
    out = {"command": "python benchmarks/bench_serve_parts.py", "started": "today", "load_before": [2.0],
           "load_after": [2.5], "serve_args": "--preload --warmup", "summary": P.summarize(kv)}
    if peer:
        reqs = [peer_req(0.16, 0.0013, 0.1), peer_req(0.1, 0.0004, 0.06), peer_req(0.1, 0.0004, 0.06)]
        out["peer"] = {"versions": ["0.6.0", "0.31.3"], "summary": P.summarize(reqs, "vllm-mlx")}
    else:
        out["peer_skipped"] = "no vllm-mlx environment given"
    return out


def test_side_by_side_section_by_stage():
    text = P.section(result())
    lines = text.splitlines()
    assert text.startswith(P.HEADING) and "vllm-mlx 0.6.0 (mlx-lm 0.31.3" in text
    assert "`MemoryAwarePrefixCache.fetch`" in text and "`TieredPromptCache.insert_cache`" in text
    head = next(x for x in lines if x.startswith("| |"))
    assert head == ("| | kvstore serve, memory hits (n=2) | vllm-mlx, memory hits (n=2) | "
                    "kvstore serve, first after restart (n=1) | vllm-mlx, first after restart (n=1) |")
    assert "| time to first token | 135.0 ms | 100.0 ms | 300.0 ms | 160.0 ms |" in lines
    assert "| prefix-cache lookup and copy | 0.5 ms | 0.4 ms | 5.0 ms | 1.3 ms |" in lines
    assert "| cache snapshot before the first token | 2.0 ms | 1.0 ms | 2.0 ms | 1.0 ms |" in lines
    assert "| tokenize / chat template | 3.0 ms | 7.0 ms | 3.0 ms | 7.0 ms |" in lines
    assert "| scheduling into the batch | - | 0.5 ms | - | 0.5 ms |" in lines
    # kvstore serve's decode step is its batch steps less the passes inside them
    assert "| decode step handing out the first token | 10.0 ms | 9.0 ms | 40.0 ms | 9.0 ms |" in lines
    assert "| **cache: kvstore / vllm-mlx prefix cache** | 2.5 ms | 1.4 ms | 7.0 ms | 2.3 ms |" in lines
    assert lines[-1].startswith("| **rest (HTTP, queues, threads)** |")
    # every timed part is in some row: no leftover rows
    assert not any("(kvstore serve) |" in x or "(vllm-mlx) |" in x for x in lines)


def test_section_without_a_peer_is_kvstores_table():
    text = P.section(result(peer=False))
    assert "| fetch (kvstore) | 5.0 ms | 0.5 ms |" in text
    assert "vllm-mlx was not measured: no vllm-mlx environment given." in text
    old = result(peer=False)
    del old["peer_skipped"]      # a results file from before the peer columns
    assert "vllm-mlx" not in P.section(old)


def test_rounds_group_each_process_first_request():
    rounds = []
    for scale in (1.0, 2.0, 3.0):     # three measure processes, their first request marked
        reqs = [kv_req(0.3 * scale, 0.005, 0.2, 0.25), kv_req(0.1 * scale, 0.0005, 0.05, 0.07)]
        reqs[0]["first"], reqs[1]["first"] = True, False
        rounds += reqs
    s = P.summarize(rounds)
    assert s["first after restart"]["n"] == 3 and s["memory hits"]["n"] == 3
    assert abs(s["first after restart"]["ttft"] - 0.6) < 1e-9 and abs(s["memory hits"]["ttft"] - 0.2) < 1e-9
