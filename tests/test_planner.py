"""The method picker: verdicts, the recommendation, suggested changes, the CLI's plan, and the one
way its settings are built (settings_for) for every caller."""

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import LlamaConfig

from studio.cli import build_parser, main
from studio.config import RunConfig, flag_name, leaf_fields
from studio.planning.hardware import CudaDevice, Hardware
from studio.planning.memory import GIB, estimate, shape_from_config
from studio.planning.planner import TIGHT_SHARE, Settings, plan, settings_for
from studio.planning.precision import AUTO_ENV

pytestmark = pytest.mark.unit

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
    return estimate(SHAPE, method, s, "cpu").total_bytes


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
    s = dict(seq_len=512, batch_size=32, bf16=True)  # the forward/backward sets the peak
    one = estimate(SHAPE, "full", Settings(**s), "cuda")
    assert one.breakdown["activations"] > 0
    ddp = estimate(SHAPE, "full", Settings(**s, devices=4), "cuda")
    fsdp = estimate(SHAPE, "full", Settings(**s, devices=4, sharded=True), "cuda")
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


# ---- one way to build the settings: settings_for ---------------------------------------------

STUDIO = Path(__file__).resolve().parents[1] / "studio"
# Every estimate of a run goes through settings_for: the Train tab's plan, the memory check before
# training, the retry offered after running out of memory, and `finetune-studio estimate`.
CALLERS = {
    "service.py": "Studio.memory_plan",
    "training/memory_check.py": "check_memory",
    "planning/planner.py": "retry_after_oom",
    "cli.py": "_estimate",
}


def _calls(node: ast.AST, name: str) -> bool:
    """``node`` is a call of ``name`` (``name(...)`` or ``module.name(...)``)."""
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == name)
        or (isinstance(node.func, ast.Attribute) and node.func.attr == name)
    )


def _own_nodes(scope: ast.AST):
    """The nodes of a module or function, nested functions yielded but not entered (their own scope)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _patched_settings(tree: ast.AST) -> list[tuple[str, int]]:
    """(function, line) of every ``replace(...)`` whose first argument is a ``settings_for(...)``
    call, or a name assigned from one in that function or a function around it."""
    found = []

    def visit(scope, name: str, inherited: set[str]) -> None:
        nodes = list(_own_nodes(scope))
        names = set(inherited)
        for node in nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and _calls(node.value, "settings_for"):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
        for node in nodes:
            if _calls(node, "replace") and node.args:
                first = node.args[0]
                if _calls(first, "settings_for") or (isinstance(first, ast.Name) and first.id in names):
                    found.append((name, node.lineno))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(node, getattr(node, "name", "<lambda>"), names)

    visit(tree, "<module>", set())
    return found


def _function(tree: ast.Module, qualname: str) -> ast.AST | None:
    """A module's function or method by dotted name (``Studio.memory_plan``)."""
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def test_the_checker_finds_settings_patched_with_replace():
    """The source test below is only as good as its checker: it sees a patch written any of these
    ways, and leaves alone the changes suggest() explores from settings it was handed."""
    code = """
import dataclasses
from dataclasses import replace

def direct(config, hw):
    return plan(shape, hw, replace(settings_for(config, hw), seq_len=300))

def through_a_name(config, hw):
    settings = planner.settings_for(config, hw)
    settings = dataclasses.replace(settings, devices=4)

def in_a_closure(config, hw):
    s = settings_for(config, hw)
    def inner():
        return replace(s, bf16=True)
    return inner

def exploring(settings):
    return replace(settings, gradient_checkpointing=True)
"""
    assert sorted(name for name, _ in _patched_settings(ast.parse(code))) == ["direct", "inner", "through_a_name"]


