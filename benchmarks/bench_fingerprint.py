"""Fingerprint cost: hashing every weight byte, at the first and at later starts.

A model folder of random safetensors shards (1 GB, and 10 GB in ``--full``)
is fingerprinted in fresh processes, interleaved:

- ``first, pages dropped``: no digest cache, the files' pages dropped from
  the page cache (what the first start after a download or a reboot pays);
- ``first, page cache warm``: no digest cache, the files just read;
- ``later start``: the store's digest cache already holds the files (what
  every restart pays), page cache dropped;
- ``raw read``: one sequential read of the same bytes, dropped and warm (the
  floor a full hash cannot beat).

Run: ``python benchmarks/bench_fingerprint.py --quick`` (or ``--full``).
"""

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
from common import log  # noqa: E402

MODES = {"quick": {"sizes_gb": [1], "repeats": 3}, "full": {"sizes_gb": [1, 10], "repeats": 3}}
SHARD = 2 * 10**9

CHILD = r"""
import json, pathlib, sys, time
t0 = time.perf_counter()
import kvstore
from kvstore.fingerprint import file_digest
imported = time.perf_counter()
store = kvstore.SnapshotStore(sys.argv[2])
opened = time.perf_counter()
# each weight file's digest (where the time goes), then the fingerprint over them
sources = sorted({file_digest(p, store.file_digests).source for p in pathlib.Path(sys.argv[1]).glob("*.safetensors")})
hashed = time.perf_counter()
fp = kvstore.fingerprint(sys.argv[1], digests=store.file_digests)
done = time.perf_counter()
print(json.dumps({"fingerprint_s": done - opened, "digests_s": hashed - opened, "import_s": imported - t0,
                  "open_s": opened - imported, "fp": fp, "sources": sources}))
"""


def build_folder(path, nbytes):
    """A model folder of random safetensors shards holding ``nbytes`` of weights."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    rng = np.random.default_rng(0)
    left, i = nbytes, 0
    while left > 0:
        size = min(SHARD, left)
        header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(path / f"model-{i:05d}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for start in range(0, size, 64 << 20):
                f.write(rng.integers(0, 256, min(64 << 20, size - start), dtype=np.uint8).tobytes())
        left -= size
        i += 1
    return sorted(path.glob("*.safetensors"))


def run_child(folder, store):
    out = subprocess.run([C.PY, "-c", CHILD, str(folder), str(store)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_read(files):
    buf = np.empty(min(max(f.stat().st_size for f in files), 256 << 20), dtype=np.uint8)
    t = C.now()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            off, size = 0, f.stat().st_size
            while off < size:
                got = os.preadv(fd, [memoryview(buf)[: min(len(buf), size - off)]], off)
                if got <= 0:
                    break
                off += got
        finally:
            os.close(fd)
    return C.now() - t


def measure(tmp, gb, repeats):
    folder = tmp / f"model-{gb}gb"
    log(f"fingerprint: writing a {gb} GB model folder")
    files = build_folder(folder, gb * 10**9)
    warm_store = tmp / f"store-{gb}gb"
    run_child(folder, warm_store)  # fills the digest cache used by "later start"
    runs = {k: [] for k in ("first_dropped", "first_warm", "later", "raw_dropped", "raw_warm")}
    order = list(runs)
    for r in range(repeats):
        for name in C.rotated(order, r):
            if name in ("first_dropped", "later", "raw_dropped"):
                C.drop_tree(folder)
            else:
                raw_read(files)
            if name.startswith("raw"):
                runs[name].append({"seconds": raw_read(files)})
                continue
            store = warm_store if name == "later" else tmp / f"fresh-{gb}-{name}-{r}"
            got = run_child(folder, store)
            runs[name].append({"seconds": got["fingerprint_s"], "sources": got["sources"], "fp": got["fp"],
                               "process_s": got["import_s"] + got["open_s"] + got["fingerprint_s"]})
            log(f"fingerprint {gb} GB {name}: {got['fingerprint_s']:.3f} s ({got['sources']})")
    fps = {x["fp"] for v in runs.values() for x in v if "fp" in x}
    return {"gb": gb, "bytes": sum(f.stat().st_size for f in files), "files": len(files), "runs": runs,
            "same_fingerprint": len(fps) == 1}


def main(argv=None):
    p = C.mode_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = p.parse_args(argv)
    mode = MODES[args.mode]
    result = C.header("fingerprint", args.mode, argv)
    result["sizes"] = []
    with C.scratch() as tmp:
        result["machine"] = C.machine(str(tmp))
        for gb in mode["sizes_gb"]:
            result["sizes"].append(measure(tmp, gb, mode["repeats"]))
    log(f"fingerprint: wrote {C.finish(result, out=args.out)}")


if __name__ == "__main__":
    main()
