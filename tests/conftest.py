"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, built once per session."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest

from tests.helpers import write_csv

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (Path(__file__).resolve().parents[1] / "studio" / "templates" / "chatml.jinja").read_text(encoding="utf-8")
WORDS = (
    "the capital of france is paris answer why what colour sky blue grass green plus times "
    "equals number one two three four five six seven eight nine ten hello world model data"
).split()


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama saved with save_pretrained, plus a BPE tokenizer with ChatML."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus() + ["system user assistant\n"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )  # big enough that LoRA moves the logits in a few steps
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


CHROMIUM = "/usr/bin/chromium"  # Debian's (make browser-deps); playwright downloads no browser here


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for the browser tests, one per test module."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: run `make browser-deps` (make test does it).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--disable-gpu", "--disable-quic"])
        yield b
        b.close()


def pytest_addoption(parser):
    parser.addoption(
        "--precision",
        choices=("auto", "bf16", "fp32", "other"),
        default="auto",
        help="What training.precision `auto` means in this session: the machine's choice (auto), "
        "forced to bf16 or fp32, or `other`: the one this machine would not pick. `make test` "
        "runs the numeric tests again with `other`, so both precisions are covered on any CPU.",
    )


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs JOBS workers) each worker gets its share of the cores
    for torch's threads, and its child processes (CLI, torchrun) inherit it: two workers that each
    spin two OpenMP threads on two cores slow each other down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    _share_the_cores()
    from studio.planning import hardware, precision

    choice = config.getoption("--precision")
    machine = precision.resolve("auto", hardware.detect().bf16) if choice in ("auto", "other") else None
    if choice == "other":
        choice = "fp32" if machine == "bf16" else "bf16"
    if choice != "auto":
        os.environ[precision.AUTO_ENV] = choice  # subprocesses (CLI tests) inherit it


def pytest_report_header(config):
    from studio.planning import hardware, precision

    forced = os.environ.get(precision.AUTO_ENV)
    return f"training.precision auto -> {precision.resolve('auto', hardware.detect().bf16)}" + (
        f" (forced by {precision.AUTO_ENV})" if forced else " (this machine's choice)"
    )


class _NotAUnitTest(AssertionError):
    pass


@contextlib.contextmanager
def _refusing_training_and_processes():
    """Backward passes and process starts raise while inside (see the hooks below)."""
    import multiprocessing
    import subprocess

    import torch

    def refuse(what):
        def fail(*args, **kwargs):
            raise _NotAUnitTest(f"a `unit` test {what}: drop its `unit` marker (it is an integration test)")

        return fail

    patches = [
        (torch.autograd, "backward", refuse("ran a backward pass (trained)")),
        (torch.Tensor, "backward", refuse("ran a backward pass (trained)")),
        (subprocess.Popen, "__init__", refuse("started a process")),
        (multiprocessing.process.BaseProcess, "start", refuse("started a process")),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, replacement in patches:
            setattr(obj, name, replacement)
        yield
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)


def _guarded(item):
    """A test marked ``unit`` must train nothing and start no process (tests/README.md), in its
    body and in every fixture its setup builds (a module or session fixture that trains counts:
    a unit test that needs one is not a unit test). So the marker cannot drift from the truth."""
    return _refusing_training_and_processes() if item.get_closest_marker("unit") else contextlib.nullcontext()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _guarded(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _guarded(item):
        yield


@pytest.fixture
def instruction_csv(tmp_path) -> Path:
    rng = random.Random(1)
    rows = []
    for _ in range(40):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append([f"what is {a} plus {b}", f"answer {a + b} why {a} plus {b} equals {a + b}"])
    return write_csv(tmp_path / "train.csv", ["instruction", "output"], rows)


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def trained_tiny_run(tiny_model_dir, tmp_path_factory):
    """A finished 6-step LoRA run of the tiny model (4 held-out rows), trained once per session for
    the tests that chat with, evaluate or export a run: ``Studio(run.path.parent)`` lists it.
    Tests may add files to it (zips, an evaluation) but must not create runs next to it."""
    from studio.runs.registry import RunRegistry
    from studio.training import run_training
    from tests.helpers import tiny_run_config

    root = tmp_path_factory.mktemp("trained-tiny")
    rows = [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 9) for b in range(1, 6)]
    data = write_csv(root / "train.csv", ["instruction", "output"], rows)
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=6, memory_check=False)
    run = RunRegistry(root / "runs").create(cfg)
    assert run_training(cfg, run).state == "finished"
    return run
