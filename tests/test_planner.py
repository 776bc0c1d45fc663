"""The method picker: verdicts, the recommendation, suggested changes, and the CLI's plan."""

import json
from dataclasses import replace

import pytest
from transformers import LlamaConfig

from studio.cli import main
from studio.planning.hardware import CudaDevice, Hardware
from studio.planning.memory import GIB, estimate, shape_from_config
from studio.planning.planner import TIGHT_SHARE, Settings, plan

# A ~0.5B Llama: big enough that the methods differ by gigabytes, built on the meta device.
SHAPE = shape_from_config(
    LlamaConfig(
        vocab_size=32000,
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
)
SETTINGS = Settings(seq_len=512, batch_size=4, bf16=True)


def _cpu(available_bytes: int, bnb: str = "yes") -> Hardware:
    return Hardware(
        cpu_cores=2,
        ram_total_bytes=64 * GIB,
        ram_available_bytes=available_bytes,
        cpu_bf16=True,
        mps=False,
        bnb_4bit={"cpu": bnb},
    )


def _total(method: str, s: Settings = SETTINGS) -> int:
    return estimate(
        SHAPE, method, s.seq_len, s.batch_size, "cpu", bf16=s.bf16, gradient_checkpointing=s.gradient_checkpointing
    ).total_bytes


def test_everything_fits_on_a_big_machine_and_full_is_recommended():
    p = plan(SHAPE, _cpu(200 * GIB), SETTINGS)
    assert [m.verdict for m in p.methods] == ["fits", "fits", "fits"]
    assert p.recommended == "full" and p.suggestion is None
    assert "learning rate" in p.recommendation  # full fine-tuning wants a lower one: said up front
    full, lora = p.get("full").estimate, p.get("lora").estimate
    assert full.trainable_params == full.total_params and full.adapter_bytes == 4 * full.total_params
    assert 0 < lora.trainable_params < 0.05 * lora.total_params and lora.adapter_bytes < 0.05 * full.adapter_bytes


def test_full_does_not_fit_so_lora_is_recommended():
    full, lora = _total("full"), _total("lora")
    available = int(lora / TIGHT_SHARE) + GIB // 8  # LoRA fits comfortably, full does not
    assert lora < full and full > available
    p = plan(SHAPE, _cpu(available), SETTINGS)
    assert p.get("full").verdict == "no" and "more than" in p.get("full").reason
    assert p.recommended == "lora" and "adapter" in p.recommendation
    # Full fine-tuning here is bound by weights + gradients + AdamW state, which no batch,
    # length or checkpointing setting shrinks: so no change is suggested rather than a wrong one.
    assert p.get("full").estimate.breakdown.get("optimizer_step_temp", 0) > 0
    assert p.suggestion is None


def test_long_rows_full_almost_fits_and_the_suggested_change_really_fits():
    long = replace(SETTINGS, seq_len=2048, batch_size=8)
    checkpointed = _total("full", replace(long, gradient_checkpointing=True))
    assert checkpointed < 0.6 * _total("full", long)  # activation-bound: checkpointing matters
    available = int(checkpointed / TIGHT_SHARE) + 1
    p = plan(SHAPE, _cpu(available), long)
    assert p.get("full").verdict == "no"
    fix = p.suggestion
    assert fix.method == "full" and fix.changes == {"training.gradient_checkpointing": True}
    assert "gradient checkpointing" in fix.text
    assert fix.estimate_bytes == checkpointed <= TIGHT_SHARE * available


def test_smaller_micro_batch_keeps_the_effective_batch():
    long = replace(SETTINGS, seq_len=2048, batch_size=8, gradient_checkpointing=True)
    p = plan(SHAPE, _cpu(int(_total("lora", replace(long, batch_size=2)) / TIGHT_SHARE) + 1), long)
    fix = p.suggestion
    assert fix is not None and "training.batch_size" in fix.changes
    assert fix.changes["training.batch_size"] * fix.changes["training.gradient_accumulation"] == 8
    assert "same effective batch" in fix.text


def test_tight_when_over_85_percent():
    lora = _total("lora")
    p = plan(SHAPE, _cpu(int(lora / 0.92)), SETTINGS)
    assert p.get("lora").verdict == "tight"
    assert 0.85 < p.get("lora").share <= 1


def test_nothing_fits_says_so_and_still_finds_a_way():
    qlora = _total("qlora")
    p = plan(SHAPE, _cpu(int(qlora * 0.6)), SETTINGS)
    assert all(m.verdict == "no" for m in p.methods)
    assert p.recommended is None and "Nothing fits" in p.recommendation
    assert p.suggestion is not None and p.suggestion.estimate_bytes <= TIGHT_SHARE * p.available_bytes


def test_methods_that_cannot_run_say_why():
    mps = Hardware(
        cpu_cores=8,
        ram_total_bytes=32 * GIB,
        ram_available_bytes=30 * GIB,
        cpu_bf16=False,
        mps=True,
        bnb_4bit={"cpu": "yes", "mps": "bitsandbytes 4-bit is not available on MPS; use LoRA"},
    )
    p = plan(SHAPE, mps, SETTINGS)
    assert p.device == "mps"
    q = p.get("qlora")
    assert q.verdict == "n/a" and q.estimate is None and "MPS" in q.reason
    no_bnb = plan(SHAPE, _cpu(200 * GIB, bnb="bitsandbytes is not installed (pip install bitsandbytes)"), SETTINGS)
    assert no_bnb.get("qlora").verdict == "n/a" and "not installed" in no_bnb.get("qlora").reason


def test_cuda_plans_against_free_gpu_memory_not_ram():
    gpu = CudaDevice(0, "Test GPU", total_bytes=24 * GIB, free_bytes=23 * GIB, bf16=True, capability="8.9")
    hw = Hardware(
        cpu_cores=8,
        ram_total_bytes=256 * GIB,
        ram_available_bytes=250 * GIB,
        cpu_bf16=False,
        mps=False,
        cuda=[gpu],
        bnb_4bit={"cpu": "yes", "cuda": "yes"},
    )
    p = plan(SHAPE, hw, SETTINGS)
    assert p.device == "cuda" and p.available_bytes == 23 * GIB
    assert p.get("full").estimate.breakdown["runtime_overhead"] == 500 * 2**20  # the CUDA context
    assert json.loads(json.dumps(p.to_dict()))["methods"][0]["method"] == "full"


def test_estimate_cli_json_carries_the_plan(tiny_model_dir, capsys):
    assert (
        main(
            [
                "estimate",
                "--model",
                str(tiny_model_dir),
                "--method",
                "lora",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert {"total_bytes", "breakdown", "trainable_params", "adapter_bytes", "fits", "device", "verdict"} <= out.keys()
    assert out["fits"] is True and out["verdict"] == "fits"  # a 2-layer model fits anywhere
    assert [m["method"] for m in out["plan"]["methods"]] == ["full", "lora", "qlora"]
    assert out["plan"]["recommended"] == "full"


def test_estimate_cli_text_lists_every_method(tiny_model_dir, capsys):
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    for word in ("full", "lora", "qlora", "Recommended:"):
        assert word in out


@pytest.mark.parametrize("bad", ["./no-such-model", "/definitely/not/here"])
def test_estimate_cli_unknown_model_is_a_sentence(bad, capsys):
    assert main(["estimate", "--model", bad]) == 2
    err = capsys.readouterr().err
    assert "Could not estimate" in err and "Traceback" not in err


def _gpus(n: int, free_gib: int) -> Hardware:
    gpus = [CudaDevice(i, "Test GPU", (free_gib + 1) * GIB, free_gib * GIB, True, "9.0") for i in range(n)]
    return Hardware(
        cpu_cores=16,
        ram_total_bytes=256 * GIB,
        ram_available_bytes=200 * GIB,
        cpu_bf16=True,
        mps=False,
        bnb_4bit={"cuda": "yes", "cpu": "no"},
        cuda=gpus,
    )


def test_fsdp_divides_weights_gradients_and_optimizer_state_but_not_activations():
    s = dict(seq_len=512, batch_size=32, device="cuda", bf16=True)  # the forward/backward sets the peak
    one = estimate(SHAPE, "full", **s)
    assert one.breakdown["activations"] > 0
    ddp = estimate(SHAPE, "full", **s, devices=4)
    fsdp = estimate(SHAPE, "full", **s, devices=4, sharded=True)
    assert ddp.breakdown == one.breakdown  # DDP: every GPU holds everything
    for part in ("base_weights", "optimizer_state"):
        assert fsdp.breakdown[part] == pytest.approx(one.breakdown[part] / 4, rel=1e-6)
    assert fsdp.breakdown["activations"] == one.breakdown["activations"]
    # Each GPU also holds what is running unsharded: the embeddings/output layer and two layers.
    per_layer = (SHAPE.total_params - SHAPE.embedding_params - SHAPE.vocab * SHAPE.hidden) / SHAPE.layers
    assert fsdp.breakdown["gathered_weights"] == pytest.approx(
        4 * (2 * SHAPE.vocab * SHAPE.hidden + 2 * per_layer), rel=0.01
    )
    assert fsdp.adapter_bytes == one.adapter_bytes  # what is saved does not shrink
    assert fsdp.total_bytes < ddp.total_bytes


def test_the_plan_says_when_sharding_is_what_makes_a_method_fit():
    """Full fine-tuning of the 0.5B shape needs ~9 GiB per GPU replicated and ~5.6 sharded: on four
    8 GiB GPUs it fits only sharded, and the recommendation says how to launch it; LoRA fits
    replicated."""
    settings = replace(SETTINGS, devices=4)
    p = plan(SHAPE, _gpus(4, 8), settings)
    full = p.get("full")
    assert (
        full.sharded
        and full.verdict == "fits"
        and "sharded with FSDP" in full.reason
        and "each of 4 GPUs" in full.reason
    )
    assert p.recommended == "full" and "--distributed fsdp" in p.recommendation
    assert not p.get("lora").sharded  # it fits as it is: no need to shard
    assert p.to_dict()["methods"][0]["sharded"] is True
    # One of those GPUs alone: full fine-tuning does not fit.
    assert plan(SHAPE, _gpus(1, 8), SETTINGS).get("full").verdict == "no"


def test_cli_estimates_per_device(capsys):
    assert (
        main(["estimate", "--method", "full", "--device", "cuda", "--devices", "4", "--distributed", "fsdp", "--json"])
        == 0
    )
    fsdp = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--method", "full", "--device", "cuda", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert fsdp["breakdown"]["optimizer_state"] * 4 == pytest.approx(one["breakdown"]["optimizer_state"], rel=1e-6)
    assert "gathered_weights" in fsdp["breakdown"]
