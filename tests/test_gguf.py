"""GGUF export on the tiny model: the file transformers reads back, its metadata, the Modelfile, the
parity check (and that it catches a wrong file), the three supported architectures and the refusals."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from studio.export.chat_format import NoRoleFormat, RoleFormat, derive, modelfile, role_format, stop_strings, verify
from studio.export.gguf_convert import GgufError, pre_tokenizer_name, supported_architecture, write_gguf
from studio.export.gguf_export import export_gguf, gguf_name, read_parity
from studio.export.gguf_parity import Parity, check
from studio.export.zips import ExportError
from tests.test_export import _train

CHATML = RoleFormat(
    begin="",
    system_prefix="<|im_start|>system\n",
    system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
)


# The parity gates (f16: the same greedy answers) compare float32 computations; the adapter is
# trained in fp32 too, so the weights under test are the same whether or not this CPU has bf16.
FP32 = {"precision": "fp32"}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gguf"), tiny_model_dir, **FP32)


@pytest.fixture(scope="module")
def f16_zip(trained):
    return export_gguf(trained[1], "f16")


def _extract(zip_path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(name, dest)
    return dest / name


def _tokenizer(model_dir):
    from studio import models

    return models.load_tokenizer(str(model_dir))


# ---- the export ----------------------------------------------------------------------------------


def test_f16_zip_holds_the_gguf_modelfile_readme_and_parity(trained, f16_zip):
    _, run = trained
    assert f16_zip.name == f"{run.id}-v1-f16.gguf.zip" == gguf_name(run, "f16")
    assert not list(run.path.glob(".*.tmp")) and not list(run.path.glob(".gguf-*"))  # temp files gone
    with zipfile.ZipFile(f16_zip) as zf:
        names = zf.namelist()
        modelfile_text = zf.read("Modelfile").decode()
        readme = zf.read("README.md").decode()
    assert names == [f"{run.id}-v1-f16.gguf", "Modelfile", "README.md", "parity.json", "config.yaml"]
    assert modelfile_text.startswith(f"FROM ./{run.id}-v1-f16.gguf\n")
    assert f'TEMPLATE """{CHATML.go_template()}"""' in modelfile_text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile_text and "PARAMETER temperature 0" in modelfile_text
    assert "ollama create" in readme and "llama-cli" in readme and "same greedy answer on 3 of 3" in readme

    parity = Parity.from_dict(read_parity(f16_zip))
    assert parity.passed and parity.problems == []
    assert len(parity.prompts) == 3 and parity.greedy_same == 3
    assert parity.layout_diff <= 1e-5  # the file holds exactly the f16-rounded weights
    assert 0 < parity.max_logit_diff < 0.05 and parity.top1_agreement == 1.0 and parity.mean_kl < 1e-4
    assert parity.tokenizer_same and parity.template_same
    # The held-out prompts, templated as in training.
    assert all(p.prompt.startswith("<|im_start|>user\nwhat is") for p in parity.prompts)


def test_the_gguf_reads_back_with_the_runs_template_tokens_and_logits(trained, f16_zip, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run = trained
    path = _extract(f16_zip, tmp_path)
    tokenizer = _tokenizer(run.weights_dir())
    fields = GGUFReader(path).fields

    def value(key):
        field = fields[key]
        return field.contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value("tokenizer.ggml.eos_token_id") == im_end == value("tokenizer.ggml.eot_token_id")
    assert value("tokenizer.ggml.add_bos_token") is False  # training never added BOS outside the template

    # transformers' reader: the same template renders the same text, the same ids.
    read_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for messages in (
        [{"role": "user", "content": "what is 3 plus 4"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 1"}],
    ):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert read_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        assert (
            read_tok(text, add_special_tokens=False)["input_ids"]
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        )

    # And the read-back model gives the merged model's logits to float16 rounding.
    merged = _merged_reference(run)
    read_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer("what is 3 plus 4 answer 7")["input_ids"]])
    with torch.no_grad():
        a, b = merged(ids).logits, read_model(ids).logits
    assert (a - b).abs().max() <= 2e-3 * a.abs().max()


def _merged_reference(run):
    """base + adapter, in float32 (what the merged export is checked against)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run.config().model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run.weights_dir())).eval()


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "bf16"])
def test_quantised_types_pass_the_layout_check_and_report_their_cost(trained, quant):
    _, run = trained
    parity = Parity.from_dict(read_parity(export_gguf(run, quant)))
    assert parity.passed, parity.problems
    assert parity.layout_diff <= 1e-5  # exactly the rounding the type explains
    assert parity.tokenizer_same and parity.template_same
    if quant == "q8_0":
        assert parity.top1_agreement >= 0.9
    assert parity.max_logit_diff > 0  # quantisation is not free, and the numbers say so


