"""The cache codec: mlx-lm cache objects to named tensors and back.

``encode`` turns a prompt cache (a list of mlx-lm cache objects, CacheLists
nested to any depth) into a layout (a msgpack-able tree of class names and
scalars), the positional KV tensors (KVCache, QuantizedKVCache,
ConcatenateKVCache: shape ``(B, H, T, X)``, one row per token) and the
non-positional state tensors (recurrent state, rotating windows, chunked
KV). ``decode`` rebuilds fresh cache objects from those parts.

Cache classes come from a whitelist, never from a name looked up at run
time; shapes and dtypes are checked against the layout before anything is
handed back. Encoding reads evaluated buffers as numpy views and runs no MLX
graph ops, so it is safe off the generation thread.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as C

from .errors import CorruptSnapshot, InvalidInput, UnsupportedCache

# whitelist: name -> class; exact type match only (subclasses may add state)
CLASSES = {
    "KVCache": C.KVCache,
    "QuantizedKVCache": C.QuantizedKVCache,
    "ConcatenateKVCache": C.ConcatenateKVCache,
    "RotatingKVCache": C.RotatingKVCache,
    "ChunkedKVCache": C.ChunkedKVCache,
    "ArraysCache": C.ArraysCache,
    "CacheList": C.CacheList,
}
POSITIONAL = ("KVCache", "QuantizedKVCache", "ConcatenateKVCache")
STEP = 256

_MX_TO_ST = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.int64: "I64",
    mx.int32: "I32",
    mx.int16: "I16",
    mx.int8: "I8",
    mx.uint64: "U64",
    mx.uint32: "U32",
    mx.uint16: "U16",
    mx.uint8: "U8",
    mx.bool_: "BOOL",
}
if hasattr(mx, "float64"):
    _MX_TO_ST[mx.float64] = "F64"
_ST_TO_MX = {v: k for k, v in _MX_TO_ST.items()}


def to_numpy(a):
    """A numpy view of an evaluated ``mx.array`` (bf16 as uint16 bits)."""
    if a.dtype not in _MX_TO_ST:
        raise UnsupportedCache(f"cannot store arrays of dtype {a.dtype}")
    mv = memoryview(a)
    if a.dtype != mx.bfloat16:
        return np.asarray(mv)
    if not mv.c_contiguous:
        a = mx.contiguous(a)
        mx.eval(a)
        mv = memoryview(a)
    return np.frombuffer(mv.cast("B"), dtype=np.uint16).reshape(mv.shape)


def st_dtype(a):
    return _MX_TO_ST[a.dtype]


def mx_dtype(sdtype):
    """The MLX dtype of a safetensors dtype name (``CorruptSnapshot`` if MLX has none)."""
    try:
        return _ST_TO_MX[sdtype]
    except KeyError:
        raise CorruptSnapshot(f"no MLX dtype for {sdtype!r}") from None


def to_mx(arr, sdtype):
    """Build an ``mx.array`` from a numpy container in safetensors dtype ``sdtype``."""
    out = mx.array(arr)
    if sdtype == "BF16":
        out = out.view(mx.bfloat16)
    return out


class Encoded:
    """A cache split into layout, positional tensors and state tensors."""

    __slots__ = ("layout", "positional", "state", "trimmable")

    def __init__(self):
        self.layout = []
        # name -> (sdtype, numpy (B, H, T, X)) holding the first T tokens
        self.positional = {}
        # name -> (sdtype, numpy array)
        self.state = {}
        self.trimmable = True


def _is_array(x):
    return isinstance(x, mx.array)


def _check_batch(arr, what):
    if arr.ndim != 4 or arr.shape[0] != 1:
        raise UnsupportedCache(f"{what}: expected a (1, heads, tokens, dim) array, got {arr.shape}")


def _encode_leaf(c, path, n, enc):
    name = type(c).__name__
    if name not in CLASSES or CLASSES[name] is not type(c):
        raise UnsupportedCache(f"cache class {type(c).__module__}.{type(c).__qualname__} is not supported")
    if name == "CacheList":
        return {"c": name, "ch": [_encode_leaf(s, f"{path}.{i}", n, enc) for i, s in enumerate(c.caches)]}
    if name in POSITIONAL:
        return _encode_positional(c, name, path, n, enc)
    if name == "RotatingKVCache":
        return _encode_rotating(c, path, n, enc)
    if name == "ChunkedKVCache":
        return _encode_chunked(c, path, n, enc)
    return _encode_arrays(c, path, enc)


def _holds(c, path, n):
    if c.offset != n:
        raise InvalidInput(f"layer {path} holds {c.offset} tokens, expected {n}")


def _encode_positional(c, name, path, n, enc):
    """KVCache, ConcatenateKVCache, QuantizedKVCache: one row per token, shareable between snapshots."""
    if c.keys is None:
        return {"c": name, "e": 1, **({"g": c.group_size, "b": c.bits} if name == "QuantizedKVCache" else {})}
    _holds(c, path, n)
    node = {"c": name, "n": n}
    if name == "QuantizedKVCache":
        node.update(g=c.group_size, b=c.bits)
        parts = [(f"{path}.k{i}", a) for i, a in enumerate(c.keys)]
        parts += [(f"{path}.v{i}", a) for i, a in enumerate(c.values)]
    else:
        parts = [(f"{path}.k", c.keys), (f"{path}.v", c.values)]
    for tname, a in parts:
        _check_batch(a, f"layer {path}")
        if a.shape[2] < n:
            raise InvalidInput(f"layer {path} buffer has {a.shape[2]} rows, expected at least {n}")
        enc.positional[tname] = (st_dtype(a), to_numpy(a)[:, :, :n, :])
    return node


def _window_state(c, path, used, enc):
    for tname, a in ((f"{path}.k", c.keys), (f"{path}.v", c.values)):
        _check_batch(a, f"layer {path}")
        enc.state[tname] = (st_dtype(a), to_numpy(a)[:, :, :used, :])


def _encode_rotating(c, path, n, enc):
    """A sliding window: trimmable only until it wraps."""
    node = {"c": "RotatingKVCache", "o": c.offset, "keep": c.keep, "max": c.max_size, "idx": c._idx}
    if c.keys is None:
        node["e"] = 1
        return node
    _holds(c, path, n)
    wrapped = c.offset >= c.max_size
    used = c.keys.shape[2] if wrapped else c.offset
    if not wrapped and c._idx != c.offset:
        used = c.keys.shape[2]
        node["raw"] = 1
    enc.trimmable &= not wrapped
    _window_state(c, path, used, enc)
    return node


def _encode_chunked(c, path, n, enc):
    """Chunked attention: trimmable only until the first chunk slides out."""
    node = {"c": "ChunkedKVCache", "o": c.offset, "cs": c.chunk_size, "sp": c.start_position}
    if c.keys is None:
        node["e"] = 1
        return node
    _holds(c, path, n)
    enc.trimmable &= c.start_position == 0
    _window_state(c, path, c.offset - c.start_position, enc)
    return node


def _encode_arrays(c, path, enc):
    """ArraysCache: recurrent state, a checkpoint only (never trimmable)."""
    enc.trimmable = False
    present = []
    for i, a in enumerate(c.cache):
        if a is None:
            present.append(0)
            continue
        if not _is_array(a):
            raise UnsupportedCache(f"layer {path} holds a {type(a).__name__}, not an array")
        if a.ndim == 0 or a.shape[0] != 1:
            raise UnsupportedCache(f"layer {path}: batched recurrent state {a.shape} is not supported")
        present.append(1)
        enc.state[f"{path}.s{i}"] = (st_dtype(a), to_numpy(a))
    if c.left_padding is not None or c.lengths is not None:
        raise UnsupportedCache(f"layer {path}: a batched (padded) recurrent cache cannot be stored")
    return {"c": "ArraysCache", "s": present}


def encode(cache, n_tokens):
    """Split a prompt cache holding exactly ``n_tokens`` tokens into an ``Encoded``.

    Raises ``UnsupportedCache`` for classes outside the whitelist or batched
    caches, and ``InvalidInput`` when a layer does not hold ``n_tokens``.
    """
    if not isinstance(cache, (list, tuple)) or not cache:
        raise InvalidInput("cache must be a non-empty list of mlx-lm cache objects")
    arrays = []
    for c in cache:
        _collect(c, arrays)
    if arrays:
        mx.eval(*arrays)
    enc = Encoded()
    enc.layout = [_encode_leaf(c, str(i), n_tokens, enc) for i, c in enumerate(cache)]
    return enc


def _collect(c, out):
    for x in getattr(c, "caches", ()) or ():
        _collect(x, out)
    for attr in ("keys", "values"):
        v = getattr(c, attr, None)
        if _is_array(v):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(a for a in v if _is_array(a))
    for a in getattr(c, "cache", None) or ():
        if _is_array(a):
            out.append(a)


def signature(layout, positional, state):
    """A layout summary that must agree between every snapshot of one model.

    Class tree, scalars that fix the layout, and every tensor's dtype and
    shape with the token axis of positional tensors left out.
    """

    tensors = {k: [d, [a.shape[0], a.shape[1], a.shape[3]]] for k, (d, a) in positional.items()}
    tensors.update({k: [d, list(a.shape)] for k, (d, a) in state.items() if not k.endswith((".k", ".v"))})
    # rotating / chunked windows vary in length: keep their head and width only
    tensors.update(
        {k: [d, [a.shape[0], a.shape[1], a.shape[3]]] for k, (d, a) in state.items() if k.endswith((".k", ".v"))}
    )
    return {"layout": [_strip(n) for n in layout], "tensors": dict(sorted(tensors.items()))}


def _strip(node):
    """A layout node without its per-snapshot fields (token counts, offsets)."""
    keep = {k: v for k, v in node.items() if k in ("c", "g", "b", "keep", "max", "cs", "s")}
    if "ch" in node:
        keep["ch"] = [_strip(x) for x in node["ch"]]
    return keep


def _int(x, lo=0, hi=None):
    return type(x) is int and x >= lo and (hi is None or x <= hi)


def check_layout(layout, sig_layout, n):
    """Raise ``CorruptSnapshot`` unless ``layout`` (read from a record) is a
    layout of exactly ``n`` tokens with the class tree and fixed scalars of
    ``sig_layout`` (the model's recorded signature), as ``encode`` writes it.

    Guards ``decode`` against records that name unknown classes, claim
    absurd offsets or windows, or do not belong to the model's layout.
    """

    def walk(node, want, path):
        if not isinstance(node, dict) or not isinstance(want, dict):
            raise CorruptSnapshot(f"layer {path}: not a layout node")
        name = node.get("c")
        if not isinstance(name, str) or name not in CLASSES:
            raise CorruptSnapshot(f"unknown cache class {name!r} in layer {path}")
        if name == "CacheList":
            ch, wch = node.get("ch"), want.get("ch")
            if not isinstance(ch, list) or not isinstance(wch, list) or len(ch) != len(wch):
                raise CorruptSnapshot(f"layer {path}: CacheList does not match the model layout")
            for i, (a, b) in enumerate(zip(ch, wch)):
                walk(a, b, f"{path}.{i}")
            if _strip({k: v for k, v in node.items() if k != "ch"}) != {k: v for k, v in want.items() if k != "ch"}:
                raise CorruptSnapshot(f"layer {path} does not match the model layout")
            return
        if "ch" in node or _strip(node) != want:
            raise CorruptSnapshot(f"layer {path} ({name}) does not match the model layout")
        if node.get("e") is not None:
            if node["e"] != 1:
                raise CorruptSnapshot(f"layer {path}: bad empty flag")
            return
        if name in POSITIONAL:
            ok = node.get("n") == n
        elif name == "RotatingKVCache":
            ok = (node.get("o") == n and _int(node.get("max"), 1) and _int(node.get("keep"))
                  and _int(node.get("idx"), 0, max(node["max"], n)) and node.get("raw") in (None, 1))
        elif name == "ChunkedKVCache":
            ok = node.get("o") == n and _int(node.get("sp"), 0, n) and _int(node.get("cs"), 1)
        else:  # ArraysCache
            ok = isinstance(node.get("s"), list) and all(p in (0, 1) for p in node["s"])
        if not ok:
            raise CorruptSnapshot(f"layer {path} ({name}) has bad offsets for {n} tokens")

    if not _int(n, 1) or not isinstance(layout, list) or not isinstance(sig_layout, list) \
            or len(layout) != len(sig_layout):
        raise CorruptSnapshot("layout does not match the model layout")
    for i, (node, want) in enumerate(zip(layout, sig_layout)):
        walk(node, want, str(i))


def sig_id(sig):
    """A short stable id of one exact layout signature."""
    import hashlib
    import json

    return hashlib.blake2b(json.dumps(sig, sort_keys=True).encode(), digest_size=8).hexdigest()


def structure(sig):
    """What every layout of one model shares, whatever its KV quantisation.

    mlx-lm quantises KV only past ``quantized_kv_start``, so one model yields
    both KVCache and QuantizedKVCache layouts; their class tree (with those
    two merged), head counts and state shapes must still agree.
    """

    def norm(node):
        c = "KV" if node["c"] in ("KVCache", "QuantizedKVCache") else node["c"]
        out = {k: v for k, v in node.items() if k not in ("c", "g", "b", "ch")}
        out["c"] = c
        if "ch" in node:
            out["ch"] = [norm(x) for x in node["ch"]]
        return out

    tensors = {}
    for name, (dtype, shape) in sig["tensors"].items():
        base, _, part = name.rpartition(".")
        if part[:1] in "kv" and part[1:].isdigit():
            tensors[f"{base}.{part[0]}"] = [shape[0], shape[1]]
        elif part in ("k", "v"):
            tensors[name] = [shape[0], shape[1]]
        else:
            tensors[name] = [dtype, shape]
    return {"layout": [norm(n) for n in sig["layout"]], "tensors": dict(sorted(tensors.items()))}


def positional_specs(layout):
    """``[(tensor name, path)]`` of every positional tensor a layout needs."""
    out = []

    def walk(node, path):
        if node["c"] == "CacheList":
            for i, ch in enumerate(node["ch"]):
                walk(ch, f"{path}.{i}")
        elif node["c"] in POSITIONAL and not node.get("e"):
            if node["c"] == "QuantizedKVCache":
                out.extend((f"{path}.{kv}{i}", path) for kv in "kv" for i in range(3))
            else:
                out.extend((f"{path}.{kv}", path) for kv in "kv")

    for i, node in enumerate(layout):
        walk(node, str(i))
    return out


def headroom(n):
    """Buffer rows for a restored KV cache of ``n`` tokens: room to decode."""
    return (n // STEP + 1) * STEP


def _need(tensors, name, sdtype=None):
    try:
        t = tensors[name]
    except KeyError:
        raise CorruptSnapshot(f"snapshot is missing tensor {name}") from None
    return t


def decode(layout, positional, state, n_tokens):
    """Rebuild fresh mlx-lm cache objects.

    Args:
        layout: the layout tree from ``encode``.
        positional: ``{name: mx.array (1, H, cap, X)}`` whose first
            ``n_tokens`` rows hold the KV (the rest is decode headroom).
        state: ``{name: mx.array}`` state tensors.
        n_tokens: tokens the rebuilt cache holds (a prefix of what was
            stored is allowed only for trimmable layouts).
    """
    return [_decode_leaf(node, str(i), positional, state, n_tokens) for i, node in enumerate(layout)]


def _decode_leaf(node, path, positional, state, n):
    name = node.get("c")
    cls = CLASSES.get(name)
    if cls is None:
        raise CorruptSnapshot(f"unknown cache class {name!r} in layer {path}")
    if name == "CacheList":
        return cls(*[_decode_leaf(ch, f"{path}.{i}", positional, state, n) for i, ch in enumerate(node["ch"])])
    if name == "QuantizedKVCache":
        c = cls(group_size=int(node["g"]), bits=int(node["b"]))
    elif name == "RotatingKVCache":
        c = cls(max_size=int(node["max"]), keep=int(node["keep"]))
    elif name == "ChunkedKVCache":
        c = cls(chunk_size=int(node["cs"]))
    elif name == "ArraysCache":
        c = cls(len(node["s"]))
    else:
        c = cls()
    if node.get("e"):
        return c
    if name in ("KVCache", "ConcatenateKVCache"):
        k, v = _need(positional, f"{path}.k"), _need(positional, f"{path}.v")
        if name == "ConcatenateKVCache":
            k, v = k[:, :, :n, :], v[:, :, :n, :]
        c.keys, c.values, c.offset = k, v, n
    elif name == "QuantizedKVCache":
        c.keys = tuple(_need(positional, f"{path}.k{i}") for i in range(3))
        c.values = tuple(_need(positional, f"{path}.v{i}") for i in range(3))
        c.offset = n
    elif name == "RotatingKVCache":
        k, v = _need(state, f"{path}.k"), _need(state, f"{path}.v")
        offset, idx = int(node["o"]), int(node["idx"])
        if n != offset:
            # trimming an unwrapped window: drop the tail tokens
            if offset >= c.max_size or node.get("raw") or n > offset:
                raise CorruptSnapshot(f"layer {path}: a wrapped window cannot serve {n} of {offset} tokens")
            k, v = k[:, :, :n, :], v[:, :, :n, :]
            offset = idx = n
        if offset < c.max_size and not node.get("raw"):
            cap = min(headroom(offset), c.max_size)
            k, v = _with_headroom(k, cap), _with_headroom(v, cap)
        c.keys, c.values, c.offset, c._idx = k, v, offset, idx
    elif name == "ChunkedKVCache":
        k, v = _need(state, f"{path}.k"), _need(state, f"{path}.v")
        offset, start = int(node["o"]), int(node["sp"])
        if n != offset:
            if start != 0 or n > offset:
                raise CorruptSnapshot(f"layer {path}: a slid chunked cache cannot serve {n} of {offset} tokens")
            k, v = k[:, :, :n, :], v[:, :, :n, :]
            offset = n
        c.keys, c.values = _with_headroom(k, headroom(offset - start)), _with_headroom(v, headroom(offset - start))
        c.offset, c.start_position = offset, start
    else:  # ArraysCache
        c.cache = [_need(state, f"{path}.s{i}") if p else None for i, p in enumerate(node["s"])]
    return c


def _with_headroom(a, cap):
    rows = a.shape[2]
    if rows >= cap:
        return a
    pad = mx.zeros((a.shape[0], a.shape[1], cap - rows, a.shape[3]), dtype=a.dtype)
    return mx.concatenate([a, pad], axis=2)


def cache_tokens(cache):
    """Tokens held by a prompt cache, from its first layer that knows (else None)."""
    for c in cache:
        if hasattr(c, "caches"):
            n = cache_tokens(c.caches)
            if n is not None:
                return n
        elif hasattr(c, "offset") and getattr(c, "keys", None) is not None:
            return int(c.offset)
    return None
