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


@dataclass
class Hardware:
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_bf16: bool
    mps: bool
    cuda: list[CudaDevice] = field(default_factory=list)

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
        cpu = (f"CPU: {self.cpu_cores} cores, {self.ram_available_bytes / gib:.1f} of "
               f"{self.ram_total_bytes / gib:.1f} GiB RAM free, bf16 {'yes' if self.cpu_bf16 else 'no'}")
        parts = [f"{d.name} ({d.free_bytes / gib:.1f} of {d.total_bytes / gib:.1f} GiB free)" for d in self.cuda]
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
            cuda.append(CudaDevice(i, torch.cuda.get_device_name(i), total, free,
                                   torch.cuda.is_bf16_supported()))
    return Hardware(
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        cpu_bf16=cpu_supports_bf16(),
        mps=bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        cuda=cuda,
    )


def memory_snapshot(device: str) -> dict[str, float]:
    """Memory in MiB for the live plot: process RSS on CPU; allocated/reserved on CUDA."""
    mib = 1024**2
    snap = {"rss_mib": psutil.Process().memory_info().rss / mib}
    if device == "cuda":
        snap["cuda_allocated_mib"] = torch.cuda.memory_allocated() / mib
        snap["cuda_reserved_mib"] = torch.cuda.memory_reserved() / mib
        snap["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / mib
    return snap
