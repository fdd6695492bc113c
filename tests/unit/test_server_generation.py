"""The mlx_lm.server hooks of kvstore serve: checked at start, patterns compiled once.

An mlx-lm release without the names kvstore hooks cannot be installed in
the test environment, so ``check`` is run against a stand-in module
attribute (monkeypatched): the one fault here that cannot be caused for real.
"""

import re

import mlx_lm.server as server
import pytest

from kvstore import server_generation
from kvstore.session import VOLATILE_PATTERNS


def test_the_installed_mlx_lm_has_every_hook():
    server_generation.check()


def test_a_changed_mlx_lm_is_named_in_one_error(monkeypatch):
    class Renamed:
        def __init__(self, provider, cache):
            pass

    monkeypatch.setattr(server, "ResponseGenerator", Renamed)
    with pytest.raises(RuntimeError, match=r"ResponseGenerator\._tokenize.*ResponseGenerator\(model_provider"):
        server_generation.check()
    monkeypatch.delattr(server, "ToolCallFormatter")
    with pytest.raises(RuntimeError, match="mlx_lm.server.ToolCallFormatter"):
        server_generation.check()


def test_patterns():
    assert server_generation.patterns(False) == ()
    assert [p.pattern for p in server_generation.patterns(True)] == list(VOLATILE_PATTERNS)
    extra = server_generation.patterns(False, [r"^Nonce: \d+$"])
    assert [p.pattern for p in extra] == [r"^Nonce: \d+$"] and extra[0].flags & re.MULTILINE
    with pytest.raises(re.error):
        server_generation.patterns(True, ["(unclosed"])


def test_built_in_patterns_remove_only_volatile_lines():
    from kvstore.session import normalize_messages

    system = ("x-anthropic-billing-header: cc_version=2.1.3; cch=5f0e2\nX-Request-ID: 9b1c\ntrace_id: 77\n"
              "Sent at: 2026-12-03T06:50:01Z\nToday is 2026-12-03.\nDeadline: 2026-12-03\nYou are helpful.")
    (out,) = normalize_messages([{"role": "system", "content": system}], server_generation.patterns(True))
    assert out["content"] == "Today is 2026-12-03.\nDeadline: 2026-12-03\nYou are helpful."
