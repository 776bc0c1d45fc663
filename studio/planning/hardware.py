"""What this machine has: CUDA devices, Apple MPS, CPU cores and RAM, bf16 support."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import psutil
import torch


@dataclass
class CudaDevice:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool
    capability: str = ""  # compute capability, e.g. "9.0"


@dataclass
class Hardware:
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_bf16: bool
    mps: bool
    cuda: list[CudaDevice] = field(default_factory=list)
    bnb_4bit: dict[str, str] = field(default_factory=dict)  # device -> "yes" or why not

    @property
    def device(self) -> str:
        """The device training will use."""
        if self.cuda:
            return "cuda"
        if self.mps:
            return "mps"
        return "cpu"

    @property
    def bf16(self) -> bool:
        if self.cuda:
            return self.cuda[0].bf16
        return self.cpu_bf16 if self.device == "cpu" else False

    def summary(self) -> str:
        """One line a person can read."""
        gib = 1024**3
        cpu = (
            f"CPU: {self.cpu_cores} cores, {self.ram_available_bytes / gib:.1f} of "
            f"{self.ram_total_bytes / gib:.1f} GiB RAM free, bf16 {'yes' if self.cpu_bf16 else 'no'}"
        )
        parts = [
            f"{d.name} ({d.free_bytes / gib:.1f} of {d.total_bytes / gib:.1f} GiB free, compute {d.capability})"
            for d in self.cuda
        ]
        if self.mps:
            parts.append("Apple MPS")
        acc = "; ".join(parts) if parts else "No GPU"
        return f"Training on {self.device.upper()}. {acc}. {cpu}."

    def to_dict(self) -> dict:
        return asdict(self) | {"device": self.device}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def detect() -> Hardware:
    vm = psutil.virtual_memory()
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            cuda.append(
                CudaDevice(
                    i, torch.cuda.get_device_name(i), total, free, torch.cuda.is_bf16_supported(), f"{major}.{minor}"
                )
            )
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Hardware(
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        cpu_bf16=cpu_supports_bf16(),
        mps=mps,
        cuda=cuda,
        bnb_4bit=bnb_4bit_support(bool(cuda), mps),
    )


def bnb_4bit_support(has_cuda: bool, has_mps: bool) -> dict[str, str]:
    """Whether QLoRA's 4-bit NF4 layers can run on each device ("yes", or the reason not)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        missing = "bitsandbytes is not installed (pip install bitsandbytes)"
        return {"cpu": missing, **({"cuda": missing} if has_cuda else {}), **({"mps": missing} if has_mps else {})}
    from importlib.metadata import version

    v = version("bitsandbytes")
    major, minor = (int(x) for x in v.split(".")[:2])
    out = {
        "cpu": "yes" if (major, minor) >= (0, 45) else f"bitsandbytes {v} has no CPU 4-bit; upgrade to 0.45 or later"
    }
    if has_cuda:
        out["cuda"] = "yes"
    if has_mps:
        out["mps"] = "bitsandbytes 4-bit is not available on MPS; use LoRA"
    return out


def memory_snapshot(device: str) -> dict[str, float]:
    """Memory in MiB for the live plot: process RSS on CPU; allocated/reserved on CUDA."""
    mib = 1024**2
    snap = {"rss_mib": psutil.Process().memory_info().rss / mib}
    if device == "cuda":
        snap["cuda_allocated_mib"] = torch.cuda.memory_allocated() / mib
        snap["cuda_reserved_mib"] = torch.cuda.memory_reserved() / mib
        snap["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / mib
    return snap
