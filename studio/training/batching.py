"""Micro-batches: which examples share a step, how they lie in rows, and the tensors they become.

Two layouts, one stream (seeded, endless, replayable from a count when resuming):

    padded   one example per row, ``rows`` rows per micro-batch, each batch as wide as its
             longest row. Rows come from length-sorted pools, so little goes to padding; the
             shape changes from batch to batch. The CPU layout: measured faster there.
    packed   every micro-batch is ``rows`` x ``width`` tokens (width = data.max_length), each
             row filled with whole examples (best fit, longest first, within a pool). Each
             example gets its own position ids (0, 1, ...) and attends only to itself, so its
             logits are those it has alone; the first token of each example is never a target
             (the previous example's last token must not learn to predict it). Every step has
             the same shape and almost no padding: the GPU layout (more work per launch, static
             shapes for torch.compile).

A micro-batch is a list of rows, a row a list of example indices. Token counts are taken from
the examples on the host, so reading them never waits for the device.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from studio.data.render import IGNORE_INDEX, Example, collate

POOL_BATCHES = 32  # micro-batches per pool: groups similar lengths, keeps the order random
# Families whose decoders take per-example position ids and mask attention by them (transformers
# 5's create_causal_mask); tests/test_batching.py checks each one's packed logits.
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "smollm3"})

MicroBatch = list[list[int]]


@dataclass(frozen=True)
class Batching:
    rows: int  # rows per micro-batch (training.batch_size)
    width: int | None = None  # packed: tokens per row (data.max_length); None: padded

    @property
    def packed(self) -> bool:
        return self.width is not None

    @property
    def tokens(self) -> int | None:
        """Tokens per packed micro-batch (the token budget); None when padded."""
        return self.rows * self.width if self.width else None

    def describe(self) -> str:
        if not self.packed:
            return f"{self.rows} examples per batch, padded to the longest"
        return f"packed: {self.rows} rows x {self.width} tokens = {self.tokens:,} tokens per batch"


def packing_problem(model_type: str | None) -> str | None:
    """Why a model cannot train packed, or None."""
    if model_type not in PACKED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose attention we have checked with packed rows"
    return None


def layout(packing: str, device: str, rows: int, width: int, model_type: str | None) -> Batching:
    """The layout a run trains in for ``training.packing``: ``auto`` packs on CUDA GPUs and not on
    CPU (there packed rows ran at 0.87x the tokens/s of length-sorted padded batches on the default
    model, benchmarks/train_throughput.py: SDPA with a dense block mask computes attention over the
    whole row), ``on`` packs wherever the model can, ``off`` never packs."""
    if packing == "off" or (packing == "auto" and device != "cuda") or packing_problem(model_type):
        return Batching(rows)
    return Batching(rows, width)


def best_fit(lengths: Sequence[int], order: Sequence[int], width: int) -> list[list[int]]:
    """Rows of at most ``width`` tokens: each example (longest first) into the fullest row it
    still fits in, else a new row. Returns rows of example indices."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in sorted(order, key=lambda j: -lengths[j]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            left, row = width - lengths[i], len(rows) - 1
        else:
            left, row = free.pop(at)
            rows[row].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


def epoch(lengths: Sequence[int], batching: Batching, rng: random.Random | None) -> list[MicroBatch]:
    """One pass over the examples as micro-batches; shuffled with ``rng``, or in order (None)."""
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)
    batches: list[MicroBatch] = []
    if batching.packed:
        budget = batching.tokens * POOL_BATCHES
        pool, used = [], 0
        for i in order + [None]:
            if i is not None:
                pool.append(i)
                used += lengths[i]
            if pool and (i is None or used >= budget):
                rows = best_fit(lengths, pool, batching.width)
                batches += [rows[k : k + batching.rows] for k in range(0, len(rows), batching.rows)]
                pool, used = [], 0
    else:
        pool = batching.rows * POOL_BATCHES
        for k in range(0, len(order), pool):
            chunk = sorted(order[k : k + pool], key=lambda j: lengths[j])
            batches += [[[j] for j in chunk[b : b + batching.rows]] for b in range(0, len(chunk), batching.rows)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def stream(
    lengths: Sequence[int], batching: Batching, seed: int, rank: int = 0, world: int = 1
) -> Iterator[MicroBatch]:
    """The endless, seeded stream of micro-batches a run trains on; every process replays the
    same stream and takes every world-th micro-batch."""
    rng = random.Random(seed)
    while True:
        yield from epoch(lengths, batching, rng)[rank::world]


def largest(lengths: Sequence[int], batching: Batching) -> MicroBatch:
    """The micro-batch that needs the most memory: the longest examples (packed: as many of
    them as fill the rows)."""
    longest = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    if not batching.packed:
        return [[j] for j in longest[: batching.rows]]
    return best_fit(lengths, longest, batching.width)[: batching.rows]


def counts(examples: Sequence[Example], batch: MicroBatch) -> tuple[int, int]:
    """(tokens, scored tokens) of a micro-batch: real tokens, and the positions whose next token
    is labeled (each example's first token is never a target, packed or not)."""
    tokens = scored = 0
    for row in batch:
        for j in row:
            tokens += examples[j].tokens
            scored += examples[j].targets
    return tokens, scored


def tensors(examples: Sequence[Example], batch: MicroBatch, batching: Batching, pad_id: int) -> dict:
    """The micro-batch as model inputs on the host.

    Padded: input_ids, attention_mask (rows x width) and labels. Packed: input_ids, labels,
    position_ids and ``document`` (which example each position belongs to), all ``rows x width``;
    :func:`sdpa_mask` turns ``document`` into the attention mask where the batch lands.
    """
    if not batching.packed:  # a preference pair fills two rows, chosen then rejected
        chosen = [examples[row[0]] for row in batch]
        out = collate([r for e in chosen for r in e.rows()], pad_id)
        if hasattr(chosen[0], "desirable"):  # answers marked good or bad one by one (kto)
            out["desirable"] = torch.tensor([e.desirable for e in chosen])
        return out
    rows, width = batching.rows, batching.width
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((rows, width), dtype=np.int64)
    document = np.empty((rows, width), dtype=np.int64)
    for r in range(rows):
        at = 0
        row = batch[r] if r < len(batch) else []  # the last micro-batch may have fewer rows
        for d, j in enumerate(row):
            e = examples[j]
            n = len(e.input_ids)
            ids[r, at : at + n] = e.input_ids
            labels[r, at + 1 : at + n] = e.labels[1:]
            positions[r, at : at + n] = np.arange(n)
            document[r, at : at + n] = d
            at += n
        positions[r, at:] = np.arange(width - at)  # the padding tail: a document of its own
        document[r, at:] = len(row)
    out = {"input_ids": ids, "labels": labels, "position_ids": positions, "document": document}
    return {k: torch.from_numpy(v) for k, v in out.items()}


def sdpa_mask(document: torch.Tensor) -> torch.Tensor:
    """The 4-D boolean mask (True = may attend) that transformers would build for SDPA from packed
    position ids: causal, and within one document. Built by the trainer on the device, because
    transformers' own detection reads the device (a host sync in every forward); other attention
    implementations get no mask and build theirs from the position ids."""
    width = document.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=document.device).tril()
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]
