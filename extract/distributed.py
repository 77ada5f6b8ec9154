"""Where this process stands among several started by a launcher, and joining them.

``torchrun`` starts one process per device and tells each its place in ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (SLURM ``srun`` or Kubernetes launchers can set the same
variables, with ``MASTER_ADDR`` and ``MASTER_PORT``). Under such a launcher ``extract`` gives every
rank a contiguous slice of the guids to encode into a shard file of its own, and rank 0 stitches the
shards into the one cache file the later stages read (extract/run.py, extract/cache.py); ``predict``
labels each rank's slice of the test rows into a part file, and rank 0 joins the parts
(fusion/predict.py). Without those variables, or with a single process, nothing here runs and
both stay one process.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Ranks meet at a barrier once the slowest slice is done, and every "+ocr" rank waits for rank 0 to
# read every image (hours on a few cores): far past the 30-minute default. A crashed rank still ends
# the job at once, since torchrun stops the other processes when one fails.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Launch:
    """This process's place: ``rank`` of ``world_size`` in all, ``local_rank`` of ``local_world_size`` on its host."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Launch | None:
        """The launcher's variables, or None when this process runs alone (no ``WORLD_SIZE``, or 1).

        ``LOCAL_WORLD_SIZE`` (set by torchrun) defaults to ``WORLD_SIZE``: with one machine that is
        exact, and on several it only divides the cores more finely than needed.
        """
        world_size = int(env.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return None
        missing = [name for name in ("RANK", "LOCAL_RANK") if name not in env]
        if missing:
            raise ValueError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not; start with torchrun, "
                             f"or set RANK, LOCAL_RANK (and MASTER_ADDR, MASTER_PORT) in the launcher")
        launch = cls(int(env["RANK"]), world_size, int(env["LOCAL_RANK"]), int(env.get("LOCAL_WORLD_SIZE", world_size)))
        if not (0 <= launch.rank < world_size and 0 <= launch.local_rank < launch.local_world_size <= world_size):
            raise ValueError(f"inconsistent launcher variables {launch}: expected 0 ≤ RANK < WORLD_SIZE and "
                             f"0 ≤ LOCAL_RANK < LOCAL_WORLD_SIZE ≤ WORLD_SIZE")
        return launch

    @property
    def leader(self) -> bool:
        """Rank 0 stitches the shards, reads the images' text and prints the summary."""
        return self.rank == 0

    def cores(self) -> int:
        """This rank's share of its machine's cores, so that the processes on one machine don't oversubscribe it."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    def share(self, guids: list[str]) -> list[str]:
        """This rank's contiguous slice of ``guids``, in their order; the ranks' slices tile the list exactly."""
        return share_of(guids, self.rank, self.world_size)


def share_of(guids: list[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s contiguous slice of ``guids`` among ``world_size``: what ``Launch.share`` gives that rank, for
    rank 0 to find every rank's rows when it joins their output (predict)."""
    count = len(guids)
    return guids[rank * count // world_size : (rank + 1) * count // world_size]


def join(launch: Launch, device: torch.device) -> torch.device:
    """Pin this rank's threads and device, then join the process group; returns the rank's device.

    On CUDA the rank takes ``cuda:LOCAL_RANK`` and NCCL, on the CPU gloo. The group is left at exit.
    """
    torch.set_num_threads(launch.cores())
    if device.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={launch.local_rank} but torch sees {torch.cuda.device_count()} GPUs; start "
                             f"at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", rank=launch.rank, world_size=launch.world_size, timeout=BARRIER_TIMEOUT, device_id=device
        )
    else:
        dist.init_process_group("gloo", rank=launch.rank, world_size=launch.world_size, timeout=BARRIER_TIMEOUT)
    atexit.register(dist.destroy_process_group)
    return device


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (anything picklable), in rank order; no rank returns before all have sent theirs."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    dist.barrier()


@contextmanager
def leader_first(launch: Launch | None) -> Iterator[None]:
    """Rank 0 runs the body alone; the other ranks run it once rank 0 has finished (to read what it wrote).

    Used for a stage whose cache file takes one writer, such as the OCR pass of "+ocr" text encoders.
    """
    if launch is not None and not launch.leader:
        barrier()
    yield
    if launch is not None and launch.leader:
        barrier()
