"""The witness: what a model computes when it is run as its user runs it.

``verify``, apply's self-check and the API's ``verify_models`` prove a normalization with this module
and nothing of the measuring path (``core.measure``): they share only the file readers. The witness calls
the model's whole ``forward``, unmodified, and reads each site's activation as it is returned, with a
``TorchFunctionMode`` of its own that numbers the pass's calls of ReLU, LeakyReLU and PReLU (modules and
functions alike, each call apart: a module called at three sites is three calls). A pass that makes
another number of calls than the statistics' model, or an activation that does not run exactly once,
makes the proof fail (``WitnessError``); it is never skipped.

The output read is the activation's return value at the moment it returns: later in-place operations
cannot change what was read, and an in-place activation's output is read before anything else can
overwrite it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from vggnorm.errors import VggnormError


class WitnessError(VggnormError):
    """The model did not run as the statistics say it does: an activation ran twice, or not at all."""


# what a ReLU, LeakyReLU or PReLU call is at run time: the modules call the first, fifth and sixth
_ACTIVATIONS = (
    F.relu,
    torch.relu,
    torch.relu_,
    torch.Tensor.relu,
    torch.Tensor.relu_,
    F.leaky_relu,
    F.prelu,
    torch.prelu,
)


class _Witness(TorchFunctionMode):
    """Sees every torch function the forward calls; passes the output of the activation calls named by
    their index (``activations``: key -> index among the pass's ReLU/LeakyReLU/PReLU calls) to ``take``."""

    def __init__(self, activations: Mapping[str, int], take: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.keys = {index: key for key, index in activations.items()}
        self.take = take
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(func is f for f in _ACTIVATIONS):
            key = self.keys.get(self.calls)
            self.calls += 1
            if key is not None:
                self.take(key, out)
        return out


@contextlib.contextmanager
def _hooks(
    model: nn.Module, activations: Mapping[str, int], take: Callable[[str, torch.Tensor], None], total: int | None
) -> Iterator[Callable[[], None]]:
    """Watch ``model``'s forward passes; yields a function that checks one pass made ``total`` calls and
    starts counting the next."""
    witness = _Witness(activations, take)

    def next_pass() -> None:
        made, witness.calls = witness.calls, 0
        if total is not None and made != total:
            raise WitnessError(
                f"the model called ReLU, LeakyReLU or PReLU {made} times in one forward pass, where the statistics' "
                f"model has {total} calls: the activations the statistics name cannot be found in it"
            )

    with witness:
        yield next_pass


def _once(seen: dict[str, int], activations: Mapping[str, int]) -> None:
    wrong = {k: n for k, n in ((k, seen.get(k, 0)) for k in activations) if n != 1}
    if wrong:
        said = ", ".join(f"{k} (activation call {activations[k]}) ran {n} times" for k, n in wrong.items())
        raise WitnessError(f"in one forward pass {said}: each measured activation must run exactly once")


def activation_outputs(
    model: nn.Module, activations: Mapping[str, int], x: torch.Tensor, *, total: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each activation call's output (a copy) and the model's output, for one call ``model(x)``;
    ``activations`` maps keys to call indices, ``total`` is the calls the pass must make."""
    outputs: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}

    def take(key: str, out: torch.Tensor) -> None:
        seen[key] = seen.get(key, 0) + 1
        outputs[key] = out.detach().clone()

    with torch.inference_mode(), _hooks(model, activations, take, total) as next_pass:
        y = model(x)
        next_pass()
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
    activations: Mapping[str, int],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    num_classes: int = 0,
    total: int | None = None,
) -> Means:
    """Run ``model(images)`` on each batch of ``(images, classes)`` (``classes``: ``(N,)`` class indices
    or None) and sum each activation's output per channel in float64."""
    result = Means()
    pending: dict[str, tuple[torch.Tensor, int]] = {}  # this batch's (N, C) per-image sums, positions per image

    def take(key: str, out: torch.Tensor) -> None:
        if key in pending:
            raise WitnessError(f"{key} (activation call {activations[key]}) ran twice in one forward pass")
        # (N, C, H, W) -> (N, C): one image's positions summed in the output's dtype (half precision: in
        # float32), then float64 across images
        low = out.dtype in (torch.float16, torch.bfloat16)
        per_image = (
            out.sum(dim=tuple(range(2, out.ndim)), dtype=torch.float32 if low else None) if out.ndim > 2 else out
        )
        pending[key] = (per_image.double(), out[0, 0].numel() if out.ndim > 2 else 1)

    with torch.inference_mode(), _hooks(model, activations, take, total) as next_pass:
        for images, classes in batches:
            pending.clear()
            model(images)
            next_pass()
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
