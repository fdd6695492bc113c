"""Shared fixtures: tiny offline models built into a per-session directory."""

import pytest

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
