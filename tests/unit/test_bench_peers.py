"""benchmarks/bench_peers.py without vllm-mlx: stream parsing, cached tokens from a
vllm-mlx log, the answer check, the table, and the skip when no peer is given."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_peers as B  # noqa: E402


def sse(*chunks):
    return [f"data: {json.dumps(c)}\n".encode() for c in chunks] + [b"\n", b"data: [DONE]\n"]


def test_stream_ttft_is_the_first_chunk_with_text():
    clock = iter([1.5, 9.0]).__next__
    lines = [b": keepalive 10/59\n"] + sse(
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"reasoning": "be"}}]},
        {"choices": [{"delta": {"content": ":*"}}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 7}}},
    )
    got = B.parse_stream(lines, 1.0, clock)
    assert got["ttft"] == 0.5 and got["text"] == "be:*" and got["chunks"] == 4
    assert B.usage_cached(got["usage"]) == 7
    assert B.usage_cached({"prompt_tokens": 3}) is None


def test_vllm_log_cached_tokens():
    log = "\n".join([
        "INFO:vllm_mlx.scheduler:[cache_fetch] request=ab HIT prompt_tokens=2030 cached=2001 remaining=29 time=0.001s",
        "INFO:vllm_mlx.server:Chat completion (stream): 32 tokens",
    ])
    assert B.vllm_cached(log) == 2001
    assert B.vllm_cached(log + "\nINFO:x:[cache_fetch] request=cd MISS prompt_tokens=2030 time=0.0s entries=0") == 0
    assert B.vllm_cached("nothing here") is None


def run(question, text, ttft=0.1, cached=0):
    return {"question": question, "text": text, "ttft": ttft, "cached": cached}


def rounds(answer_q2=None):
    def server(r, scale):
        qa, qb = ("q1", "q2") if r == 0 else ("q2", "q1")
        return {
            "restart": {"cold": run(qa, qa.upper(), 4.0 * scale), "memory": run(qb, (qb == "q2" and answer_q2) or qb.upper(), 0.1 * scale, 2000),
                        "after_restart": run(qa, qa.upper(), 0.2 * scale, 2000), "startup_s": 1.0 * scale,
                        "stop_s": 0.5, "disk_bytes": 5_000_000},
            "warm": {"first": run(qa, qa.upper(), 0.15 * scale, 2000)},
            "kill": {"after": run(qb, qb.upper(), 0.3 * scale, 1998 if scale == 1 else 0)},
        }
    return [{s: server(r, k) for s, k in zip(B.SERVERS, (1, 2))} for r in range(2)]


def test_summary_medians_and_answers():
    summary = B.summarize(rounds())
    kv, peer = summary["kvstore serve"], summary["vllm-mlx"]
    assert kv["cold"] == 4.0 and peer["cold"] == 8.0 and kv["kill_cached"] == 1998 and peer["kill_cached"] == 0
    assert kv["answers"] == {"compared": 8, "equal": 8, "mismatches": []}
    bad = B.summarize(rounds(answer_q2="wrong"))["kvstore serve"]["answers"]
    assert bad == {"compared": 8, "equal": 7, "mismatches": ["q2"]}


def test_table_rows():
    text = B.table(B.summarize(rounds()))
    lines = text.splitlines()
    assert lines[0] == "| | kvstore serve | vllm-mlx |"
    assert "| cold | 4.00 s | 8.00 s |" in lines
    assert "| prefix in memory | 100 ms | 200 ms |" in lines
    assert "| disk after 3 requests | 5.0 MB | 5.0 MB |" in lines
    assert "| SIGKILL during a request, then restart | 300 ms (1998 cached) | 600 ms (0 cached) |" in lines
    assert len(lines) == 2 + len(B.ROWS) + 1


def test_skipped_without_a_peer(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KVSTORE_PEER_VENV", raising=False)
    assert B.peer_venv(None) == (None, "no vllm-mlx environment given (--peer-venv or KVSTORE_PEER_VENV)")
    venv, why = B.peer_venv(str(tmp_path))
    assert venv is None and "not found" in why
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vllm-mlx").write_text("")
    assert B.peer_venv(str(tmp_path)) == (tmp_path, None)
    monkeypatch.setenv("KVSTORE_PEER_VENV", str(tmp_path / "missing"))
    assert B.main(["--quick", "--out", str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_section_replaces_its_earlier_copy(tmp_path):
    result = {"command": "python benchmarks/bench_peers.py --quick", "started": "today", "rounds": [{}],
              "load_before": [1.0], "load_after": [2.0], "summary": B.summarize(rounds()),
              "config": {"model": {"hidden_size": 256, "num_hidden_layers": 4}, "system_tokens": 2000,
                         "max_tokens": 32, "kvstore_options": ["--warmup"],
                         "peer": {"vllm_mlx": ["0.6.0"], "mlx_lm": ["0.31.3"]}}}
    text = B.section(result)
    assert text.startswith(B.HEADING) and "| cold | 4.00 s | 8.00 s |" in text and "pip install vllm-mlx" in text
    md = tmp_path / "RESULTS.md"
    md.write_text("# r\n\n## Server\n\nold\n\n## Plots\n\npics\n")
    B.write_section(md, text)
    B.write_section(md, text.replace("4.00 s", "3.00 s"))
    doc = md.read_text()
    assert doc.count(B.HEADING) == 1 and "| cold | 3.00 s | 8.00 s |" in doc
    assert doc.index("## Server") < doc.index(B.HEADING) < doc.index("## Plots") and doc.endswith("pics\n")


def test_serve_parts_split_by_owner():
    import bench_serve_parts as P

    def req(ttft, fetch, prefill, steps):
        return {"question": "q", "ttft": ttft, "cached": 2000,
                "parts": {"fetch": fetch, "insert_cache": 0.002, "tokenize": 0.003, "prefill passes": prefill,
                          "first token pass": 0.01, "batch steps": steps}}

    s = P.summarize([req(0.2, 0.001, 0.1, 0.15), req(0.05, 0.0005, 0.02, 0.04), req(0.07, 0.0005, 0.03, 0.05)])
    first, hits = s["first after restart"], s["memory hits"]
    assert first["n"] == 1 and hits["n"] == 2
    assert abs(first["parts"]["decode step handing out the first token"] - 0.04) < 1e-9
    assert abs(first["owners"]["kvstore"] - 0.003) < 1e-9
    assert abs(first["owners"]["mlx_lm.server"] - (0.003 + 0.1 + 0.01 + 0.04)) < 1e-9
    assert abs(sum(first["owners"].values()) - 0.2) < 1e-9
    text = P.section({"command": "c", "started": "t", "load_before": [1.0], "load_after": [1.0],
                      "serve_args": "--preload", "summary": s})
    assert "| fetch (kvstore) | 1.0 ms | 0.5 ms |" in text and text.startswith(P.HEADING)
