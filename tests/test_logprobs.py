"""Token log-probabilities (studio/serving/logprobs.py): scored numbers and OpenAI's legacy shape.
The served path (echo, batches, adapters, against transformers) is in test_serve.py and
test_lm_eval.py."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_the_legacy_logprobs_shape_counts_an_ending_end_of_turn(tiny_model_dir):
    """lm-eval reads ``token_logprobs[ctxlen:-1]``: with max_tokens 1 there must be one entry past
    the prompt even when that token ended the turn (it is not in the text, but it was scored)."""
    import torch
    from transformers import AutoTokenizer

    from studio.serving.logprobs import completion_logprobs, score

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tokenizer("hello world")["input_ids"]
    logits = torch.randn(len(prompt), len(tokenizer))
    logits[-1, tokenizer.eos_token_id] = 50.0  # the end of turn is the likeliest next token
    prompt_scores = score(logits[:-1], prompt[1:], 2)
    ending = score(logits[-1:], [tokenizer.eos_token_id], 2)
    lp = completion_logprobs(tokenizer, prompt, prompt_scores, ending, echo=True)
    assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["tokens"][-1] == "<|im_end|>"
    assert lp["top_logprobs"][-1]["<|im_end|>"] == max(lp["top_logprobs"][-1].values())  # greedy, exactly
    assert [lp["token_logprobs"][i] for i in range(1, len(prompt))] == [s.logprob for s in prompt_scores]
    assert completion_logprobs(tokenizer, prompt, [], ending, echo=False)["tokens"] == ["<|im_end|>"]
