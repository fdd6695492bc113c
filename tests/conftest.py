"""Shared fixtures: tiny offline models built into a per-session directory.

Tests are grouped as unit/ (no store on disk: keys, records, matching,
codec, blobs), integration/ (the store, the tiers, the session, the server
and the command line with real parts) and reliability/ (failures, attacks,
load). The helper modules they share (workers, procs, chat) live here in
tests/, which is put on the import path for all of them.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvstore

from kvstore import tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family, **kw) -> Path``: a cached tiny model directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KVSTORE_TINY_DIR", str(tmp_path_factory.mktemp("tiny")))
    yield tiny.model_dir
    mp.undo()


@pytest.fixture(scope="session")
def load_tiny(tiny_model):
    """``load_tiny(family) -> (model, tokenizer)`` via ``mlx_lm.load``, once per
    family per session."""
    import mlx_lm

    loaded = {}

    def load(family):
        if family not in loaded:
            loaded[family] = mlx_lm.load(str(tiny_model(family)))
        return loaded[family]

    return load


@pytest.fixture
def store(tmp_path):
    """A fresh ``SnapshotStore`` with 16-token blocks (short prompts reach block links)."""
    s = kvstore.SnapshotStore(tmp_path / "store", block_tokens=16)
    yield s
    s.close()


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on 127.0.0.1 with a random password (``.url`` to connect)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()
