"""A prompt trie with mlx-lm's ``PromptTrie`` interface and results, on compressed edges.

mlx-lm's ``PromptTrie`` keeps one dict per token: inserting, finding or
removing a 32K-token prompt walks 32K dicts in Python (tens of milliseconds
per ``insert_cache``, paid on the request's thread).
``RadixTrie`` stores each run of tokens without a branch as one tuple edge,
so a walk costs a step per branch point plus C-speed tuple comparisons.

Every method returns what ``PromptTrie``'s returns for the same calls,
including which entry ``search`` picks as ``longer`` among extensions of
equal length (children are visited in the same order: a node's edges keep
their first token's insertion order through splits and merges).
``tests/unit/test_trie.py`` checks this against ``PromptTrie`` on random
operation sequences.
"""

from mlx_lm.models.cache import PromptTrieResult

_NONE = object()  # a node without a value (values may be anything, even None)


class _Node:
    __slots__ = ("edges", "value")

    def __init__(self, value=_NONE):
        self.edges = {}  # first token -> (label: tuple of tokens, child _Node)
        self.value = value


def _common(label, toks, i):
    """How many leading tokens of ``label`` equal ``toks[i:]`` (both tuples)."""
    n = len(label)
    if toks[i:i + n] == label:
        return n
    lo, hi = 0, min(n, len(toks) - i)  # label[:lo] matches; label[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if toks[i:i + mid] == label[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixTrie:
    """``PromptTrie`` (mlx-lm) on compressed edges: ``add``, ``get``, ``pop``,
    ``pop_prefixes`` and ``search`` with the same arguments and results."""

    def __init__(self):
        self._roots = {}

    def _path(self, model, toks):
        """``(node, path)``: the node of exactly ``toks`` and the ``[(parent, first token, child)]``
        edges down to it; ``KeyError`` if the trie has no such node."""
        node = self._roots[model]
        path, i, n = [], 0, len(toks)
        while i < n:
            label, child = node.edges[toks[i]]
            if toks[i:i + len(label)] != label:
                raise KeyError(toks[i])
            path.append((node, toks[i], child))
            node, i = child, i + len(label)
        return node, path

    def add(self, model, tokens, value):
        """Set the value of ``tokens``; return the value it replaces (``None`` if none)."""
        node = self._roots.get(model)
        if node is None:
            node = self._roots[model] = _Node()
        toks = tuple(tokens)
        i, n = 0, len(toks)
        while i < n:
            first = toks[i]
            edge = node.edges.get(first)
            if edge is None:
                node.edges[first] = (toks[i:], _Node(value))
                return None
            label, child = edge
            k = _common(label, toks, i)
            if k < len(label):  # split the edge where the tokens leave it
                mid = _Node()
                mid.edges[label[k]] = (label[k:], child)
                node.edges[first] = (label[:k], mid)
                child = mid
            node, i = child, i + k
        prev = node.value
        node.value = value
        return None if prev is _NONE else prev

    def get(self, model, tokens):
        """The value of exactly ``tokens``; ``KeyError`` if there is none."""
        node, _ = self._path(model, tuple(tokens))
        if node.value is _NONE:
            raise KeyError("__value__")
        return node.value

    def pop(self, model, tokens):
        """Remove and return the value of exactly ``tokens`` (``KeyError`` if none); drop emptied nodes."""
        node, path = self._path(model, tuple(tokens))
        value = node.value
        if value is _NONE:
            raise KeyError("__value__")
        node.value = _NONE
        if node.edges or not path:
            self._merge(path, len(path) - 1)
            return value
        parent, first, _ = path[-1]
        del parent.edges[first]
        self._merge(path, len(path) - 2)
        return value

    @staticmethod
    def _merge(path, j):
        """Fold ``path[j]``'s node into its parent's edge if it has no value and one child."""
        if j < 0:
            return
        parent, first, node = path[j]
        if node.value is not _NONE or len(node.edges) != 1:
            return
        (label2, child), = node.edges.values()
        label1, _ = parent.edges[first]
        parent.edges[first] = (label1 + label2, child)

    def pop_prefixes(self, model, tokens):
        """Remove the values of every proper prefix of ``tokens`` (the empty one too);
        return ``[(length, value)]`` shortest first. ``tokens`` must be in the trie."""
        toks = tuple(tokens)
        node, path = self._path(model, toks)
        root = self._roots[model]
        values = []
        if toks and root.value is not _NONE:
            values.append((0, root.value))
            root.value = _NONE
        depth, emptied = 0, []
        for j, (parent, first, child) in enumerate(path[:-1]):
            depth += len(parent.edges[first][0])
            if child.value is not _NONE:
                values.append((depth, child.value))
                child.value = _NONE
                emptied.append(j)
        for j in reversed(emptied):  # deepest first: a fold above sees the folds below
            self._merge(path, j)
        return values

    def search(self, model, tokens):
        """``PromptTrieResult``: the exact entry, the longest stored prefix, the
        shortest entry extending the longest common path, and that path's length."""
        root = self._roots.get(model)
        if root is None:
            return PromptTrieResult(model, None, None, None, 0)
        if not tokens:
            return PromptTrieResult(model, [] if root.value is not _NONE else None, None, None, 0)
        if tokens[0] not in root.edges:  # a miss from the first token: no copy of the prompt
            return PromptTrieResult(model, None, None, None, 0)
        toks = tuple(tokens)
        node, i, n, last = root, 0, len(toks), -1
        rest = ()  # the part of an edge past the common path, when the walk stops inside one
        while i < n:
            edge = node.edges.get(toks[i])
            if edge is None:
                break
            label, child = edge
            k = _common(label, toks, i)
            i += k
            if k < len(label):
                rest, node = label[k:], child
                break
            node = child
            if node.value is not _NONE:
                last = i - 1
        if last == n - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        shorter = tokens[: last + 1] if last > 0 else None
        longer = None
        if i > 0:
            longer = list(tokens[:i]) + list(rest) + self._shortest(node, len(rest))
        return PromptTrieResult(model, None, shorter, longer, i)

    @staticmethod
    def _shortest(start, offset):
        """Tokens from ``start`` to its nearest valued node (``PromptTrie``'s depth-first
        order and tie-break: the first found of the shortest); ``offset`` tokens lead to it."""
        best, best_len = None, None
        stack = [(start, offset, None)]
        while stack:
            node, length, chain = stack.pop()
            if node.value is not _NONE:
                if best is None or length < best_len:
                    best, best_len = chain, length
            elif best is None or length < best_len:
                for label, child in node.edges.values():
                    stack.append((child, length + len(label), (label, chain)))
        out = []
        while best is not None:
            label, best = best
            out.append(label)
        return [t for label in reversed(out) for t in label]
