"""The remote tier's place of storage: a Redis (or Valkey) server, or a Redis Cluster.

Key layout under a deployment's prefix ``P`` (format version in the name):

  P:v1:{NS}:r:<key>      a snapshot's bundle (``kvstore.transfer``)
  P:v1:{NS}:e:<link>     hash: key -> tokens, snapshots ending in the block after ``link``
  P:v1:{NS}:n:<link>     hash: tokens -> how many of those ends have that length
  P:v1:{NS}:t:<link>     hash: key -> tokens, snapshots passing through ``link``
  P:v1:{NS}:all          hash: key -> a small listing entry (tokens, tier, bytes, time)
  P:v1:{BLOB}:c:<i>      chunk ``i`` of a blob's bytes

``NS`` names one model namespace (fingerprint + tenant root) and block
size; ``{...}`` is a Redis hash tag, so a namespace's index lives in one
hash slot (the lookup script reads it in one call, also on a Cluster) and
each blob's chunks share a slot of their own. A lookup is one call of a
server-side script over the request's block links: it finds the deepest
link stored snapshots pass through, the snapshots ending on the way and a
few passing through, and returns their bundles; entries whose bundle has
expired or been evicted are removed as it goes. The bundles of a link's
ends come with the answer only while it has at most ``ENDS_EAGER`` of them;
beyond, the answer lists the ends' keys and the client asks for the one that
is its own (``resolve``), and past ``ENDS_LISTED`` (a system prompt
thousands of conversations continue) it lists only the distinct lengths
ending there: the client hashes its own key of each length and asks for
exactly those. Either is a second round trip, only when the plan reaches
that link. Writes put chunks first and the bundle and its index entries last, in
one script call.

This module speaks to Redis through the ``redis`` client and nothing else;
what a hit is stays with ``kvstore.matching``. Faults are the client's
exceptions; ``kvstore.remote`` turns them into misses.
"""

import threading
from urllib.parse import urlsplit

from ..errors import InvalidInput

VERSION = 1
SCHEMES = ("redis", "rediss", "unix")
# bundles a lookup returns at most
MAX_RECORDS = 48
# a link with more ends than this is listed by its distinct lengths, not its ends
ENDS_LISTED = 128
# a link with at most this many ends comes with their bundles; beyond, the client asks
# for the ones whose key is its own (most of a popular link's ends are other conversations)
ENDS_EAGER = 16

# the count of ends of length n after a link, one down (the field goes at zero)
COUNT_DOWN = """
local function count_down(link, n)
  local nk = base .. 'n:' .. link
  if redis.call('HINCRBY', nk, n, -1) <= 0 then redis.call('HDEL', nk, n) end
end
"""

