"""Gatys' names (``conv1_1`` ... ``conv5_4``) for the convs of a plain chain: a pass over the finished topology and the traced graph."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from vggnorm.analysis.handlers import POOL_FNS, POOLS

if TYPE_CHECKING:
    from vggnorm.analysis.topology import Topology


def gatys_names(graph: torch.fx.Graph, modules: dict[str, nn.Module], topology: Topology) -> dict[str, str]:
    """Conv path -> ``convB_I``: the ``I``-th Conv2d called after ``B - 1`` poolings (max or average, a module
    or a function) that follow a conv. Empty unless ``topology`` is a chain (``is_chain``)."""
    if not is_chain(topology):
        return {}
    names: dict[str, str] = {}
    block, index = 1, 0
    for node in graph.nodes:
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        pool = isinstance(m, POOLS) or (node.op in ("call_function", "call_method") and node.target in POOL_FNS)
        if isinstance(m, nn.Conv2d):
            index += 1
            names[str(node.target)] = f"conv{block}_{index}"
        elif pool and index:
            block, index = block + 1, 0
    return names if all(s.conv in names for s in topology.sites) else {}


def is_chain(topology: Topology) -> bool:
    """Whether Gatys' names mean something for ``topology``: a normalizable chain of convs (VGG's, AlexNet's),
    each site compensated by one layer reading it alone. A branching model's would be made up (conv2_18)."""
    readers: dict[str, int] = {}
    for comp in topology.compensations:
        for p in comp.sites:
            readers[p] = readers.get(p, 0) + 1
    return (
        not topology.refusals
        and not topology.streams
        and not topology.absorbs
        and all(len(c.runs) == 1 and c.groups == 1 for c in topology.compensations)
        and all(n == 1 for n in readers.values())
    )
