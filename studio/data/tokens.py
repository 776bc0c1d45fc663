"""Count tokens of many strings fast, exactly as the tokenizer would.

Byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2...) first split text with a regex
into pre-tokens and never merge across them, so a text's token count is the sum of its
pre-tokens' counts. Natural text repeats pre-tokens heavily, so a dict of pre-token -> count
makes counting about twice as fast as the tokenizer's own batch encode on two cores (measured
in benchmarks/validate_speed.py), and exact. Tokenizers of other kinds fall back to batch encode.
"""

from __future__ import annotations

import json

import numpy as np

# The GPT-2 split that ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class _Counts(dict):
    def __init__(self, encode):
        super().__init__()
        self._encode = encode

    def __missing__(self, piece: str) -> int:
        n = self[piece] = len(self._encode(piece))
        return n


class TokenCounter:
    """``count(texts)`` -> token counts without special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._pattern = _split_pattern(backend) if backend is not None else None
        if self._pattern is not None:
            self._counts = _Counts(lambda s: backend.encode(s, add_special_tokens=False).ids)
            self._special = _special_pattern(tokenizer)

    @property
    def fast(self) -> bool:
        return self._pattern is not None

    def count(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        if self._pattern is None:
            enc = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)
            return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))
        get, findall = self._counts.__getitem__, self._pattern.findall
        out = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            if self._special is not None and self._special.search(text):
                out[i] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:
                out[i] = sum(map(get, findall(text)))
        return out


def _split_pattern(backend):
    """The pre-tokenizer's split regex when the tokenizer is byte-level BPE with no normalizer."""
    import regex

    try:
        spec = json.loads(backend.to_str())
    except (ValueError, AttributeError):
        return None
    if spec.get("normalizer") or (spec.get("model") or {}).get("type") != "BPE":
        return None
    rule = split_regex(spec)
    return regex.compile(rule) if rule is not None else None


def split_regex(spec: dict) -> str | None:
    """The regex a byte-level BPE tokenizer (its ``tokenizer.json`` as a dict) splits text with
    before merging: GPT-2's for a plain ByteLevel pre-tokenizer, or the Split pattern before a
    regex-free ByteLevel (Llama 3, Qwen2); None for any other pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (
            len(steps) == 2
            and steps[0].get("type") == "Split"
            and steps[0].get("behavior") == "Isolated"
            and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)
            and "Regex" in (steps[0].get("pattern") or {})
        ):
            return steps[0]["pattern"]["Regex"]  # Llama 3 / Qwen2 style
    return None


def _special_pattern(tokenizer):
    """Texts containing special tokens (e.g. <|im_end|>) are counted by the tokenizer itself."""
    import re

    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    added = [t for t in getattr(tokenizer, "get_added_vocab", dict)().keys() if t]
    tokens = sorted(set(specials + added), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None
