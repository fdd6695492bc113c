"""Shared parts of the benchmark scripts: timing, machine description,
bandwidth probes, model shapes and builders, random KV of a real shape.

Benchmarks are scripts, not tests: each runs every contender in one process
run, interleaved (the order rotates every repeat), and writes a JSON file
under ``benchmarks/results/``. ``report.py`` turns those files into
``RESULTS.md`` and the plots. Nothing here writes into the repository but
results and plots; stores and scratch files live in a temporary folder
that is removed at the end, and built models in a cache folder outside it.
"""

import contextlib
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PLOTS = HERE / "plots"
PY = sys.executable

# --------------------------------------------------------------------- shapes
# Model shapes: (mlx-lm module, config overrides). Weights are random (bf16),
# the tokenizer is kvstore's tiny 512-token BPE (token ids stay below 512).
SHAPES = {
    # SmolLM2-135M, a llama: 30 layers, 9 heads, 3 KV heads of 64
    "llama-135m": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        num_hidden_layers=30, rms_norm_eps=1e-5, rope_theta=100000.0, vocab_size=49152,
        tie_word_embeddings=True, max_position_embeddings=8192)),
    # Qwen3-0.6B: 28 layers, 16 heads, 8 KV heads of 128, q/k norms
    "qwen3-0.6b": ("qwen3", dict(
        hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=28, rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936,
        tie_word_embeddings=True, max_position_embeddings=40960)),
    # small shapes where a 40-turn chat fits in minutes on a CPU
    "llama-small": ("llama", dict(
        hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=8)),
    "qwen3_5-small": ("qwen3_5", dict(
        hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=8, full_attention_interval=4, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=32, linear_value_head_dim=32)),
    # kvstore's own tiny test models
    "llama-tiny": ("llama", {}),
    "qwen3_5-tiny": ("qwen3_5", {}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def model_cache_root():
    """Where built benchmark models are kept between runs (not in the repository)."""
    if root := os.environ.get("KVSTORE_BENCH_MODELS"):
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvstore-bench-models"


def _build_qwen3(dest, overrides, seed):
    """A random bf16 Qwen3 model directory (tiny.build has no qwen3 family)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from kvstore import tiny

    base = tiny.config("llama")
    cfg = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": tiny.VOCAB_SIZE,
           "eos_token_id": base["eos_token_id"], "pad_token_id": base["pad_token_id"], "bos_token_id": None,
           "torch_dtype": "bfloat16", **overrides}
    arch = importlib.import_module("mlx_lm.models.qwen3")
    model = arch.Model(arch.ModelArgs.from_dict(cfg))
    weights = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        if name.endswith("weight") and p.ndim >= 2:
            p = mx.random.normal(p.shape, key=mx.random.key(seed * 1_000_003 + i)) * 0.02
        weights[name] = p.astype(mx.bfloat16)
        mx.eval(weights[name])
    mx.save_safetensors(str(Path(dest) / "model.safetensors"), weights, metadata={"format": "mlx"})
    (Path(dest) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # the tokenizer files of a tiny build
    src = tiny.model_dir("llama")
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, Path(dest) / name)


def model_dir(name, seed=0):
    """Path of the random-weight model ``name`` (a key of SHAPES), built once and cached."""
    import mlx_lm

    from kvstore import tiny

    family, overrides = SHAPES[name]
    stamp = json.dumps([name, family, overrides, seed, mlx_lm.__version__,
                        hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]], sort_keys=True)
    path = model_cache_root() / f"{name}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}"
    if family == "qwen3":
        return tiny.build_once(path, lambda tmp: _build_qwen3(tmp, overrides, seed))
    return tiny.build_once(path, lambda tmp: tiny.build(family, tmp, seed=seed, dtype="bfloat16", **overrides))


def model_info(path):
    """Shape facts of a model directory: config excerpt, parameters, KV bytes per token."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    from safetensors import safe_open

    params = 0
    with safe_open(str(Path(path) / "model.safetensors"), "np") as f:
        for k in f.keys():
            params += int(np.prod(f.get_slice(k).get_shape()))
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "intermediate_size", "vocab_size", "full_attention_interval")
    return {"config": {k: text[k] for k in keys if k in text}, "params": params,
            "dtype": "bfloat16", "path_name": Path(path).name}


