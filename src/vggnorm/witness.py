"""The witness: what a model computes when it is run as its user runs it.

``verify``, apply's self-check and the API's ``verify_models`` prove a normalization with this module
and nothing of the measuring path (``collect``): they share only the file readers. The witness calls
the model's whole ``forward``, unmodified, and reads each site's activation through forward hooks of
its own on the user's own activation modules. An activation that does not run exactly once per
forward pass makes the proof fail (``WitnessError``); it is never skipped.

A hook's output is the activation's return value at the moment it runs: later in-place operations
cannot change what was read, and an in-place activation's output is read before anything else can
overwrite it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from vggnorm.errors import VggnormError


class WitnessError(VggnormError):
    """The model did not run as the statistics say it does: an activation ran twice, or not at all."""


@contextlib.contextmanager
def _hooks(
    model: nn.Module, activations: Mapping[str, str], take: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Forward hooks calling ``take(key, output)`` on the module at ``activations[key]`` (its path)."""
    modules = dict(model.named_modules())
    missing = sorted(p for p in activations.values() if p not in modules)
    if missing:
        raise WitnessError(f"the model has no module {', '.join(missing)}: the statistics belong to another model")
    handles = [
        modules[path].register_forward_hook(lambda m, args, out, key=key: take(key, out))
        for key, path in activations.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _once(seen: dict[str, int], activations: Mapping[str, str]) -> None:
    wrong = {k: n for k, n in ((k, seen.get(k, 0)) for k in activations) if n != 1}
    if wrong:
        said = ", ".join(f"{activations[k]} ran {n} times" for k, n in wrong.items())
        raise WitnessError(f"in one forward pass {said}: each measured activation must run exactly once")


def activation_outputs(
    model: nn.Module, activations: Mapping[str, str], x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each activation's output (a copy) and the model's output, for one call ``model(x)``."""
    outputs: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def take(key: str, out: torch.Tensor) -> None:
        seen[key] = seen.get(key, 0) + 1
        outputs[key] = out.detach().clone()

    with torch.inference_mode(), _hooks(model, activations, take):
        y = model(x)
    _once(seen, activations)
    return outputs, y


@dataclass
class Means:
    """Per-channel sums of each activation over images and positions, in float64, and their counts;
    per class too when the batches say each image's class."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # (C,) float64
    counts: dict[str, int] = field(default_factory=dict)  # images x positions
    class_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # (K, C) float64
    class_counts: dict[str, torch.Tensor] = field(default_factory=dict)  # (K,) int64
    num_images: int = 0

    def mean(self, key: str) -> torch.Tensor:
        return self.sums[key] / self.counts[key]

    def balanced_mean(self, key: str) -> torch.Tensor:
        """The mean over the classes that have images of each class's mean."""
        counts = self.class_counts[key]
        present = counts > 0
        return (self.class_sums[key][present] / counts[present].double().view(-1, 1)).mean(dim=0)


def activation_means(
    model: nn.Module,
    activations: Mapping[str, str],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    num_classes: int = 0,
) -> Means:
    """Run ``model(images)`` on each batch of ``(images, classes)`` (``classes``: ``(N,)`` class indices
    or None) and sum each activation's output per channel in float64."""
    result = Means()
    pending: dict[str, tuple[torch.Tensor, int]] = {}  # this batch's (N, C) per-image sums, positions per image

    def take(key: str, out: torch.Tensor) -> None:
        if key in pending:
            raise WitnessError(f"{activations[key]} ran twice in one forward pass: each must run exactly once")
        # (N, C, H, W) -> (N, C): one image's positions summed in the output's dtype (half precision: in
        # float32), then float64 across images
        low = out.dtype in (torch.float16, torch.bfloat16)
        per_image = (
            out.sum(dim=tuple(range(2, out.ndim)), dtype=torch.float32 if low else None) if out.ndim > 2 else out
        )
        pending[key] = (per_image.double(), out[0, 0].numel() if out.ndim > 2 else 1)

    with torch.inference_mode(), _hooks(model, activations, take):
        for images, classes in batches:
            pending.clear()
            model(images)
            _once(dict.fromkeys(pending, 1), activations)
            result.num_images += images.shape[0]
            for key, (per_image, positions) in pending.items():  # (N, C) -> (C,)
                result.sums[key] = result.sums.get(key, 0) + per_image.sum(dim=0)
                result.counts[key] = result.counts.get(key, 0) + per_image.shape[0] * positions
                if num_classes and classes is not None:
                    index = classes.to(per_image.device)
                    sums = torch.zeros(num_classes, per_image.shape[1], dtype=torch.float64, device=per_image.device)
                    result.class_sums[key] = result.class_sums.get(key, 0) + sums.index_add_(0, index, per_image)
                    counts = torch.bincount(index, minlength=num_classes) * positions
                    result.class_counts[key] = result.class_counts.get(key, 0) + counts
    result.sums = {k: v.cpu() for k, v in result.sums.items()}
    result.class_sums = {k: v.cpu() for k, v in result.class_sums.items()}
    result.class_counts = {k: v.cpu() for k, v in result.class_counts.items()}
    return result
