"""Write a saved Hugging Face causal LM folder as one GGUF file for llama.cpp, Ollama and LM Studio.

Built on the ``gguf`` package (gguf-py: MIT, released with llama.cpp by its maintainers, pure
Python, works offline): ``GGUFWriter`` writes the file, its tensor-name map gives llama.cpp's
tensor names, its numpy quantisers write the Q8_0 and Q4_0 blocks, and ``SpecialVocab`` reads the
merges and special tokens. llama.cpp's own converter (``convert_hf_to_gguf.py``) is not on PyPI (it
needs a llama.cpp checkout, which is what Unsloth builds); no other maintained package on PyPI
converts. What is left to us is the handful of rules llama.cpp's converter applies to this family:

- Llama and Mistral store Q and K in the "rotate half" order of ``transformers``; llama.cpp's
  ``llama`` architecture wants each head's rotary pairs interleaved, so those two weights are
  permuted (transformers permutes them back when it reads the file). Qwen2 needs no permutation.
- A tied output layer is not written: llama.cpp reuses ``token_embd``.
- Norms and biases stay float32 (llama.cpp computes them in float32 anyway).
- The tokenizer is llama.cpp's ``gpt2`` (byte-level BPE) model plus a pre-tokenizer name that
  says how text is split before the merges.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` with byte-level BPE
tokenizers (SmolLM, Llama 3, Qwen2 and plain GPT-2-style vocabularies), without rope scaling.
Anything else is refused with a sentence before a byte is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ARCHITECTURES = {  # transformers class -> llama.cpp architecture name
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # llama.cpp runs Mistral as llama (as its converter does)
    "Qwen2ForCausalLM": "qwen2",
}
PERMUTED_ARCHS = ("llama",)  # architectures whose Q/K rotary layout llama.cpp interleaves

# name -> (type of 2-D weights, type of the embedding and output layer, llama.cpp file type)
QUANTS = {
    "f16": ("F16", "F16", "MOSTLY_F16"),
    "bf16": ("BF16", "BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    # llama.cpp's own Q4_0 keeps the output layer at 6 bits; gguf-py cannot write Q6_K, so the
    # embedding and output layer stay Q8_0 (a tied embedding is the output layer too).
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")

# How llama.cpp names a tokenizer's pre-tokenizer: it encodes a fixed check text and looks up the
# sha256 of the token ids (convert_hf_to_gguf.py, get_vocab_base_pre). The three families we
# support are listed with llama.cpp's hashes; the text must stay byte for byte as llama.cpp has it.
PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
# A vocabulary of our own (a fine-tune that retrained the tokenizer, the tests' tiny model) has no
# known hash; its pre-tokenizer is then named by its split rule, when it is one llama.cpp has.
GPT2_PRE = "gpt-2"  # a plain byte-level pre-tokenizer: GPT-2's split rule
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_RULES = {  # Split regex before a regex-free ByteLevel -> llama.cpp's name for it
    _WORDS + r"\p{N}" + _REST: "qwen2",  # digits one by one
    _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # Llama 3: up to three digits together
}


class GgufError(ValueError):
    """The model cannot be written as GGUF; the message says why and what is supported."""


@dataclass(frozen=True)
class GgufInfo:
    """What was written, for the parity check, the Modelfile and the README."""

    path: Path
    quant: str
    architecture: str
    pre_tokenizer: str
    tensors: int
    bytes: int


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise GgufError(f"Unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}.")
    return quant


def supported_architecture(config: dict) -> str:
    """llama.cpp's architecture name for a config.json, or GgufError naming what is supported."""
    declared = (config.get("architectures") or ["(none)"])[0]
    arch = ARCHITECTURES.get(declared)
    if arch is None:
        raise GgufError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is {declared}. "
            "Export the merged model instead and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = (
        scaling.get("rope_type") or scaling.get("type") or (config.get("rope_parameters") or {}).get("rope_type")
    )
    if rope_type not in (None, "default"):
        raise GgufError(
            f"This model uses {rope_type!r} rope scaling, which the GGUF export does not write yet "
            "(it could not be checked against the trained model). Export the merged model instead."
        )
    return arch


def rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a (fast) byte-level BPE tokenizer, or GgufError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_json = json.loads(backend.to_str()) if backend is not None else {}
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(pre):
        raise GgufError(
            "GGUF export supports byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2); this model's "
            "tokenizer is a SentencePiece-style one. Export the merged model instead and convert it "
            "with llama.cpp's convert_hf_to_gguf.py."
        )
    ids = tokenizer.encode(PRE_CHECK_TEXT, add_special_tokens=False)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[digest]
    from studio.data.tokens import GPT2_PATTERN, split_regex

    rule = split_regex(tokenizer_json)
    if rule == GPT2_PATTERN:
        return GPT2_PRE
    if rule in SPLIT_RULES:
        return SPLIT_RULES[rule]
    raise GgufError(
        "This tokenizer splits text in a way llama.cpp has no name for that we can verify "
        f"(check hash {digest[:12]}…), so llama.cpp would tokenize prompts differently from training. "
        "Export the merged model instead."
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, in id order, padded to the model's vocab size."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, types


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half Q/K rows -> llama.cpp's interleaved rotary pairs, per head."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> str:
    """The GGML type a tensor is written in: 1-D tensors float32; rows that do not fill whole
    32-value blocks float16 (as llama.cpp's converter does)."""
    weights, embeddings, _ = QUANTS[quant]
    if len(shape) < 2:
        return "F32"
    wanted = embeddings if gguf_name in EMBEDDING_NAMES else weights
    if wanted in ("Q8_0", "Q4_0") and shape[-1] % 32:
        return "F16"
    return wanted


def round_trip(weight: np.ndarray, gguf_name: str, quant: str) -> np.ndarray:
    """The float32 values a reader gets back for ``weight`` written as ``quant`` (for the parity
    check's expected logits)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[tensor_type(gguf_name, weight.shape, quant)]
    if qtype == GGMLQuantizationType.F32:
        return weight.astype(np.float32)
    return quants.dequantize(quants.quantize(weight.astype(np.float32), qtype), qtype).reshape(weight.shape)


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, n_layers: int):
    """gguf-py builds the whole map (every tensor of every block, by string formatting) on each
    call: 13 ms here, so once per tensor was 7 s of a 45 s export of the default model."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)


def gguf_tensor_name(arch: str, n_layers: int, hf_name: str) -> str:
    name = _tensor_name_map(arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GgufError(
            f"The weight {hf_name!r} has no place in llama.cpp's {arch} architecture; it cannot be exported."
        )
    return name


def write_gguf(
    model_dir: str | Path,
    out: str | Path,
    quant: str,
    *,
    name: str,
    chat_template: str | None,
    add_bos: bool,
    end_of_turn_id: int | None,
) -> GgufInfo:
    """Write the saved model in ``model_dir`` (config.json, safetensors, tokenizer) as one GGUF.

    ``chat_template`` is the run's exact template (stored as ``tokenizer.chat_template``);
    ``add_bos`` says whether a prompt starts with BOS added by the tokenizer (training did not add
    one unless the template writes it); ``end_of_turn_id`` is the token that ends an assistant turn.

    Raises:
        GgufError: the architecture, rope scaling, tokenizer or a weight is not supported.
    """
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    check_quant(quant)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = supported_architecture(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pre = pre_tokenizer_name(tokenizer)

    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    vocab_size = config["vocab_size"]
    context = config.get("max_position_embeddings", 2048)
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        context = min(context, config["sliding_window"])  # llama.cpp's llama has no sliding window

    writer = gguf.GGUFWriter(out, arch, use_temp_file=True)  # tensors spill to disk, not RAM
    if "mistral" not in name.lower():
        # transformers (5.23) reads a llama-architecture file whose general.name says "mistral" as a
        # Mistral model and then cannot map its tensors: the read-back would fail. The name is only
        # for display, so such a file goes without it.
        writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][2]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab_size)

    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.chat_template = chat_template  # the run's template, exactly as training used it
    special.add_special_token = {"bos": add_bos, "eos": False}
    special.add_to_gguf(writer, quiet=True)
    if end_of_turn_id is not None:
        writer.add_eot_token_id(end_of_turn_id)

    tied = bool(config.get("tie_word_embeddings", False))
    count = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="numpy" if _numpy_safe(file) else "pt") as f:
            for hf_name in f.keys():
                if tied and hf_name == "lm_head.weight":
                    continue
                weight = _as_float32(f.get_tensor(hf_name))
                gguf_name = gguf_tensor_name(arch, n_layers, hf_name)
                if arch in PERMUTED_ARCHS and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                    weight = _permute(weight, n_head)
                elif arch in PERMUTED_ARCHS and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                    weight = _permute(weight, n_kv)
                qtype = gguf.GGMLQuantizationType[tensor_type(gguf_name, weight.shape, quant)]
                data = gguf.quants.quantize(weight, qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
                count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return GgufInfo(out, quant, arch, pre, count, out.stat().st_size)


def _numpy_safe(file: Path) -> bool:
    """numpy cannot hold bfloat16, so a bf16 checkpoint is read through torch."""
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    return all(v.get("dtype") != "BF16" for k, v in header.items() if k != "__metadata__")


def _as_float32(tensor) -> np.ndarray:
    import numpy as np

    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    return tensor.float().numpy()
