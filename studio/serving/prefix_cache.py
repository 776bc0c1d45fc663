"""Prompts that start alike share one prefill: the KV cache of recent prompts, reused by the
longest common start.

Chat requests begin with the same template tokens and usually the same system prompt or few-shot
block; their keys and values at those positions are identical (attention is causal: a position's
K/V depend only on the tokens up to it), so a new prompt copies them from a recent prompt and
prefills only the rest. Entries are keyed by the loaded base (a reload starts afresh) and by the
adapter's weights: a LoRA changes the hidden states every later layer's K/V are computed from.

Bounded by bytes, least recently used first out. Counted for ``/metrics``: lookups, hits, prompt
tokens reused and prompt tokens computed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, heads, tokens, head_dim]


@dataclass
class _Entry:
    tokens: list[int]
    kv: KV
    bytes: int


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    tokens_computed: int = 0


class PrefixCache:
    def __init__(self, max_bytes: int = 256 * 2**20, min_tokens: int = 4):
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # a shorter common start is not worth a copy
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # (key, tuple(tokens)) -> entry
        self._bytes = 0
        self._lock = threading.Lock()  # /metrics reads the counters from another thread
        self.stats = PrefixStats()

    def longest(self, key: tuple, ids: list[int]) -> tuple[int, KV | None]:
        """(n, the first n positions' K/V) of the cached prompt sharing the longest start with
        ``ids`` under ``key``; (0, None) when none shares ``min_tokens``. At least the last token
        is left to compute (its logits pick the first answer token)."""
        best, entry = 0, None
        with self._lock:
            self.stats.lookups += 1
            for (k, _), e in self._entries.items():
                if k != key:
                    continue
                n = min(len(os.path.commonprefix([e.tokens, ids])), len(ids) - 1)
                if n > best:
                    best, entry = n, e
            if entry is None or best < self.min_tokens:
                self.stats.tokens_computed += len(ids)
                return 0, None
            self._entries.move_to_end((key, tuple(entry.tokens)))
            self.stats.hits += 1
            self.stats.tokens_reused += best
            self.stats.tokens_computed += len(ids) - best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in entry.kv]

    def add(self, key: tuple, ids: list[int], kv: KV) -> None:
        """Keep a prompt's K/V (one row, exactly ``len(ids)`` positions). A prompt that is the start
        of a kept one adds nothing."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes or len(ids) < self.min_tokens:
            return
        with self._lock:
            for (k, tokens), e in self._entries.items():
                if k == key and tokens[: len(ids)] == tuple(ids):
                    return
            self._entries[(key, tuple(ids))] = _Entry(list(ids), kv, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.bytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def snapshot(self) -> PrefixStats:
        with self._lock:
            return PrefixStats(**vars(self.stats))
