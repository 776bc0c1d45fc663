"""The one run configuration shared by the UI, the CLI and YAML files.

Each field is followed by a docstring; that docstring is the single source for the CLI's
``--help`` text and the UI's tooltips (see :func:`field_help`). ``RunConfig.validate()``
returns every problem at once, each naming the field as the user sees it and the fix.

Example:
    >>> cfg = RunConfig.from_dict({"data": {"path": "train.csv"}, "method": "lora"})
    >>> cfg.validate()
    []
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("auto", "bf16", "fp32")
OBJECTIVES = ("sft", "dpo", "orpo", "kto")
DISTRIBUTED = ("ddp", "fsdp")
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
PACKING = ("auto", "on", "off")
LR_SCHEDULERS = ("cosine", "linear", "constant")  # after the warmup; names transformers' get_scheduler knows
# Full fine-tuning moves every weight, so it wants about a tenth of an adapter's learning rate.
DEFAULT_LEARNING_RATE = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}


def learning_rate_for(method: str, current: float) -> float:
    """The learning rate to keep after switching to ``method``: ``current`` when it was chosen by
    hand, the new method's default when it is still another method's default."""
    if current in DEFAULT_LEARNING_RATE.values() and current != DEFAULT_LEARNING_RATE[method]:
        return DEFAULT_LEARNING_RATE[method]
    return current


def optimizer_for(setting: str, method: str, device: str) -> str:
    """The optimizer a run steps with for a ``training.optimizer`` setting: ``auto`` is the QLoRA
    recipe's paged AdamW for QLoRA on a CUDA GPU (NF4 + double quantization + paged optimizer),
    torch's AdamW everywhere else."""
    if setting != "auto":
        return setting
    return "paged_adamw_32bit" if method == "qlora" and device == "cuda" else "adamw"


