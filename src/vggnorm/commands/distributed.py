"""torchrun support: each rank measures a disjoint share of the files; rank 0 writes the result.

``torchrun --nproc-per-node N -m vggnorm compute-stats ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. Rank r takes files r, r+N, r+2N, ... (no padding, no duplicates, unlike
``DistributedSampler``). Sums and counts are all-reduced in float64 (NCCL on CUDA, gloo on CPU) and
the skipped-file lists gathered, at every checkpoint and at the end.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vggnorm.core.stats import Stats


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The torchrun world this process is in (a world of one without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: torch.device) -> None:
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def reduce_stats(stats: Stats, world: World, device: torch.device) -> Stats:
    """The sum over ranks of every rank's ``stats`` (a collective: every rank must call it)."""
    if not world.distributed:
        return stats
    names = list(stats.layers)
    # One float64 vector: every layer's sums (and per-class sums and counts), then the counts and the
    # image count (integers exact below 2**53).
    parts: list[torch.Tensor] = []
    for n in names:
        layer = stats.layers[n]
        parts.append(layer.sum.double().flatten())
        if layer.class_sum is not None and layer.class_count is not None:
            parts += [layer.class_sum.double().flatten(), layer.class_count.double()]
    parts.append(torch.tensor([stats.layers[n].count for n in names] + [stats.num_images], dtype=torch.float64))
    flat = torch.cat(parts).to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    layers, offset = {}, 0

    def take(count: int) -> torch.Tensor:
        nonlocal offset
        out = flat[offset : offset + count].clone()
        offset += count
        return out

    for n in names:
        layer = stats.layers[n]
        layers[n] = dataclasses.replace(layer, sum=take(layer.sum.numel()), count=0, class_sum=None, class_count=None)
        if layer.class_sum is not None and layer.class_count is not None:
            layers[n].class_sum = take(layer.class_sum.numel()).view_as(layer.class_sum)
            layers[n].class_count = take(layer.class_count.numel()).round().long()
    for i, n in enumerate(names):
        layers[n].count = int(flat[offset + i])
    gathered: list[list[tuple[str, str]]] = [[] for _ in range(world.size)]
    dist.all_gather_object(gathered, stats.skipped)
    skipped = sorted(s for part in gathered for s in part)
    return Stats(
        layers, int(flat[-1]), stats.provenance, skipped, stats.complete, stats.position, stats.dataset, stats.classes
    )


def agree_max(value: float, world: World, device: torch.device) -> float:
    """The largest ``value`` over all ranks (a collective)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
