"""Export and import archives: snapshots and their blobs as one tar file.

An archive is a tar whose first member, ``manifest.msgpack``, maps
``format``, ``block_tokens``, ``snapshots`` (key and raw index record of
each), ``segments`` (blob id -> segment metadata) and ``models``
(fingerprint -> model record); the blob files follow as
``blobs/<id>.safetensors``, copied as stored, never re-encoded.

Archives come from elsewhere and are read as hostile input. The manifest is
decoded one object at a time (memory stays bounded by the largest record,
not the manifest), every blob member is copied only up to the size the
manifest declares for it and verified chunk by chunk before it is indexed,
duplicate or undeclared members are refused, an import that would not fit
on the disk is refused before it writes, and temp files are removed on
every path out. Files written are 0600. This module never imports MLX.
"""

import io
import os
import tarfile
import time
import zlib

import msgpack

from ..backends.files import CLOEXEC, NOFOLLOW
from ..blobs import FORMAT_VERSION, SUFFIX, is_blob_id, new_id
from ..errors import CorruptSnapshot, InvalidInput, StoreUnavailable
from ..records import decode_segment, is_id, model_from, pack, segment_from, snapshot_from, unpack
from ..reports import Problem
from ..transactions import adopt_snapshot

MANIFEST = "manifest.msgpack"
# one manifest object (a snapshot record, a segment or model entry) at most
MAX_OBJECT = 64 << 20
MAX_MODELS = 256
# what a segment entry of the manifest may carry (anything else is dropped as it is read)
SEGMENT_FIELDS = ("fp", "rows", "at", "size", "hs")
COPY_CHUNK = 1 << 20


class _Problems(list):
    def add(self, kind, key, blob, reason):
        self.append(Problem(kind, key, blob, reason))


def create_private(path):
    """Open ``path`` for writing as a new or truncated 0600 file, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW | CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


# ---------------------------------------------------------------- manifest
def _unpacker(fileobj):
    return msgpack.Unpacker(
        fileobj, raw=False, strict_map_key=False, max_buffer_size=MAX_OBJECT, max_bin_len=MAX_OBJECT,
        max_str_len=1 << 20, max_array_len=1 << 24, max_map_len=1 << 24,
    )


def read_manifest(fileobj, on_snapshot, keep_segment=None, keep_model=None):
    """Decode a manifest stream one object at a time.

    ``on_snapshot(item)`` is called with each snapshot entry as it is
    decoded (none is kept here). Returns ``(header, segments, models)``:
    ``header`` holds ``format`` and ``block_tokens``; of the segment and
    model entries only those ``keep_segment(blob_id)`` / ``keep_model(fp)``
    accept are kept (the fields a segment needs, nothing else), so what stays
    in memory is bounded by what the snapshot records reference. Snapshots
    come before segments and models (as ``export_archive`` writes them), so
    the records' references are known when the rest is read.
    """
    unpacker = _unpacker(fileobj)
    header, segments, models = {}, {}, {}
    seen = set()
    try:
        for _ in range(unpacker.read_map_header()):
            name = unpacker.unpack()
            if name in ("segments", "models") and "snapshots" not in seen:
                raise InvalidInput("malformed manifest: segments or models before the snapshots")
            seen.add(name)
            if name == "snapshots":
                for _ in range(unpacker.read_array_header()):
                    on_snapshot(unpacker.unpack())
            elif name == "segments":
                for _ in range(unpacker.read_map_header()):
                    blob_id, meta = unpacker.unpack(), unpacker.unpack()
                    if isinstance(blob_id, str) and isinstance(meta, dict) and keep_segment and keep_segment(blob_id):
                        segments[blob_id] = {k: meta[k] for k in SEGMENT_FIELDS if k in meta}
            elif name == "models":
                for _ in range(unpacker.read_map_header()):
                    fp, model = unpacker.unpack(), unpacker.unpack()
                    if isinstance(fp, str) and isinstance(model, dict) and keep_model and keep_model(fp):
                        if len(models) >= MAX_MODELS:
                            raise InvalidInput(f"the manifest lists more than {MAX_MODELS} models")
                        models[fp] = model
            elif name in ("format", "block_tokens"):
                header[name] = unpacker.unpack()
            else:
                unpacker.skip()
    except InvalidInput:
        raise
    except (ValueError, TypeError, msgpack.OutOfData, msgpack.exceptions.ExtraData,
            msgpack.exceptions.BufferFull) as exc:
        raise InvalidInput(f"malformed manifest: {type(exc).__name__}: {exc}") from None
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise InvalidInput(f"the archive is damaged: {exc}") from None
    return header, segments, models


def _open_tar(archive):
    try:
        tar = tarfile.open(archive, "r:*")
        first = tar.next()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise InvalidInput(f"cannot read archive {archive}: {exc}") from exc
    if first is None or first.name != MANIFEST or not first.isfile():
        tar.close()
        raise InvalidInput(f"{archive} is not a kvstore archive (no manifest first)")
    return tar, first


class _BlobRefs:
    """The blobs a manifest's snapshot entries name: segment ids and state blobs with their sizes."""

    def __init__(self):
        self.segments, self.states, self.models = set(), {}, set()

    def __call__(self, item):
        if not isinstance(item, dict) or not isinstance(item.get("rec"), bytes):
            return
        try:
            rec = unpack(item["rec"])
        except CorruptSnapshot:
            return
        if isinstance(rec.get("fp"), str):
            self.models.add(rec["fp"])
        for ext in rec.get("ext") or []:
            if isinstance(ext, list) and ext and isinstance(ext[0], bytes):
                self.segments.add(ext[0].hex())
        st = rec.get("st")
        if isinstance(st, list) and len(st) == 3 and isinstance(st[0], bytes) and type(st[1]) is int \
                and type(st[2]) is int and st[1] >= 0:
            self.states[st[0].hex()] = (st[1], st[2])

    def declared(self, segments):
        """``{blob id: (size, header sum)}`` of every blob the entries need."""
        out = dict(self.states)
        for blob_id in self.segments:
            meta = segments.get(blob_id)
            if isinstance(meta, dict) and type(meta.get("size")) is int and type(meta.get("hs")) is int \
                    and meta["size"] >= 0:
                out[blob_id] = (meta["size"], meta["hs"])
        return out