class ConfigError(ValueError):
    """Raised when a config cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class DataConfig:
    path: str = ""
    """CSV, JSONL, JSON or Parquet file with instruction/output or prompt/completion columns."""
    mapping: str = ""
    """Column roles as column=role pairs (roles: prompt, input, response, system, messages, text),
    e.g. question=prompt,answer=response; empty = detect."""
    eval_fraction: float = 0.1
    """Share of rows held out to measure eval loss (0 turns evaluation off); rows with the same
    prompt stay on one side."""
    eval_rows: int = 0
    """Hold out this many rows instead of a fraction (0 = use eval_fraction)."""
    eval_path: str = ""
    """A separate eval file with the same columns (replaces the held-out split)."""
    max_length: int = 512
    """Longest example in tokens; longer examples are cut from the end."""
    max_file_mb: int = 200
    """Largest dataset file accepted, in MB."""


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank; higher learns more and costs more memory."""
    alpha: int = 32
    """LoRA scaling numerator; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training; 0 is about 25% faster on CPU (PEFT's dropout costs a
    noise tensor per adapted layer) and 0.05-0.1 can help small datasets trained for many epochs."""
    targets: str = "all-linear"
    """Modules that get adapters: a comma list such as q_proj,v_proj, or all-linear."""

    def target_modules(self) -> str | list[str]:
        """The value PEFT's ``LoraConfig.target_modules`` expects."""
        if self.targets.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    """Passes over the training rows (ignored when max_steps is above 0)."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means use epochs."""
    learning_rate: float = DEFAULT_LEARNING_RATE["lora"]
    """Peak learning rate (2e-4 suits LoRA; use about 2e-5 for full fine-tuning)."""
    batch_size: int = 4
    """Examples per optimizer step on one device."""
    gradient_accumulation: int = 1
    """Micro-batches summed into one optimizer step (effective batch = batch_size x this)."""
    warmup_ratio: float = 0.05
    """Share of steps over which the learning rate ramps up from 0."""
    lr_scheduler: str = "cosine"
    """How the learning rate falls after the warmup: cosine (to 0, the usual choice), linear (to 0) or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are scaled down to this norm when above it (clipping keeps one bad batch from undoing
    training); 0 turns clipping off."""
    precision: str = "auto"
    """auto (bf16 autocast where the device supports it), bf16 or fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations during the backward pass: far less memory for long rows, about a third slower."""
    compile: bool = False
    """Compile each decoder layer with torch.compile: about 10% faster per step after roughly a minute of
    compiling (measured on CPU); worth it for runs longer than about ten minutes. Where compiling does
    not work the run trains uncompiled and says so."""
    memory_check: bool = True
    """Before training, run an optimizer step on the longest rows and measure peak memory; stop with
    a suggestion if the run would not fit."""
    eval_steps: int = 0
    """Measure eval loss every N steps (0 = only at the end)."""
    early_stopping: int = 0
    """Stop when eval loss has not improved for this many evaluations in a row (0 = off; needs eval_steps)."""
    save_steps: int = 0
    """Save a resumable checkpoint (weights, optimizer, scheduler, RNG) every N steps; 0 = every 10% of
    the run, at least 10 steps apart."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep on disk."""
    keep_versions: int = 0
    """How many of a run's latest versions (each final save: v1, v2, ...) to keep on disk; a deployed
    version is always kept. 0 = the default: 10 for LoRA/QLoRA (an adapter is megabytes), 2 for full
    fine-tuning (each version is a whole model)."""
    seed: int = 42
    """Random seed for the split, shuffling and adapter initialisation."""
    optimizer: str = "auto"
    """auto (paged_adamw_32bit for QLoRA on a CUDA GPU, the QLoRA recipe; adamw otherwise), adamw (torch's,
    fused on CUDA), adamw_8bit, paged_adamw_8bit or paged_adamw_32bit (bitsandbytes: 8-bit state is a
    quarter of the memory; paged state moves to RAM instead of running out of GPU memory on a spike)."""
    packing: str = "auto"
    """Fill each batch row with several examples up to max_length tokens, each example seeing only itself
    (per-example positions and attention): every step the same shape and no compute on padding.
    auto = on for CUDA GPUs, off on CPU (measured slower there); on; off (one example per row)."""
    distributed: str = "ddp"
    """Under torchrun / accelerate launch with several processes: ddp (a full copy of the model on
    every device) or fsdp (parameters, gradients and optimizer state sharded across the devices, so a
    model too big for one device can train on several). One process ignores it."""
    objective: str = "sft"
    """What the model learns: sft (to give the answers in the data), or from preference pairs (a prompt,
    a chosen and a rejected answer) which answer is better: dpo (the base with the adapter off, or a
    frozen copy for full fine-tuning, is the reference) or orpo (no reference model: a supervised term on
    the chosen answers plus an odds-ratio penalty on the rejected ones); or kto, from answers marked good
    or bad one by one (prompt, completion, label: thumbs up/down), or from pairs read that way."""
    beta: float = 0.1
    """dpo and kto: how far the model may move from the reference (higher keeps it closer)."""
    orpo_lambda: float = 0.1
    """orpo: the weight of the odds-ratio term against the supervised term on the chosen answers."""
    kto_desirable_weight: float = 1.0
    """kto: the weight of the answers marked good (raise it when good answers are much rarer than bad)."""
    kto_undesirable_weight: float = 1.0
    """kto: the weight of the answers marked bad."""
    start_from: str = ""
    """RUN@vN (or RUN, its latest version) of another LoRA/QLoRA run on the same base: this run's adapter
    starts as that one and trains on; with dpo that version is also the reference (the usual recipe:
    sft first, then dpo on preference pairs). Empty: a new adapter."""


