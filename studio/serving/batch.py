"""The rows decoding together: continuous batching on one loaded base.

A request joins the running batch at the next step and leaves it the step it ends:

- **Join**: the newcomers' prompts are prefilled on their own (one padded forward for those
  without a cached prefix, one forward each for the rest, which compute only what follows the
  cached start: studio/serving/prefix_cache.py), each through its own adapter; their first token
  is picked from that prefill, and their K/V rows are appended to the batch's cache.
- **Step**: one forward for every row, one new token each, each row through its own adapter
  (studio/serving/routing.py).
- **Leave**: a row that ended (end of turn, a stop string, max tokens, its client went away) is
  dropped from the cache before the next step, so nobody decodes for it.

The cache is one ``DynamicCache`` whose rows are left-padded to a common width, with an
attention mask of the real positions and each row's own position ids: a row's logits are those
it gets alone (tests compare a row that joined mid-batch with the same request alone). A model
whose cache is not plain per-layer K/V (sliding-window or hybrid layers) cannot be spliced that
way: its rows join only an empty batch, as in static batching.

Per row: its own sampling settings and seeded generator, its own stop strings (text is held back
while it could still be the start of one), its own max tokens. A row that asks for
log-probabilities gets each generated token scored, and with ``echo`` every prompt token too, from
its prefill (studio/serving/logprobs.py); only then does a prefill keep logits for all positions
(and skip the prefix cache, whose positions have no logits).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from studio.inference.playground import BASE_ADAPTER, Playground, sampling_processors
from studio.planning import precision
from studio.serving.logprobs import score
from studio.serving.prefix_cache import PrefixCache
from studio.serving.routing import Route, can_route


class Batch:
    """Rows decoding on ``pg``'s model (held by the caller for as long as the batch lives)."""

    def __init__(self, pg: Playground, run_precision: str, prefix_cache: PrefixCache | None = None):
        self.pg = pg
        self.model = pg.model
        self.device = pg.device
        self.run_precision = run_precision
        self.prefix_cache = prefix_cache
        self.eos = pg.eos_ids()
        self.pad = pg.tokenizer.pad_token_id if pg.tokenizer.pad_token_id is not None else 0
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where the cache holds a real token
        self.joinable = True  # False once the model's cache is found not to be plain K/V layers
        self.peft = hasattr(self.model, "peft_config")
        self.route: Route | None = None
        self._routable: dict[frozenset, bool] = {}
        self._state = (id(pg.model), tuple(id(a) for a in pg.adapters.values()))

    def open_to_newcomers(self) -> bool:
        return self.joinable or not self.rows

    # ---- adapters ------------------------------------------------------------------------------
    def _adapter_kwargs(self, names: list[str]) -> dict:
        """Point the model's LoRA layers at ``names`` (one per row) for the next forward; the
        extra keyword arguments that forward needs (PEFT's ``adapter_names`` where routing cannot)."""
        if self._adapters_changed():
            self.reprepare([row.adapter for row in self.rows])
        if not self.peft:
            return {}
        adapters = frozenset(n for n in names if n != BASE_ADAPTER)
        if adapters not in self._routable:
            self._routable[adapters] = can_route(self.model, list(adapters))
        if self._routable[adapters]:
            if self.route is None:
                self.route = Route(self.model)
            self.route.set_rows(names)
            return {}
        self.close_route()  # DoRA, LoRA on embeddings...: PEFT's own mixed batch
        return {"adapter_names": list(names)}

    def _adapters_changed(self) -> bool:
        """A newcomer's adapter was loaded (or one evicted) since the route was built: loading the
        first adapter turns the base into a PeftModel in place, and a new adapter may wrap layers
        the route does not know, whose own forward would then apply it to every row."""
        state = (id(self.pg.model), tuple(id(a) for a in self.pg.adapters.values()))
        changed = state != self._state
        self._state = state
        return changed

    def close_route(self) -> None:
        if self.route is not None:
            self.route.close()
            self.route = None

    def reprepare(self, names: list[str]) -> None:
        """After the playground was lent to another thread: the rows' adapter names now (an adapter
        evicted meanwhile was loaded again under a new name)."""
        self.close_route()
        self._routable.clear()
        self.model = self.pg.model  # the base may have been loaded again meanwhile
        self.peft = hasattr(self.model, "peft_config")
        for row, name in zip(self.rows, names):
            row.adapter = name

    def _forward(self, names: list[str], ids, mask, positions, cache, keep: int):
        kwargs = self._adapter_kwargs(names)
        try:
            with precision.autocast(self.device, self.run_precision):
                return self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=keep,
                    **kwargs,
                )
        finally:
            # PEFT's mixed-batch hooks are removed by a context manager without try/finally: a
            # forward that raised would leave them on every LoRA layer, steering later requests.
            if kwargs:
                _drop_adapter_name_hooks(self.model)

    # ---- joining -------------------------------------------------------------------------------
    @torch.no_grad()
    def join(self, requests: list, names: list[str], prefix_keys: list[tuple | None]) -> None:
        """Prefill ``requests`` together (each with its adapter name and its prefix-cache key, None:
        no reuse), pick their first tokens, and add those that go on to the batch."""
        rows = [_Row(r, self.pg, self.device, n) for r, n in zip(requests, names)]
        starts, kvs = [], []
        for row, key in zip(rows, prefix_keys):
            row.prefix_key = key
            start, kv = 0, None
            if key is not None and self.prefix_cache is not None and self.joinable and not row.r.wants_prompt_scores:
                start, kv = self.prefix_cache.longest(key, row.r.prompt_ids)
            starts.append(start)
            kvs.append(kv)
        self._merge(*self._prefill(rows, starts, kvs))

    def _prefill(self, rows: list[_Row], starts: list[int], kvs: list):
        """One forward over the newcomers' prompts. Row i's first ``starts[i]`` positions come from
        the prefix cache (``kvs[i]``); the rest is computed. Cached starts are right-aligned in the
        first P columns, the computed parts in the last S (left padding in both; the mask and each
        row's position ids say what is real). Returns (cache, mask, rows, indices of those that go on)."""
        k, prefix = len(rows), max(starts)
        width = max(len(row.r.prompt_ids) - start for row, start in zip(rows, starts))
        ids = torch.full((k, width), self.pad, dtype=torch.long)
        positions = torch.zeros((k, width), dtype=torch.long)
        mask = torch.zeros((k, prefix + width), dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows, starts)):
            n = len(row.r.prompt_ids)
            rest = n - start
            ids[i, width - rest :] = torch.tensor(row.r.prompt_ids[start:])
            positions[i, width - rest :] = torch.arange(start, n)
            mask[i, prefix - start : prefix] = 1
            mask[i, prefix + width - rest :] = 1
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        if prefix:
            cache = DynamicCache(ddp_cache_data=_stack_prefixes(starts, kvs, prefix))
        else:
            cache = DynamicCache(config=self.model.config)
        keep = 0 if any(row.r.wants_prompt_scores for row in rows) else 1  # all positions only to score them
        out = self._forward([row.adapter for row in rows], ids, mask, positions, cache, keep)
        cache = out.past_key_values
        if self.joinable and not _plain_layers(cache):
            self.joinable = False
        if keep == 0:
            _score_prompts(rows, out.logits)
        logits = out.logits[:, -1, :].float()
        kept = []
        for i, row in enumerate(rows):
            if self.prefix_cache is not None and row.prefix_key is not None and self.joinable:
                real = mask[i].nonzero().squeeze(-1)  # this prompt's columns, in order
                own = [(keys[i : i + 1, :, real], values[i : i + 1, :, real]) for keys, values in _kv(cache)]
                self.prefix_cache.add(row.prefix_key, row.r.prompt_ids, own)
            row.position = len(row.r.prompt_ids)
            row.next_token = row.advance(logits[i : i + 1], self.eos)
            if not row.done:
                kept.append(i)
        return cache, mask, rows, kept

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, rows: list[_Row], indices: list[int]) -> None:
        """Append the rows ``indices`` of a prefill's cache to the batch's, both left-padded to one width."""
        if not indices:
            return
        if len(indices) < len(rows):
            cache.batch_select_indices(torch.tensor(indices, device=mask.device))
            mask = mask[indices]
        self.rows += [rows[i] for i in indices]
        if self.cache is None:
            self.cache, self.mask = cache, mask
            self._trim()
            return
        mine, theirs = self.mask.shape[1], mask.shape[1]
        width = max(mine, theirs)
        for a, b in zip(self.cache.layers, cache.layers):
            a.keys = torch.cat([_pad_left(a.keys, width - mine), _pad_left(b.keys, width - theirs)])
            a.values = torch.cat([_pad_left(a.values, width - mine), _pad_left(b.values, width - theirs)])
        self.mask = torch.cat([F.pad(self.mask, (width - mine, 0)), F.pad(mask, (width - theirs, 0))])

    # ---- stepping ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[_Row]:
        """One token for every row; rows that ended leave (returned)."""
        if not self.rows:
            return []
        ids = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.device)
        mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)], 1)
        out = self._forward([row.adapter for row in self.rows], ids, mask, positions, self.cache, 1)
        self.cache, self.mask = out.past_key_values, mask
        logits = out.logits[:, -1, :].float()
        for i, row in enumerate(self.rows):
            row.position += 1
            row.next_token = row.advance(logits[i : i + 1], self.eos)
        return self.drop_finished()

    def drop_finished(self) -> list[_Row]:
        """Rows that ended (or whose client left) out of the cache; returns them."""
        for row in self.rows:
            if not row.done and row.r.cancelled.is_set():
                row.finish("stop")
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return []
        left = [row for row in self.rows if row.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return left
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self._trim()
        return left

    def _trim(self) -> None:
        """Drop leading columns no row uses (the padding of rows that left)."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start and _plain_layers(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def finish_all(self, reason: str = "length") -> None:
        for row in self.rows:
            row.finish(reason)
        self.rows, self.cache, self.mask = [], None, None


def _drop_adapter_name_hooks(model) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(getattr(hook, "func", None), "__name__", "") == "_adapter_names_pre_forward_hook":
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def _plain_layers(cache) -> bool:
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _stack_prefixes(starts: list[int], kvs: list, width: int):
    """Per layer (keys, values) for a prefill's rows: each row's cached start right-aligned in
    ``width`` columns, zeros where a row has less (or none)."""
    some = next(kv for kv in kvs if kv is not None)
    stacked = []
    for layer, (k0, v0) in enumerate(some):
        keys = k0.new_zeros((len(kvs), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(kvs), v0.shape[1], width, v0.shape[3]))
        for i, (start, kv) in enumerate(zip(starts, kvs)):
            if kv is not None:
                keys[i, :, width - start :] = kv[layer][0][0]
                values[i, :, width - start :] = kv[layer][1][0]
        stacked.append((keys, values))
    return stacked


def _kv(cache: DynamicCache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t


def _score_prompts(rows: list[_Row], logits: torch.Tensor) -> None:
    """Each echo row's prompt tokens 2..n, scored from the prefill: rows are left-padded, so a
    prompt of n tokens fills the last n columns, and column j predicts column j + 1."""
    width = logits.shape[1]
    for i, row in enumerate(rows):
        ids = row.r.prompt_ids
        if row.r.wants_prompt_scores and len(ids) > 1:
            row.r.prompt_scores = score(logits[i, width - len(ids) : width - 1], ids[1:], row.r.logprobs)


class _Row:
    """One row's sampling state and its streamed text."""

    def __init__(self, request, pg: Playground, device: str, adapter: str):
        self.r = request
        self.adapter = adapter
        self.prefix_key: tuple | None = None
        self.position = 0  # the position of the token fed next
        self.next_token = 0
        self.tokenizer = request.tokenizer or pg.tokenizer
        self.ids = torch.tensor([request.prompt_ids], device=device)
        self.generated: list[int] = []
        self.sent = 0  # characters of text already sent
        self.done = False
        self.processors = sampling_processors(request.settings)
        self.generator = torch.Generator(device=device).manual_seed(request.settings.seed)

    def advance(self, logits: torch.Tensor, eos: set[int]) -> int:
        """Pick this row's next token; returns the token to feed."""
        if self.done:
            return self.next_token
        if self.r.cancelled.is_set():
            self.finish("stop")
            return self.next_token
        if self.r.settings.max_new_tokens == 0:  # echo only: the prompt was scored, nothing to add
            self.finish("length")
            return self.next_token
        scores = self.processors(self.ids, logits)
        if self.r.settings.temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        tid = int(token)
        self.r.output_ids.append(tid)  # evaluation teacher-forces these exact tokens (regression.py)
        if self.r.logprobs is not None:  # from the raw logits, before any sampling setting
            self.r.scores += score(logits, [tid], self.r.logprobs)
        if self.r.first_token_at is None:
            self.r.first_token_at = time.monotonic()
        if tid in eos and not self.r.ignore_eos:
            self.finish("stop")
            return tid
        self.generated.append(tid)
        self.ids = torch.cat([self.ids, token.view(1, 1)], dim=-1)
        self._emit()
        if not self.done and len(self.generated) >= self.r.settings.max_new_tokens:
            self.finish("length")
        return tid

    def _emit(self) -> None:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        for stop in self.r.stop:
            at = text.find(stop)
            if at != -1:
                self._send(text[:at])
                self.finish("stop")
                return
        # Hold back what could still become a stop string, and a half-decoded character.
        safe = len(text) - max((_overlap(text, s) for s in self.r.stop), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.r.events.put(("text", text[self.sent :]))
            self.sent, self.r.text = len(text), text

    def finish(self, reason: str) -> None:
        if self.done:
            return
        if not self.r.cancelled.is_set():  # the text held back for stop strings goes out now
            text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            cut = min((text.find(s) for s in self.r.stop if s in text), default=len(text))
            self._send(text[:cut])
        self.done = True
        self.r.completion_tokens = len(self.generated)
        self.r.finish_reason = reason
        self.r.finished_at = time.monotonic()
        self.r.events.put(("done", None))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