# ------------------------------------------------------------------ import
def import_archive(store, archive, progress=None):
    """Add the snapshots of an archive to ``store``; see ``SnapshotStore.import_archive``."""
    if store.readonly:
        raise StoreUnavailable("the store is open read-only")
    problems = _Problems()
    for name in orphaned_temps(store):  # left by an import that was killed
        _unlink_tmp(store, name)
    tar, first = _open_tar(archive)
    with tar:
        refs = _BlobRefs()
        header, segments, models = read_manifest(tar.extractfile(first), refs, refs.segments.__contains__,
                                                 refs.models.__contains__)
        _check_header(archive, header, store.block)
        declared = refs.declared(segments)
        _check_room(store, declared)
        arrived = {}
        try:
            _copy_blobs(store, tar, first, declared, arrived, problems, progress, archive)
            added, added_bytes = _index_snapshots(store, archive, segments, models, arrived, problems)
        finally:
            for tmp_name in arrived.values():
                _unlink_tmp(store, tmp_name)
    return added, added_bytes, problems


def archive_block_tokens(archive):
    """The block size of the store an archive was exported from (the whole manifest is
    read and checked, none of it kept): a new store made for an import takes it."""
    tar, first = _open_tar(archive)
    with tar:
        header, _segments, _models = read_manifest(tar.extractfile(first), lambda item: None)
    _check_header(archive, header, header.get("block_tokens"))
    block = header.get("block_tokens")
    if type(block) is not int or not 1 <= block <= 1 << 20:
        raise InvalidInput(f"{archive} names no valid block size ({block!r})")
    return block


def _check_header(archive, header, block):
    if header.get("format") != FORMAT_VERSION:
        raise InvalidInput(f"{archive} has archive format {header.get('format')}")
    if header.get("block_tokens") != block:
        raise InvalidInput(f"{archive} was written by a store with {header.get('block_tokens')}-token blocks, "
                           f"this store uses {block}")


def _check_room(store, declared):
    """Refuse an import whose new blobs cannot fit on the store's disk."""
    need = sum(size for blob_id, (size, _hs) in declared.items() if not store.blobs.exists(blob_id))
    try:
        st = os.statvfs(store.blobs.folder.fd("tmp"))
    except (OSError, AttributeError):
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise StoreUnavailable(f"the archive's blobs need {need} bytes and the store's disk has {free} free")


class Truncated(InvalidInput):
    """The archive ends (or its compression breaks) before its last member: nothing is imported."""


def _members(tar, archive):
    """The tar's members; a truncated or damaged stream is ``Truncated``, never a tarfile error."""
    it = iter(tar)
    while True:
        try:
            member = next(it)
        except StopIteration:
            return
        except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
            raise Truncated(f"{archive} is truncated or damaged ({exc}); nothing imported") from None
        yield member