def kv_bytes_per_token(cache):
    """Bytes per token of the positional KV in a prompt cache (from its arrays)."""
    total = 0
    for c in cache:
        if getattr(c, "keys", None) is not None and hasattr(c, "offset"):
            k, v = c.keys, c.values
            total += (k.nbytes // k.shape[2]) + (v.nbytes // v.shape[2])
    return total


# --------------------------------------------------------------- model work
def random_cache(model, n, seed=0):
    """A prompt cache of ``model``'s classes holding ``n`` tokens of random bf16 KV.

    Buffers are sized as mlx-lm sizes them after a one-shot prefill (rounded
    up to its 256-token step); a restore does not care how the KV was made.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    cap = -(-n // KVCache.step) * KVCache.step
    # head counts and widths from one real forward step on a throwaway cache
    probe = make_prompt_cache(model)
    model(mx.array([[1]]), cache=probe)
    for i, (c, p) in enumerate(zip(cache, probe)):
        if type(c) is not KVCache:
            raise TypeError(f"random_cache handles plain KVCache layers, not {type(c).__name__}")
        shape = (1, p.keys.shape[1], cap, p.keys.shape[3])
        c.keys = (mx.random.normal(shape, key=mx.random.key(seed * 1_000_003 + 2 * i)) * 0.5).astype(p.keys.dtype)
        c.values = (mx.random.normal(shape, key=mx.random.key(seed * 1_000_003 + 2 * i + 1)) * 0.5).astype(p.values.dtype)
        c.offset = n
        mx.eval(c.keys, c.values)
    del probe
    return cache


def shape_cache(name, n, seed=0, fill=True):
    """A list of ``KVCache`` holding ``n`` tokens of random bf16 KV shaped like model ``name``'s
    (plain-attention shapes only), without loading the model. With ``fill=False`` the KV is zeros."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    family, cfg = SHAPES[name]
    if family not in ("llama", "qwen3"):
        raise ValueError(f"shape_cache handles plain-attention shapes, not {family}")
    cfg = {**_TINY_ATTN, **cfg} if not cfg else cfg
    layers, heads, width = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    cap = -(-n // KVCache.step) * KVCache.step
    shape = (1, heads, cap, width)
    out = []
    for i in range(layers):
        c = KVCache()
        if fill:
            c.keys = (mx.random.normal(shape, key=mx.random.key(seed * 1_000_003 + 2 * i)) * 0.5).astype(mx.bfloat16)
            c.values = (mx.random.normal(shape, key=mx.random.key(seed * 1_000_003 + 2 * i + 1)) * 0.5).astype(
                mx.bfloat16)
        else:
            c.keys = mx.zeros(shape, dtype=mx.bfloat16)
            c.values = mx.zeros(shape, dtype=mx.bfloat16)
        c.offset = n
        mx.eval(c.keys, c.values)
        out.append(c)
    return out


_TINY_ATTN = {"num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 16}


def prefill(model, tokens, cache=None, step=2048):
    """Prefill ``tokens`` (as mlx-lm does, in chunks of ``step``) and return
    ``(cache, logits of the last token)``, evaluated."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    if cache is None:
        cache = make_prompt_cache(model)
    tokens = list(tokens)
    while len(tokens) > step:
        model(mx.array(tokens[:step])[None], cache=cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[step:]
    logits = model(mx.array(tokens)[None], cache=cache)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    return cache, logits


def fresh_memory():
    """Collect garbage and return MLX's buffer cache to the system before a timed run."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


# ------------------------------------------------------------------ timing
def now():
    return time.perf_counter()


def timed(fn, sink, name):
    """``fn``, adding the wall time of every call to ``sink[name]`` (a stage timer)."""

    def wrapper(*a, **k):
        t = now()
        try:
            return fn(*a, **k)
        finally:
            sink[name] += now() - t

    return wrapper


def summary(xs, p99=False):
    """Median and spread of a list of numbers (``None`` entries dropped)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    a = np.asarray(xs)
    out = {"n": len(xs), "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
           "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90))}
    if p99:
        out["p99"] = float(np.percentile(a, 99))
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def rotated(items, r):
    """``items`` rotated by ``r``: each repeat starts with a different contender."""
    items = list(items)
    if not items:
        return items
    r %= len(items)
    return items[r:] + items[:r]


def loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def mount_of(path):
    """(device, filesystem type, mount point) holding ``path``."""
    path = os.path.realpath(path)
    best = ("?", "?", "/")
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) >= len(best[2]):
                best = (parts[0], parts[2], parts[1])
    return best


def machine(tmp=None):
    """A description of this machine and the software the numbers come from."""
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    versions = {}
    for pkg in ("mlx", "mlx-lm", "numpy", "lmdb", "safetensors", "xxhash", "blake3", "mlx-kvstore"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = "?"
    tmp = tmp or tempfile.gettempdir()
    dev, fstype, mnt = mount_of(tmp)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "versions": versions, "commit": commit,
        "scratch": {"path": tmp, "device": dev, "fs": fstype, "mount": mnt},
        "mlx_device": _mlx_device(),
    }


def _mlx_device():
    try:
        import mlx.core as mx

        return str(mx.default_device())
    except Exception:  # pragma: no cover - informational only
        return "?"


@contextlib.contextmanager
def scratch(prefix="kvstore-bench-"):
    """A temporary folder (``$KVSTORE_BENCH_TMP`` or the system default), removed afterwards."""
    base = os.environ.get("KVSTORE_BENCH_TMP") or None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dir_bytes(path):
    """(logical bytes, allocated bytes) of every file under ``path``."""
    logical = allocated = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            logical += st.st_size
            allocated += st.st_blocks * 512
    return logical, allocated


# -------------------------------------------------------------- bandwidth
_CHUNK = 16 << 20


def drop_pages(path):
    """Drop ``path``'s pages from the page cache (fsync, then POSIX_FADV_DONTNEED).

    Needs no privileges; works on files the caller can open. Returns True if
    the advice was given.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            os.fsync(fd)
        except OSError:
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def drop_tree(path):
    """``drop_pages`` on every regular file under ``path``; returns the count."""
    n = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                n += drop_pages(p)
    return n


def write_probe(path, nbytes, fsync=True):
    """Seconds to write ``nbytes`` sequentially to a new file (and fsync it)."""
    buf = np.random.default_rng(1).integers(0, 255, min(nbytes, _CHUNK), dtype=np.uint8)
    mv = memoryview(buf)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    t = now()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, mv[: min(left, len(mv))])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return now() - t


def read_probe(path, buf=None):
    """Seconds to read ``path`` sequentially with preadv into ``buf`` (pre-touched
    memory), or, without ``buf``, into a numpy buffer allocated inside the timing (its
    first-touch page faults included, as a restore into new memory pays them; numpy
    asks for transparent huge pages for large buffers, and below glibc's mmap threshold
    a freed buffer of the same size is reused, so this is the fastest new memory there is)."""
    size = os.path.getsize(path)
    t = now()
    if buf is None:
        buf = np.empty(size, dtype=np.uint8)
    mv = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            got = os.preadv(fd, [mv[off : min(size, off + _CHUNK)]], off)
            if got <= 0:
                break
            off += got
    finally:
        os.close(fd)
    return now() - t


def read_into_mlx_probe(path, specs):
    """A raw sequential read of ``path`` into new MLX arrays of ``specs`` (``[(shape, dtype)]``,
    allocated and evaluated inside the timing, as a restore allocates them), filled in
    order until the file ends: ``{"seconds", "alloc"}``."""
    import mlx.core as mx

    t = now()
    arrays = [mx.zeros(shape, dtype=dtype) for shape, dtype in specs]
    mx.eval(arrays)
    alloc = now() - t
    size, off = os.path.getsize(path), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for a in arrays:
            mv = memoryview(a).cast("B")
            want = min(len(mv), size - off)
            while want > 0:
                got = os.preadv(fd, [mv[:want]], off)
                if got <= 0:
                    break
                off += got
                want -= got
                mv = mv[got:]
            if off >= size:
                break
    finally:
        os.close(fd)
    return {"seconds": now() - t, "alloc": alloc}


def memcpy_probe(nbytes):
    """Seconds numpy takes to copy ``nbytes`` between two pre-touched buffers."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    t = now()
    np.copyto(dst, src)
    return now() - t


def cold_read_works(folder, nbytes=64 << 20):
    """Check that ``drop_pages`` makes reads cold: warm and dropped read seconds of one file."""
    path = Path(folder) / "cold-check.bin"
    write_probe(path, nbytes)
    buf = np.ones(nbytes, dtype=np.uint8)
    read_probe(path, buf)
    warm = read_probe(path, buf)
    drop_pages(path)
    cold = read_probe(path, buf)
    os.unlink(path)
    return {"bytes": nbytes, "warm_s": warm, "dropped_s": cold, "ratio": cold / warm if warm else None}


def drop_caches_writable():
    """Whether the global /proc/sys/vm/drop_caches could be written (not used: it is machine-wide)."""
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def page_reporting():
    """Whether this (virtual) machine hands memory processes free back to its host at once.

    With free page reporting (a virtio balloon feature) on, a page a process
    frees goes back to the host, and the next process to touch it pays the
    host's fault as well as its own: new memory costs more than on bare metal,
    and by how much swings with what else the host is doing. Returns
    ``{"on": bool, "order": int, "min_free_ms": int}`` or ``None`` where the
    kernel has no page reporting.
    """
    root = "/sys/module/page_reporting/parameters"
    if not os.path.isdir(root):
        return None

    def param(name):
        try:
            return int(open(os.path.join(root, name)).read().strip())
        except (OSError, ValueError):
            return None

    return {"on": (param("reported_kib") or 0) > 0, "order": param("page_reporting_order"),
            "min_free_ms": param("min_free_ms")}


# ----------------------------------------------------------------- output
def header(bench, mode, argv=None):
    """The common head of a results file: command, machine, load average."""
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + list(argv if argv is not None else sys.argv[1:]))
    return {"bench": bench, "mode": mode, "command": cmd, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "started_epoch": time.time(), "machine": machine(), "load_before": loadavg()}


def finish(result, name=None, out=None):
    """Stamp the end load average and wall time, write JSON, return the path."""
    result["load_after"] = loadavg()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if "started_epoch" in result:
        result["wall_s"] = time.time() - result["started_epoch"]
    out = Path(out) if out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or result['bench']}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def mode_args(parser):
    """--quick / --full and --out shared by every script."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="mode", action="store_const", const="quick",
                   help="a short run (the whole suite in under 5 minutes on 2 cores)")
    g.add_argument("--full", dest="mode", action="store_const", const="full", help="the full run (default)")
    parser.set_defaults(mode="full")
    parser.add_argument("--out", default=str(RESULTS), help=f"results folder (default: {RESULTS})")
    return parser
