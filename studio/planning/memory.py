"""Peak-memory estimate for full fine-tuning, LoRA and QLoRA, from the model's config alone.

No weights are loaded: the model is built on the meta device to read every linear layer's
shape (so LoRA targets and 4-bit quantization are counted exactly for any causal LM).
The estimate is a sum of parts a person can check:

    base weights   fp32 master weights (full), frozen base in the compute dtype (LoRA),
                   NF4 + double-quantized constants for linear layers, the rest in the
                   compute dtype (QLoRA; QLoRA paper)
    adapter        LoRA A and B in fp32: r x (d_in + d_out) per adapted layer
    gradients      fp32, one per trainable parameter
    optimizer      AdamW 8 B per trainable parameter (paged too); 8-bit AdamW 2 B (bitsandbytes)
    activations    what autograd keeps per token and layer (residual stream and norms in fp32,
                   projections in the compute dtype; Korthikanti et al.'s accounting, written
                   out for gated-MLP layers); with gradient checkpointing only each layer's
                   input plus one layer's worth. CUDA and CPU differ (CPU dropout keeps an
                   fp32 noise tensor, CUDA a 1-byte mask), so each has its own function
    logits         labeled positions x vocab: the logits, their fp32 copy, log-softmax and
                   gradient. The trainer runs the output layer only where a label is
                   (studio/training/loss.py); before the data is known every position counts
                   (``labeled_share`` 1), which over-estimates prompt/completion data
    retention      CPU only: memory the forward pass frees that glibc keeps resident
    overhead       on CUDA the context; on CPU the interpreter and libraries (measured once,
                   see ``CPU_RUNTIME_BYTES``)

Device aware: on CUDA it predicts ``torch.cuda.max_memory_allocated`` plus the context; on CPU
the training process's peak resident set size. ``benchmarks/estimator_accuracy.py`` measures
the CPU side on this machine, ``benchmarks/cuda_memory.py`` the CUDA side; the coefficients
below are explained where they are defined.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from studio.config import optimizer_for
from studio.formatting import GIB, MIB  # noqa: F401 - re-exported: sizes are computed here

# State bytes per trainable parameter (two moments); 8-bit state also keeps a small absmax per block.
OPTIMIZERS = {"adamw": 8.0, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "paged_adamw_32bit": 8.0}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks
CUDA_CONTEXT_BYTES = 500 * MIB
CPU_RUNTIME_BYTES = 500 * MIB  # python + torch + transformers + peft + pandas + tokenizer, measured here
# Of the forward pass's freed temporaries, glibc keeps this share resident. Fitted on this machine:
# 0.6 on benchmarks/results/cpu_memory.jsonl (full, and LoRA/QLoRA with dropout 0.05); adapters
# without dropout allocate fewer short-lived tensors and keep less: 0.42 on cpu_memory_dropout0.jsonl.
RETAINED_SHARE = 0.6
RETAINED_SHARE_NO_DROPOUT = 0.42


@dataclass
class Linear:
    name: str
    d_in: int
    d_out: int


@dataclass
class ModelShape:
    """What the estimate needs, read from a config on the meta device."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    q_dim: int
    kv_dim: int
    total_params: int
    embedding_params: int
    linears: list[Linear] = field(default_factory=list)  # every linear, lm_head included
    checkpoint_bytes_per_param: int = 2  # 4 when the weights on disk are fp32

    @property
    def lm_head(self) -> Linear | None:
        return next((lin for lin in self.linears if lin.name.split(".")[-1] in ("lm_head", "embed_out")), None)

    def lora_targets(self, targets: str | list[str]) -> list[Linear]:
        """The linears PEFT would adapt: all-linear means every linear but the output layer."""
        body = [lin for lin in self.linears if lin is not self.lm_head]
        if targets == "all-linear":
            return body
        names = set(targets)
        return [lin for lin in body if lin.name.split(".")[-1] in names]


