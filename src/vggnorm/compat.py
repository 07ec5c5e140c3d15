"""The private torch and torchvision APIs vggnorm relies on, each behind one function.

Written against torch 2.14.1 and torchvision 0.29.1 (the versions the Makefile pins). Each comment says what
vggnorm uses and what breaks if it moves; ``tests/test_compat.py`` checks each shim against the installed
torch. torch is imported inside the functions, so importing this module costs nothing (``--help`` imports
no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# The logger torch's fake tensors report a failed kernel to (an ERROR with a traceback). The analysis
# tries input sizes a model may not take and silences it meanwhile; if the module moves, that expected
# failure is logged on stderr again (nothing else changes).
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


def fake_tensor_mode() -> Any:
    """A ``FakeTensorMode`` that accepts real tensors as inputs: the analysis runs a model with real weights
    under it to learn its shapes without computing or allocating anything.

    ``torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)``, private since torch 2.0; if
    it moves or changes its signature, every command that analyses a model fails (the analysis learns no
    shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def dropout_classes() -> tuple[type[nn.Module], ...]:
    """The base class of torch's dropouts (``Dropout``, ``Dropout2d``, ``AlphaDropout``, ...), which keep
    their input's shape.

    ``torch.nn.modules.dropout._DropoutNd``; if it moves, the analysis cannot be imported (every command
    that analyses a model fails)."""
    from torch.nn.modules.dropout import _DropoutNd

    return (_DropoutNd,)


def norm_base_class() -> type[nn.Module]:
    """The base class of torch's batch and instance norms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
    ``InstanceNorm1d/2d/3d`` and their lazy forms), which keep their input's shape.

    ``torch.nn.modules.batchnorm._NormBase``; if it moves, the analysis cannot be imported."""
    from torch.nn.modules.batchnorm import _NormBase

    return _NormBase


def batch_norm_class() -> type[nn.Module]:
    """The base class of torch's batch norms (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), which the fold
    scales through their fixed statistics.

    ``torch.nn.modules.batchnorm._BatchNorm``; if it moves, every model with BatchNorm is refused."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return _BatchNorm


def instance_norm_class() -> type[nn.Module]:
    """The base class of torch's instance norms (``InstanceNorm1d/2d/3d``).

    ``torch.nn.modules.instancenorm._InstanceNorm``; if it moves, every model with InstanceNorm is refused."""
    from torch.nn.modules.instancenorm import _InstanceNorm

    return _InstanceNorm


def pair(value: Any) -> tuple[Any, Any]:
    """``value`` as a pair, as torch's pooling layers read their ``kernel_size``, ``stride`` and ``padding``.

    ``torch.nn.modules.utils._pair``; if it moves, shape propagation through pooling layers fails."""
    from torch.nn.modules.utils import _pair

    result: tuple[Any, Any] = _pair(value)
    return result


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether hooks run before or after ``module``'s forward (which may change what it computes).

    ``Module._forward_pre_hooks`` and ``Module._forward_hooks`` (no public accessor); if they move, the
    analysis cannot see hooks, and a hooked model is no longer refused."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def own_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]]:
    """The dicts that hold ``module``'s own parameters and buffers (not its children's), by name, which a
    float64 forward swaps a tensor in and out of for the duration of one call.

    ``Module._parameters`` and ``Module._buffers``; if they move, verify's float64 forward fails."""
    parameters: dict[str, torch.Tensor | None] = module._parameters  # type: ignore[assignment]
    buffers: dict[str, torch.Tensor | None] = module._buffers
    return parameters, buffers


def image_classification_transform(
    *, crop: int, resize: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str
) -> nn.Module:
    """torchvision's own ImageNet classification transform (resize, center crop, scale to 0-1, normalize),
    the one its weights' ``transforms()`` return.

    ``torchvision.transforms._presets.ImageClassification``; if it moves, measuring with torchvision
    preprocessing fails."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    transform: nn.Module = ImageClassification(
        crop_size=crop, resize_size=resize, mean=mean, std=std, interpolation=InterpolationMode(interpolation)
    )
    return transform
