"""extract/device.py: the device from a CLI string, and the precision of float32 matrix products on it."""

from __future__ import annotations

import pytest
import torch

from extract.device import resolve_device, tf32_matmuls


def test_unknown_device_refused():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize(("enabled", "inside"), [(True, "tf32"), (False, "ieee")])
def test_tf32_on_cuda_inside_the_block_and_restored_after(enabled, inside):
    # The flag is a process setting that needs no GPU to read or set, so the CPU suite covers the CUDA branch.
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls("cuda", enabled):
        assert matmul.fp32_precision == inside
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), tf32_matmuls(torch.device("cuda", 0), enabled):
        raise RuntimeError("an error inside the block")
    assert matmul.fp32_precision == before


def test_tf32_leaves_other_devices_alone():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls("cpu"):
        assert matmul.fp32_precision == before
