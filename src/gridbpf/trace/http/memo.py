"""A bounded cache looked up for a whole batch at once (the consumers' per-capture caches)."""
from __future__ import annotations

from typing import Callable, Hashable


def memo_map(cache: dict, keys: list[Hashable], make: Callable, bound: int = 4096) -> list:
    """[cache[k] for k in KEYS], computing MAKE(k) for the keys not cached yet (never None).
    Keys repeat (a client's requests, stale bytes and all), so a batch costs one dict lookup
    per key (map runs in C); CACHE is emptied when it reaches BOUND entries (keys can be
    256-byte captures: kept small, renewed)."""
    found = list(map(cache.get, keys))
    if None in found:
        for i, got in enumerate(found):
            if got is None:
                got = cache.get(keys[i])         # made earlier in this batch
                if got is None:
                    if len(cache) >= bound:
                        cache.clear()
                    got = cache[keys[i]] = make(keys[i])
                found[i] = got
    return found
