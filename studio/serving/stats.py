"""Who was served what: one log line per request, and per-adapter counters for ``/metrics``
(Prometheus text format) and the Chat tab's table."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from studio.serving.engine import Request

log = logging.getLogger("studio.serving")


@dataclass
class AdapterStats:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0  # summed over requests that produced a token
    ttft_count: int = 0
    seconds: float = 0.0  # queued to finished, summed


class Stats:
    def __init__(self):
        self._by_model: dict[str, AdapterStats] = {}
        self._lock = threading.Lock()

    def record(self, model: str, served: str, weights_hash: str | None, r: Request, error: str | None = None) -> None:
        """Count a finished request and write its log line: the ``model`` it asked for (a
        deployment, a run id...) -> the exact weights that answered (``served``: RUN@vN or
        RUN@step-N) and their sha256."""
        with self._lock:
            s = self._by_model.setdefault(model, AdapterStats())
            s.requests += 1
            s.errors += error is not None
            s.prompt_tokens += len(r.prompt_ids)
            s.completion_tokens += r.completion_tokens
            s.queue_s += r.queue_s
            if r.ttft_s is not None:
                s.ttft_s += r.ttft_s
                s.ttft_count += 1
            if r.finished_at is not None:
                s.seconds += r.finished_at - r.submitted_at
        ttft = f"{r.ttft_s * 1000:.0f}ms" if r.ttft_s is not None else "-"
        log.info(
            "request=%s model=%s -> %s weights=%s batch=%s batch_models=%s queue=%.0fms ttft=%s "
            "tokens_in=%d tokens_out=%d finish=%s%s",
            r.id,
            model,
            served,
            weights_hash or "-",
            r.batch_id,
            ",".join(sorted(set(r.batch_refs))) or "-",
            r.queue_s * 1000,
            ttft,
            len(r.prompt_ids),
            r.completion_tokens,
            r.finish_reason or "-",
            f" error={error!r}" if error else "",
        )

    def snapshot(self) -> dict[str, AdapterStats]:
        with self._lock:
            return {k: AdapterStats(**vars(v)) for k, v in self._by_model.items()}

    def prometheus(self) -> str:
        """The counters in Prometheus' text exposition format, one series per model id."""
        series = [
            ("finetune_studio_requests_total", "counter", "Completed requests.", "requests"),
            ("finetune_studio_request_errors_total", "counter", "Requests that ended in an error.", "errors"),
            ("finetune_studio_prompt_tokens_total", "counter", "Prompt tokens processed.", "prompt_tokens"),
            ("finetune_studio_completion_tokens_total", "counter", "Tokens generated.", "completion_tokens"),
            ("finetune_studio_queue_seconds_total", "counter", "Time requests waited for a batch.", "queue_s"),
            ("finetune_studio_ttft_seconds_total", "counter", "Time to first token, summed.", "ttft_s"),
            ("finetune_studio_request_seconds_total", "counter", "Submitted to finished, summed.", "seconds"),
        ]
        snap = self.snapshot()
        lines = []
        for name, kind, help_text, attr in series:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for model, s in sorted(snap.items()):
                lines.append(f'{name}{{model="{_label(model)}"}} {getattr(s, attr)}')
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
