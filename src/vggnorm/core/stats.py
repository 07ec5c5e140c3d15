"""Per-filter activation statistics: float64 sums and integer counts per site, and their exact merge.

Sums and counts are kept (not only means) so that partial results merge exactly. Reading and writing
them as HDF5 is ``vggnorm.io.statsfile``'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vggnorm.core.provenance import MeasurementRecord
from vggnorm.errors import InvalidValuesError, StatsFileError, StatsMismatchError


@dataclass
class LayerStats:
    """Sums of one conv's ReLU output per filter, over ``count`` = images x positions."""

    conv: str
    relu: str
    bn: str | None
    sum: torch.Tensor  # (C,) float64
    count: int
    class_sum: torch.Tensor | None = None  # (K, C) float64, with --per-class: the sum per class
    class_count: torch.Tensor | None = None  # (K,) int64: images x positions per class
    activation: str = "ReLU"  # the site's activation (LeakyReLU and PReLU means may be negative)
    norm: str = ""  # the class of ``bn``, the site's normalization (BatchNorm2d, GroupNorm, ...)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count if self.count else torch.full_like(self.sum, float("nan"))

    @property
    def class_means(self) -> torch.Tensor:
        """``(K, C)``: each class's mean feature (NaN for a class with no images)."""
        if self.class_sum is None or self.class_count is None:
            raise StatsMismatchError(
                f"{self.conv}: no per-class sums; measure with `vggnorm compute-stats ... --per-class`"
            )
        return self.class_sum / self.class_count.to(self.class_sum).view(-1, 1)

    @property
    def balanced_mean(self) -> torch.Tensor:
        """``(C,)``: the class-balanced mean, the mean over the classes (with images) of their means."""
        present = self.class_count > 0  # type: ignore[operator]
        return self.class_means[present].mean(dim=0)


@dataclass
class Stats:
    """The statistics of one run plus its provenance and the files it skipped."""

    layers: dict[str, LayerStats]  # keyed by conv module path, in forward order
    num_images: int
    provenance: MeasurementRecord = MeasurementRecord()
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    complete: bool = True
    position: int = 0  # files consumed so far (for --resume)
    dataset: list[tuple[str, int]] = field(default_factory=list)  # the folder's files (relative path, size)
    classes: list[str] = field(default_factory=list)  # with --per-class: the class names, sorted

    @property
    def layer_order(self) -> list[str]:
        return list(self.layers)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: layer.mean for name, layer in self.layers.items()}

    def merge(self, other: Stats) -> Stats:
        """Exact sum of two disjoint measurements of the same layers (per-class sums matched by class name)."""
        if self.layer_order != other.layer_order:
            raise StatsFileError("cannot merge statistics of different layers")
        if bool(self.classes) != bool(other.classes):
            raise StatsMismatchError("cannot merge statistics with per-class sums and statistics without (--per-class)")
        classes = sorted(set(self.classes) | set(other.classes))
        layers = {}
        for n, a in self.layers.items():
            b = other.layers[n]
            layer = dataclasses.replace(a, sum=a.sum + b.sum, count=a.count + b.count, class_sum=None, class_count=None)
            if classes:
                layer.class_sum = _by_class(a, self.classes, classes, "sum") + _by_class(
                    b, other.classes, classes, "sum"
                )
                layer.class_count = _by_class(a, self.classes, classes, "count") + _by_class(
                    b, other.classes, classes, "count"
                )
            layers[n] = layer
        return Stats(
            layers,
            self.num_images + other.num_images,
            self.provenance,
            self.skipped + other.skipped,
            dataset=self.dataset,
            classes=classes,
        )


def _by_class(layer: LayerStats, have: list[str], want: list[str], what: str) -> torch.Tensor:
    """``layer``'s per-class sums (or counts) laid out for the classes ``want`` (zeros where absent)."""
    src = layer.class_sum if what == "sum" else layer.class_count
    assert src is not None
    out = torch.zeros((len(want), *src.shape[1:]), dtype=src.dtype)
    index = {c: i for i, c in enumerate(want)}
    for i, c in enumerate(have):
        out[index[c]] = src[i]
    return out


def check_values(layers: dict[str, LayerStats], source: str | Path) -> None:
    """Refuse what no measurement of ReLU outputs gives: an empty count, a NaN, inf or negative mean."""
    for name, layer in layers.items():
        if layer.count <= 0:
            raise InvalidValuesError(
                f"{source}: layer {name} has count {layer.count}: it measured nothing; measure again"
            )
        mean = layer.mean
        bad = ~torch.isfinite(mean) | (
            (mean < 0) if layer.activation == "ReLU" else torch.zeros_like(mean, dtype=torch.bool)
        )
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise InvalidValuesError(
                f"{source}: layer {name}, filter {i}: mean {float(mean[i])} ({int(bad.sum())} such filter(s)); a mean "
                f"{layer.activation} activation is finite{' and >= 0' if layer.activation == 'ReLU' else ''}: the file is damaged or was edited; measure again with "
                "`vggnorm compute-stats`"
            )
