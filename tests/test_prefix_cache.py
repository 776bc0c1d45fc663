"""The prefix cache on its own: the longest shared start wins, at least one token is left to
compute, keys keep models apart, and the byte budget evicts the least recently used."""

from __future__ import annotations

import pytest
import torch

from studio.serving.prefix_cache import PrefixCache

pytestmark = pytest.mark.unit


def _kv(tokens: list[int], layers: int = 2):
    """Fake K/V whose values name their position, so a slice can be checked."""
    pos = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1)
    return [(pos.clone(), -pos.clone()) for _ in range(layers)]


def test_the_longest_shared_start_is_reused_and_the_last_token_is_left_to_compute():
    cache = PrefixCache(min_tokens=2)
    cache.add("m", [1, 2, 3, 4, 5], _kv([1, 2, 3, 4, 5]))
    cache.add("m", [1, 2, 9, 9], _kv([1, 2, 9, 9]))
    n, kv = cache.longest("m", [1, 2, 3, 4, 7, 8])
    assert n == 4 and kv[0][0].flatten().tolist() == [1, 2, 3, 4] and kv[1][1].flatten().tolist() == [-1, -2, -3, -4]
    n, _ = cache.longest("m", [1, 2, 3, 4, 5])  # the whole prompt is cached: its last token is computed
    assert n == 4
    assert cache.longest("other model", [1, 2, 3, 4, 7]) == (0, None)
    assert cache.longest("m", [1, 7, 7]) == (0, None)  # one shared token is below min_tokens
    stats = cache.snapshot()
    assert (stats.lookups, stats.hits, stats.tokens_reused) == (4, 2, 8)
    assert stats.tokens_computed == (6 - 4) + (5 - 4) + 5 + 3


def test_a_prompt_that_starts_a_kept_one_adds_nothing_and_the_budget_evicts_the_oldest():
    one = sum(t.numel() * t.element_size() for pair in _kv([1] * 10) for t in pair)  # bytes of 10 tokens
    cache = PrefixCache(max_bytes=2 * one, min_tokens=2)
    cache.add("m", list(range(10)), _kv(list(range(10))))
    cache.add("m", list(range(5)), _kv(list(range(5))))  # already covered by the first
    assert cache.bytes == one
    cache.add("m", list(range(100, 110)), _kv(list(range(100, 110))))
    cache.longest("m", list(range(10)) + [1])  # touch the first: the second is now the oldest
    cache.add("m", list(range(200, 210)), _kv(list(range(200, 210))))
    assert cache.bytes == 2 * one
    assert cache.longest("m", list(range(100, 110)) + [1]) == (0, None)  # evicted
    assert cache.longest("m", list(range(10)) + [1])[0] == 10
