"""Numeric precision of training: fp32, or bf16 autocast where the hardware has bf16 matrix units.

Heads train in fp32 by default. On CPUs with bf16 matrix instructions (AMX tiles or AVX512-BF16)
a bf16 matmul runs several times faster than fp32, so ``fit --precision auto`` trains under bf16
autocast there (fp32 master weights, fp32 optimiser, bf16 matmuls); elsewhere bf16 is emulated
and slower than fp32 (``python -m benchmarks.pipeline --flops`` measures both peaks), so auto
keeps fp32 and every figure measured on such a machine is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix instructions
HEAD_PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16_units(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 matrices natively (Linux only; elsewhere assume it does not)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_head_precision(precision: str) -> str:
    """``auto`` → ``bf16`` on a CPU with bf16 units, else ``fp32``; ``fp32`` and ``bf16`` stay as asked."""
    if precision not in HEAD_PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {list(HEAD_PRECISIONS)}")
    if precision == "auto":
        return "bf16" if cpu_has_bf16_units() else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision context: bf16/fp16 autocast on CUDA (bf16 also on CPU), a no-op for fp32."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)