@dataclass(frozen=True)
class Settings:
    """The settings memory depends on: a slice of RunConfig plus the batch the estimate assumes.

    A run's settings come from ``studio.planning.planner.settings_for``, the one place that reads
    them from a RunConfig.
    """

    seq_len: int  # tokens per row of the batch: max length, or the data's longest row
    batch_size: int  # rows per micro-batch on each device
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False  # the run's resolved precision is bf16 (autocast), else fp32
    lora_r: int = 16
    lora_targets: str | list[str] = "all-linear"
    lora_dropout: float = 0.0
    optimizer: str = "auto"  # training.optimizer; auto is decided per method and device (config.optimizer_for)
    labeled_share: float = 1.0  # of seq_len x batch_size positions; 1 until a batch is known
    devices: int = 1  # GPUs the run is launched on (torchrun / accelerate launch), each with batch_size rows
    sharded: bool = False  # with devices > 1: FSDP shards weights, gradients and optimizer state (else DDP)
    objective: str = "sft"  # dpo/orpo: each row of batch_size is a pair, two sequences in one forward


@dataclass
class Estimate:
    method: str
    device: str
    breakdown: dict[str, int]
    trainable_params: int
    total_params: int
    adapter_bytes: int  # size of the saved adapter (or model) on disk

    @property
    def total_bytes(self) -> int:
        return int(sum(self.breakdown.values()))

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def shape_from_config(config) -> ModelShape:
    """Instantiate on the meta device (no memory) and read the shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(Linear(name, module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (d_in, d_out)
            linears.append(Linear(name, module.weight.shape[0], module.weight.shape[1]))
    seen, total, embed = set(), 0, 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, torch.nn.Embedding):
                embed += p.numel()
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return ModelShape(
        config.model_type,
        config.vocab_size,
        hidden,
        layers,
        intermediate,
        heads * head_dim,
        kv_heads * head_dim,
        total,
        embed,
        linears,
        4 if "float32" in dtype else 2,
    )


def _cuda_activations(
    shape: ModelShape,
    method: str,
    tokens: int,
    a: int,
    targets: list[Linear],
    lora_dropout: float,
    gradient_checkpointing: bool,
    labeled: float,
) -> tuple[float, float, float]:
    """(activations, logits, 0) on CUDA; checked against max_memory_allocated on an H100
    (benchmarks/results/cuda_memory_h100*.jsonl: full -5..0%, LoRA 0..+18%, QLoRA -16..+19%)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    # Per token and layer, what autograd keeps for the backward pass:
    #   fp32: residual stream into each of the two norms, the norm's normalised copy (2 x 2h x 4 B)
    #   compute dtype: norm outputs cast for the projections (2h), q/k/v and their rotary
    #   copies (2q + 3kv), attention output (q), gated MLP: gate, up, act(gate), act*up (4i)
    per_layer = 16 * h + a * (2 * h + 3 * q + 3 * kv + 4 * i)
    if method != "full" and lora_dropout > 0:
        # each adapted layer keeps its dropped-out input (compute dtype) and the dropout mask (1 B)
        per_layer += sum((a + 1) * t.d_in for t in targets) / shape.layers
    if gradient_checkpointing:
        activations = tokens * (shape.layers * 4 * h + per_layer)  # layer inputs + one layer recomputed
    else:
        activations = tokens * shape.layers * per_layer
    # lm_head output (compute dtype), its fp32 upcast, log-softmax and the fp32 gradient.
    logits = labeled * shape.vocab * (a + 12)
    return activations, logits, 0.0


