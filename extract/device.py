"""Choosing the torch device from a CLI string, and the precision of float32 matrix products on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {list(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


@contextlib.contextmanager
def tf32_matmuls(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Inside the block, float32 matrix products on a CUDA ``device`` use TF32 (``enabled``) or full float32.

    PyTorch already runs CUDA convolutions in TF32 by default, but not matrix products; the setting
    before the block is restored after it. On other devices nothing changes.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    was = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = was
