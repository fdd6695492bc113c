"""kvstore demo: the main job end to end on a built-in tiny model.

Warms a system prompt into a store, runs ``kvstore serve`` (mlx-lm's server)
on 127.0.0.1, restarts it, and shows what each request reused, beside the
same restart without the disk tier. Everything runs locally; the model has
random weights, so the answers are noise: the cached token counts are the point.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SYSTEM = ("You are the support assistant of a hardware store. Answer in one short sentence, "
          "name the aisle when you can, and never invent prices. ") * 4


def _kvstore():
    return shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"


def free_port():
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``kvstore serve`` in a subprocess on a free loopback port, driven over HTTP."""

    def __init__(self, store, model, *extra, log=None, max_tokens=8, timeout=120):
        self.port = free_port()
        self.log = Path(log or tempfile.mkstemp(prefix=f"kvstore-serve-{self.port}-", suffix=".log")[1])
        args = [_kvstore()] + (["--store", str(store)] if store else []) + [
            "serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--max-tokens", str(max_tokens), *extra]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("kvstore serve exited: " + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        return
            except OSError:
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError("kvstore serve did not start: " + self.log.read_text()[-3000:])

    def post(self, path, body):
        """POST ``body`` as JSON to ``path``; return the decoded JSON answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.load(r)

    def chat(self, user, system=SYSTEM, **kw):
        """A greedy chat completion with an optional system prompt."""
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0, **kw})

    def stop(self, timeout=60):
        """SIGTERM (queued snapshots are written), wait, and return the server log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise RuntimeError("kvstore serve did not stop on SIGTERM") from None
        return self.log.read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def cached(resp):
    """``usage.prompt_tokens_details.cached_tokens`` of a response."""
    return resp["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)


def _line(resp):
    u = resp["usage"]
    return f"prompt {u['prompt_tokens']} tokens, cached {cached(resp)}"


def main(argv, store_dir=None, fmt=None, quiet=False):
    """Run ``kvstore demo``; return the exit status."""
    p = argparse.ArgumentParser(prog="kvstore demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen3_5", help="tiny model family: llama, gemma3_text, qwen3_5, "
                                                       "falcon_h1, mamba (default: qwen3_5, a hybrid thinking model)")
    p.add_argument("--demo-store", metavar="DIR", help="store to use and keep (default: a temporary folder, removed at the end)")
    args = p.parse_args(argv)
    from kvstore import tiny

    if args.family not in tiny.FAMILIES:
        p.error(f"unknown family {args.family!r}")
    say = (lambda *a: None) if quiet else print
    t0 = time.perf_counter()
    model = tiny.model_dir(args.family)
    # the store (unless --demo-store) and the server logs live here and go when the demo ends
    work = Path(tempfile.mkdtemp(prefix="kvstore-demo-"))
    try:
        return _run(args, model, work, say, fmt, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _shown(path):
    """``path`` relative to the current folder when it is inside it (``.venv/bin/kvstore``)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") and os.sep in rel else str(path)


def _run(args, model, work, say, fmt, t0):
    store = Path(args.demo_store) if args.demo_store else work / "store"
    kv = _kvstore()
    say(f"model: tiny {args.family} (random weights) in {model}")
    say(f"store: {store}" + ("" if args.demo_store else " (removed at the end; --demo-store DIR keeps one)") + "\n")

    say("1. kvstore warm: prefill the system prompt before deployment")
    out = subprocess.run([kv, "--store", str(store), "warm", "--model", str(model), "--system", SYSTEM,
                          "--format", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 1
    (snap,) = json.loads(out.stdout)["snapshots"]
    say(f"   stored {snap['tokens']} tokens (tier system) as {snap['key'][:12]}\n")

    say("2. kvstore serve: the first request after deployment")
    with LocalServer(store, model, log=work / "serve1.log") as s:
        r1 = s.chat("Where do I find wood screws?")
        say(f"   chat 1: {_line(r1)}   <- the system prompt came from the store")
        r2 = s.chat("Where do I find wood screws?", max_tokens=8)
        say(f"   chat 1 again: {_line(r2)}")
    say("")
    say("3. restart the server (a new process, empty memory) and ask something else")
    with LocalServer(store, model, log=work / "serve2.log") as s:
        r3 = s.chat("Do you cut keys?")
        say(f"   with kvstore:        {_line(r3)}")
    with LocalServer(None, model, "--no-disk", log=work / "serve3.log") as s:
        r4 = s.chat("Do you cut keys?")
        say(f"   without (--no-disk): {_line(r4)}")
    say("")
    same = r3["choices"][0]["message"] == r4["choices"][0]["message"]
    say(f"   same answer with and without the cache: {same}\n")
    say("4. what the store holds:")
    ls = subprocess.run([kv, "--store", str(store), "ls"], capture_output=True, text=True)
    say("   " + ls.stdout.rstrip().replace("\n", "\n   "))
    kvstore = _shown(kv)
    if args.demo_store:
        say(f"\nDone in {time.perf_counter() - t0:.1f}s. Inspect with: {kvstore} --store {store} stats")
    else:
        say(f"\nDone in {time.perf_counter() - t0:.1f}s. With your own model: {kvstore} serve --model PATH")
    ok = cached(r1) >= snap["tokens"] and cached(r3) >= snap["tokens"] and cached(r4) == 0 and same
    if fmt == "json":
        print(json.dumps({"store": str(store), "model": str(model), "system_tokens": snap["tokens"],
                          "requests": [{"prompt_tokens": r["usage"]["prompt_tokens"], "cached_tokens": cached(r)}
                                       for r in (r1, r2, r3, r4)], "ok": ok}))
    return 0 if ok else 1
