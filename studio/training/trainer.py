"""One training run as a lifecycle: setup() -> train() -> save() (torchtune recipe style).

A plain PyTorch loop rather than TRL's SFTTrainer: DESIGN.md measured SFTTrainer at about half
the tokens/s of a plain loop on CPU (its chunked loss/metrics code and gradient checkpointing
by default). Batches are padded to their own longest row from length-sorted pools, or on GPUs
packed into rows of a fixed width (batching.py), so little compute goes to padding, and the
output layer runs only at labeled positions (loss.py), not at prompt and padding positions.

The step never waits for the device: losses and gradient norms stay on it and are read
together at most every ``READ_EVERY_S`` seconds (and before an evaluation, a checkpoint or the
end), when the steps' records are written; token counts come from the host.
"""

from __future__ import annotations

import math
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from studio import models
from studio.config import RunConfig, optimizer_for
from studio.data import DataError, Example, prepare
from studio.data.render import collate
from studio.planning import hardware, precision
from studio.runs.records import EvalRecord, Event, Record, TrainRecord
from studio.runs.registry import Run
from studio.training import adapters, batching, checkpoint, distributed, optimizers, schedule
from studio.training.compiling import CompileWatch, compile_layers, inductor_problem
from studio.training.loss import causal_lm
from studio.training.objectives import PREFERENCE_STATS, data_problem, loss_for

MetricsSink = Callable[[Record], None]
# How often a GPU run reads its losses back (each read waits for the device to catch up). On CPU
# the host is the device, so every step is read at once.
READ_EVERY_S = 1.0


@dataclass
class _Unread:
    """A step whose loss and gradient norm are still on the device (see Trainer._read)."""

    step: int
    loss_sum: torch.Tensor  # summed over the step's micro-batches
    grad_norm: torch.Tensor
    tokens: int
    scored: int
    lr: float
    micro: int
    started: float
    stats: torch.Tensor | None = None  # a preference objective's statistics, summed over micro-batches


class TrainingStopped(Exception):
    """Not an error: the user pressed Stop."""


class EarlyStopped(Exception):
    """Not an error: eval loss stopped improving (``training.early_stopping``)."""


