"""The scale state the analysis carries along each value of the traced graph: which channels are divided by which scales."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

Run = tuple[str | None, int, int]  # (site key, first channel, count): channels of that site's scale; None: scale 1
Unit = tuple[str, int]  # (scale variable: the module whose output the fold divides, channel)


@dataclass(frozen=True, eq=False)
class Value:
    """A value some of whose channels (dim 1) are divided by scales: ``labels[c]`` is channel ``c``'s unit
    (None: unscaled). ``pre`` (an id) marks a pre-activation value: a Conv2d/Linear/norm output, or a sum of
    them, that no activation has read yet; the first activation reading it is a site."""

    labels: tuple[Unit | None, ...]
    pre: str = ""
    producer: str = ""  # the module a classic site is keyed by (the conv before a norm); "" for a sum
    norm: str | None = None
    norm_type: str = ""
    added_affine: bool = False
    in_channels: int = 0
    blocked: str = ""  # why this value cannot be a site (a norm without affine parameters)
    fix: str = ""
    positions: int = 1  # > 1 after a channel-major flatten: each channel's P columns
    via: tuple[str, ...] = ()
    max_factor: float = 1.0
    grid: torch.Tensor | None = None  # while channels are spread over several dims: label ids laid out as the value

    @property
    def scaled(self) -> bool:
        return any(u is not None for u in self.labels)

    def through(self, name: str, max_factor: float = 1.0) -> Value:
        return dataclasses.replace(self, via=(*self.via, name), max_factor=self.max_factor * max_factor)

    def read(self) -> Value | None:
        """The value once an activation has read it: no longer a pre-activation."""
        out = dataclasses.replace(self, pre="", producer="", norm=None, norm_type="", blocked="", fix="")
        return out if out.scaled else None


@dataclass(frozen=True)
class Pieces:
    """The pieces of a ``chunk`` or ``split`` along the channels."""

    items: tuple[Value | None, ...]


State = Value | Pieces | None  # None: carries no scale


def units(x: State) -> list[Unit]:
    """The units ``x`` carries, in channel order."""
    if isinstance(x, Pieces):
        return [u for i in x.items for u in units(i)]
    return [u for u in x.labels if u is not None] if isinstance(x, Value) else []