def _copy_blobs(store, tar, first, declared, arrived, problems, progress, archive=""):
    """Copy each declared blob member into tmp/ (up to its declared size) and verify it."""
    for member in _members(tar, archive):
        if member is first:
            continue
        name = member.name
        blob_id = name[len("blobs/"): -len(SUFFIX)] if name.startswith("blobs/") and name.endswith(SUFFIX) else ""
        if not member.isfile() or not is_blob_id(blob_id):
            problems.add("import", None, None, f"unexpected archive member {name!r}")
            continue
        if blob_id in arrived:
            problems.add("import", None, blob_id, f"duplicate archive member {name!r}")
            continue
        if blob_id not in declared:
            problems.add("import", None, blob_id, f"archive member {name!r} is not in the manifest")
            continue
        size, hs = declared[blob_id]
        if member.size != size:
            problems.add("import", None, blob_id, f"archive member {name!r} is {member.size} bytes, "
                                                  f"the manifest says {size}")
            continue
        if store.blobs.exists(blob_id):
            continue  # already here; verified when a record claims it
        try:
            arrived[blob_id] = _import_blob(store, tar.extractfile(member), blob_id, size, hs)
        except (EOFError, tarfile.ReadError, zlib.error, _EndsEarly) as exc:
            raise Truncated(f"{archive} is truncated or damaged ({exc}); nothing imported") from None
        except (CorruptSnapshot, OSError, tarfile.TarError) as exc:
            problems.add("import", None, blob_id, f"{type(exc).__name__}: {exc}")
        if progress:
            progress(1)


class _EndsEarly(CorruptSnapshot):
    """A blob member ends before the size the manifest declares (a truncated archive)."""


def temp_owner(name):
    """The process id an import's temp file name carries (``<blob>.import.<pid>.<rand>``), or ``None``."""
    parts = name.split(".")
    if len(parts) == 4 and parts[1] == "import" and parts[2].isdigit():
        return int(parts[2])
    return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def orphaned_temps(store):
    """Temp files of imports whose process is gone (killed mid-import): safe to remove at once."""
    return [name for name, _st in store.blobs.temp_files()
            if temp_owner(name) not in (None, os.getpid()) and not _alive(temp_owner(name))]


def _import_blob(store, src, blob_id, size, header_sum):
    """Stream exactly ``size`` bytes of one member into tmp/, fsync, verify; return the temp name."""
    tmp_name = f"{blob_id}.import.{os.getpid()}.{new_id()[:8]}"
    tmp_fd = store.blobs.folder.fd("tmp")
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, 0o600, dir_fd=tmp_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            left = size
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise _EndsEarly(f"blob {blob_id} ends {left} bytes early")
                f.write(chunk)
                left -= len(chunk)
            f.flush()
            if store.fsync:
                os.fsync(f.fileno())
        with store.blobs.open_temp(tmp_name, blob_id, size, header_sum) as r:
            r.verify()
    except BaseException:
        _unlink_tmp(store, tmp_name)
        raise
    return tmp_name


def _unlink_tmp(store, tmp_name):
    store.blobs.remove_temp(tmp_name)


