"""RadixTrie against mlx-lm's PromptTrie: the same calls give the same results.

Random operation sequences over a small token alphabet (so prompts share
prefixes, branch mid-edge, end inside edges and extend each other), the way
LRUPromptCache drives a trie: add, pop of a stored prompt, pop_prefixes of a
prompt just added, get, and search of stored prompts, their prefixes and
extensions and unrelated prompts.
"""

import random

import pytest
from mlx_lm.models.cache import PromptTrie

from kvstore.trie import _NONE, RadixTrie, _common


def random_prompt(rng, stored):
    """A prompt related to what is stored most of the time: a prefix, an extension, a branch."""
    roll = rng.random()
    if stored and roll < 0.6:
        base = list(rng.choice(stored))
        cut = rng.randint(0, len(base))
        return base[:cut] + [rng.randint(0, 3) for _ in range(rng.randint(0, 4))]
    return [rng.randint(0, 3) for _ in range(rng.randint(0, 9))]


def all_searches(rng, ours, theirs, models, stored):
    for model in models:
        queries = [list(t) for m, t in stored if m == model][:6]
        queries += [random_prompt(rng, [t for m, t in stored if m == model]) for _ in range(6)]
        for q in queries:
            assert ours.search(model, q) == theirs.search(model, q), (model, q)


@pytest.mark.parametrize("seed", range(40))
def test_same_results_as_prompt_trie(seed):
    rng = random.Random(seed)
    ours, theirs = RadixTrie(), PromptTrie()
    models = ["a", "b"]
    stored = []  # (model, tuple of tokens) with a value
    for step in range(120):
        model = rng.choice(models)
        roll = rng.random()
        if roll < 0.5 or not stored:
            toks = random_prompt(rng, [t for m, t in stored if m == model])
            value = ("v", seed, step)
            assert ours.add(model, toks, value) == theirs.add(model, toks, value)
            if (model, tuple(toks)) not in stored:
                stored.append((model, tuple(toks)))
            if rng.random() < 0.3:  # LRUPromptCache does this after adding a trimmable cache
                got = ours.pop_prefixes(model, toks)
                assert got == theirs.pop_prefixes(model, toks)
                for n, _v in got:
                    stored.remove((model, tuple(toks[:n])))
        elif roll < 0.8:
            m, toks = rng.choice(stored)
            assert ours.pop(m, list(toks)) == theirs.pop(m, list(toks))
            stored.remove((m, toks))
        else:
            m, toks = rng.choice(stored)
            assert ours.get(m, list(toks)) == theirs.get(m, list(toks))
        all_searches(rng, ours, theirs, models, stored)
    for m, toks in stored:  # nothing left behind: every stored prompt pops, and then the tries are empty
        assert ours.pop(m, list(toks)) == theirs.pop(m, list(toks))
    for model in models:
        assert ours.search(model, [0, 1]) == theirs.search(model, [0, 1])
        assert all(not root.edges and root.value is _NONE for root in ours._roots.values())


def test_edges_stay_compressed():
    """A node without a value keeps at least two children: pops fold single-child chains back into one edge."""
    t = RadixTrie()
    t.add("m", [1, 2, 3, 4], "long")
    t.add("m", [1, 2, 5], "branch")
    t.add("m", [1, 2], "mid")
    root = t._roots["m"]
    assert [label for label, _ in root.edges.values()] == [(1, 2)]
    t.pop("m", [1, 2, 5])
    t.pop("m", [1, 2])
    assert [label for label, _ in root.edges.values()] == [(1, 2, 3, 4)]
    assert t.pop_prefixes("m", [1, 2, 3, 4]) == []
    t.add("m", [1], "short")
    assert t.pop_prefixes("m", [1, 2, 3, 4]) == [(1, "short")]
    assert [label for label, _ in root.edges.values()] == [(1, 2, 3, 4)]


def test_missing_prompts_raise_key_error_like_prompt_trie():
    t = RadixTrie()
    t.add("m", [1, 2, 3], "x")
    for toks in ([1, 2], [1, 2, 4], [9], [1, 2, 3, 4]):
        with pytest.raises(KeyError):
            t.get("m", toks)
        with pytest.raises(KeyError):
            t.pop("m", toks)
    assert t.get("m", [1, 2, 3]) == "x"


def test_common_prefix_of_long_edges():
    label = tuple(range(40_000))
    assert _common(label, label, 0) == 40_000
    for cut in (0, 1, 17, 39_999):
        toks = label[:cut] + (-1,) + label[cut + 1:]
        assert _common(label, toks, 0) == cut
    assert _common(label, (5,) + label[:100], 1) == 100  # the tokens end inside the label


def test_search_of_a_long_prompt_walks_branches_not_tokens():
    """32K-token prompts: results as PromptTrie's, with a trie of a handful of nodes."""
    rng = random.Random(7)
    system = [rng.randint(0, 50_000) for _ in range(2_000)]
    convs = [system + [rng.randint(0, 50_000) for _ in range(30_000)] for _ in range(3)]
    ours, theirs = RadixTrie(), PromptTrie()
    for i, c in enumerate(convs):
        ours.add("m", c, i)
        theirs.add("m", c, i)
    nodes, stack = 0, [ours._roots["m"]]
    while stack:
        node = stack.pop()
        nodes += 1
        stack.extend(child for _, child in node.edges.values())
    assert nodes == 5  # root, the shared system prompt's node, three conversations
    for q in (convs[1], convs[2][:20_000], convs[0] + [1, 2], system + [7] * 10, [3] * 5):
        assert ours.search("m", q) == theirs.search("m", q)
