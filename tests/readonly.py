"""A real read-only folder for tests of stores shipped on read-only volumes."""

import contextlib
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def read_only(folder, ways=("mount", "chattr", "chmod")):
    """``folder`` (holding ``store``) made read-only for real, the first of ``ways`` that
    works: a read-only bind mount of it (EROFS), ``chattr +i`` (immutable: even root
    cannot write, and LMDB cannot open its lock file), ``chmod a-w`` (enough when not
    root). Yields ``(store path to use, how)``; skips if none of them stops a write."""
    view = folder.parent / (folder.name + "-ro")
    view.mkdir()
    if "mount" in ways and subprocess.run(["mount", "--bind", str(folder), str(view)],
                                          capture_output=True).returncode == 0:
        try:
            if subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], capture_output=True).returncode == 0:
                yield view / "store", "read-only bind mount"
                return
        finally:
            subprocess.run(["umount", "-l", str(view)], capture_output=True)
    store = folder / "store"
    if "chattr" in ways and shutil.which("chattr") and subprocess.run(["chattr", "-R", "+i", str(store)],
                                                                      capture_output=True).returncode == 0:
        try:
            yield store, "chattr +i"
        finally:
            subprocess.run(["chattr", "-R", "-i", str(store)], capture_output=True)
        return
    if "chmod" not in ways:
        pytest.skip(f"cannot make a folder read-only by {' or '.join(ways)} here")
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    try:
        if os.access(store, os.W_OK):
            pytest.skip("no way to make a folder read-only here (root without mount or chattr)")
        yield store, "chmod a-w"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)