def test_a_wrong_file_is_not_offered(trained, monkeypatch, tmp_path):
    """Without llama.cpp's Q/K permutation the file loads and runs, but answers differently: the
    parity check must catch it, and no zip may be left behind."""
    import studio.export.gguf_convert as convert

    _, run = trained
    monkeypatch.setattr(convert, "_permute", lambda weight, n_head: weight)
    out = tmp_path / "wrong.gguf.zip"
    with pytest.raises(ExportError, match="not offered: read back, the file's logits differ"):
        export_gguf(run, "f16", out)
    assert not out.exists() and not list(run.path.glob(".gguf-*"))


def test_the_export_is_reused_until_the_run_changes(trained, f16_zip):
    _, run = trained
    before = f16_zip.stat().st_mtime_ns
    assert export_gguf(run, "f16") == f16_zip and f16_zip.stat().st_mtime_ns == before


def test_unknown_type_and_unfinished_run_are_sentences(trained, tiny_model_dir, tmp_path):
    from studio.runs.registry import RunRegistry
    from tests.helpers import tiny_run_config, write_csv

    _, run = trained
    with pytest.raises(ExportError, match="Unknown GGUF type 'q2_k'; choose one of f16, bf16, q8_0, q4_0"):
        export_gguf(run, "q2_k")
    data = write_csv(tmp_path / "d.csv", ["instruction", "output"], [["a", "b"]] * 4)
    queued = RunRegistry(tmp_path / "runs").create(tiny_run_config(tiny_model_dir, data))
    with pytest.raises(ExportError, match="no finished adapter"):
        export_gguf(queued, "f16")


def test_cli_exports_gguf_and_prints_the_parity(trained, capsys):
    from studio.cli import main

    registry, run = trained
    assert main(["export", run.id, "--gguf", "q8_0", "--runs-dir", str(registry.root)]) == 0
    out = capsys.readouterr().out
    assert f"{run.id}-v1-q8_0.gguf.zip" in out and "Parity with the merged model: q8_0: same greedy answer" in out


# ---- the three architectures, straight from a saved model ------------------------------------------


def _save_tiny(kind: str, tiny_model_dir: Path, out: Path) -> Path:
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        eos_token_id=tok.eos_token_id,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(1)
    if kind == "qwen2":  # biases on q/k/v, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=None))
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["llama-tied", "mistral", "qwen2"])
def test_each_supported_architecture_reads_back_exactly(kind, tiny_model_dir, tmp_path):
    model_dir = _save_tiny(kind, tiny_model_dir, tmp_path / kind)
    tokenizer = _tokenizer(model_dir)
    info = write_gguf(
        model_dir,
        tmp_path / f"{kind}.gguf",
        "f16",
        name=kind,
        chat_template=tokenizer.chat_template,
        add_bos=False,
        end_of_turn_id=tokenizer.eos_token_id,
    )
    assert info.architecture == ("qwen2" if kind == "qwen2" else "llama")
    # transformers tokenizes for a Qwen2 folder with Qwen2's own split rule, whatever tokenizer.json
    # says; the file must name the rule training used (llama.cpp's "qwen2"), not the JSON's.
    assert info.pre_tokenizer == ("qwen2" if kind == "qwen2" else "gpt-2")
    prompts = [tokenizer("what is 3 plus 4 answer 7 why")["input_ids"], tokenizer("answer 9")["input_ids"]]
    parity = check(
        model_dir, info.path, info.architecture, "f16", prompts, [tokenizer.eos_token_id], tokenizer.chat_template
    )
    assert parity.layout_diff <= 1e-5, parity.summary()
    assert parity.passed, parity.problems


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_unsupported_models_are_refused_with_what_is_supported(tiny_model_dir):
    with pytest.raises(
        GgufError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM .* GPT2LMHeadModel"
    ):
        supported_architecture({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(GgufError, match="'llama3' rope scaling"):
        supported_architecture({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3"}})
    assert supported_architecture({"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_type": "default"}})

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(GgufError, match="SentencePiece"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=spm))
    tokenizer = _tokenizer(tiny_model_dir)
    custom = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    custom.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])
    with pytest.raises(GgufError, match="no name for that we can verify"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=custom))