@dataclass
class RunConfig:
    """Everything a run needs, shared by the UI form, the CLI flags and the YAML file.

    Each field's docstring is its help text everywhere. ``check()`` reports every problem at
    once (ConfigError), ``with_overrides({"training.epochs": 2})`` changes fields by dotted name,
    ``to_yaml``/``from_yaml`` round-trip, and ``flat()`` lists dotted names and values.
    """

    model: str = "default"
    """Base model: default (bundled SmolLM2-135M-Instruct), a hub id, or a local folder."""
    method: str = "lora"
    """full (all weights), lora (adapters on a 16/32-bit base) or qlora (adapters on a 4-bit NF4 base)."""
    trust_remote_code: bool = False
    """Run code shipped with the model; only for models you trust."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RunConfig":
        """Build a config from nested dicts; unknown keys raise ConfigError naming them."""
        problems: list[str] = []
        cfg = _build(cls, raw or {}, "", problems)
        if problems:
            raise ConfigError(problems)
        return cfg

    def flat(self) -> dict[str, Any]:
        """Every setting by dotted name (``training.epochs``), in declaration order."""
        return {name: _get(self, name) for name, _, _ in leaf_fields()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"Config file {p} does not exist; pass the path of a YAML file."])
        try:
            # libyaml's safe loader where PyYAML was built with it: ~10x faster than the pure-Python
            # one, and every API request reads its run's config.
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise ConfigError([f"{p} is not valid YAML: {exc}"]) from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError([f"{p} must hold a mapping of settings, found {type(raw).__name__}."])
        return cls.from_dict(raw)

    def with_overrides(self, overrides: dict[str, Any], skip_none: bool = True) -> "RunConfig":
        """A copy with dotted keys (``training.epochs``) replaced. None values are skipped (an
        unset CLI flag), or with ``skip_none=False`` checked like any value (an emptied form box
        is a mistake to report, not "the default")."""
        merged = self.to_dict()
        for dotted, value in overrides.items():
            if value is None and skip_none:
                continue
            node = merged
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        return RunConfig.from_dict(merged)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, check_data_file: bool = True) -> list[str]:
        """Every problem with this config, as sentences that name the field and the fix."""
        p: list[str] = []
        if not self.model.strip():
            p.append(
                "`model` is empty: use default, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, "
                "or a local folder."
            )
        if self.method not in METHODS:
            p.append(f"`method` must be one of {', '.join(METHODS)} (got {self.method!r}).")
        d, lo, t = self.data, self.lora, self.training
        if check_data_file:
            if not d.path:
                p.append("`data.path` is empty: choose a CSV, JSONL, JSON or Parquet file.")
            elif not Path(d.path).is_file():
                p.append(f"`data.path` {d.path} does not exist; check the path.")
        if check_data_file and d.eval_path and not Path(d.eval_path).is_file():
            p.append(f"`data.eval_path` {d.eval_path} does not exist; check the path or leave it empty.")
        if d.eval_rows < 0:
            p.append(f"`data.eval_rows` must be 0 (use eval_fraction) or more (got {d.eval_rows}).")
        if not 1 <= d.max_file_mb <= 100_000:
            p.append(f"`data.max_file_mb` must be between 1 and 100000 (got {d.max_file_mb}).")
        if not 0 <= d.eval_fraction < 0.5:
            p.append(f"`data.eval_fraction` must be at least 0 and below 0.5 (got {d.eval_fraction}).")
        if not 16 <= d.max_length <= 32768:
            p.append(f"`data.max_length` must be between 16 and 32768 tokens (got {d.max_length}).")
        if self.method in ("lora", "qlora"):
            if not 1 <= lo.r <= 256:
                p.append(f"`lora.r` must be between 1 and 256 (got {lo.r}).")
            if lo.alpha < 1:
                p.append(f"`lora.alpha` must be at least 1 (got {lo.alpha}).")
            if not 0 <= lo.dropout < 1:
                p.append(f"`lora.dropout` must be at least 0 and below 1 (got {lo.dropout}).")
            if not lo.target_modules():
                p.append("`lora.targets` is empty: use all-linear or a comma list such as q_proj,v_proj.")
        if t.max_steps < 0:
            p.append(f"`training.max_steps` must be 0 (use epochs) or more (got {t.max_steps}).")
        if t.max_steps == 0 and not 0 < t.epochs <= 100:
            p.append(f"`training.epochs` must be above 0 and at most 100 (got {t.epochs}).")
        if not 0 < t.learning_rate <= 0.1:
            p.append(
                "`training.learning_rate` must be above 0 and at most 0.1 "
                f"(typical: 2e-4 for LoRA, 2e-5 for full; got {t.learning_rate})."
            )
        if not 1 <= t.batch_size <= 1024:
            p.append(f"`training.batch_size` must be between 1 and 1024 (got {t.batch_size}).")
        if not 1 <= t.gradient_accumulation <= 1024:
            p.append(f"`training.gradient_accumulation` must be between 1 and 1024 (got {t.gradient_accumulation}).")
        if not 0 <= t.warmup_ratio < 1:
            p.append(f"`training.warmup_ratio` must be at least 0 and below 1 (got {t.warmup_ratio}).")
        if t.lr_scheduler not in LR_SCHEDULERS:
            p.append(f"`training.lr_scheduler` must be one of {', '.join(LR_SCHEDULERS)} (got {t.lr_scheduler!r}).")
        if t.weight_decay < 0:
            p.append(f"`training.weight_decay` must be 0 or more (got {t.weight_decay}).")
        if t.max_grad_norm < 0:
            p.append(f"`training.max_grad_norm` must be 0 (no clipping) or more (got {t.max_grad_norm}).")
        if t.precision not in PRECISIONS:
            p.append(f"`training.precision` must be one of {', '.join(PRECISIONS)} (got {t.precision!r}).")
        if t.eval_steps < 0:
            p.append("`training.eval_steps` must be 0 (only at the end) or more.")
        if t.early_stopping < 0:
            p.append(f"`training.early_stopping` must be 0 (off) or more (got {t.early_stopping}).")
        elif t.early_stopping and not t.eval_steps:
            p.append("`training.early_stopping` needs `training.eval_steps` above 0: it watches the eval loss.")
        elif t.early_stopping and not (d.eval_fraction or d.eval_rows or d.eval_path):
            p.append("`training.early_stopping` needs held-out rows: set `data.eval_fraction` above 0.")
        if t.save_steps < 0:
            p.append("`training.save_steps` must be 0 (every 10% of the run) or more.")
        if t.optimizer not in OPTIMIZERS:
            p.append(f"`training.optimizer` must be one of {', '.join(OPTIMIZERS)} (got {t.optimizer!r}).")
        if t.packing not in PACKING:
            p.append(f"`training.packing` must be one of {', '.join(PACKING)} (got {t.packing!r}).")
        if t.objective not in OBJECTIVES:
            p.append(f"`training.objective` must be one of {', '.join(OBJECTIVES)} (got {t.objective!r}).")
        for name in ("beta", "orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight"):
            if not 0 < getattr(t, name) <= 100:
                p.append(f"`training.{name}` must be above 0 and at most 100 (got {getattr(t, name)}).")
        if t.objective != "sft" and t.packing == "on":
            p.append(
                f"`training.packing` on trains one answer per row position; {t.objective} compares two answers "
                "in padded rows. Set training.packing to auto or off."
            )
        if t.distributed not in DISTRIBUTED:
            p.append(f"`training.distributed` must be one of {', '.join(DISTRIBUTED)} (got {t.distributed!r}).")
        elif t.distributed == "fsdp" and self.method == "qlora":
            p.append(
                "`training.distributed` fsdp does not train QLoRA: FSDP2 with 4-bit weights has an open "
                "correctness bug upstream, so it would train wrong. Use ddp for QLoRA, or LoRA with fsdp."
            )
        if t.distributed == "fsdp" and t.optimizer not in ("auto", "adamw"):
            p.append(
                f"`training.optimizer` {t.optimizer} cannot step sharded (fsdp) parameters: bitsandbytes "
                "optimizers need whole tensors. Use adamw with fsdp, or ddp."
            )
        if not 0 <= t.keep_versions <= 1000:
            p.append(f"`training.keep_versions` must be between 0 (the default) and 1000 (got {t.keep_versions}).")
        if not 1 <= t.keep_checkpoints <= 100:
            p.append(f"`training.keep_checkpoints` must be between 1 and 100 (got {t.keep_checkpoints}).")
        return p

    def check(self, check_data_file: bool = True) -> "RunConfig":
        """Raise ConfigError listing every problem; return self when there are none."""
        problems = self.validate(check_data_file)
        if problems:
            raise ConfigError(problems)
        return self


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls, raw: Any, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"`{prefix.rstrip('.') or 'config'}` must be a mapping of settings.")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"`{prefix}{key}` is not a setting; known settings: {', '.join(fields)}.")
            continue
        ftype = _field_type(cls, key)
        if dataclasses.is_dataclass(ftype):
            kwargs[key] = _build(ftype, value, f"{prefix}{key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(value, ftype)
        except (TypeError, ValueError):
            problems.append(f"`{prefix}{key}` must be {ftype.__name__} (got {value!r}).")
    return cls(**kwargs)


def _field_type(cls, name: str):
    hints = {
        "str": str,
        "int": int,
        "float": float,
        "bool": bool,
        "DataConfig": DataConfig,
        "LoraConfig": LoraConfig,
        "TrainingConfig": TrainingConfig,
    }
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return hints[f.type] if isinstance(f.type, str) else f.type


def _coerce(value: Any, ftype: type):
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(value)
    if ftype is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if ftype is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if ftype is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    return value


@functools.cache
def _docstrings(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after ``name: type = value``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_help(dotted: str) -> str:
    """The docstring of a config field, by dotted name (``lora.r``)."""
    cls = RunConfig
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = _field_type(cls, part)
    return _docstrings(cls).get(leaf, "")


# ---- the command line: every setting is a flag (studio/cli.py), and a config prints as a command

# A flag is the field's name with dashes: --epochs, --max-length, --lora-r. Data and training
# settings drop their section (there is only one of each); the data file itself is --data.
_BARE_SECTIONS = ("data", "training")
_FLAG_ALIASES = {"data.path": "data"}


def flag_name(dotted: str) -> str:
    """The CLI flag for a setting, without the dashes: `training.epochs` -> `epochs`."""
    if dotted in _FLAG_ALIASES:
        return _FLAG_ALIASES[dotted]
    section, _, leaf = dotted.rpartition(".")
    return (leaf if section in _BARE_SECTIONS else dotted.replace(".", "-")).replace("_", "-")


def command_for(config: RunConfig) -> str:
    """The `finetune-studio train` command that builds this same config (for "copy as CLI")."""
    import shlex

    defaults = RunConfig().flat()
    parts = ["finetune-studio", "train"]
    for dotted, value in config.flat().items():
        if dotted == "data.path" or value != defaults.get(dotted):
            parts += [f"--{flag_name(dotted)}", shlex.quote(str(value))]
    return " ".join(parts)


def launch_command_for(config: RunConfig, processes: int = 2, sharded: bool = False) -> str:
    """The same run on several GPUs through accelerate, DDP or (``sharded``) FSDP: see
    docs/scaling-out.md."""
    if sharded:
        config = config.with_overrides({"training.distributed": "fsdp"})
    return command_for(config).replace(
        "finetune-studio train", f"accelerate launch --multi_gpu --num_processes {processes} -m studio.cli train", 1
    )


def leaf_fields() -> list[tuple[str, type, Any]]:
    """(dotted name, type, default) for every scalar setting, in declaration order."""
    out = []

    def walk(cls, prefix):
        default = cls()
        for f in dataclasses.fields(cls):
            ftype = _field_type(cls, f.name)
            if dataclasses.is_dataclass(ftype):
                walk(ftype, f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", ftype, getattr(default, f.name)))

    walk(RunConfig, "")
    return out