LOOKUP = """
local base, L, maxc, floor, m = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local exact = ARGV[6]
""" + COUNT_DOWN + """
local links = {}
for i = 0, L do links[i] = ARGV[7 + i] end
local function thru(i)
  if i == 0 then return true end
  return redis.call('EXISTS', base .. 't:' .. links[i]) == 1
end
if floor >= 1 and not thru(floor) then return {-1, {}, {}, {}} end
local lo, hi, step = floor, L, 1
while lo < hi do
  local probe = math.min(hi, lo + step)
  if not thru(probe) then hi = probe - 1; break end
  lo = probe; step = step * 2
end
while lo < hi do
  local mid = math.floor((lo + hi + 1) / 2)
  if thru(mid) then lo = mid else hi = mid - 1 end
end
local k = lo
local want, order = {}, {}
local function add(key)
  if not want[key] and #order < MAXREC then want[key] = true; table.insert(order, key) end
end
if k == L then add(exact) end
local levels = {L}
for i = k, floor, -1 do if i ~= L then table.insert(levels, i) end end
-- the distinct lengths of the ends after a crowded link, from its counts; counted
-- again from the ends when the counts do not add up (written before they were
-- kept, or one of the two keys evicted)
local function lengths(link, count)
  local nk = base .. 'n:' .. link
  local h = redis.call('HGETALL', nk)
  local total, out = 0, {}
  for j = 1, #h, 2 do total = total + tonumber(h[j + 1]); table.insert(out, h[j]) end
  if total == count then return out end
  redis.call('DEL', nk)
  local seen = {}
  out = {}
  for _, n in ipairs(redis.call('HVALS', base .. 'e:' .. link)) do
    if not seen[n] then seen[n] = 0; table.insert(out, n) end
    seen[n] = seen[n] + 1
  end
  for n, c in pairs(seen) do redis.call('HSET', nk, n, c) end
  return out
end
local ends = {}
for _, i in ipairs(levels) do
  local count = redis.call('HLEN', base .. 'e:' .. links[i])
  if count > LISTED then  -- (level, '', n): lengths only, for the client to resolve
    for _, n in ipairs(lengths(links[i], count)) do
      table.insert(ends, i); table.insert(ends, ''); table.insert(ends, n)
    end
  elseif count > 0 then
    local h = redis.call('HGETALL', base .. 'e:' .. links[i])
    for j = 1, #h, 2 do
      table.insert(ends, i); table.insert(ends, h[j]); table.insert(ends, h[j + 1])
      if count <= EAGER and (tonumber(h[j + 1]) <= m or i == L) then add(h[j]) end
    end
  end
end
local through = {}
if k > 0 then
  local r = redis.call('HSCAN', base .. 't:' .. links[k], 0, 'COUNT', maxc)
  for j = 1, math.min(#r[2], 2 * maxc), 2 do table.insert(through, r[2][j]); add(r[2][j]) end
end
local recs, gone = {}, {}
for _, key in ipairs(order) do
  local raw = redis.call('GET', base .. 'r:' .. key)
  if raw then table.insert(recs, key); table.insert(recs, raw) else gone[key] = true end
end
for j = 1, #ends, 3 do
  if gone[ends[j + 1]] and redis.call('HDEL', base .. 'e:' .. links[ends[j]], ends[j + 1]) == 1 then
    count_down(links[ends[j]], ends[j + 2])
  end
end
for _, key in ipairs(through) do
  if gone[key] then redis.call('HDEL', base .. 't:' .. links[k], key) end
end
return {k, ends, through, recs}
""".replace("MAXREC", str(MAX_RECORDS)).replace("LISTED", str(ENDS_LISTED)).replace("EAGER", str(ENDS_EAGER))

RESOLVE = """
local base, link = ARGV[1], ARGV[2]
""" + COUNT_DOWN + """
local ek = base .. 'e:' .. link
local out = {}
for i = 3, #ARGV do
  local n = redis.call('HGET', ek, ARGV[i])
  if n then
    local raw = redis.call('GET', base .. 'r:' .. ARGV[i])
    if raw then
      table.insert(out, ARGV[i]); table.insert(out, raw)
    else
      redis.call('HDEL', ek, ARGV[i]); count_down(link, n)
    end
  end
end
return out
"""

PUT = """
local base, key, raw, n, endl, ttl, info = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
if ttl > 0 then
  redis.call('SET', base .. 'r:' .. key, raw, 'EX', ttl)
else
  redis.call('SET', base .. 'r:' .. key, raw)
end
if redis.call('HSET', base .. 'e:' .. endl, key, n) == 1 then redis.call('HINCRBY', base .. 'n:' .. endl, n, 1) end
for i = 8, #ARGV do redis.call('HSET', base .. 't:' .. ARGV[i], key, n) end
redis.call('HSET', base .. 'all', key, info)
return 1
"""

DELETE = """
local base, key, endl = ARGV[1], ARGV[2], ARGV[3]
""" + COUNT_DOWN + """
local had = redis.call('DEL', base .. 'r:' .. key)
local n = redis.call('HGET', base .. 'e:' .. endl, key)
if n then redis.call('HDEL', base .. 'e:' .. endl, key); count_down(endl, n) end
for i = 4, #ARGV do redis.call('HDEL', base .. 't:' .. ARGV[i], key) end
redis.call('HDEL', base .. 'all', key)
return had
"""


