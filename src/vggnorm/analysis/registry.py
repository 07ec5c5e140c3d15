"""The op handlers the analysis dispatches to, by module class and by function; ``register_module`` and ``register_function`` add a user's own.

A **handler** is called for each call of its op in the traced graph, as ``handler(walk, node, op, states)``:
``walk`` is the analysis under way (``analysis.topology.Walk``), ``node`` the ``torch.fx`` node, ``op``
the module (a module call) or the function or method name, ``states`` the scale state of each of the
node's inputs (``analysis.values``); it returns the state of the node's output, and refuses what it
cannot follow through ``walk.problem`` (a scale it receives) or ``walk.refuse``. vggnorm's own handlers,
one per op family, are in ``analysis.handlers``; two of them are for users' ops:

* ``commutes``: the op keeps each channel's scale where it is, ``f(x / s) = f(x) / s`` for every positive
  per-channel ``s``, on dim 1 (a blur, an anti-aliased or a user's pooling, a per-channel gain);
* ``not_homogeneous``: the op is a nonlinearity that is not positively homogeneous (a user's Swish):
  the activation before it is refused by its name rather than as an unknown op.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.fx
from torch import nn
from torch.fx.node import Target

from vggnorm.analysis.values import State

if TYPE_CHECKING:
    from vggnorm.analysis.topology import Walk

Handler = Callable[["Walk", torch.fx.Node, Any, list[State]], State]


@dataclass(frozen=True)
class Entry:
    """A handler and how it is dispatched to."""

    handler: Handler
    subclasses: bool = True  # also for subclasses of the class (torch's layers); a user's class: itself only
    leaf: bool = False  # the tracer keeps the module as one call, its forward unseen (a user's module)
    pieces: bool = False  # takes the pieces of a split (else they are refused before it is called)
    spread: bool = False  # a function taking channels spread over several dims (else refused before)
    closed: bool = False  # no user may register the op or a subclass (the activations: the sites)


_MODULES: dict[type[nn.Module], Entry] = {}
_FUNCTIONS: dict[Target, Entry] = {}
_WRAPPED: dict[int, Target] = {}  # users' Python functions, which the tracer must not trace into


def _check_handler(handler: object) -> None:
    """A handler is a function (``commutes``, ``not_homogeneous``), not its name: refused at registration
    rather than when the analysis calls it."""
    if not callable(handler):
        raise TypeError(
            f"the handler must be vggnorm.analysis.commutes or vggnorm.analysis.not_homogeneous (the function "
            f"itself), not {handler!r}"
        )


def register_module(cls: type[nn.Module], handler: Handler) -> None:
    """Analyze every module of class ``cls`` (not its subclasses) with ``handler``: the tracer keeps each
    call of one as a single node, and ``handler`` says what it does to a per-channel scale.

    ``vggnorm.analysis.register_module(BlurPool, vggnorm.analysis.commutes)`` tells vggnorm that
    ``BlurPool`` keeps each channel's scale in place; the module must call no ReLU, LeakyReLU or PReLU
    inside (those are the sites, counted as the model runs)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module takes an nn.Module subclass, not {cls!r}")
    _check_handler(handler)
    for base in cls.__mro__:
        entry = _MODULES.get(base)
        if entry is not None and not entry.leaf and (base is cls or entry.closed):
            raise ValueError(f"vggnorm already analyzes {base.__name__}: {cls.__name__} cannot be registered")
    _MODULES[cls] = Entry(handler, subclasses=False, leaf=True)


def register_function(fn: Target, handler: Handler) -> None:
    """Analyze every call of ``fn`` (a function, or a tensor method's name such as ``"clamp"``) with
    ``handler``. A Python function of the user's is traced as one call, not into."""
    if not (callable(fn) or isinstance(fn, str)):
        raise TypeError(f"register_function takes a function or a method name, not {fn!r}")
    _check_handler(handler)
    known = function_entry(fn)
    if known is not None and not known.leaf:
        raise ValueError(f"vggnorm already analyzes {getattr(fn, '__name__', fn)}: it cannot be registered")
    _FUNCTIONS[fn] = Entry(handler, leaf=True)
    if isinstance(fn, types.FunctionType):
        _WRAPPED[id(fn)] = fn


def builtin_modules(classes: Iterable[type[nn.Module]], handler: Handler, *, closed: bool = False) -> None:
    """vggnorm's handler for torch's ``classes`` and their subclasses (traced as torch decides)."""
    for cls in classes:
        _MODULES[cls] = Entry(handler, closed=closed)


def builtin_functions(
    targets: Iterable[Target], handler: Handler, *, pieces: bool = False, spread: bool = False
) -> None:
    """vggnorm's handler for torch's functions and tensor methods ``targets`` (no user may replace it)."""
    for target in targets:
        _FUNCTIONS[target] = Entry(handler, pieces=pieces, spread=spread, closed=True)


def module_entry(m: nn.Module) -> Entry | None:
    """The entry for ``m``: its class's, else (for torch's layers) its nearest base class's."""
    for cls in type(m).__mro__:
        entry = _MODULES.get(cls)
        if entry is not None and (entry.subclasses or cls is type(m)):
            return entry
    return None


def function_entry(target: Target) -> Entry | None:
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None


def is_leaf(m: nn.Module) -> bool:
    """Whether a user registered ``m``'s class: the tracer keeps its calls whole."""
    entry = _MODULES.get(type(m))
    return entry is not None and entry.leaf


def wrapped_functions() -> tuple[Callable[..., object], ...]:
    """The users' registered Python functions, for the tracer to record as calls."""
    return tuple(f for f in _WRAPPED.values() if callable(f))
