"""The memory tier: mlx-lm's own ``LRUPromptCache``, composed.

Tier order (assistant entries go before user entries, user before system),
count and byte limits and the dropping of redundant trimmable prefixes
behave exactly as in mlx-lm because they are mlx-lm's. Its prompt trie is
swapped for ``RadixTrie`` (same calls, same results, a step per branch
point instead of per token). This is the only module that reads
``LRUPromptCache`` internals (its prompt trie and LRU order); it adds
what a tier in front of a store needs: planning a hit without copying it,
an exact hit served one token short, and eviction counts.

It never hands out an entry's cache itself: ``checkout`` gives a copy
that shares no mutable state with the entry.
"""

import copy

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from .trie import RadixTrie


class MemoryTier:
    """Prompt caches in memory, keyed by (model key, tokens)."""

    def __init__(self, max_size=10, max_bytes=None):
        self._lru = LRUPromptCache(max_size, (1 << 63) if max_bytes is None else max_bytes)
        self._trie = self._lru._trie = RadixTrie()

    def __len__(self):
        return len(self._lru)

    @property
    def nbytes(self):
        return self._lru.nbytes

    def stats_by_type(self):
        """``{tier: {"n_sequences", "n_bytes"}}`` (as ``LRUPromptCache``)."""
        return self._lru.stats_by_type()

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        """Evict (assistant first, system last) down to the limits; return how many went."""
        before = len(self._lru)
        self._lru.trim_to(n_sequences=n_sequences, n_bytes=n_bytes)
        return before - len(self._lru)

    def room(self):
        """``(entries, bytes)`` the tier can take without evicting (bytes ``None``: no limit)."""
        lru = self._lru
        nbytes = None if lru.max_bytes >= 1 << 62 else max(0, lru.max_bytes - lru.nbytes)
        return max(0, lru.max_size - len(lru)), nbytes

    def fits(self, nbytes):
        """True if one more entry of ``nbytes`` fits without evicting another."""
        entries, room = self.room()
        return entries > 0 and (room is None or nbytes <= room)

    def plan(self, key, tokens):
        """``(entry tokens, tokens to serve, kind)`` of the best entry for ``tokens``, or ``None``.

        mlx-lm's rules (exact, then a longer trimmable entry sharing more than
        the longest stored prefix, then that prefix), with the exact hit one
        token short: a non-trimmable exact entry falls back to the best
        strictly shorter one.
        """
        trie = self._trie
        res = trie.search(key, tokens)
        if res.exact is not None:
            if len(tokens) < 2:
                return None
            if can_trim_prompt_cache(trie.get(key, tokens).prompt_cache):
                return tokens, len(tokens) - 1, "exact"
            res = trie.search(key, tokens[:-1])
            if res.exact is not None:
                return res.exact, len(res.exact), "shorter"
        short = len(res.shorter) if res.shorter is not None else 0
        if res.longer is not None and res.common_prefix > short:
            if can_trim_prompt_cache(trie.get(key, res.longer).prompt_cache):
                prefix = min(len(tokens) - 1, res.common_prefix)
                if prefix > 0:
                    return res.longer, prefix, "longer"
        if short > 0:
            return res.shorter, short, "shorter"
        return None

    def checkout(self, key, held, n):
        """``(cache, tier)``: an independent copy of entry ``held`` holding its first ``n`` tokens."""
        entry = self._trie.get(key, held)
        cache = copy.deepcopy(entry.prompt_cache)
        if len(held) > n:
            trim_prompt_cache(cache, len(held) - n)
        return cache, entry.cache_type

    def insert(self, key, tokens, cache, tier):
        """Keep ``cache`` (the caller gives it up) for ``tokens``; return how many entries were evicted."""
        before = len(self._lru)
        if self._holds(key, tokens):
            before -= 1  # replaced, not added
        self._lru.insert_cache(key, tokens, cache, cache_type=tier)
        return before + 1 - len(self._lru)

    def _holds(self, key, tokens):
        """True if an entry of exactly (key, tokens) is kept. The LRU order lists every
        entry; comparing against it costs a length check for all but same-length ones,
        where walking the trie would cost a step per token."""
        entry = (key, tokens)
        return any(entry == e for lru in self._lru._lru._lrus.values() for e in lru)