def test_no_caller_patches_what_settings_for_built():
    """settings_for takes what varies between callers (the measured seq length and batch, the
    devices, sharding) as arguments; a replace() on its result would be a fifth way to build them."""
    patched = [
        f"studio/{path.relative_to(STUDIO)}:{line} in {name}()"
        for path in sorted(STUDIO.rglob("*.py"))
        for name, line in _patched_settings(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not patched, "replace() on a settings_for result; pass the value to settings_for instead:\n" + "\n".join(
        patched
    )


def test_every_estimate_of_a_run_builds_its_settings_with_settings_for():
    for path, qualname in CALLERS.items():
        fn = _function(ast.parse((STUDIO / path).read_text(encoding="utf-8")), qualname)
        assert fn is not None, f"studio/{path} has no {qualname}: update CALLERS"
        assert any(_calls(n, "settings_for") for n in ast.walk(fn)), f"{qualname} (studio/{path}) skips settings_for"
    # ...and nothing else builds a Settings by hand.
    built = [
        f"studio/{path.relative_to(STUDIO)}:{node.lineno}"
        for path in sorted(STUDIO.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if _calls(node, "Settings")
    ]
    here = _function(ast.parse((STUDIO / "planning/planner.py").read_text(encoding="utf-8")), "settings_for")
    inside = [f"studio/planning/planner.py:{n.lineno}" for n in ast.walk(here) if _calls(n, "Settings")]
    assert built == inside and len(inside) == 1, built


def test_settings_for_reads_the_config_and_takes_what_the_config_cannot_know(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)  # `auto` precision: decided by the hardware here
    cfg = RunConfig.from_dict(
        {
            "data": {"max_length": 1024},
            "lora": {"r": 8, "targets": "q_proj, v_proj", "dropout": 0.1},
            "training": {
                "batch_size": 8,
                "gradient_accumulation": 2,
                "gradient_checkpointing": True,
                "optimizer": "adamw_8bit",
            },
        }
    )
    bf16_cpu = _cpu(64 * GIB)
    assert settings_for(cfg, bf16_cpu) == Settings(
        seq_len=1024,
        batch_size=8,
        gradient_accumulation=2,
        gradient_checkpointing=True,
        bf16=True,
        lora_r=8,
        lora_targets=["q_proj", "v_proj"],
        lora_dropout=0.1,
        optimizer="adamw_8bit",
    )
    measured = settings_for(cfg, bf16_cpu, seq_len=300, batch_size=3, labeled_share=0.4, devices=4, sharded=True)
    assert (measured.seq_len, measured.batch_size, measured.labeled_share) == (300, 3, 0.4)
    assert (measured.devices, measured.sharded, measured.gradient_accumulation) == (4, True, 2)
    # `auto` precision follows the device estimated for: this CPU's bf16, a CUDA GPU's elsewhere.
    fp32_cpu = replace(bf16_cpu, cpu_bf16=False)
    assert not settings_for(cfg, fp32_cpu).bf16 and settings_for(cfg, fp32_cpu, "cuda").bf16
    assert not settings_for(cfg.with_overrides({"training.precision": "fp32"}), bf16_cpu).bf16


# A value unlike the default for every config field, valid all together (full fine-tuning, FSDP).
EVERY_FIELD = {
    "model": "some-org/some-model",
    "method": "full",
    "trust_remote_code": True,
    "data.path": "train.csv",
    "data.mapping": "q=prompt,a=response",
    "data.eval_fraction": 0.2,
    "data.eval_rows": 5,
    "data.eval_path": "eval.csv",
    "data.max_length": 256,
    "data.max_file_mb": 100,
    "lora.r": 8,
    "lora.alpha": 16,
    "lora.dropout": 0.1,
    "lora.targets": "q_proj,v_proj",
    "training.epochs": 2.0,
    "training.max_steps": 10,
    "training.learning_rate": 1e-4,
    "training.batch_size": 2,
    "training.gradient_accumulation": 3,
    "training.warmup_ratio": 0.1,
    "training.lr_scheduler": "linear",
    "training.weight_decay": 0.01,
    "training.max_grad_norm": 0.5,
    "training.precision": "fp32",
    "training.gradient_checkpointing": True,
    "training.compile": True,
    "training.memory_check": False,
    "training.eval_steps": 5,
    "training.early_stopping": 2,
    "training.save_steps": 7,
    "training.keep_checkpoints": 3,
    "training.keep_versions": 4,
    "training.seed": 7,
    "training.optimizer": "adamw",
    "training.packing": "off",
    "training.distributed": "fsdp",
    "training.objective": "orpo",
    "training.beta": 0.2,
    "training.orpo_lambda": 0.3,
    "training.kto_desirable_weight": 1.5,
    "training.kto_undesirable_weight": 0.5,
    "training.start_from": "some-run@v2",
}


def _flags(values: dict) -> list[str]:
    """Command-line flags for dotted config values."""
    text = {dotted: str(v).lower() if isinstance(v, bool) else str(v) for dotted, v in values.items()}
    return [x for dotted, v in text.items() for x in (f"--{flag_name(dotted)}", v)]


@pytest.mark.parametrize("dotted", [name for name, _, _ in leaf_fields()])
def test_estimate_takes_every_config_flag(dotted):
    assert dotted in EVERY_FIELD, f"a new config field: give {dotted} a value in EVERY_FIELD"
    value = EVERY_FIELD[dotted]
    args = build_parser().parse_args(["estimate", *_flags({dotted: value})])
    assert getattr(args, dotted) == value
    assert RunConfig().flat()[dotted] != value  # the value shows the flag, not the default


def test_every_estimate_flag_reaches_the_config_it_estimates(tiny_model_dir, monkeypatch, capsys):
    from studio.planning import planner

    seen = []
    real = planner.settings_for

    def spy(config, hw, device=None, **given):
        seen.append((config, given))
        settings = real(config, hw, device, **given)
        seen.append(settings)
        return settings

    monkeypatch.setattr(planner, "settings_for", spy)
    values = EVERY_FIELD | {"model": str(tiny_model_dir)}
    assert set(values) == {name for name, _, _ in leaf_fields()}
    assert main(["estimate", *_flags(values), "--devices", "2", "--json"]) == 0, capsys.readouterr().err
    (config, given), settings = seen
    assert config.flat() == values  # the RunConfig `train` would build from the same flags
    assert given == {"devices": 2, "sharded": True}  # --distributed fsdp
    assert (settings.seq_len, settings.batch_size, settings.gradient_accumulation) == (256, 2, 3)
    assert settings.gradient_checkpointing and not settings.bf16 and settings.optimizer == "adamw"
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "full" and out["trainable_params"] == out["total_params"]
    assert "gathered_weights" in out["breakdown"]  # estimated sharded across the two devices


def test_estimate_keeps_its_own_flags_and_reads_a_run_yaml(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--seq-len is max length; a bare --gradient-checkpointing turns it on; --config as train reads it."""
    from studio.planning import planner

    seen = []
    real = planner.settings_for
    monkeypatch.setattr(planner, "settings_for", lambda config, *a, **k: seen.append(config) or real(config, *a, **k))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        RunConfig.from_dict(
            {"model": str(tiny_model_dir), "method": "full", "training": {"batch_size": 8, "optimizer": "adamw_8bit"}}
        ).to_yaml()
    )
    argv = ["estimate", "--config", str(run_yaml), "--batch-size", "2", "--gradient-checkpointing", "--seq-len", "300"]
    assert main([*argv, "--json"]) == 0
    cfg = seen[-1]
    assert (cfg.model, cfg.method, cfg.data.max_length) == (str(tiny_model_dir), "full", 300)
    assert (cfg.training.batch_size, cfg.training.optimizer, cfg.training.gradient_checkpointing) == (
        2,
        "adamw_8bit",
        True,
    )
    assert json.loads(capsys.readouterr().out)["breakdown"]["optimizer_state"] > 0
    args = build_parser().parse_args(["estimate", "--gradient-checkpointing", "false", "--device", "cuda"])
    assert vars(args)["training.gradient_checkpointing"] is False and args.device == "cuda" and args.devices == 1
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "sgd"]) == 2
    assert "`method` must be one of" in capsys.readouterr().err  # the config's own sentence, as train says it
