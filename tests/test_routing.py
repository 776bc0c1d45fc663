"""The serving path's LoRA routing computes what PEFT's own forward computes: logits within 1e-5
(fp32) for one adapter, a mix of adapters and the base, in a prefill and in decode steps, and the
same greedy answers from the engine's batch as from PEFT's ``generate``. Trains nothing: two random
adapters on the tiny model."""

from __future__ import annotations

import pytest
import torch

from studio.inference.playground import BASE_ADAPTER


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(base, config, adapter_name="a1")
    model.add_adapter("a2", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the update would be nothing
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _peft_logits(model, names, ids):
    """PEFT's own forward: one adapter with set_adapter, several (or the base) with adapter_names."""
    if set(names) == {BASE_ADAPTER}:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    if len(set(names)) == 1:
        model.set_adapter(names[0])
        return model(input_ids=ids).logits
    return model(input_ids=ids, adapter_names=names).logits


@pytest.mark.parametrize(
    "names",
    [["a1"] * 3, ["a2"] * 3, [BASE_ADAPTER] * 3, ["a1", BASE_ADAPTER, "a2"], ["a2", "a1", "a1"]],
    ids=["one adapter", "a narrower adapter", "base", "mixed with the base", "two adapters"],
)
@torch.no_grad()
def test_routed_logits_equal_peft_forward(two_adapters, names):
    from studio.serving.routing import routed

    model, _ = two_adapters
    ids = torch.randint(3, 300, (3, 11), generator=torch.Generator().manual_seed(5))
    expected = _peft_logits(model, names, ids)
    with routed(model, names) as route:
        got = model(input_ids=ids).logits
        route.set_rows(list(reversed(names)))  # the rows change (a join or a leave): new masks
        flipped = model(input_ids=ids.flip(0)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flipped, expected.flip(0), atol=1e-5, rtol=1e-5)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert not any("forward" in vars(m) or hasattr(m, "_fs_group") for m in layers)  # PEFT's forward is back
    model.set_adapter("a1")


@torch.no_grad()
def test_the_batch_decodes_what_peft_generate_decodes(two_adapters):
    """Greedy answers from the engine's batch (routing, left padding, a cache per row) equal
    PEFT's generate for each row alone, each adapter and the base in one batch."""
    from studio.inference.playground import SamplingSettings
    from studio.serving.batch import Batch
    from studio.serving.engine import Request

    model, tokenizer = two_adapters

    class Pg:  # what Batch reads from a playground
        pass

    pg = Pg()
    pg.model, pg.tokenizer, pg.device = model, tokenizer, "cpu"
    pg.eos_ids = lambda: set()
    pg.adapters = {}
    prompts = [[5, 9, 31, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100, 7]]
    names = ["a1", BASE_ADAPTER, "a2"]
    requests = [
        Request(f"r{i}", None, p, SamplingSettings(max_new_tokens=12, temperature=0)) for i, p in enumerate(prompts)
    ]
    batch = Batch(pg, "fp32")
    try:
        batch.join(requests, names, [None] * 3)
        while batch.rows:
            batch.step()
    finally:
        batch.close_route()
    for request, name in zip(requests, names):
        ids = torch.tensor([request.prompt_ids])
        kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                expected = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1] :].tolist()
        else:
            model.set_adapter(name)
            expected = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1] :].tolist()
        assert request.output_ids == expected, name
    model.set_adapter("a1")


@torch.no_grad()
def test_fp32_adapters_on_a_bf16_base_are_at_least_as_exact_as_peft_under_autocast(tiny_model_dir):
    """A LoRA run in bf16 loads its base in bf16 and keeps fp32 adapters; routing computes their
    update in fp32 (PEFT's own numbers without autocast) rather than autocast's bf16, which is
    ~7x slower on CPU. Against the all-fp32 model it errs no more than PEFT under autocast does."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from studio.serving.routing import routed

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="a1")
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    reference.eval()
    half = copy.deepcopy(reference)
    for name, p in half.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    exact = reference(input_ids=ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft = half(input_ids=ids).logits.float()
        with routed(half, ["a1", "a1"]):
            ours = half(input_ids=ids).logits.float()
        # The routed layers switch autocast off for their fp32 update and back on after it.
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert (ours - exact).abs().max() <= (peft - exact).abs().max() * 1.05
    assert (ours - exact).abs().max() < 0.1
