"""Stream images through the network once, reducing every ReLU output to per-filter sums.

A forward hook on each site's ReLU reduces its output ``(N, C, H, W) -> (C,)`` immediately (the
ReLUs are in-place, so a stored conv output would be overwritten, and keeping activations would
cost memory proportional to the data). Sums stay on the device; counts are Python integers taken
from shapes, so there is no host synchronisation per batch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vggnorm import data as data_mod
from vggnorm.errors import DataError, VggnormError
from vggnorm.layers import Site, find_topology
from vggnorm.stats import LayerStats, Stats

log = logging.getLogger(__name__)


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

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if output.ndim == 2:  # an fc site: (N, C) -> (C,)
                self._pending[name] = (output.sum(dim=0, dtype=torch.float64), output.shape[0])
                return
            n, _, h, w = output.shape
            # (N, C, H, W) -> (N, C) in float32 (H*W terms, cascade-summed: ~1e-7 relative), then
            # -> (C,) in float64. Reducing all of it with dtype=float64 costs ~30x more on CPU.
            # bf16/fp16 activations (autocast) are summed in float32, never in their own dtype.
            low = output.dtype in (torch.float16, torch.bfloat16)
            partial = output.sum(dim=(2, 3), dtype=torch.float32 if low else None).sum(dim=0, dtype=torch.float64)
            self._pending[name] = (partial, n * h * w)

        return hook

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[ReluSums]:
        modules = dict(model.named_modules())
        handles = [modules[s.relu].register_forward_hook(self._hook(s.conv)) for s in self.sites]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

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


def forward_part(model: nn.Module, sums: ReluSums) -> nn.Module:
    """The part of the model the statistics need: ``features`` unless an fc site is measured."""
    features = getattr(model, "features", None)
    if features is None:
        return model
    inside = {f"features.{name}" for name, _ in features.named_modules() if name}
    return features if all(s.relu in inside for s in sums.sites) else model


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device that is absent is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VggnormError(f"bad --device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VggnormError(
                f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VggnormError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise VggnormError(f"--device {device}: vggnorm supports cpu and cuda")
    return dev


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise VggnormError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise VggnormError(f"--precision {precision} is for CUDA; on {device.type} vggnorm measures in fp32")


@contextlib.contextmanager
def precision_mode(precision: str = "fp32", device_type: str = "cpu") -> Iterator[None]:
    """The arithmetic of the forward pass: fp32 (TF32 off, the default: exact statistics), tf32, or
    bf16/fp16 autocast. The hook sums in float32 and float64 whatever the activations' dtype."""
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    ieee = precision == "fp32"
    torch.backends.cudnn.conv.fp32_precision = "ieee" if ieee else "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee" if ieee else "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CPU, where it made VGG19's forward 1.5x faster (scripts/bench.py); not yet
    measured on CUDA, so contiguous there."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def measure(
    model: nn.Module,
    batches: Iterable[data_mod.Batch],
    sums: ReluSums,
    *,
    device: torch.device,
    on_batch: Callable[[data_mod.Batch], None] | None = None,
    precision: str = "fp32",
) -> None:
    """Run every batch through ``model`` with ``sums`` attached; call ``on_batch`` after each commit.

    The model should already be in ``memory_format(device)`` (``load_model`` does that).
    """
    net = forward_part(model, sums)
    fmt = memory_format(device)
    with torch.inference_mode(), precision_mode(precision, device.type), sums.attached(model):
        for batch in batches:
            if batch.images is not None:
                net(batch.images.to(device, non_blocking=True, memory_format=fmt))
                sums.commit()
            if on_batch is not None:
                on_batch(batch)


def measure_means(
    model: nn.Module,
    files: list[Path],
    preprocess: data_mod.Preprocess,
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = False,
    include_classifier: bool = False,
) -> tuple[Stats, list[tuple[str, str]]]:
    """Per-filter means of ``model`` over ``files`` (verify's re-measurement); returns skipped files too.

    Images are decoded as ``preprocess.decode`` says (``--decode gpu`` needs a CUDA ``device``)."""
    data_mod.check_decode(preprocess.decode, device)
    topo = find_topology(model)
    sums = ReluSums([*topo.sites, *(topo.fc_sites if include_classifier else ())], device)
    loader = data_mod.make_loader(
        files, preprocess, batch_size=batch_size, workers=data_mod.default_workers() if workers is None else workers,
        device=device,
    )  # fmt: skip
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
    return Stats(sums.layers(), num_images), skipped
