"""Data parallelism under torchrun (gloo on CPU, NCCL on GPU).

Every process builds the same step plan and takes its share of each optimizer step's
micro-batches. Gradients are summed over processes once per optimizer step (one flattened
all-reduce per bucket), after the micro-batch losses were divided by the *global* normaliser, so
the update equals the single-process update on the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 25_000_000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(prefer_cuda: bool = True) -> DistInfo:
    """Join the torchrun process group if there is one; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = prefer_cuda and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def allreduce_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum gradients over processes, in flattened buckets."""
    if info.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= BUCKET_ELEMENTS:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in bucket:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_sum(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum a dict of floats over processes; a key missing on a process counts as 0 there."""
    if info.world_size == 1:
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(gathered, values)
    total: dict[str, float] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def broadcast_object(obj: object, info: DistInfo) -> object:
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