def _cpu_activations(
    shape: ModelShape,
    method: str,
    tokens: int,
    a: int,
    targets: list[Linear],
    lora_r: int,
    lora_dropout: float,
    gradient_checkpointing: bool,
    labeled: float,
) -> tuple[float, float, float]:
    """(activations, logits, allocator retention) for a process's peak RSS on CPU.

    Measured on the default model with saved_tensors_hooks and per-phase VmHWM (the numbers and
    probes are in the issue 4 note). Per token and layer, autograd keeps:
      full   both norms' input and normalised copy (16h), the q/k/v and gate/up inputs (2h),
             rotated q and k, v, attention output (2q + 2kv), gate, act(gate), up, act*up (4i)
      LoRA   the frozen base saves no inputs and no normalised copies (8h), act*up is not
             kept (3i); each adapted layer keeps its dropout noise and the dropped-out input
             (CPU dropout is x * noise, both in the compute dtype: 2a x d_in) and lora_A's
             output (a x r). QLoRA keeps the same (MatMul4Bit saves only the packed weight).
    The loss keeps log-softmax, and backward adds its gradient and the logits' (12 B per vocab
    entry in fp32), at the labeled positions only. glibc keeps part of what the forward frees resident (its dynamic mmap
    threshold moves large tensors into the heap, which fragments): a share of the forward's
    transient tensors fitted on this machine (see RETAINED_SHARE).
    """
    h, i, q, kv, L = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.layers
    d_in = sum(t.d_in for t in targets) / L  # per layer, over adapted linears
    d_out = sum(t.d_out for t in targets) / L
    if method == "full":
        per_layer = 16 * h + a * (2 * h + 2 * q + 2 * kv + 4 * i)
        final = 12 * h  # final norm and the lm_head input
    else:
        per_layer = 8 * h + a * (2 * q + 2 * kv + 3 * i) + a * lora_r * len(targets) / L
        if lora_dropout > 0:
            per_layer += 2 * a * d_in
        else:  # lora_A reads the layer inputs themselves: the norm outputs and act*up are kept
            per_layer += a * (2 * h + i)
        final = 4 * h
    # Freed again inside the forward: rotary temporaries, pre-rotary q/k, the norms' pow, o/down
    # outputs; with adapters also every adapted layer's base output, lora_B output and scaled
    # copy; QLoRA adds PEFT's defensive clone of the 4-bit layer's output.
    transient = a * (4.5 * (q + kv) + 4 * h)
    if method != "full":
        transient += a * (4 * h + i) + 3 * a * d_out
    if method == "qlora":
        transient += a * d_out
    layers_kept = 1 if gradient_checkpointing else L
    if gradient_checkpointing:
        activations = tokens * (L * 4 * h + per_layer + final)  # layer inputs + one layer recomputed
    else:
        activations = tokens * (L * per_layer + final)
    logits = labeled * shape.vocab * (a + 8)
    share = RETAINED_SHARE_NO_DROPOUT if method != "full" and lora_dropout == 0 else RETAINED_SHARE
    retained = share * tokens * layers_kept * transient
    return activations, logits, retained