@pytest.mark.unit
def test_the_default_tokenizer_is_named_as_llama_cpp_names_it():
    """llama.cpp identifies SmolLM's tokenizer by the hash of a check text's token ids; ours must
    produce the same name, or llama.cpp would split prompts differently from training."""
    from transformers import AutoTokenizer

    from studio import models

    folder = Path(models.resolve("default"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert pre_tokenizer_name(tokenizer) == "smollm"


# ---- chat formats and the Modelfile ------------------------------------------------------------------


def _jinja(template: str, bos: str = "<s>", eos: str = "</s>"):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)

    def render(messages, add_generation_prompt):
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )

    return render


SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.unit
def test_role_formats_are_read_from_the_template_and_verified():
    chatml = derive(_jinja(open_chatml()))
    assert chatml == CHATML
    smol = derive(_jinja(SMOL))
    assert smol.default_system == "You are helpful." and smol.begin == ""
    verify(smol, _jinja(SMOL))
    llama3 = derive(_jinja(LLAMA3, bos="<|begin_of_text|>"))
    assert llama3.begin == "<|begin_of_text|>" and llama3.assistant_suffix == "<|eot_id|>"
    assert llama3.go_template().startswith("<|begin_of_text|>{{ if .System }}<|start_header_id|>system")
    with pytest.raises(NoRoleFormat, match="does not write each message once"):
        derive(_jinja(INST))


def open_chatml() -> str:
    from studio.models import CHATML_TEMPLATE

    return CHATML_TEMPLATE.read_text(encoding="utf-8")


@pytest.mark.unit
def test_the_go_template_is_ollamas_chatml():
    assert CHATML.go_template() == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
        "<|im_start|>assistant\n"
    )


@pytest.mark.unit
def test_stop_tokens_end_the_turn_training_ended(tiny_model_dir):
    """The Modelfile's stops are where a trained assistant turn ends: the first thing after the
    answer in the training text, each one a single special token."""
    from studio.data.render import render_with_spans

    tokenizer = _tokenizer(tiny_model_dir)
    fmt = role_format(tokenizer)
    stops = stop_strings(fmt, tokenizer)
    assert stops == ["<|im_end|>"]
    conv = [{"role": "user", "content": "what is 1 plus 2"}, {"role": "assistant", "content": "answer 3"}]
    text, spans = render_with_spans(conv, tokenizer)
    answer_end = text.index("answer 3") + len("answer 3")
    assert any(text[answer_end:].startswith(s) for s in stops)
    assert spans[-1][1] >= answer_end + len(stops[0])  # training taught the model to emit the stop
    assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1 for s in stops)


@pytest.mark.unit
def test_modelfile_says_plainly_when_it_has_no_template():
    text = modelfile(
        "m.gguf", None, "the template folds the system prompt into the first user turn", ["</s>"], None, {}
    )
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "")
    assert "# No TEMPLATE" in text and "folds the system prompt" in text and 'PARAMETER stop "</s>"' in text
    plain = modelfile("m.gguf", None, "plain text", ["</s>"], None, {}, plain_text=True)
    assert 'TEMPLATE """{{ .Prompt }}"""' in plain
    braces = RoleFormat("", "{{x}}", "", "", "", "", "", "")
    assert "cannot hold" in modelfile("m.gguf", braces, None, [], None, {})
    system = modelfile("m.gguf", CHATML, None, ["<|im_end|>"], "Answer in French.", {"temperature": 0})
    assert 'SYSTEM """Answer in French."""' in system


def test_full_fine_tune_and_plain_text_runs_export(tiny_model_dir, tmp_path):
    """A full fine-tune is its own merged model; a plain-text run gets a pass-through template and
    is checked on the first half of its held-out texts."""
    from studio.runs.registry import RunRegistry
    from studio.training import run_training
    from tests.helpers import tiny_run_config, write_csv

    _, full = _train(tmp_path, tiny_model_dir, "full", steps=3, **FP32)
    parity = Parity.from_dict(read_parity(export_gguf(full, "f16")))
    assert parity.passed and parity.greedy_same == len(parity.prompts) == 3

    data = write_csv(tmp_path / "text.csv", ["text"], [[f"the fox {a} jumps over {a + 1} dogs"] for a in range(40)])
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=3, memory_check=False, **FP32)
    run = RunRegistry(tmp_path / "runs-text").create(cfg)
    assert run_training(cfg, run).state == "finished"
    path = export_gguf(run, "q8_0")
    with zipfile.ZipFile(path) as zf:
        text = zf.read("Modelfile").decode()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "SYSTEM" not in text
    parity = Parity.from_dict(read_parity(path))
    assert parity.passed and all(p.prompt.startswith("the fox") for p in parity.prompts), parity.prompts
