"""The restore path: a planned snapshot -> verified arrays -> fresh cache objects.

``load`` reads what a ``matching.Plan`` needs, in this order: the stored
tokens against the request, the segment and model records from one index
view, the layout against the model's recorded signature, then only the blob
bytes of the tokens served (row chunks verified as they are read), and
rebuilds mlx-lm cache objects with decode headroom. Every check failing is
``CorruptSnapshot`` (the caller counts it and treats it as a miss); nothing
is handed to MLX before its shape and dtype match the model's layout.
This module holds no index transaction during blob I/O.

Bytes are read once, straight into the memory of the MLX arrays the cache
will hold, where MLX's memory is the host's (the CPU device, and Apple
silicon's unified memory); under a device with memory of its own (CUDA)
they are read into host buffers and copied to the device once.

The first extent's buffers are made a few at a time on the caller's thread
while a reader thread fills and checks the ones already made: making an MLX
buffer faults in and zeroes its pages one by one (most of a warm restore on
Linux), and reading with checks is the other half, so the two halves run on
two cores side by side. A snapshot under ``PIPELINE_MIN`` bytes is made and
read in one go on the caller's thread. Only the caller's thread calls MLX;
the reader only copies bytes into memory it was handed and checksums them.
"""

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .blobs import DTYPES
from .errors import CorruptSnapshot
from .records import decode_model, decode_segment


def _unified():
    import mlx.core as mx

    return mx.default_device().type == mx.cpu or mx.metal.is_available()


#: Bytes of buffers made per MLX evaluation before their reads are handed to the reader thread.
ALLOC_GROUP = 4 << 20
#: Below this many bytes of KV a restore reads on the caller's thread: the hand-offs
#: to the reader thread would cost more than the overlap saves.
PIPELINE_MIN = 16 << 20

_pool = None
_pool_pid = None
_pool_lock = threading.Lock()


def _reader():
    """The process's restore reader thread (made again after a fork)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-restore")
            _pool_pid = os.getpid()
        return _pool


def _submit(fn, *args):
    """``fn(*args)`` on the reader thread, or here when it cannot take work (interpreter shutdown)."""
    try:
        return _reader().submit(fn, *args)
    except RuntimeError:
        f = Future()
        try:
            f.set_result(fn(*args))
        except BaseException as exc:
            f.set_exception(exc)
        return f


def _nbytes(shape, sdtype):
    """Bytes of a tensor of ``shape`` in the container dtype of ``sdtype``."""
    return np.dtype(DTYPES[sdtype]).itemsize * int(np.prod(shape))


def _groups(shapes):
    """``shapes`` split into runs of about ``ALLOC_GROUP`` bytes, in order."""
    group, size = {}, 0
    for name, (shape, sd) in shapes.items():
        group[name] = (shape, sd)
        size += _nbytes(shape, sd)
        if size >= ALLOC_GROUP:
            yield group
            group, size = {}, 0
    if group:
        yield group


def _finish(futures):
    """Wait for every read handed out (the reader must be done before its blob closes); raise the first fault."""
    first = None
    for f in futures:
        exc = f.exception()
        if exc is not None and first is None:
            first = exc
    if first is not None:
        raise first


def alloc(shapes):
    """Zeroed buffers for ``{name: (shape, sdtype)}``: ``{name: (array, host)}`` with
    ``array`` an MLX array (or ``None``) and ``host`` a writable numpy view of
    its memory in the container dtype of ``sdtype``.

    All arrays are made in one evaluation. Where MLX's memory is not the
    host's, ``array`` is ``None`` and ``host`` a numpy buffer to copy to the
    device with ``codec.to_mx`` once it is full.
    """
    import mlx.core as mx

    from . import codec

    out = {}
    if _unified():
        arrs = {name: mx.zeros(shape, dtype=codec.mx_dtype(sd)) for name, (shape, sd) in shapes.items()}
        mx.eval(list(arrs.values()))
        for name, arr in arrs.items():
            shape, sd = shapes[name]
            container = np.dtype(DTYPES[sd])
            mv = memoryview(arr)
            if not mv.readonly and mv.c_contiguous and mv.nbytes == _nbytes(shape, sd):
                out[name] = (arr, np.frombuffer(mv.cast("B"), dtype=container).reshape(shape))
    for name, (shape, sd) in shapes.items():
        if name not in out:
            out[name] = (None, np.zeros(shape, dtype=np.dtype(DTYPES[sd])))
    return out


def load(index, blobs, plan, fingerprint, toks):
    """Rebuild the cache ``plan`` serves for the request tokens ``toks``; return ``(cache, bytes read)``."""
    from . import codec

    rec, n = plan.record, plan.tokens
    if not rec.same_tokens(toks, n):
        raise CorruptSnapshot("stored tokens do not match")
    segs, model = _records(index, rec, fingerprint)
    sig = model.sigs.get(rec.layout_id)
    if not isinstance(sig, dict) or not isinstance(sig.get("tensors"), dict):
        raise CorruptSnapshot(f"no layout {rec.layout_id} recorded for {fingerprint}")
    codec.check_layout(rec.layout, sig.get("layout"), rec.n_tokens)
    tensors = sig["tensors"]
    read = [0]
    positional = _positional(blobs, rec, segs, tensors, n, read)
    state = _state(blobs, rec, tensors, read) if rec.state else {}
    cache = codec.decode(rec.layout, positional, state, n)
    import mlx.core as mx

    mx.eval(list(positional.values()) + list(state.values()))
    return cache, read[0]


def _records(index, rec, fingerprint):
    """The segment records of ``rec``'s extents and the model record, from one view."""
    with index.read() as r:
        model_raw = r.model(str(fingerprint))
        segs = {}
        for e in rec.extents:
            raw = r.segment(e.segment)
            if raw is None:
                raise CorruptSnapshot(f"segment {e.segment.hex()} is missing from the index")
            seg = decode_segment(raw)
            if seg.fingerprint != rec.fingerprint:
                raise CorruptSnapshot(f"segment {e.segment.hex()} belongs to another model")
            if e.rows > seg.rows:
                raise CorruptSnapshot(f"extent of {e.rows} rows in a {seg.rows}-row segment")
            segs[e.segment] = seg
    if model_raw is None:
        raise CorruptSnapshot(f"no layout recorded for {fingerprint}")
    return segs, decode_model(model_raw)


