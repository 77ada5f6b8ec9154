"""extract.memory: after reuse_freed_memory, a freed large block's pages serve the next one without page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import ctypes, resource, sys
if sys.argv[1] == "reuse":
    from extract.memory import reuse_freed_memory
    reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
def faults_of_a_fresh_block(size=150 << 20):  # an activation of EfficientNet-Lite0 on 32 images is 50-150 MB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_block()
print(max(faults_of_a_fresh_block() for _ in range(3)))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_instead_of_faulted_in_again():
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parents[1])
        return int(run.stdout.split()[-1])

    pages = (150 << 20) // 4096
    assert faults("default") > pages // 2  # glibc unmaps a freed 150 MB block: every page faults in again
    assert faults("reuse") < pages // 100  # kept in the heap: its pages are already there
