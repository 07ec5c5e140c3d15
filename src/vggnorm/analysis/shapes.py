"""The traced graph of a model and the shape of every value in it, with no memory and no arithmetic.

``trace`` is torch.fx's tracer keeping torch.nn's layers (and subclasses of its norms, activations,
convs and Linears, such as torchvision's ``LayerNorm2d``) as leaves. ``propagate_shapes`` records each
node's output shape (``shape``): the common layers by formula (``meta_shape``), the rest run on the meta
device, or on fake tensors when the model holds real weights. ``input_fits`` answers whether an input
size runs through a model. The structural analysis (``analysis.topology``) reads these shapes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from vggnorm.analysis import registry
from vggnorm.compat import FAKE_TENSOR_LOGGER, dropout_classes, fake_tensor_mode, norm_base_class, pair
from vggnorm.errors import CheckpointError

_NORMS = (norm_base_class(), nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _elementwise(m: nn.Module) -> bool:
    """torch.nn's activations and their subclasses (an output per input element; not MultiheadAttention)."""
    activation = any(c.__module__ == "torch.nn.modules.activation" for c in type(m).__mro__)
    return activation and not isinstance(m, nn.MultiheadAttention)


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with norms (LayerNorm2d-style subclasses included) and the modules users registered
    (``analysis.registry``) kept as leaves, and the functions users registered recorded as calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=registry.wrapped_functions())
        self.failed_in: tuple[str, nn.Module] | None = None  # the innermost module whose forward failed to trace

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), m)
            raise

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            isinstance(m, (*_NORMS, nn.Conv2d, nn.Linear))
            or _elementwise(m)
            or registry.is_leaf(m)
            or super().is_leaf_module(m, qualname)
        )


def shape_of(node: Any) -> tuple[int, ...] | None:
    return getattr(node, "meta", {}).get("vggnorm_shape")


class Shapes(torch.fx.Interpreter):
    """Runs the traced graph on the model itself under a fake-tensor mode (no memory, no arithmetic,
    no copy of the model) and records each node's output shape."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, mode: contextlib.AbstractContextManager[Any]) -> None:
        super().__init__(model, graph=graph)
        self.mode = mode

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.device.type == "meta" and len(args) == 1 and not kwargs:
            shape = meta_shape(module, tuple(x.shape))
            if shape is not None:
                return x.new_empty(shape)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        with self.mode:
            result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["vggnorm_shape"] = tuple(int(d) for d in result.shape)
        return result


_SAME_SHAPE = (*_NORMS, *dropout_classes(), nn.Identity)


def meta_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape of the common layers, by formula; None for others (they are run on the meta
    device). Running them there costs more than the arithmetic: the first meta pooling imports
    torch's meta registrations (0.3 s), a meta BatchNorm or Linear decomposes through code that
    imports torch._dynamo (0.7 s and more) -- a second of every ``verify``."""
    if isinstance(module, _SAME_SHAPE) or _elementwise(module):
        return shape
    if isinstance(module, nn.Linear):
        if shape[-1] != module.in_features:
            raise RuntimeError(f"{module} got {shape[-1]} features")
        return (*shape[:-1], module.out_features)
    if len(shape) != 4:
        return None
    if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str) and shape[1] == module.in_channels:
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        return (shape[0], module.out_channels, *_window(shape[2:], k, s, p, d, ceil=False))
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k, p = pair(module.kernel_size), pair(module.padding)
        s = pair(module.stride if module.stride is not None else module.kernel_size)
        d = pair(module.dilation) if isinstance(module, nn.MaxPool2d) else (1, 1)
        if any(pi > ki // 2 for pi, ki in zip(p, k, strict=True)):
            raise RuntimeError(f"{module}: padding larger than half the kernel")
        return (*shape[:2], *_window(shape[2:], k, s, p, d, ceil=module.ceil_mode))
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return (*shape[:2], *(o if o is not None else i for o, i in zip(size, shape[2:], strict=True)))
    return None


def _window(size: tuple[int, ...], k: Any, s: Any, p: Any, d: Any, *, ceil: bool) -> tuple[int, ...]:
    """Output sizes of a sliding window (conv or pooling), as torch computes them; raises when empty."""
    out = []
    for n, ki, si, pi, di in zip(size, k, s, p, d, strict=True):
        span = n + 2 * pi - di * (ki - 1) - 1
        o = (span + (si - 1 if ceil else 0)) // si + 1  # floor division, as torch's pooling_output_shape
        if ceil and (o - 1) * si >= n + pi:  # the last window must start inside the input or its left padding
            o -= 1
        if o <= 0:
            raise RuntimeError(f"input {tuple(size)} is too small for a window of {k}")
        out.append(o)
    return tuple(out)


def _input_channels(model: nn.Module, graph: torch.fx.Graph | None = None) -> int:
    """The image's channels: those of the first conv the forward calls (modules may be registered in
    another order), else of the first registered conv, else 3."""
    modules = dict(model.named_modules())
    called = (
        (modules.get(str(n.target)) for n in graph.nodes if n.op == "call_module") if graph is not None else iter(())
    )
    first = next((m for m in called if isinstance(m, nn.Conv2d)), None)
    first = first or next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def input_fits(model: nn.Module) -> Callable[[int], bool]:
    """For a model on the meta device: whether a square input of size ``n`` runs through it (its
    windows leave at least one position), by shapes alone (``meta_shape``)."""
    try:
        graph: torch.fx.Graph | None = Tracer().trace(model)
    except Exception:  # untraceable: run the model itself
        graph = None
    channels = _input_channels(model)

    def fits(n: int) -> bool:
        x = torch.empty(1, channels, n, n, device="meta")
        try:
            with torch.no_grad():
                _ = model(x) if graph is None else Shapes(model, graph, contextlib.nullcontext()).run(x)
        except (RuntimeError, ValueError):
            return False
        return True

    return fits


def propagate_shapes(model: nn.Module, graph: torch.fx.Graph) -> None:
    """Record each node's output shape (``_shape``) from a run on a small input the model can take."""
    channels = _input_channels(model, graph)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    error: BaseException | None = None
    # a size the model cannot take fails inside a fake kernel, which torch logs as an ERROR with a traceback;
    # here that is an expected answer, not the user's problem
    fake_log = logging.getLogger(FAKE_TENSOR_LOGGER)
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        for size in (224, 64, 32, 512, 16, 1024):
            try:
                _run_at(model, graph, channels, size, device, dtype)
                return
            except Exception as e:  # a size the model cannot take: try the next
                error = e
    finally:
        fake_log.setLevel(level)
    raise CheckpointError(f"could not run the traced model on any input size to learn its shapes ({error})")


def _run_at(
    model: nn.Module, graph: torch.fx.Graph, channels: int, size: int, device: torch.device, dtype: torch.dtype
) -> None:
    """One shape-propagating run on an ``(1, channels, size, size)`` input."""
    # two images: a BatchNorm in training mode (refused by the analysis, with its reason) needs more than one
    x = torch.empty(2, channels, size, size, device=device, dtype=dtype)
    # a model on the meta device runs as it is; one with real weights under a fake-tensor mode
    # (whose first use imports torch._dynamo: about a second, once per process)
    mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if device.type != "meta":
        fake = fake_tensor_mode()
        x, mode = fake.from_tensor(x), fake
    with torch.no_grad():
        Shapes(model, graph, mode).run(x)