def _positional_specs(layout, tensors):
    """``{name: (dtype, (B, H, X))}`` of every positional tensor, as the model's layout records it."""
    from . import codec

    out = {}
    for name, _path in codec.positional_specs(layout):
        want = tensors.get(name)
        if not (isinstance(want, list) and len(want) == 2 and want[0] in DTYPES and isinstance(want[1], list)
                and len(want[1]) == 3 and all(type(d) is int and d >= 1 for d in want[1])):
            raise CorruptSnapshot(f"tensor {name} is not in the model layout")
        out[name] = (want[0], tuple(want[1]))
    return out


def _read_rows(r, take, jobs):
    """Read and check ``take`` rows of each ``(name, out)`` in ``jobs`` from the blob reader ``r``."""
    for name, out in jobs:
        r.read_rows(name, take, out)


def _jobs(dests, specs, cap, pos, take):
    """``(name, rows pos..pos+take of its buffer)`` for each buffer in ``dests``."""
    return [(name, host.reshape(-1, cap, specs[name][1][2])[:, pos : pos + take, :])
            for name, (_arr, host) in dests.items()]


def _alloc_and_read(r, specs, cap, take):
    """Buffers with ``cap`` rows for every tensor of ``specs``, their first ``take`` rows read from ``r``.

    From ``PIPELINE_MIN`` bytes up the buffers are made a group at a time here
    while the reader thread reads and checks the groups already made; a fault
    stops further allocation, and every read is waited for before returning
    (the blob closes after).
    """
    shapes = {name: ((b, h, cap, x), sd) for name, (sd, (b, h, x)) in specs.items()}
    if sum(_nbytes(shape, sd) for shape, sd in shapes.values()) < PIPELINE_MIN:
        dests = alloc(shapes)
        _read_rows(r, take, _jobs(dests, specs, cap, 0, take))
        return dests
    dests, futures = {}, []
    try:
        for group in _groups(shapes):
            if any(f.done() and f.exception() is not None for f in futures):
                break  # a fault already makes this a miss
            made = alloc(group)
            dests.update(made)
            futures.append(_submit(_read_rows, r, take, _jobs(made, specs, cap, 0, take)))
    finally:
        _finish(futures)
    return dests


def _positional(blobs, rec, segs, tensors, n, read):
    """Positional KV of the first ``n`` tokens, read extent by extent into buffers with decode headroom."""
    from . import codec

    specs = _positional_specs(rec.layout, tensors)
    if not specs:
        return {}
    cap = codec.headroom(n)
    dests = None
    pos = 0
    for e in rec.extents:
        if pos >= n:
            break
        take = min(e.rows, n - pos)
        seg = segs[e.segment]
        if seg.start is not None and seg.start != pos:
            raise CorruptSnapshot(f"segment {e.segment.hex()} holds tokens from {seg.start}, not {pos}")
        with blobs.open(e.segment.hex(), seg.size, seg.header_sum) as r:
            for name, (sdtype, (b, h, x)) in specs.items():
                shape = r.shape(name)
                if r.dtype(name) != sdtype or len(shape) != 4 or (shape[0], shape[1], shape[3]) != (b, h, x):
                    raise CorruptSnapshot(f"segment tensor {name} has shape {shape} {r.dtype(name)}")
                if shape[2] < take:
                    raise CorruptSnapshot(f"segment tensor {name} has {shape[2]} rows, need {take}")
            if dests is None:  # allocated only once a real blob has shown these shapes
                dests = _alloc_and_read(r, specs, cap, take)
            else:
                _read_rows(r, take, _jobs(dests, specs, cap, pos, take))
            read[0] += r.bytes_read
        pos += take
    if pos < n:
        raise CorruptSnapshot(f"segments cover {pos} of {n} tokens")
    return {name: arr if arr is not None else codec.to_mx(host, specs[name][0])
            for name, (arr, host) in dests.items()}


def _state(blobs, rec, tensors, read):
    """The snapshot's own state tensors, each checked against the model's layout before it is read."""
    from . import codec

    st = rec.state
    out = {}
    with blobs.open(st.blob.hex(), st.size, st.header_sum) as r:
        for name in r.tensors:
            sdtype, shape = r.dtype(name), list(r.shape(name))
            want = tensors.get(name)
            if not isinstance(want, list) or len(want) != 2 or want[0] != sdtype:
                raise CorruptSnapshot(f"state tensor {name} is not in the model layout")
            check = [shape[0], shape[1], shape[3]] if name.endswith((".k", ".v")) and len(shape) == 4 else shape
            if check != list(want[1]):
                raise CorruptSnapshot(f"state tensor {name} has shape {tuple(shape)}, want {want[1]}")
            arr, host = alloc({name: (tuple(shape), sdtype)})[name]
            r.read_into(name, host)
            out[name] = arr if arr is not None else codec.to_mx(host, sdtype)
        read[0] += r.bytes_read
    return out
