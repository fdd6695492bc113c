"""kvstore warm as an operator runs it: bad input gives one line, Ctrl-C keeps
what was stored, progress shows as prompts finish. Real subprocesses, real
signals, real stores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import kvstore

KVSTORE = shutil.which("kvstore", path=os.path.dirname(sys.executable)) or "kvstore"


def run(*args, timeout=120):
    return subprocess.run([KVSTORE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def one_line_error(out):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_missing_model_is_one_line(tmp_path):
    out = run("--store", tmp_path / "store", "warm", "--model", tmp_path / "nonexistent", "--system", "hi")
    assert "no model directory at" in one_line_error(out)
    assert out.stdout == ""
    assert not (tmp_path / "store").exists()


def test_store_that_is_a_file_is_one_line(tmp_path, tiny_model):
    blocker = tmp_path / "store"
    blocker.write_text("not a store")
    out = run("--store", blocker, "warm", "--model", tiny_model("llama"), "--system", "hi")
    assert "is a file, not a store directory" in one_line_error(out)
    assert blocker.read_text() == "not a store"


def test_one_line_per_prompt_as_it_finishes(tmp_path, tiny_model):
    """Off a terminal each prompt's line is written (and flushed) when it is done,
    not all at the end: the first lines can be read while later prompts run."""
    store = tmp_path / "store"
    prompts = [f"You are assistant number {i}. " * 30 for i in range(40)]
    args = [KVSTORE, "--store", str(store), "warm", "--model", str(tiny_model("llama"))]
    for p in prompts:
        args += ["--system", p]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    still_running = proc.poll() is None
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "system" in first and "tokens  prefilled in" in first
    assert still_running, "the first line came only after warm had finished"
    lines = (first + rest).splitlines()
    assert len(lines) == len(prompts) + 1 and lines[-1].startswith(f"Warmed {len(prompts)} of {len(prompts)}")


def test_ctrl_c_keeps_what_was_stored(tmp_path, tiny_model):
    store = tmp_path / "store"
    prompts = [f"You are assistant number {i}. " * 60 for i in range(400)]
    args = [KVSTORE, "--store", str(store), "warm", "--model", str(tiny_model("qwen3_5"))]
    for p in prompts:
        args += ["--system", p]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = [proc.stdout.readline() for _ in range(3)]
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    reported = int(line.split("interrupted; ")[1].split(" of ")[0])
    stored = kvstore.SnapshotStore(store).entries()
    printed += rest.splitlines()
    assert 3 <= reported < len(prompts)
    assert len(stored) == reported == len([x for x in printed if x.strip()])
    assert f"of {len(prompts)} system prompts stored in {store}" in line
    # nothing half-written: no temp files, and every stored snapshot verifies
    assert not any((store / "tmp").iterdir())
    with kvstore.SnapshotStore(store) as s:
        assert s.verify() == []


def test_json_output_and_stderr_progress(tmp_path, tiny_model):
    out = run("--store", tmp_path / "store", "warm", "--model", tiny_model("llama"), "--system", "a " * 40,
              "--system", "b " * 40, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["snapshots"]) == 2
    progress = [line for line in out.stderr.splitlines() if line.startswith("kvstore warm: ")]
    assert [p.split()[2] for p in progress] == ["1/2", "2/2"]


def test_progress_bar_on_a_terminal(tmp_path, tiny_model):
    """On a terminal (a real pseudo-terminal, 120 columns) a bar counts prompts,
    and each prompt's line is printed above it as it finishes."""
    import fcntl
    import pty
    import struct
    import termios

    args = [KVSTORE, "--store", str(tmp_path / "store"), "warm", "--model", str(tiny_model("llama")),
            "--system", "a " * 30, "--system", "b " * 30, "--system", "c " * 30]
    pid, fd = pty.fork()
    if pid == 0:  # the child: warm on the terminal
        os.execv(args[0], args)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.WEXITSTATUS(status) == 0, text[-2000:]
    assert "warm: 100%" in text and "3/3" in text
    assert text.count("tokens  prefilled in") == 3
    assert "Warmed 3 of 3 system prompts" in text
