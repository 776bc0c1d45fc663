"""``training.compile``: regional torch.compile of the decoder layers, and whether it really happened.

torch.compile with ``suppress_errors`` falls back to eager execution when compiling fails, so
"N layers compiled" proves nothing by itself (a machine without a working C++ compiler trains
uncompiled and would still say compiled). Two checks make the report true:

- before compiling, :func:`inductor_problem` compiles and runs a tiny function once per process
  with errors raised, so a broken toolchain is named up front and nothing is compiled;
- after the first training step, :class:`CompileWatch` reads dynamo's counters: a frame that
  failed to compile during this run means the layers run eager, and the run says so.
"""

from __future__ import annotations

import functools


@functools.cache
def inductor_problem() -> str | None:
    """Why torch.compile cannot compile on the CPU here, or None when it can. Cached: the
    toolchain does not change while the process lives (about 2 s the first time)."""
    import torch._dynamo

    def probe(x):  # its own code object: nothing else compiled can satisfy it from a cache
        return torch.relu(x).sin() * 2

    compiled = torch.compile(probe, dynamic=True)
    previous = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False
    try:
        x = torch.randn(3, 4, requires_grad=True)
        compiled(x).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot compile here"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        torch._dynamo.config.suppress_errors = previous
    return None


def compile_layers(model, static: bool = False) -> int:
    """torch.compile each decoder layer in place; returns how many were compiled (0: not possible).

    Regional compilation: the layers share one code object, so inductor compiles one layer graph
    and every layer reuses it. Padded batches change shape every step, so the graph takes dynamic
    shapes (no recompiles); packed batches (``static``) always have one shape, and a graph
    specialised to it is faster (constant sizes, no shape guards) and is the same one the memory
    check's batch and the evaluation's use. The
    state dict keys stay as they are, so saving and resuming are unchanged. It fuses the norm,
    rotary, activation and residual elementwise work around the matmuls (about 10% of a CPU step
    on the default model). Evaluation runs without gradients, a second graph, so runs with an
    eval split compile twice. QLoRA is left out: bitsandbytes' 4-bit layers are untested under
    torch.compile here.
    """
    import torch._dynamo

    from studio.training.loss import causal_lm

    try:
        layers = causal_lm(model).get_decoder().layers
    except AttributeError:
        return 0
    # A layer that fails to compile (an operator inductor cannot handle) runs eager rather than
    # failing the run; CompileWatch reports it.
    torch._dynamo.config.suppress_errors = True
    for layer in layers:
        layer.compile(dynamic=not static)
    return len(layers)


class CompileWatch:
    """Dynamo's frame counters at the start of a run, to tell afterwards whether any frame
    failed to compile since (a failed frame runs eager from then on)."""

    def __init__(self):
        self.start = self._failures()

    @staticmethod
    def _failures() -> int:
        from torch._dynamo.utils import counters

        frames = counters["frames"]
        return frames["total"] - frames["ok"] + counters["aot_autograd"]["not_ok"]

    def failed(self) -> bool:
        return self._failures() > self.start