def estimate(shape: ModelShape, method: str, settings: Settings, device: str = "cpu") -> Estimate:
    """Peak memory of training ``method`` with ``settings`` on ``device``, as a breakdown in bytes,
    per device. Build the settings of a run with ``studio.planning.planner.settings_for``.

    ``settings.labeled_share`` is the share of the batch x seq positions that carry a label (the
    only ones the output layer runs at); 1, the default, is the most a batch can need.

    With ``settings.devices`` > 1 every device runs ``batch_size`` rows. Replicated (DDP,
    ``sharded`` False) each holds everything, as one device does. Under FSDP the parameters,
    gradients and optimizer state are divided by ``devices``; activations are not, and each device
    also holds the unsharded weights of what is running: the root unit (embeddings and output
    layer) and two decoder layers (the running one and the one being prefetched).

    Example:
        >>> estimate(shape_for_model("default"), "lora", Settings(seq_len=512, batch_size=4)).total_bytes
    """
    s = settings
    optimizer = optimizer_for(s.optimizer, method, device)
    lora_r, lora_dropout, devices = s.lora_r, s.lora_dropout, s.devices
    gradient_checkpointing = s.gradient_checkpointing
    a = 2 if s.bf16 else 4  # bytes of an activation under autocast (bf16) or in fp32
    # A preference pair is two rows (chosen, rejected) through one forward.
    tokens = s.seq_len * s.batch_size * (1 if s.objective == "sft" else 2)
    labeled = tokens * min(max(s.labeled_share, 0.0), 1.0)
    P = shape.total_params
    targets = shape.lora_targets(s.lora_targets) if method != "full" else []
    lora_params = sum(lora_r * (t.d_in + t.d_out) for t in targets)

    if method == "full":
        weights, trainable = 4 * P, P
    elif method == "lora":
        weights, trainable = a * P, lora_params
    else:
        quantized = sum(lin.d_in * lin.d_out for lin in shape.linears if lin is not shape.lm_head)
        # What stays unquantized (embeddings, output layer, norms) stays in the compute dtype.
        weights, trainable = NF4_BYTES_PER_PARAM * quantized + a * (P - quantized), lora_params
    adapter = 4 * lora_params
    grads = 4 * trainable
    opt = OPTIMIZERS[optimizer] * trainable

    saved = 4 * P if method == "full" else adapter
    gathered = 0
    if s.sharded and devices > 1:
        weight_bytes = 4 if method == "full" else a  # full fine-tuning keeps fp32 parameters
        head = shape.lm_head.d_in * shape.lm_head.d_out if shape.lm_head else 0
        per_layer = (P - shape.embedding_params - head) / max(shape.layers, 1)
        gathered = weight_bytes * ((P - per_layer * shape.layers) + 2 * per_layer)  # root unit + two layers
        weights, adapter, grads, opt = weights / devices, adapter / devices, grads / devices, opt / devices

    if device == "cuda":
        activations, logits, retained = _cuda_activations(
            shape, method, tokens, a, targets, lora_dropout, gradient_checkpointing, labeled
        )
    else:
        activations, logits, retained = _cpu_activations(
            shape, method, tokens, a, targets, lora_r, lora_dropout, gradient_checkpointing, labeled
        )
        if method == "qlora":
            # On CPU the checkpoint file stays memory-mapped (resident) next to the NF4 copy.
            weights += shape.checkpoint_bytes_per_param * P

    # The peak is the larger of two moments. During forward/backward: weights, optimizer state
    # (from the previous step), activations and logits (gradients fill in as activations are
    # freed, so they are not added on top). During optimizer.step(): weights, gradients, state,
    # and torch's foreach AdamW's temporary copy of the trainable parameters (measured: full
    # fine-tuning peaks at 20 B/param on an H100, not 16). On CUDA the trainer uses the fused
    # AdamW, which updates in place, as bitsandbytes' optimizers do.
    foreach = optimizer == "adamw" and device != "cuda"
    step_temp = (4 * trainable if foreach else 0) / (devices if gathered else 1)
    step_phase = grads + step_temp
    # dpo and kto score the answers with the reference too, under no_grad, while the policy's
    # log-probabilities wait for backward: a logits-sized transient at the peak for full
    # fine-tuning's frozen copy, about half that for an adapter switched off (fitted on the default
    # model, CPU, benchmarks/results/cpu_memory_dpo.jsonl: without it the estimate was 4-21% under).
    reference_pass = 0.0
    if s.objective in ("dpo", "kto"):
        reference_pass = logits * (1.0 if method == "full" else 0.5)
    fb_phase = activations + logits + retained + reference_pass
    if step_phase > fb_phase:  # report the moment that sets the peak
        activations, logits, retained, reference_pass = 0, 0, 0, 0
        extra = {"optimizer_step_temp": int(step_temp)}
    else:
        grads, extra = 0, {}
    if reference_pass:
        extra["reference_pass"] = int(reference_pass)
    if device != "cuda":
        extra["allocator_retention"] = int(retained)
    if gathered:
        extra["gathered_weights"] = int(gathered)
    if s.objective == "dpo" and method == "full":
        # Full fine-tuning's DPO reference is a frozen fp32 copy of the starting model
        # (studio/training/objectives.py); an adapter's reference is the base with it switched off.
        extra["reference_weights"] = int(4 * P / (devices if gathered else 1))
    breakdown = {
        "base_weights": int(weights),
        "adapter_weights": int(adapter),
        "gradients": int(grads),
        "optimizer_state": int(opt),
        "activations": int(activations),
        "logits": int(logits),
        **extra,
        "runtime_overhead": CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES,
    }
    return Estimate(method, device, breakdown, int(trainable), P, int(saved))


@functools.lru_cache(maxsize=8)
def shape_for_model(model: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of a model reference (default, hub id or folder): reads only its config.

    Raises:
        ModelError: the model or its config cannot be found or read.
    """
    from transformers import AutoConfig

    from studio import models

    ref = models.resolve(model)
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise models.ModelError(
            f"Could not read the config of model {model!r}: {str(exc).splitlines()[0][:200]}. Check the name or folder."
        ) from None
    return shape_from_config(config)
