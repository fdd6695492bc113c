"""A real redis-server on 127.0.0.1 for tests: started with a password, stopped,
killed, restarted empty, given a memory limit, or run as a small cluster."""

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary():
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if path is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    return path


def bus_free_port():
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server process with no persistence, on a free loopback port."""

    def __init__(self, workdir, password=None, port=None, extra=()):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password if password is not None else secrets.token_hex(12)
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc = None

    @property
    def url(self):
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self):
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--requirepass", self.password, *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def kill(self):
        """SIGKILL: the server and its data are gone at once."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self):
        """Kill and start again on the same port: empty (nothing is persisted)."""
        self.kill()
        return self.start()


class RedisCluster:
    """Three redis-server nodes on loopback joined into one cluster (no replicas)."""

    def __init__(self, workdir, password=None):
        self.password = password or secrets.token_hex(12)
        extra = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--masterauth", self.password]
        self.nodes = []
        for i in range(3):
            port = bus_free_port()
            node = RedisServer(Path(workdir) / f"node{i}", self.password, port,
                               extra + ["--cluster-config-file", f"nodes-{port}.conf"])
            self.nodes.append(node)

    @property
    def url(self):
        return self.nodes[0].url

    def start(self):
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed")
        subprocess.run([cli, "-a", self.password, "--no-auth-warning", "--cluster", "create",
                        *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if b"cluster_state:ok" in self.nodes[0].client().execute_command("CLUSTER", "INFO"):
                return self
            time.sleep(0.1)
        raise RuntimeError("the cluster did not come up")

    def kill(self):
        for node in self.nodes:
            node.kill()