def redact(url):
    """``url`` with any password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_url(url):
    """Raise ``InvalidInput`` (one line) unless ``url`` is a usable Redis URL:
    ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or ``unix://path``."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidInput(f"remote URL must look like redis://host:port/db, rediss://... or unix://path, "
                           f"got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed remote URL {redact(url)}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"remote URL scheme must be one of {', '.join(s + '://' for s in SCHEMES)}, "
                           f"got {parts.scheme}://")
    if parts.scheme == "unix":
        if not (parts.path or parts.netloc):
            raise InvalidInput(f"unix remote URL names no socket path: {redact(url)}")
        return
    if not parts.hostname:
        raise InvalidInput(f"remote URL names no host: {redact(url)}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise InvalidInput(f"remote URL database must be a number, got {db!r}")
    del port


def connect(url, connect_timeout, timeout):
    """A client for ``url`` (a ``RedisCluster`` when the server is a cluster node)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    check_url(url)
    # one immediate retry (a connection dropped by a restart reconnects), never a sleep on the request path
    opts = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout, "health_check_interval": 0,
            "retry": Retry(NoBackoff(), 1)}
    client = redis.Redis.from_url(url, **opts)
    info = client.info("cluster")
    if info.get("cluster_enabled"):
        from redis.cluster import RedisCluster

        client.close()
        return RedisCluster.from_url(url, **opts), True
    return client, False


class RedisPlace:
    """One deployment's keys on one Redis server or cluster.

    Every method is one round trip (a pipeline or one script call) unless it
    says otherwise; the client's exceptions pass through.
    """

    def __init__(self, url, prefix="kvstore", connect_timeout=0.5, timeout=5.0):
        check_url(url)
        if not prefix or any(c in prefix for c in "{}: \n"):
            raise InvalidInput(f"remote key prefix must be a non-empty word without {{}}: or spaces, got {prefix!r}")
        self.url, self.prefix = url, prefix
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self.client = None
        self.cluster = False
        self._scripts = None
        self._lock = threading.Lock()

    def open(self):
        """Connect (if not connected) and return the client."""
        with self._lock:
            if self.client is None:
                c, cluster = connect(self.url, self.connect_timeout, self.timeout)
                scripts = (LOOKUP, PUT, DELETE, RESOLVE)
                self._scripts = tuple(c.register_script(script) for script in scripts)
                for script in scripts:  # loaded now, so a request's call is one round trip
                    c.script_load(script)
                self.client, self.cluster = c, cluster
            return self.client

    def close(self):
        if self.client is not None:
            try:
                self.client.close()
            finally:
                self.client = None

    # ---------------------------------------------------------------- keys
    def base(self, nsx):
        return f"{self.prefix}:v{VERSION}:{{{nsx}}}:"

    def chunk_key(self, blob, i):
        return f"{self.prefix}:v{VERSION}:{{{blob}}}:c:{i}"

    # ------------------------------------------------------------- lookup
    def lookup(self, nsx, links, exact, floor, m, maxc):
        """One script call: ``(k, ends {level: [(n, key hex)]}, through [key hex], bundles {key hex: raw})``
        for the hex ``links`` (levels 0..L) of a request of ``m`` tokens; ``k`` is -1 when nothing
        passes through level ``floor``. A level with more than ``ENDS_LISTED`` ends lists each
        distinct length once with an empty key: ``resolve`` finds which of them the request has."""
        self.open()
        base = self.base(nsx)
        k, ends, through, recs = self._scripts[0](
            keys=[base + "all"], args=[base, len(links) - 1, maxc, floor, m, exact, *links])
        out = {}
        for j in range(0, len(ends), 3):
            out.setdefault(int(ends[j]), []).append((int(ends[j + 2]), ends[j + 1].decode()))
        bundles = {recs[j].decode(): recs[j + 1] for j in range(0, len(recs), 2)}
        return int(k), out, [t.decode() for t in through], bundles

    def resolve(self, nsx, link, keys):
        """One script call: ``{key hex: bundle raw}`` of those ``keys`` (hex) that end after ``link``
        (hex) and whose bundle is still there (entries whose bundle is gone are removed)."""
        self.open()
        base = self.base(nsx)
        got = self._scripts[3](keys=[base + "all"], args=[base, link, *keys])
        return {got[j].decode(): got[j + 1] for j in range(0, len(got), 2)}

    # ------------------------------------------------------------- chunks
    def get_chunks(self, specs):
        """``{blob: [bytes or None]}`` for ``[(blob, count)]``, in one pipeline."""
        c = self.open()
        pipe = c.pipeline(transaction=False)
        for blob, count in specs:
            for i in range(count):
                pipe.get(self.chunk_key(blob, i))
        got = pipe.execute()
        out, at = {}, 0
        for blob, count in specs:
            out[blob] = got[at : at + count]
            at += count
        return out

    def stream_chunks(self, specs):
        """A ``ChunkStream``: the GETs of ``[(blob, count)]`` sent in one pipeline, their
        values left on the connection for the caller to receive in place. ``None`` on a
        cluster (the client splits pipelines by node there)."""
        c = self.open()
        if self.cluster:
            return None
        pool = c.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(
                [("GET", self.chunk_key(b, i)) for b, count in specs for i in range(count)]))
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return ChunkStream(conn, pool, sum(count for _b, count in specs))

    def have_chunks(self, specs, ttl=None):
        """``{blob: True if every chunk is there}`` for ``[(blob, count)]``; with ``ttl`` their
        expiry is renewed (a new snapshot sharing an old blob keeps it alive)."""
        c = self.open()
        pipe = c.pipeline(transaction=False)
        for blob, count in specs:
            for i in range(count):
                k = self.chunk_key(blob, i)
                pipe.expire(k, ttl) if ttl else pipe.exists(k)
        got = pipe.execute()
        out, at = {}, 0
        for blob, count in specs:
            out[blob] = all(got[at : at + count])
            at += count
        return out

    def touch(self, nsx, key, specs, ttl):
        """Renew the expiry of a bundle and its blobs' chunks (one pipeline)."""
        c = self.open()
        pipe = c.pipeline(transaction=False)
        pipe.expire(self.base(nsx) + "r:" + key, ttl)
        for blob, count in specs:
            for i in range(count):
                pipe.expire(self.chunk_key(blob, i), ttl)
        pipe.execute()

    def put_chunks(self, blob, parts, ttl=None):
        """Store a blob's chunks (one pipeline)."""
        c = self.open()
        pipe = c.pipeline(transaction=False)
        for i, part in enumerate(parts):
            pipe.set(self.chunk_key(blob, i), part, ex=ttl or None)
        pipe.execute()

    def delete_chunks(self, blob, count):
        c = self.open()
        pipe = c.pipeline(transaction=False)
        for i in range(count):
            pipe.delete(self.chunk_key(blob, i))
        pipe.execute()

    # ------------------------------------------------------------ bundles
    def put_bundle(self, nsx, key, raw, n, end_link, links, info, ttl=None):
        """Store a bundle and its index entries (after its chunks), in one script call."""
        self.open()
        base = self.base(nsx)
        self._scripts[1](keys=[base + "all"], args=[base, key, raw, n, end_link, int(ttl or 0), info, *links])

    def get_bundle(self, nsx, key):
        return self.open().get(self.base(nsx) + "r:" + key)

    def delete_bundle(self, nsx, key, end_link, links):
        """Remove a bundle and its index entries; True if the bundle was there."""
        self.open()
        base = self.base(nsx)
        return bool(self._scripts[2](keys=[base + "all"], args=[base, key, end_link, *links]))

    def catalogue(self):
        """Every ``(namespace id, key hex, raw listing entry)`` of this deployment (a SCAN; admin only)."""
        c = self.open()
        pattern = f"{self.prefix}:v{VERSION}:*:all"
        names = c.scan_iter(match=pattern, count=1000)
        for name in sorted(set(names)):
            nsx = name.decode().split("{", 1)[1].split("}", 1)[0]
            for key, raw in c.hgetall(name).items():
                yield nsx, key.decode(), raw

    def chunk_blobs(self):
        """``{blob id: [chunk key names]}`` of every blob of this deployment (a SCAN; admin only)."""
        out = {}
        for name in self.open().scan_iter(match=f"{self.prefix}:v{VERSION}:*:c:*", count=1000):
            blob = name.decode().split("{", 1)[1].split("}", 1)[0]
            out.setdefault(blob, []).append(name)
        return out

    def delete_keys(self, names):
        c = self.open()
        pipe = c.pipeline(transaction=False)
        for name in names:
            pipe.delete(name)
        pipe.execute()

    def server_info(self):
        """Memory and key figures of the server (or of each node of a cluster)."""
        c = self.open()
        mem = c.info("memory")
        if self.cluster:  # {node: info}
            used = sum(v.get("used_memory", 0) for v in mem.values())
            limit = sum(v.get("maxmemory", 0) for v in mem.values())
            policy = next(iter(mem.values()), {}).get("maxmemory_policy", "")
        else:
            used, limit, policy = mem.get("used_memory", 0), mem.get("maxmemory", 0), mem.get("maxmemory_policy", "")
        return {"used_memory": used, "maxmemory": limit, "maxmemory_policy": policy, "cluster": self.cluster}


class ChunkStream:
    """Bulk-string replies read off one connection straight into the caller's buffers.

    Only GET replies are expected: ``$<n>\\r\\n<n bytes>\\r\\n`` or ``$-1\\r\\n``
    (no such key). ``finish`` gives the connection back to the pool when every
    reply was read, and drops it otherwise (a stream left half read is never reused).
    """

    def __init__(self, conn, pool, replies):
        self.conn, self.pool, self.replies = conn, pool, replies
        self.sock = conn._sock
        self.broken = False
        self._one = bytearray(1)

    def _line(self):
        out = bytearray()
        one = memoryview(self._one)
        while not out.endswith(b"\r\n"):
            if self.sock.recv_into(one, 1) != 1:
                raise ConnectionError("the remote closed the connection")
            out += one
            if len(out) > 64:
                raise ConnectionError("unexpected reply from the remote")
        return bytes(out[:-2])

    def begin(self):
        """Start the next reply: its length, or ``None`` for a missing key."""
        self.replies -= 1
        line = self._line()
        if line in (b"$-1", b"_"):  # no such key (RESP2, RESP3)
            return None
        if not line.startswith(b"$"):
            self.broken = True
            raise ConnectionError(f"unexpected reply from the remote: {line[:40]!r}")
        return int(line[1:])

    def recv_into(self, mv):
        got, n = 0, len(mv)
        while got < n:
            k = self.sock.recv_into(mv[got:], n - got)
            if k == 0:
                raise ConnectionError("the remote closed the connection")
            got += k

    def end(self):
        """Read the reply's closing CRLF."""
        if self._line() != b"":
            raise ConnectionError("unexpected reply framing from the remote")

    def skip_reply(self):
        n = self.begin()
        if n is not None:
            buf = memoryview(bytearray(min(n, 1 << 20)))
            while n:
                k = min(n, len(buf))
                self.recv_into(buf[:k])
                n -= k
            self.end()

    def finish(self):
        """Give the connection back (clean) or drop it (anything left unread or broken)."""
        try:
            if not self.broken:
                while self.replies > 0:
                    self.skip_reply()
        except Exception:
            self.broken = True
        if self.broken:
            self.conn.disconnect()
        self.pool.release(self.conn)
