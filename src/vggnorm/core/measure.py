"""Stream batches through the network once, reducing every ReLU output to per-filter sums.

A forward hook on each site's ReLU reduces its output ``(N, C, H, W) -> (C,)`` immediately (the
ReLUs are in-place, so a stored conv output would be overwritten, and keeping activations would
cost memory proportional to the data). Sums stay on the device; counts are Python integers taken
from shapes, so there is no host synchronisation per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vggnorm.analysis.topology import Site
from vggnorm.core.device import precision_mode
from vggnorm.core.stats import LayerStats, Stats
from vggnorm.errors import CheckpointError
from vggnorm.options import Precision

HookFn = Callable[[Site, torch.Tensor], None]


# the activation functions a site's call is one of: nn.ReLU, LeakyReLU and PReLU call the first, fifth and
# sixth; a model's own forward may call any of them
ACTIVATION_FUNCTIONS = frozenset(
    {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.leaky_relu, F.prelu, torch.prelu}
)


class _ActivationCalls(TorchFunctionMode):
    """Numbers the activation calls of each forward pass of ``model`` (``Site.call``) and passes the
    sites' outputs to ``fn`` as they are returned (before any later in-place op can change them)."""

    def __init__(self, model: nn.Module, sites: Sequence[Site], fn: HookFn, total: int | None) -> None:
        super().__init__()
        self.by_call = {s.call: s for s in sites}
        self.fn, self.total, self.count = fn, total, 0
        self.handles = [
            model.register_forward_pre_hook(lambda m, args: self._reset()),
            model.register_forward_hook(lambda m, args, out: self._done()),
        ]

    def _reset(self) -> None:
        self.count = 0

    def _done(self) -> None:
        if self.total is not None and self.count != self.total:
            raise CheckpointError(
                f"the model called ReLU, LeakyReLU or PReLU {self.count} times in one forward pass where its traced "
                f"graph has {self.total} calls: it does not run as traced (a module whose forward calls them "
                "internally?), so its activations cannot be told apart"
            )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in ACTIVATION_FUNCTIONS:
            site = self.by_call.get(self.count)
            self.count += 1
            if site is not None:
                self.fn(site, out)
        return out


@contextlib.contextmanager
def relu_hooks(model: nn.Module, sites: Sequence[Site], fn: HookFn, total: int | None = None) -> Iterator[None]:
    """Call ``fn(site, output)`` with each site's activation output during forward passes of ``model``.

    A site is an activation *call*, found by its index among the forward's calls of ReLU, LeakyReLU and
    PReLU (modules or functions): a module called at several sites, or a function, is measured per call.
    ``total``: the calls one forward pass must make (the analysis' count); another count is an error.
    The one place vggnorm's measuring path finds activations (``ReluSums``, ``checks``).
    """
    mode = _ActivationCalls(model, sites, fn, total)
    try:
        with mode:
            yield
    finally:
        for h in mode.handles:
            h.remove()