class Trainer:
    """One run's training: ``setup()`` builds data, model and optimizer; ``train()`` runs the
    loop to the final step (raising TrainingStopped or EarlyStopped); ``save()``,
    ``save_checkpoint()`` and ``restore()`` write and read the run folder through checkpoint.py.

    The lifecycle around it (status, memory check, failures) is training/recipe.py; the memory
    check drives it through ``collate_rows``, ``autocast``, ``loss_fn``, ``clip_gradients`` and
    ``reset_optimizer``.
    """

    def __init__(
        self,
        config: RunConfig,
        run: Run,
        stop_event: threading.Event | None = None,
        on_metrics: MetricsSink | None = None,
        save_event: threading.Event | None = None,
    ):
        self.config = config
        self.run = run
        self.stop_event = stop_event or threading.Event()
        self.save_event = save_event or threading.Event()  # "save now", set from another thread
        self.on_metrics = on_metrics or (lambda record: None)
        self.step = 0
        self.best_eval: float | None = None
        self.evals_without_gain = 0
        self.micro = 0  # micro-batches consumed: where the data stream resumes
        self.dist = distributed.Dist()  # one process until setup() reads the launcher's environment
        self.sharded = False  # FSDP: parameters, gradients and optimizer state split across processes
        self.total_steps = 0
        self.continued_from: int | None = None  # a continuation's first step (continue_from)
        self._unread: list[_Unread] = []  # steps done whose numbers are still on the device
        self._started, self._first_step = time.time(), 0
        self.created = time.time()  # ~ when Train was pressed: the job's thread builds the trainer first
        self.timings: dict[str, float] = {}  # seconds per start-up phase (startup())
        self.after_first_step: Callable[[], None] | None = None  # run once, after step 1 is recorded

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build data before the model: a bad file should fail in a second, not after a load."""
        cfg, t = self.config, self.config.training
        torch.manual_seed(t.seed)
        self.dist = distributed.from_env(t.distributed)
        distributed.init(self.dist)
        self.hw = hardware.detect()
        self.device = self.hw.device
        if cfg.method == "qlora" and self.device == "mps":
            raise models.ModelError(
                "QLoRA needs bitsandbytes 4-bit, which is not available on Apple MPS; choose LoRA instead."
            )
        self.precision = precision.resolve(t.precision, self.hw.bf16)  # recorded with the run

        started = time.time()
        self.tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
        data = prepare(cfg.data, self.tokenizer, t.seed)
        problem = data_problem(t.objective, getattr(data, "kind", "sft"))
        if problem:
            raise DataError(problem)
        self.train_examples, self.eval_examples = data.train, data.eval
        self.data_findings = data.report.findings + data.notes
        self.timings["tokenizer and data"] = time.time() - started

        self.model = self._load_model()
        self.batching = self._batching()
        self._compile()
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # The loss computes logits only at labeled positions (studio/training/loss.py). With
        # several processes, training steps go through the DDP wrapper around it (gradients
        # all-reduced), or it is sharded in place with FSDP (then every forward, evaluation and
        # the memory check included, goes through it, since it is the root that gathers weights).
        self.loss_fn = loss_for(self.model, cfg)  # sft: LabeledTokenLoss; dpo/orpo: PreferenceLoss
        self.forward_loss = distributed.wrap(self.loss_fn, self.dist, self.device, t.distributed)
        self.sharded = distributed.is_sharded(self.loss_fn)
        self.checkpoints = checkpoint.Checkpoints(
            self.model, self.tokenizer, self.loss_fn, self.dist, self.sharded, self.device, cfg.method == "full"
        )
        self.lengths = [len(e.input_ids) for e in self.train_examples]
        # An epoch's micro-batches, counted on the first epoch's draw (packing varies a little by draw).
        self.batches_per_epoch = len(batching.epoch(self.lengths, self.batching, random.Random(t.seed)))
        steps_per_epoch = max(1, self.batches_per_epoch // (t.gradient_accumulation * self.dist.world))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        self.optimizer_name = optimizer_for(t.optimizer, cfg.method, self.device)
        # Under several processes every step is read: the read is a collective (the losses are
        # summed over processes), so all must read at the same steps, and clocks differ.
        self.read_every_s = READ_EVERY_S if self.device == "cuda" and not self.dist.enabled else 0.0
        self.reset_optimizer()

    def _batching(self) -> batching.Batching:
        """``training.packing``: packed rows of data.max_length tokens, or one padded example per row."""
        cfg, t = self.config, self.config.training
        model_type = causal_lm(self.model).config.model_type
        problem = batching.packing_problem(model_type)
        if problem and t.packing == "on":
            raise models.ModelError(
                f"training.packing is on, but this model cannot train packed: {problem}. "
                "Set training.packing to auto or off."
            )
        # A preference pair is two padded rows compared with each other: never packed.
        packing = t.packing if t.objective == "sft" else "off"
        return batching.layout(packing, self.device, t.batch_size, cfg.data.max_length, model_type)

    def _compile(self) -> None:
        """``training.compile``: compile the decoder layers where inductor works; ``compile_note``
        says why not otherwise (checked again after the first step, see _check_compiled)."""
        self.compiled_layers, self.compile_note, self._compile_watch = 0, None, None
        if not self.config.training.compile:
            return
        if self.config.method == "qlora":
            return self._not_compiled("Not compiled: QLoRA's 4-bit layers are not compiled; training runs uncompiled.")
        if self.config.training.distributed == "fsdp" and self.dist.enabled:
            return self._not_compiled(
                "Not compiled: compiling sharded (FSDP) layers is not supported yet; training runs uncompiled."
            )
        problem = inductor_problem()
        if problem:
            return self._not_compiled(
                f"Not compiled: torch.compile does not work on this machine ({problem}); "
                "training runs uncompiled. Installing a C++ compiler usually fixes it."
            )
        self._compile_watch = CompileWatch()
        self.compiled_layers = compile_layers(self.model, static=self.batching.packed)

    def _check_compiled(self) -> None:
        """After the first step every compiled graph has been built: a failed one runs eager."""
        if self._compile_watch is not None and self._compile_watch.failed():
            self._not_compiled(
                "Not compiled: torch.compile failed on this model's layers, so they run "
                "uncompiled (dynamo's warning is in the log)."
            )
        self._compile_watch = None

    def _not_compiled(self, note: str) -> None:
        self.compiled_layers, self.compile_note = 0, note
        self._emit(Event("compile", self.step, time.time(), {"compiled_layers": 0, "note": note}))

    def reset_optimizer(self) -> None:
        from transformers import get_scheduler

        t = self.config.training
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizers.build(self.optimizer_name, params, t.learning_rate, t.weight_decay, self.device)
        # "constant" still warms up: transformers calls that one constant_with_warmup.
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        self.scheduler = get_scheduler(
            name,
            self.optimizer,
            num_warmup_steps=int(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )

    def _load_model(self):
        cfg, started = self.config, time.time()
        model = models.load_model(cfg.model, cfg.method, self.device, self.precision, cfg.trust_remote_code)
        self.timings["model"] = time.time() - started
        model.config.use_cache = False
        if cfg.training.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so it works the
            # same for full fine-tuning and for adapters on a frozen base.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "full":
            if cfg.training.start_from:  # the config reads alone; which runs exist is known only here
                raise models.ModelError(
                    "training.start_from names an adapter version to start from; a full fine-tune trains the "
                    "whole model: leave it empty, or choose lora or qlora."
                )
            return model
        started = time.time()
        if cfg.training.start_from:
            folder = self._start_from_weights()
            model = adapters.attach_saved(model, folder, self.precision, with_reference=cfg.training.objective == "dpo")
        else:
            model = adapters.attach_lora(model, cfg.lora, self.precision)
        self.timings["adapter"] = time.time() - started
        return model

    def _start_from_weights(self):
        """The adapter folder ``training.start_from`` names, checked: another LoRA/QLoRA run's
        version on this run's base. Raises ModelError with the reason."""
        from studio.runs.registry import RunRegistry

        ref = self.config.training.start_from
        run_id, _, point = ref.partition("@")
        try:
            source = RunRegistry(self.run.path.parent).get(run_id)
            folder = source.weights_at(point or None)
            source_cfg = source.at_version(int(point[1:])).config() if point.startswith("v") else source.config()
        except (LookupError, ValueError) as exc:
            raise models.ModelError(f"training.start_from {ref!r}: {exc}") from None
        if source_cfg.method not in ("lora", "qlora") or source_cfg.model != self.config.model:
            raise models.ModelError(
                f"training.start_from {ref!r} is a {source_cfg.method} run on {source_cfg.model!r}; this run "
                f"trains an adapter on {self.config.model!r}: start from an adapter trained on the same base."
            )
        return folder

    # ---- train -------------------------------------------------------------------------------
    def batches(self):
        """The endless, seeded stream of micro-batches this process trains on (batching.stream):
        a resumed run replays it and skips what it consumed."""
        return batching.stream(self.lengths, self.batching, self.config.training.seed, self.dist.rank, self.dist.world)

    def tensors(self, micro_batch: batching.MicroBatch, examples=None) -> dict[str, torch.Tensor]:
        """A micro-batch of ``examples`` (the training rows by default) as tensors on the device."""
        examples = self.train_examples if examples is None else examples
        host = batching.tensors(examples, micro_batch, self.batching, self.tokenizer.pad_token_id)
        if self.device != "cuda":
            batch = {k: v.to(self.device) for k, v in host.items()}
        else:  # pinned memory copies without making the host wait for the device's queue
            batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in host.items()}
        document = batch.pop("document", None)  # packed rows: which example each position is
        if document is not None and causal_lm(self.model).config._attn_implementation == "sdpa":
            batch["attention_mask"] = batching.sdpa_mask(document)
        return batch

    def largest_batch(self) -> dict[str, torch.Tensor]:
        """The micro-batch needing the most memory (the memory check's), as device tensors."""
        return self.tensors(batching.largest(self.lengths, self.batching))

    def collate_rows(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Examples as one padded batch on the device, one per row (for tests and tools)."""
        return {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    @property
    def use_bf16(self) -> bool:
        return self.precision == "bf16"

    def autocast(self):
        return precision.autocast(self.device, self.precision)

    def clip_gradients(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Scale the gradients down to ``training.max_grad_norm`` where above it (0: measure only);
        returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.training.max_grad_norm or math.inf)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded norm

    @property
    def save_every(self) -> int:
        """Checkpoint interval in steps: the configured one, or every 10% of the run (at least
        10 steps apart: a full fine-tuning checkpoint with optimizer state is 4x the model)."""
        return self.config.training.save_steps or max(10, self.total_steps // 10)

    def train(self) -> None:
        t = self.config.training
        stream = self.batches()
        for _ in range(self.micro):  # resuming: skip what the checkpointed run consumed
            next(stream)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._started, self._first_step = time.time(), self.step
        while self.step < self.total_steps:
            if self._stop_requested():
                self._read()
                raise TrainingStopped()
            if self.save_event.is_set():
                self.save_event.clear()
                self.save_checkpoint()
            step_start, loss_sum, tokens, scored, stats = time.time(), None, 0, 0, None
            for micro_step in range(t.gradient_accumulation):
                micro_batch = next(stream)
                batch = self.tensors(micro_batch)
                self.micro += 1
                # Under DDP only the last micro-batch of a step all-reduces gradients: the earlier
                # ones accumulate locally (no_sync), one all-reduce per step instead of one per micro-batch.
                last = micro_step == t.gradient_accumulation - 1
                if self.sharded:  # FSDP's equivalent: reduce-scatter the gradients on the last one only
                    self.forward_loss.set_requires_gradient_sync(last)
                sync = (
                    nullcontext() if last or not hasattr(self.forward_loss, "no_sync") else self.forward_loss.no_sync()
                )
                with sync:
                    with self.autocast():
                        loss = self.forward_loss(**batch)
                    (loss / t.gradient_accumulation).backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                pairs = getattr(self.loss_fn, "last", None)  # reward accuracy and margins (objectives.py)
                if pairs is not None:
                    stats = pairs if stats is None else stats + pairs
                n_tokens, n_scored = batching.counts(self.train_examples, micro_batch)
                tokens, scored = tokens + n_tokens, scored + n_scored
            grad_norm = self.clip_gradients(params)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at (before the schedule moves)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._unread.append(
                _Unread(self.step, loss_sum, grad_norm, tokens, scored, lr, self.micro, step_start, stats)
            )
            if self.step == self._first_step + 1:
                self._check_compiled()
                if self.after_first_step is not None:
                    self._read()  # the first loss point is out before the hook's work
                    hook, self.after_first_step = self.after_first_step, None
                    hook()
            evaluate = t.eval_steps and self.step % t.eval_steps == 0 and self.step < self.total_steps
            save_now = self.step % self.save_every == 0 and self.step < self.total_steps
            due = bool(self._unread) and time.time() - self._unread[0].started >= self.read_every_s
            if due or evaluate or save_now or self.step == self.total_steps:
                self._read()
            if evaluate:
                self._watch(self.evaluate())
            if save_now:
                self.save_checkpoint()

    def _stop_requested(self) -> bool:
        """Whether to stop before the next step: Stop was pressed, or the CLI got Ctrl-C or SIGTERM
        (studio/training/signals.py). Under several processes a signal reaches each at its own
        moment, so they agree every step (one all-reduce of a flag; every step is read there
        anyway) and all stop at the same step, where they save one checkpoint together."""
        asked = self.stop_event.is_set()
        return distributed.any_rank(asked, self.dist) if self.dist.enabled else asked

    def _read(self) -> None:
        """Read the unread steps' losses and gradient norms from the device in one go (under
        several processes, summed over them in one all-reduce) and write their records."""
        unread, self._unread = self._unread, []
        if not unread:
            return
        k, t = len(unread), self.config.training
        read = torch.stack([u.loss_sum.float() for u in unread] + [u.grad_norm.float() for u in unread]).tolist()
        losses, norms = read[:k], read[k:]  # that tolist() is the one wait for the device
        counts = [(u.tokens, u.scored) for u in unread]
        if self.dist.enabled:  # a step's loss is the mean over every process's micro-batches; counts add up
            summed = distributed.sum_over_ranks(losses + [n for pair in counts for n in pair], self.dist)
            losses, counts = summed[:k], [(summed[k + 2 * i], summed[k + 2 * i + 1]) for i in range(k)]
        losses = [v / (t.gradient_accumulation * self.dist.world) for v in losses]
        for u, loss in zip(unread, losses):
            if not math.isfinite(loss):
                raise FloatingPointError(f"The loss became {loss} at step {u.step}; lower the learning rate.")
        now = time.time()
        self.timings.setdefault("first loss point", now - self.created)
        rate = sum(tokens for tokens, _ in counts) / max(now - unread[0].started, 1e-9)  # the steps read together
        memory = hardware.memory_snapshot(self.device)
        # A preference objective's statistics, the mean over the step's micro-batches (this
        # process's: under several processes, rank 0 speaks for the run).
        stats = [
            {} if u.stats is None else dict(zip(PREFERENCE_STATS, (u.stats / t.gradient_accumulation).tolist()))
            for u in unread
        ]
        for u, loss, norm, (tokens, scored), more in zip(unread, losses, norms, counts, stats):
            self._emit(
                TrainRecord(
                    step=u.step,
                    total_steps=self.total_steps,
                    loss=loss,
                    lr=u.lr,
                    grad_norm=norm,
                    tokens=int(tokens),
                    labeled_tokens=int(scored),
                    tokens_per_s=rate,
                    epoch=u.micro / self.batches_per_epoch,
                    time=now,
                    elapsed_s=now - self._started,
                    steps_this_session=u.step - self._first_step,
                    extra=memory | more,
                )
            )

    def _watch(self, eval_loss: float | None) -> None:
        """Early stopping: raise EarlyStopped after ``early_stopping`` evaluations without a new best."""
        patience = self.config.training.early_stopping
        if eval_loss is None or not patience:
            return
        if self.best_eval is None or eval_loss < self.best_eval:
            self.best_eval, self.evals_without_gain = eval_loss, 0
            return
        self.evals_without_gain += 1
        if self.evals_without_gain >= patience:
            raise EarlyStopped(
                f"Stopped early at step {self.step}: eval loss has not improved on "
                f"{self.best_eval:.4f} for {patience} evaluations."
            )

    def startup(self) -> dict[str, float]:
        """Seconds per start-up phase (tokenizer and data, model, adapter, memory check, base
        score) and from the trainer's creation to the first loss point, as the run records them."""
        return {name: round(seconds, 2) for name, seconds in self.timings.items()}

    @property
    def base_scorable_later(self) -> bool:
        """Whether the base can be scored after training started: an adapter switches off, one
        process (several would each have to agree when) and no compiled layers (switching the
        adapter off would recompile every layer)."""
        return self.config.method != "full" and not self.dist.enabled and not self.compiled_layers

    def evaluate_base(self) -> float | None:
        """The base model's held-out loss, recorded at step 0: the model itself before the first
        step (a new adapter is a no-op), the model with its adapter switched off after it."""
        if self.step == 0:
            return self.evaluate()
        with self.model.disable_adapter():
            return self.evaluate(at_step=0)

    @torch.no_grad()
    def evaluate(self, at_step: int | None = None) -> float | None:
        """Token-weighted mean loss on the held-out rows, batched as training is (packed rows keep
        the compiled shape), recorded at ``at_step`` (default: now); None when there is no eval split."""
        if not self.eval_examples:
            return None
        self.model.eval()
        total, count, stats, pairs = None, 0, None, 0
        lengths = [len(e.input_ids) for e in self.eval_examples]
        for micro_batch in batching.epoch(lengths, self.batching, None):
            n = batching.counts(self.eval_examples, micro_batch)[1]
            if n == 0:  # nothing to score (one-token rows): the loss would be NaN and weigh nothing
                continue
            with self.autocast():
                loss = self.loss_fn(**self.tensors(micro_batch, self.eval_examples))
            total = loss.detach() * n if total is None else total + loss.detach() * n
            count += n
            last = getattr(self.loss_fn, "last", None)  # a preference objective: held-out reward accuracy
            if last is not None:
                stats = last * len(micro_batch) if stats is None else stats + last * len(micro_batch)
                pairs += len(micro_batch)
        self.model.train()
        if not count:
            return None
        eval_loss = total.item() / count
        extra = {} if stats is None else dict(zip(PREFERENCE_STATS, (stats / pairs).tolist()))
        self._emit(EvalRecord(self.step if at_step is None else at_step, eval_loss, time.time(), extra=extra))
        return eval_loss

    def _emit(self, record: Record) -> None:
        if not self.dist.main:  # one process speaks for the run
            return
        self.run.append_metrics(record)
        self.on_metrics(record)

    # ---- save and resume (checkpoint.py) ----------------------------------------------------
    def save(self, dest=None, with_state: bool = False, weights: bool = True) -> None:
        """Save the adapter (or full model) with its tokenizer, and with ``with_state`` what
        resuming needs; ``weights=False``: only that (under FSDP every process calls it)."""
        if dest is None:
            dest = self.run.model_dir if self.config.method == "full" else self.run.adapter_dir
        position = None
        if with_state:
            position = checkpoint.Position(
                self.step,
                self.micro,
                self.batching,
                self.total_steps,
                self.best_eval,
                self.evals_without_gain,
                self.continued_from,
            )
        self.checkpoints.save(dest, self.optimizer, self.scheduler, position, weights)

    def save_checkpoint(self) -> None:
        """checkpoints/step-N with weights and trainer state; only the latest few are kept."""
        self._read()  # the steps it holds are in the log first (and a non-finite loss is never saved)
        self.save(checkpoint.step_folder(self.run, self.step), with_state=True)
        if not self.dist.main:
            return
        checkpoint.prune(self.run, self.config.training.keep_checkpoints)
        self._emit(Event("checkpoint", self.step, time.time()))

    def restore(self, path, weights=None) -> None:
        """Continue from a checkpoint: its weights (or ``weights``), optimizer, scheduler, RNG and
        data position."""
        at = self.checkpoints.restore(path, self.optimizer, self.scheduler, self.batching, weights)
        self.step, self.micro = at.step, at.micro
        if at.continued_from is not None:  # a continuation stopped part-way: its schedule, where it was
            self.total_steps = at.total_steps
            self.continue_from(at.continued_from, done=self.scheduler.last_epoch)
        if at.batching != self.batching:  # the stream replays in the layout it was trained in
            self.batching = at.batching
            self.batches_per_epoch = len(
                batching.epoch(self.lengths, at.batching, random.Random(self.config.training.seed))
            )
        self.best_eval, self.evals_without_gain = at.best_eval, at.evals_without_gain

    def continue_from(self, start: int, done: int = 0) -> str:
        """Train on from step ``start`` to ``total_steps`` on a continuation's own schedule
        (schedule.py), ``done`` of its steps taken; the optimizer's moments carry on. Returns
        the schedule in words."""
        t = self.config.training
        plan = schedule.Continuation.plan(start, self.total_steps, t.warmup_ratio, t.lr_scheduler)
        self.scheduler = plan.scheduler(self.optimizer, self.scheduler.base_lrs, done)
        self.continued_from = start
        return plan.describe(t.learning_rate)