def _index_snapshots(store, archive, segments, models, arrived, problems):
    """Read the manifest again and index its snapshots one at a time."""
    added, added_bytes = 0, 0

    def one(item):
        nonlocal added, added_bytes
        try:
            kb, raw = bytes(item["key"]), bytes(item["rec"])
            got = _import_record(store, kb, raw, segments, models, arrived)
        except (CorruptSnapshot, InvalidInput, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            key = item.get("key") if isinstance(item, dict) else None
            problems.add("import", bytes(key).hex() if isinstance(key, bytes) else None, None, str(exc))
            return
        if got is not None:
            added += 1
            added_bytes += got

    tar, first = _open_tar(archive)
    with tar:
        read_manifest(tar.extractfile(first), one)  # keeps no segments or models this time
    return added, added_bytes


def _needed_blobs(rec, segments):
    """``{blob id: (size, header sum, Segment or None)}`` a record needs, from the manifest's entries."""
    need = {}
    for e in rec.extents:
        meta = segments.get(e.segment.hex())
        if not isinstance(meta, dict):
            raise CorruptSnapshot(f"archive has no segment {e.segment.hex()}")
        seg = segment_from(meta, refs=1)
        if seg.fingerprint != rec.fingerprint:
            raise CorruptSnapshot(f"segment {e.segment.hex()} belongs to another model")
        need[e.segment.hex()] = (seg.size, seg.header_sum, seg)
    if rec.state:
        need[rec.state.blob.hex()] = (rec.state.size, rec.state.header_sum, None)
    return need


def _place(store, need, arrived):
    """Put every blob a record needs in place (or find it there), each verified."""
    for blob_id, (size, hs, _seg) in need.items():
        try:
            with store.blobs.open(blob_id, size, hs) as r:
                r.verify()
            continue  # already here (an earlier import or snapshot)
        except FileNotFoundError:
            pass
        if blob_id not in arrived:
            raise CorruptSnapshot(f"archive lacks blob {blob_id}")
        store.blobs.adopt(arrived.pop(blob_id), blob_id)
        try:
            with store.blobs.open(blob_id, size, hs) as r:
                r.verify()
        except (CorruptSnapshot, OSError):
            store.blobs.unlink(blob_id)
            raise


def _import_record(store, kb, raw, segments, models, arrived):
    """Index one archived snapshot whose blobs are verified in place; its new bytes, or ``None`` if present."""
    rec = unpack(raw)
    if not is_id(kb) or rec.get("v") != FORMAT_VERSION:
        raise CorruptSnapshot("bad record in archive")
    snap = snapshot_from(rec)
    model = models.get(snap.fingerprint)
    if not isinstance(model, dict) or "struct" not in model or not isinstance(model.get("sigs"), dict):
        raise CorruptSnapshot(f"archive has no layout for {snap.fingerprint}")
    need = _needed_blobs(snap, segments)
    _place(store, need, arrived)

    segs = {bytes.fromhex(blob_id): seg for blob_id, (_size, _hs, seg) in need.items() if seg is not None}
    return store.index.write(lambda w: adopt_snapshot(w, kb, snap, model_from(model), segs, raw=raw))


# ------------------------------------------------------------------ export
def export_archive(store, wanted, archive, progress=None):
    """Write the snapshots whose keys are in ``wanted`` (bytes; ``None``: all) to a 0600 tar."""
    with store.index.read() as r:
        snaps = [(k, v) for k, v in r.snapshots() if wanted is None or k in wanted]
        segs = dict(r.segments())
        models = dict(r.models())
    manifest = {"format": FORMAT_VERSION, "block_tokens": store.block, "snapshots": [], "segments": {},
                "models": {}}
    problems, blob_sizes = [], {}
    for kb, raw in snaps:
        try:
            snap = snapshot_from(unpack(raw))
            entries = {}
            for e in snap.extents:
                if e.segment not in segs:
                    raise CorruptSnapshot(f"segment {e.segment.hex()} is missing from the index")
                entries[e.segment.hex()] = unpack(segs[e.segment], "segment record")
                seg = decode_segment(segs[e.segment])
                _verified(store, e.segment.hex(), seg.size, seg.header_sum, blob_sizes)
            if snap.state:
                _verified(store, snap.state.blob.hex(), snap.state.size, snap.state.header_sum, blob_sizes)
            model = unpack(models[snap.fingerprint], "model record") if snap.fingerprint in models else None
        except (CorruptSnapshot, OSError, KeyError, TypeError) as exc:
            problems.append(Problem("export", kb.hex(), None, str(exc)))
            continue
        manifest["snapshots"].append({"key": kb, "rec": raw})
        for blob_id, srec in entries.items():
            manifest["segments"][blob_id] = {k: srec[k] for k in SEGMENT_FIELDS if k in srec}
        if model is not None:
            manifest["models"][snap.fingerprint] = model

    def files():
        for blob_id, size in blob_sizes.items():
            yield blob_id, size, store.blobs.open_file(blob_id)

    write_archive(archive, pack(manifest), files(), progress)
    return len(manifest["snapshots"]), sum(blob_sizes.values()), problems


def _verified(store, blob_id, size, header_sum, seen):
    """Verify a blob once per export (``CorruptSnapshot`` / ``OSError`` if it fails)."""
    if blob_id not in seen:
        with store.blobs.open(blob_id, size, header_sum) as r:
            r.verify()
        seen[blob_id] = size


def write_archive(path, manifest_bytes, blob_files, progress=None):
    """Write a 0600 tar at ``path``: the manifest, then ``blob_files`` ``[(blob id, size, open file)]``."""
    with create_private(path) as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(manifest_bytes), int(time.time()), 0o600
        tar.addfile(info, io.BytesIO(manifest_bytes))
        for blob_id, size, f in blob_files:
            with f:
                info = tarfile.TarInfo(f"blobs/{blob_id}{SUFFIX}")
                info.size, info.mtime, info.mode = size, int(time.time()), 0o600
                tar.addfile(info, f)
            if progress:
                progress(1)
