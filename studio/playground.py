"""One base model in memory, many adapters by name; base and adapted replies streamed together.

The base side is the *same* loaded model with the adapter disabled (``disable_adapter()``), so
the comparison is honest and switching adapters never reloads the base. Both replies are
decoded in one loop, a token for each side per step, each with its own KV cache and its own
random generator seeded identically, so both panes stream at once under the same settings.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from studio import models
from studio.runs import Run


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0


class Playground:
    def __init__(self, device: str = "cpu"):
        self.device = device
        self.base_ref: str | None = None
        self.tokenizer = None
        self.model = None  # a PeftModel once an adapter is loaded, else the plain base
        self.adapters: dict[str, str] = {}  # adapter name -> folder
        self.active: str | None = None
        self.full_models: dict[str, torch.nn.Module] = {}  # fully fine-tuned runs
        self.base_loads = 0  # how many times a base was loaded (tests assert swaps don't reload)
        self._lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------
    def _ensure_base(self, ref: str, trust_remote_code: bool = False) -> None:
        if self.base_ref == ref and self.model is not None:
            return
        self.tokenizer = models.load_tokenizer(ref, trust_remote_code)
        self.model = models.load_model(ref, "lora", self.device, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.base_ref, self.adapters, self.active, self.full_models = ref, {}, None, {}
        self.base_loads += 1

    def activate(self, run: Run) -> None:
        """Make a trained run the adapted side, loading its base only if it differs."""
        with self._lock:
            cfg = run.config()
            self._ensure_base(cfg.model, cfg.trust_remote_code)
            weights = run.weights_dir()
            if weights is None:
                raise ValueError(f"Run {run.id} has no saved adapter yet; train it first.")
            if cfg.method == "full":
                if run.id not in self.full_models:
                    self.full_models = {run.id: models.load_model(str(weights), "full", self.device).eval()}
            elif run.id not in self.adapters:
                from peft import PeftModel

                if not self.adapters:
                    self.model = PeftModel.from_pretrained(self.model, str(weights), adapter_name=run.id)
                else:
                    self.model.load_adapter(str(weights), adapter_name=run.id)
                self.model.eval()
                self.adapters[run.id] = str(weights)
            if cfg.method != "full":
                self.model.set_adapter(run.id)
            self.active = run.id

    # ---- generation ------------------------------------------------------------------------
    def _base_context(self):
        return self.model.disable_adapter() if self.adapters else nullcontext()

    def _adapted_model(self):
        return self.full_models.get(self.active, self.model)

    def encode(self, messages: list[dict[str, str]]) -> torch.Tensor:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(ids, add_special_tokens=False, return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def stream_pair(self, base_messages, adapted_messages, settings: SamplingSettings) -> Iterator[tuple[str, str]]:
        """Yield (base_text, adapted_text) so far, one token more per side each step."""
        with self._lock:
            if self.model is None:
                raise ValueError("Pick a trained run first.")
            sides = [
                _Side(self.model, self._base_context, self.encode(base_messages), settings),
                _Side(self._adapted_model(), nullcontext, self.encode(adapted_messages), settings),
            ]
            eos = _eos_ids(self.tokenizer, self.model)
            for _ in range(settings.max_new_tokens):
                if all(s.done for s in sides):
                    break
                for s in sides:
                    s.advance(eos)
                yield tuple(self.tokenizer.decode(s.generated, skip_special_tokens=True) for s in sides)


class _Side:
    """One pane's decoding state: its model, adapter context, cache, generator and tokens."""

    def __init__(self, model, context, prompt_ids: torch.Tensor, settings: SamplingSettings):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                  TemperatureLogitsWarper, TopPLogitsWarper)

        self.model, self.context, self.settings = model, context, settings
        self.ids = prompt_ids
        self.next_input = prompt_ids
        self.cache = None
        self.generated: list[int] = []
        self.done = False
        self.generator = torch.Generator(device=prompt_ids.device).manual_seed(settings.seed)
        procs = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.temperature > 0:
            procs.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_p < 1.0:
                procs.append(TopPLogitsWarper(settings.top_p))
        self.processors = procs

    @torch.no_grad()
    def advance(self, eos: set[int]) -> None:
        if self.done:
            return
        with self.context():
            out = self.model(input_ids=self.next_input, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        scores = self.processors(self.ids, out.logits[:, -1, :].float())
        if self.settings.temperature > 0:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=self.generator)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        tid = int(token)
        if tid in eos:
            self.done = True
            return
        self.generated.append(tid)
        self.ids = torch.cat([self.ids, token], dim=-1)
        self.next_input = token


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(v)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)  # the ChatML end of turn, for templates we supplied
    return ids
