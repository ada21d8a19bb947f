"""Several processes on one node (``torchrun``): which rank this is, its share of the work, and
the collectives that make N ranks compute what one process computes on the same global batch.

Launched by ``torchrun --nproc-per-node N`` (its ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), a
run joins a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU) with a timeout on
every collective, so a rank that dies ends the others instead of hanging them. One process is
the world of size 1: every collective below is then the identity, and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the run's ranks."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, checkpoints, ``final/`` and the progress bar."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (the first ``count % size`` ranks
        get one more): rank 0's items, then rank 1's, ... are the items in order, so the
        ranks' shares put together are one process's batch."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, *values: float) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values, op) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=collective_device())
        dist.all_reduce(t, op=op)
        return t.tolist()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (picklable values this run made itself)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = World()


def interleaved_ids(counts: list[int], rank: int) -> list[int]:
    """Global numbers for ``rank``'s questions when rank r holds ``counts[r]``: dealt round
    robin (rank 0's first, rank 1's first, ..., rank 0's second, ...), so that any run of
    consecutive numbers — a mini-batch — holds about as many questions of every rank, and
    each rank's share of an update is about 1/N of it."""
    ids: list[int] = []
    position = 0
    for turn in range(max(counts, default=0)):
        for r, count in enumerate(counts):
            if turn < count:
                if r == rank:
                    ids.append(position)
                position += 1
    return ids


def collective_device() -> torch.device:
    """Where small collectives' tensors live: NCCL needs them on this rank's GPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun (or accelerate launch) sets it; 1 without a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init_world(device_name: str, timeout_s: float) -> World:
    """The world this process runs in: size 1 without a launcher; under torchrun, the
    process group (joined here, once), NCCL when ``device_name`` resolves to CUDA and gloo
    otherwise, ``timeout_s`` on every collective."""
    size = launched_ranks()
    if size <= 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and
                                              torch.cuda.is_available())
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=rank, size=size, local_rank=local)


def rank_device(world: World, device: torch.device) -> torch.device:
    """A rank's device: its own GPU (``LOCAL_RANK``) when the run is on CUDA."""
    if device.type == "cuda" and world.distributed:
        if device.index not in (None, world.local_rank):
            raise ValueError(f"device: {device} under torchrun; each rank uses its own GPU "
                             "(LOCAL_RANK): set device: cuda or auto")
        return torch.device("cuda", world.local_rank)
    return device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
