"""An index held in process memory: the reference ``Index`` for tests of what
sits above the storage interface (matching, records), and a holder for index
entries fetched from elsewhere. Nothing here is persistent or shared."""

import contextlib
import copy
import threading


class InMemoryIndex:
    """An ``Index`` in dicts; ``write`` is atomic (applied on a copy, swapped in on success)."""

    readonly = False

    def __init__(self):
        self.tables = {"snap": {}, "seg": {}, "model": {}, "acc": {}, "files": {}, "meta": {}}
        # link -> {keys} / {(n, key)}; read back in LMDB's dupsort order (bytes ascending)
        self.thru, self.ends = {}, {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def read(self):
        yield _View(self)

    def write(self, fn):
        with self._lock:
            draft = copy.deepcopy(self)
            result = fn(_View(draft))
            self.tables, self.thru, self.ends = draft.tables, draft.thru, draft.ends
            return result

    def close(self):
        pass

    def __deepcopy__(self, memo):
        other = InMemoryIndex.__new__(InMemoryIndex)
        other.tables = {k: dict(v) for k, v in self.tables.items()}
        other.thru = {k: set(v) for k, v in self.thru.items()}
        other.ends = {k: set(v) for k, v in self.ends.items()}
        other._lock = None
        return other


class _View:
    def __init__(self, index):
        self.i = index

    def snapshot(self, key):
        return self.i.tables["snap"].get(key)

    def segment(self, seg_id):
        return self.i.tables["seg"].get(seg_id)

    def model(self, fingerprint):
        return self.i.tables["model"].get(fingerprint)

    def access(self, key):
        return self.i.tables["acc"].get(key)

    def passes_through(self, link):
        return bool(self.i.thru.get(link))

    def links_through(self, link, limit):
        return sorted(self.i.thru.get(link, ()))[:limit]

    def ends_at(self, link, limit):
        return sorted(self.i.ends.get(link, ()), key=lambda e: e[0].to_bytes(4, "big") + e[1])[:limit]

    def ends_matching(self, link, below, key_of):
        ends = self.i.ends.get(link, ())
        return sorted({n for n, key in ends if 0 < n < below and key == key_of(n)}, reverse=True)

    def snapshots(self):
        return iter(list(self.i.tables["snap"].items()))

    def segments(self):
        return iter(list(self.i.tables["seg"].items()))

    def models(self):
        return iter(list(self.i.tables["model"].items()))

    def access_keys(self):
        return iter(list(self.i.tables["acc"]))

    def accesses(self):
        return iter(list(self.i.tables["acc"].items()))

    def snapshot_keys_from(self, start):
        return iter(sorted(k for k in self.i.tables["snap"] if k >= start))

    def counter(self, name):
        return self.i.tables["meta"].get(name, 0)

    def count(self, table):
        return len(self.i.tables[{"snapshots": "snap", "segments": "seg"}[table]])

    def file_digest(self, identity):
        return self.i.tables["files"].get(identity)

    def put_snapshot(self, key, raw):
        self.i.tables["snap"][key] = raw

    def delete_snapshot(self, key):
        self.i.tables["snap"].pop(key, None)

    def add_link(self, link, key):
        self.i.thru.setdefault(link, set()).add(key)

    def remove_link(self, link, key):
        keys = self.i.thru.get(link, set())
        keys.discard(key)
        if not keys:
            self.i.thru.pop(link, None)

    def add_end(self, link, n, key):
        self.i.ends.setdefault(link, set()).add((n, key))

    def remove_end(self, link, n, key):
        ends = self.i.ends.get(link, set())
        ends.discard((n, key))
        if not ends:
            self.i.ends.pop(link, None)

    def put_segment(self, seg_id, raw):
        self.i.tables["seg"][seg_id] = raw

    def delete_segment(self, seg_id):
        self.i.tables["seg"].pop(seg_id, None)

    def put_model(self, fingerprint, raw):
        self.i.tables["model"][fingerprint] = raw

    def put_access(self, key, raw):
        self.i.tables["acc"][key] = raw

    def delete_access(self, key):
        self.i.tables["acc"].pop(key, None)

    def add_counter(self, name, delta):
        self.i.tables["meta"][name] = max(0, self.counter(name) + delta)

    def put_file_digest(self, identity, raw):
        self.i.tables["files"][identity] = raw
