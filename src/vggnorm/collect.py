"""Stream batches through the network once, reducing every ReLU output to per-filter sums.

A forward hook on each site's ReLU reduces its output ``(N, C, H, W) -> (C,)`` immediately (the
ReLUs are in-place, so a stored conv output would be overwritten, and keeping activations would
cost memory proportional to the data). Sums stay on the device; counts are Python integers taken
from shapes, so there is no host synchronisation per batch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vggnorm import data as data_mod
from vggnorm.device import memory_format, precision_mode
from vggnorm.errors import DataError
from vggnorm.layers import Site
from vggnorm.models import load_model
from vggnorm.stats import LayerStats, Stats

HookFn = Callable[[Site, torch.Tensor], None]


@contextlib.contextmanager
def relu_hooks(model: nn.Module, sites: Sequence[Site], fn: HookFn) -> Iterator[None]:
    """Call ``fn(site, output)`` with each site's ReLU output during forward passes of ``model``.

    The one place vggnorm hooks ReLUs: measuring (``ReluSums``) and checking (``checks``) both use it.
    """
    modules = dict(model.named_modules())
    handles = [modules[s.relu].register_forward_hook(lambda m, args, out, site=s: fn(site, out)) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ReluSums:
    """Forward hooks that add each site's ReLU output, per filter, into float64 sums.

    A batch's sums are committed only after its forward pass completes (``commit``), so an
    interrupt in the middle of a batch leaves a consistent state that can be saved and resumed.
    """

    def __init__(self, sites: Sequence[Site], device: torch.device, initial: Stats | None = None) -> None:
        self.sites = list(sites)
        self.sums = {s.conv: torch.zeros(s.out_channels, dtype=torch.float64, device=device) for s in self.sites}
        self.counts = dict.fromkeys(self.sums, 0)
        if initial is not None:
            for s in self.sites:
                self.sums[s.conv] += initial.layers[s.conv].sum.to(device)
                self.counts[s.conv] = initial.layers[s.conv].count
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}

    def _add(self, site: Site, output: torch.Tensor) -> None:
        if output.ndim == 2:  # an fc site: (N, C) -> (C,)
            self._pending[site.conv] = (output.sum(dim=0, dtype=torch.float64), output.shape[0])
            return
        n, _, h, w = output.shape
        # (N, C, H, W) -> (N, C) in the activations' dtype (H*W terms, cascade-summed: ~1e-7
        # relative in float32), then -> (C,) in float64. Reducing all of it with dtype=float64
        # costs ~30x more on CPU. bf16/fp16 activations (autocast) are summed in float32.
        low = output.dtype in (torch.float16, torch.bfloat16)
        partial = output.sum(dim=(2, 3), dtype=torch.float32 if low else None).sum(dim=0, dtype=torch.float64)
        self._pending[site.conv] = (partial, n * h * w)

    def attached(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return relu_hooks(model, self.sites, self._add)

    def commit(self) -> None:
        if len(self._pending) != len(self.sites):
            missing = sorted(set(self.sums) - set(self._pending))
            raise RuntimeError(f"ReLU hooks did not fire for {missing}")
        for name, (partial, count) in self._pending.items():
            self.sums[name] += partial
            self.counts[name] += count
        self._pending.clear()

    def layers(self) -> dict[str, LayerStats]:
        return {
            s.conv: LayerStats(s.conv, s.relu, s.bn, self.sums[s.conv].cpu(), self.counts[s.conv]) for s in self.sites
        }


def forward_part(model: nn.Module, sites: Sequence[Site]) -> nn.Module:
    """The part of the model the statistics need: ``features`` unless an fc site is measured."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        return model
    inside = {f"features.{name}" for name, _ in features.named_modules() if name}
    return features if all(s.relu in inside for s in sites) else model


def images_of(batch: Any) -> torch.Tensor | None:
    """The images of a batch: a ``data.Batch``, a tensor, or an ``(images, labels)`` pair."""
    if isinstance(batch, data_mod.Batch):
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
    precision: str = "fp32",
) -> None:
    """Run every batch through ``model`` with ``sums`` attached; call ``on_batch`` after each commit.

    The model's parameters decide the input dtype (a float64 model measures in float64); it should
    already be in ``memory_format(device)`` (``load_model`` does that).
    """
    net = forward_part(model, sums.sites)
    fmt = memory_format(device)
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    with torch.inference_mode(), precision_mode(precision, device.type), sums.attached(model):
        for batch in batches:
            images = images_of(batch)
            if images is not None:
                net(images.to(device, dtype=dtype, non_blocking=True, memory_format=fmt))
                sums.commit()
            if on_batch is not None:
                on_batch(batch)


def measuring_model(
    arch: str,
    state_dict: Mapping[str, torch.Tensor],
    preprocess: data_mod.Preprocess,
    device: torch.device,
    *,
    precision: str = "fp32",
) -> nn.Module:
    """``arch`` carrying ``state_dict`` as vggnorm measures it: under the policy's pooling and padding,
    in the device's memory format, and in float64 for ``precision="fp64"``."""
    model = load_model(
        arch,
        state_dict,
        device=device,
        memory_format=memory_format(device),
        pooling=preprocess.pooling,
        padding=preprocess.padding,
    )
    return model.double() if precision == "fp64" else model


def measure_files(
    model: nn.Module,
    files: list[Path],
    preprocess: data_mod.Preprocess,
    sites: Sequence[Site],
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[Stats, list[tuple[str, str]]]:
    """Per-filter means of ``model`` over ``files`` at ``sites``; returns the skipped files too.

    Images are decoded as ``preprocess.decode`` says (``--decode gpu`` needs a CUDA ``device``)."""
    data_mod.check_decode(preprocess.decode, device)
    sums = ReluSums(sites, device)
    loader = data_mod.make_loader(
        files,
        preprocess,
        batch_size=batch_size,
        workers=data_mod.default_workers() if workers is None else workers,
        device=device,
    )
    skipped: list[tuple[str, str]] = []
    num_images = 0
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=not progress, desc="measuring") as bar:

        def on_batch(batch: data_mod.Batch) -> None:
            nonlocal num_images
            num_images += len(batch.indices)
            skipped.extend((str(files[i]), reason) for i, reason in batch.failures)
            bar.update(batch.num_files)

        measure(model, loader, sums, device=device, on_batch=on_batch)
    if num_images == 0:
        raise DataError("none of the images could be decoded")
    return Stats(sums.layers(), num_images, skipped=skipped), skipped
