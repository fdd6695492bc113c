"""The remote tier's section of RESULTS.md, from ``results/remote.json`` (``bench_remote.py``)."""

import report as R


def remote_section(d):
    """A remote hit against a raw GET of the same bytes, a local disk hit and a cold prefill."""
    client = d.get("client", {})
    out = ["## Remote tier: a hit from Redis", "",
           f"Script: `{R.cmd(d)}`; {R.loads_line(d)}. One redis-server on 127.0.0.1 started by the script; KV of "
           "the llama-135m shape (random bf16); redis-py " + str(client.get("redis")) +
           (" with hiredis" if client.get("hiredis") else " without hiredis") + ". Medians of interleaved runs. "
           "*remote hit*: `SnapshotStore.fetch` on a host whose local store lacks the snapshot (one lookup call, "
           "one pipeline of chunk GETs received into the cache's buffers, every digest and row checksum checked); "
           "*raw GET*: the same chunk keys in one redis-py pipeline, bytes only; *disk hit*: the same snapshot from "
           "a local store, page cache warm. Goal: a remote hit within 1.5x of the raw GET.", ""]
    rows = []
    for s in d["sizes"]:
        m, st = s["median"], s["remote_stages"]
        rows.append([f"{s['tokens']:,}", R.mb(s["bytes"]), str(s["chunks"]), R.ms(m["remote"]), R.ms(m["raw_get"]),
                     f"{s['remote_over_raw_get']:.2f}x", R.ms(m["disk"]), R.ms(st.get("lookup", 0)),
                     R.ms(st.get("read", 0)), R.ms(st.get("alloc", 0))])
    out += [R.table(["tokens", "KV", "chunks", "remote hit", "raw GET", "remote / raw GET", "disk hit",
                     "lookup", "read (receive + checks + load)", "of which buffer allocation"], rows), ""]
    rd = d["readers"]
    rows = [[str(x["readers"]), R.ms(x["remote"]["median_s"]), R.ms(x["raw_get"]["median_s"]),
             f"{x['remote_over_raw_get']:.2f}x", f"{x['remote']['gb_per_s']:.2f}", f"{x['raw_get']['gb_per_s']:.2f}"]
            for x in rd["rows"]]
    out += [f"Concurrent readers ({rd['tokens']:,} tokens, {R.mb(rd['bytes'])} per restore; threads of one process, "
            "each its own host and connection; GB/s = readers x bytes / median time):", "",
            R.table(["readers", "remote hit", "raw GET", "remote / raw GET", "remote GB/s", "raw GET GB/s"], rows), ""]
    ch = d["chunks"]
    rows = [[f"{c['chunk_bytes'] / (1 << 20):g} MiB", R.ms(c["median_s"]), R.ms(min(c["seconds"])),
             R.ms(max(c["seconds"]))] for c in ch["rows"]]
    out += [f"Value size ({ch['tokens']:,} tokens; remote hit; each size under its own key prefix, run one after "
            "the other, so the spread between runs shows next to the medians). The default is 4 MiB:", "",
            R.table(["chunk", "remote hit (median)", "fastest", "slowest"], rows), ""]
    rows = [[f"{f['tokens']:,}", R.sec(f["with_remote_s"]), R.sec(f["without_s"]), f"{f['speedup']:.1f}x"]
            for f in d["fresh_host"]]
    out += ["A first request on a fresh host (empty local store, new connection; the request is the stored prompt "
            "plus 16 tokens, prefilled with the real model):", "",
            R.table(["prompt", "with the remote (connect + hit + suffix prefill)", "without (cold prefill)",
                     "speedup"], rows), ""]
    pop = d.get("popular")
    if pop:
        rows = [[f"{r['conversations']:,}", R.ms(r["p50_s"]), R.ms(r["p99_s"]), r.get("listed", "-"),
                 str(r.get("calls", "-")), "yes" if r["found"] else "**no**"] for r in pop["rows"]]
        out += [f"A system prompt that many conversations continue ({pop['lookups']} lookups each; every "
                "conversation's first turn ends in the block right after the prompt; index entries and 2 KB "
                "bundles written directly; the request continues the prompt with turns of its own): the lookup "
                "with the `resolve` calls the client makes after it, deepest block first (the conversations' "
                "block, listed with its ends' bundles up to "
                f"{pop.get('ends_eager', '-')} ends, their keys up to {pop['ends_listed']:,}, its lengths beyond; "
                "then the prompt's), and whether the prompt's own snapshot is found:",
                "", R.table(["conversations", "p50", "p99", "conversations' block listed by", "calls",
                             "prompt found"], rows), ""]
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys

    import common as C

    print(remote_section(json.loads((C.RESULTS / "remote.json").read_text())), end="" if len(sys.argv) < 2 else "\n")