class ReluSums:
    """Forward hooks that add each site's ReLU output, per filter, into float64 sums.

    A batch's sums are committed only after its forward pass completes (``commit``), so an
    interrupt in the middle of a batch leaves a consistent state that can be saved and resumed.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        device: torch.device,
        initial: Stats | None = None,
        *,
        file_labels: Sequence[int] | None = None,
        num_classes: int = 0,
        total: int | None = None,
    ) -> None:
        self.sites = list(sites)
        self.total = total  # the activation calls one forward pass makes (the analysis' count), when known
        self.sums = {s.conv: torch.zeros(s.out_channels, dtype=torch.float64, device=device) for s in self.sites}
        self.counts = dict.fromkeys(self.sums, 0)
        # per class (--per-class): each file's class, and (K, C) sums and (K,) counts per site
        self.file_labels = torch.tensor(list(file_labels), device=device) if file_labels is not None else None
        self.num_classes = num_classes
        self.class_sums = (
            {s.conv: torch.zeros(num_classes, s.out_channels, dtype=torch.float64, device=device) for s in self.sites}
            if self.file_labels is not None
            else {}
        )
        self.class_counts = (
            {s.conv: torch.zeros(num_classes, dtype=torch.int64, device=device) for s in self.sites}
            if self.file_labels is not None
            else {}
        )
        if initial is not None:
            for s in self.sites:
                layer = initial.layers[s.conv]
                self.sums[s.conv] += layer.sum.to(device)
                self.counts[s.conv] = layer.count
                if self.file_labels is not None and layer.class_sum is not None and layer.class_count is not None:
                    self.class_sums[s.conv] += layer.class_sum.to(device)
                    self.class_counts[s.conv] += layer.class_count.to(device)
        self._labels: torch.Tensor | None = None  # the classes of the batch being measured
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}
        self._pending_classes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_batch(self, file_indices: Sequence[int]) -> None:
        """Say which files the next forward pass holds (for per-class sums)."""
        if self.file_labels is not None:
            index = torch.as_tensor(list(file_indices), dtype=torch.long, device=self.file_labels.device)
            self._labels = self.file_labels[index]

    def _add(self, site: Site, output: torch.Tensor) -> None:
        if site.conv in self._pending:  # the analysis refuses an activation module called twice: a bug if seen
            raise CheckpointError(f"the activation {site.relu} ran twice in one forward pass: one call, one scale")
        if output.ndim == 2:  # an fc site: (N, C) -> (C,)
            per_image, positions = output, 1
        else:
            # (N, C, H, W) -> (N, C) in the activations' dtype (H*W terms, cascade-summed: ~1e-7
            # relative in float32), then -> (C,) in float64. Reducing all of it with dtype=float64
            # costs ~30x more on CPU. bf16/fp16 activations (autocast) are summed in float32.
            low = output.dtype in (torch.float16, torch.bfloat16)
            per_image = output.sum(dim=(2, 3), dtype=torch.float32 if low else None)
            positions = output.shape[2] * output.shape[3]
        self._pending[site.conv] = (per_image.sum(dim=0, dtype=torch.float64), output.shape[0] * positions)
        if self._labels is not None:  # (N, C) -> (K, C): each image into its class, in float64
            sums = torch.zeros(self.num_classes, per_image.shape[1], dtype=torch.float64, device=per_image.device)
            sums.index_add_(0, self._labels, per_image.double())
            counts = torch.bincount(self._labels, minlength=self.num_classes) * positions
            self._pending_classes[site.conv] = (sums, counts)

    def attached(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return relu_hooks(model, self.sites, self._add, self.total)

    def commit(self) -> None:
        if len(self._pending) != len(self.sites):
            missing = sorted(set(self.sums) - set(self._pending))
            raise CheckpointError(
                f"the activations of {missing} did not run in the forward pass, so they cannot be measured"
            )
        for name, (partial, count) in self._pending.items():
            self.sums[name] += partial
            self.counts[name] += count
        for name, (class_partial, class_count) in self._pending_classes.items():
            self.class_sums[name] += class_partial
            self.class_counts[name] += class_count
        self._pending.clear()
        self._pending_classes.clear()

    def layers(self) -> dict[str, LayerStats]:
        out = {}
        for s in self.sites:
            layer = LayerStats(
                s.conv, s.relu, s.bn, self.sums[s.conv].cpu(), self.counts[s.conv], activation=s.activation, norm=s.norm
            )
            if self.file_labels is not None:
                layer.class_sum, layer.class_count = self.class_sums[s.conv].cpu(), self.class_counts[s.conv].cpu()
            out[s.conv] = layer
        return out


class Batch(NamedTuple):
    images: torch.Tensor | None  # (N, 3, crop, crop) or None when every file failed
    indices: list[int]  # file indices of the decoded images
    failures: list[tuple[int, str]]  # (file index, reason)

    @property
    def num_files(self) -> int:
        return len(self.indices) + len(self.failures)


def images_of(batch: Any) -> torch.Tensor | None:
    """The images of a batch: a ``data.Batch``, a tensor, or an ``(images, labels)`` pair."""
    if isinstance(batch, Batch):
        return batch.images
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"a batch must be a tensor, an (images, labels) pair or a vggnorm Batch, not {type(batch)}")


def measure(
    model: nn.Module,
    batches: Iterable[Any],
    sums: ReluSums,
    *,
    device: torch.device,
    on_batch: Callable[[Any], None] | None = None,
    precision: Precision = Precision.FP32,
) -> None:
    """Run every batch through ``model`` with ``sums`` attached; call ``on_batch`` after each commit.

    The model's parameters decide the input dtype (a float64 model measures in float64) and memory
    format (channels-last inputs only for a channels-last model: a user's ``x.view(N, -1)`` fails on
    them).
    """
    fmt = _input_format(model)
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    with torch.inference_mode(), precision_mode(precision, device.type), sums.attached(model):
        for batch in batches:
            images = images_of(batch)
            if isinstance(batch, Batch):
                sums.set_batch(batch.indices)
            if images is not None:
                # the whole forward, as the model's user runs it: a model may transform its input, or run
                # layers of its own, before (or around) the part that holds the sites
                model(images.to(device, dtype=dtype, non_blocking=True, memory_format=fmt))
                sums.commit()
            if on_batch is not None:
                on_batch(batch)


def _input_format(model: nn.Module) -> torch.memory_format:
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] * p.shape[2] * p.shape[3] > 1:  # a conv weight whose layout shows
            return torch.channels_last if not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format
