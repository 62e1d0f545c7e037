"""Multi-process (torchrun: DDP or FSDP2) helpers: which rank this is, and the few collectives the
trainer, the recorder and the CLI share.

Data parallel throughout: every rank trains on its own rows of one global batch, with the
same weights (DDP) or its shard of them (FSDP2). Without a process group of more than one rank every helper answers as
rank 0 of 1 and communicates nothing, so a single-process run pays nothing for them.
Collectives must be called by every rank at the same point of the program.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


@contextlib.contextmanager
def torchrun_group(device: str) -> Iterator[None]:
    """Join the process group when torchrun started this process as one of several ranks
    (gloo for a CPU device, nccl for CUDA) and leave it on exit; otherwise do nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():  # torchrun sets it
        yield
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_device(device: str) -> None:
    """Refuse a device this machine has not got, before any training starts (and without
    creating a context on it: a suite's launcher holds no GPU memory)."""
    chosen = torch.device(device)
    if chosen.type == "cpu":
        return
    found = torch.accelerator.current_accelerator(check_available=True)
    if found is None or found.type != chosen.type:
        raise ValueError(f"device {device!r} is not available here: torch {torch.__version__} finds no "
                         f"{chosen.type} device (accelerator: {found.type if found else 'none'}); train "
                         "on 'cpu', or on a machine that has one")
    count = torch.accelerator.device_count()
    if chosen.index is not None and chosen.index >= count:
        raise ValueError(f"device {device!r} is not available here: {count} {chosen.type} device(s), "
                         f"numbered from 0")


def rank_device(device: str) -> torch.device:
    """The device this rank trains on: with several ranks, "cuda" is the rank's own GPU, the
    current CUDA device (`torchrun_group` sets it from LOCAL_RANK)."""
    check_device(device)
    chosen = torch.device(device)
    if chosen.type == "cuda" and world_size() > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return chosen


def local_rows(batch_size: int, grad_accum_steps: int = 1) -> slice:
    """This rank's contiguous rows of a global batch of `batch_size` rows, which it trains on
    in `grad_accum_steps` equal micro-batches."""
    world = world_size()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not split over {world} ranks: each rank "
                         f"trains on batch_size / {world} rows of the global batch, so use a "
                         f"multiple of {world}")
    rows = batch_size // world
    if rows % grad_accum_steps:
        raise ValueError(f"each of the {world} ranks trains on {rows} rows, which do not split into "
                         f"grad_accum_steps={grad_accum_steps} micro-batches: use a batch_size that "
                         f"is a multiple of {world * grad_accum_steps}")
    return slice(rank() * rows, (rank() + 1) * rows)


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of `value` over the ranks (gloo has no AVG: SUM / n); `value` itself alone."""
    if world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def mean_in_shares(items: Sequence[T], mean: Callable[[Sequence[T]], float]) -> float:
    """`mean(items)`, each rank computing it over its share of `items` (which every rank
    holds alike), the shares weighted by their length."""
    world = world_size()
    if world == 1:
        return mean(items)
    share = items[rank()::world]
    total = torch.tensor(mean(share) * len(share) if share else 0.0, dtype=torch.float64,
                         device=_collective_device())
    dist.all_reduce(total)
    return total.item() / len(items)


def agree_to_stop(asked: bool, reason: str | None) -> tuple[bool, str | None]:
    """(stop, reason): stop when any rank asked to. A rank that did not ask takes the reason
    of the first rank that did, as "rank r: ..."; the reasons are exchanged only then."""
    if world_size() == 1:
        return asked, reason
    flag = torch.tensor(float(asked), device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return False, reason
    asks: list[tuple[bool, str | None]] = [(False, None)] * world_size()
    dist.all_gather_object(asks, (asked, reason))
    if asked:
        return True, reason
    first = next(r for r, (rank_asked, _) in enumerate(asks) if rank_asked)
    return True, f"rank {first}: {asks[first][1] or 'asked to stop'}"


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl reduces only CUDA tensors; every other backend takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
