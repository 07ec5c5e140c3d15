"""The structural analysis: which activations of a model can be normalized, and how the fold compensates.

``find_topology`` traces the model with ``torch.fx`` (its shapes from ``shapes.py``: no memory, no
arithmetic) and follows per-channel scales through the graph. Every model vggnorm handles, torchvision's
VGGs included, goes through this one analysis.

* A **site** is a *call* of a positively homogeneous activation (ReLU, LeakyReLU, PReLU: ``f(s x) = s f(x)``
  for ``s > 0``; a module, each call apart, or a function such as ``F.relu``) whose input every channel of
  which the fold can divide: a Conv2d/Linear output (divide its weight rows and bias), a per-channel
  affine norm's output (BatchNorm, GroupNorm, InstanceNorm, a channel-wise LayerNorm: divide its weight
  and bias), perhaps through ops that commute with the scale, or a sum or ``cat`` of such values.
* Each such output is a **scale variable** (its module: an ``Origin``), one unit per channel. A residual
  ``add`` of two scaled values joins their units: they must carry the same scale. The units a site reads
  are its scales; units joined to several sites' channels make a **stream** (ResNet's stages), whose
  shared scale a policy chooses (``core.fold._stream_scales``).
* The scale **flows** through ops that commute with it (pooling, dropout, padding, identity, flatten,
  ``cat``/``chunk``/``split``/slices along the channels, channel shuffles, constants, the activations
  themselves, a product with an unscaled gate) to the next Conv2d or Linear, which **compensates** its
  input columns (per group for a grouped conv; ``P`` columns per channel for a Linear after a flatten),
  or to an eval-mode BatchNorm, which **absorbs** it (``Absorb``: running mean / s, weight * s).
* Anything else a kept scale would reach is **refused**, by node and with the reason: an add of scaled
  and unscaled channels, a product of two scaled values, an activation that is not homogeneous, a
  GroupNorm/LayerNorm/InstanceNorm that receives a scale, a BatchNorm using batch statistics, a conv or
  norm called more than once, weights computed at call time, code the tracer cannot see through.
* Each op is analyzed by its **handler** (``analysis.handlers``, one per op family), found by module class
  or function in ``analysis.registry``, where a user registers their own (``register_module``,
  ``register_function``). Gatys' names (``conv1_1``) are a pass of their own over the finished topology
  (``analysis.naming``).
* **Every reader is accounted for.** Pass 1 gives every Conv2d, Linear and norm output a variable and
  walks the graph: the sites, the joins, and what each variable meets. The variables joined to a site are
  kept, less those whose scale reaches the model's output uncompensated (``left_unscaled``: the outputs
  stay unchanged). Pass 2 walks again with only the kept ones, so that every reader of a kept value -- a
  second activation, a side conv, an alias, an in-place ReLU's overwritten input, an add -- compensates
  it, passes it on, or is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from vggnorm.analysis import registry
from vggnorm.analysis.handlers import HOMOGENEOUS, HOMOGENEOUS_FNS, norm_channels, unknown_function, unknown_module
from vggnorm.analysis.naming import gatys_names
from vggnorm.analysis.shapes import Tracer, propagate_shapes, shape_of
from vggnorm.analysis.values import Pieces, Run, State, Unit, Value, units
from vggnorm.errors import CheckpointError


@dataclass(frozen=True)
class Site:
    """One measured activation call: the statistics' unit, whose output the fold divides by its scales.

    ``conv`` is the site's key in the statistics: the producing Conv2d/Linear's module path for a
    conv -> [norm] -> activation site (``features.0``, ``classifier.0``); the norm's path when a norm
    whose input is no conv's output feeds the activation (DenseNet's ``norm1``); otherwise the
    activation call's own label (a ReLU after a residual add: ``layer1.0.relu:2``, its second call).
    ``relu`` labels the activation call: a module's path (``:k`` for its k-th call when it is called
    several times) or, for a function, the module whose forward calls it and the function
    (``conv1.relu``). ``call`` is the call's index among every call of ReLU, LeakyReLU and PReLU (module
    or function) in one forward pass, in order: how the statistics and the witness find it at run time.
    ``bn`` is the normalization's path for a conv -> norm -> activation site.
    """

    conv: str
    relu: str
    bn: str | None
    in_channels: int
    out_channels: int
    kind: str = "conv"  # conv or linear (an (N, C) value: normalized with the classifier, on request)
    norm: str = ""  # the normalization's class name
    activation: str = "ReLU"  # the activation's class name
    added_affine: bool = False  # the norm had no affine parameters; --add-affine gave it weight 1, bias 0
    call: int = -1

    @property
    def signed(self) -> bool:
        """Whether the activation can be negative (LeakyReLU, PReLU): a mean at or below 0 is then legal."""
        return self.activation != "ReLU"


@dataclass(frozen=True)
class Compensation:
    """A Conv2d or Linear that reads scaled channels and multiplies its input columns by their scales.

    ``runs`` lists its input channels in order as ``(site key, first channel, count)``: those channels
    carry that site's scales from the first channel on; ``(None, 0, count)`` for channels that carry no
    scale (a ``cat`` with the image, say). ``positions`` is ``P``, the columns per channel of a Linear
    after a channel-major flatten.
    """

    module: str
    runs: tuple[Run, ...]
    positions: int = 1
    groups: int = 1
    via: tuple[str, ...] = ()  # the ops the scale passed through on its way here
    max_factor: float = 1.0  # max poolings on the way raise an input channel's mean at most this many times

    @property
    def pieces(self) -> tuple[tuple[str | None, int], ...]:
        """``(site key, count)`` per run."""
        return tuple((k, n) for k, _, n in self.runs)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for k, _, _ in self.runs if k is not None))


@dataclass(frozen=True)
class Origin:
    """A module whose output channels the fold divides: a Conv2d/Linear (``rows``: its weight rows and
    bias) or a per-channel affine norm (``affine``: its weight and bias); ``runs`` say by which scales."""

    module: str
    kind: str  # rows or affine
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Absorb:
    """An eval-mode BatchNorm that reads scaled channels and absorbs their scales exactly: its running mean
    is divided by them and its weight multiplied (``BN(x / s)`` with ``mean / s``, ``weight * s`` is ``BN(x)``)."""

    module: str
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Stream:
    """Sites that share one scale per channel, because residual adds join their values: on a ResNet stage,
    its first activation's output and every block's activation after the add. Their means cannot all be 1;
    the scale policy (``--stream-scale``) chooses one value per channel.

    ``classes[i][c]`` numbers the scale that channel ``c`` of ``sites[i]`` shares: the same number, the
    same scale. ``writers`` are the modules the fold divides by it, ``readers`` the layers that compensate.
    """

    sites: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """Why a node keeps the model from being normalized, and what would make it normalizable."""

    node: str
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}" + (f"; {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class Topology:
    """The sites in forward order, what the fold divides and compensates, and the refusals (empty:
    normalizable)."""

    sites: tuple[Site, ...]
    classifier: str | None = None  # the first Linear after a flatten of scaled channels (fc6)
    classifier_in_features: int | None = None
    fc_sites: tuple[Site, ...] = ()  # (N, C) activation sites (fc6, fc7): normalized on request
    compensations: tuple[Compensation, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    names: dict[str, str] = field(default_factory=dict)  # conv path -> Gatys' name (conv1_1)
    # activations that would be sites, left unscaled because their scale reaches the model's output
    # with no layer after it to compensate (SqueezeNet's last ReLU): the outputs stay unchanged
    left_unscaled: tuple[str, ...] = ()
    # activation calls that are no site: their input is no conv, Linear or norm output (the image, say)
    not_sites: tuple[str, ...] = ()
    origins: tuple[Origin, ...] = ()
    absorbs: tuple[Absorb, ...] = ()
    streams: tuple[Stream, ...] = ()
    activation_calls: int = 0  # calls of ReLU, LeakyReLU and PReLU in one forward pass
    # --add-affine: the norms without affine parameters that carry or absorb a scale, and their channels
    added_affine: tuple[tuple[str, int], ...] = ()

    @property
    def positions_per_channel(self) -> int:
        """``P``: flattened positions per channel seen by the first Linear (7 * 7)."""
        for c in self.compensations:
            if c.module == self.classifier:
                return c.positions
        raise ValueError("this topology has no classifier")

    @property
    def all_sites(self) -> tuple[Site, ...]:
        return (*self.sites, *self.fc_sites)

    @property
    def backbone(self) -> frozenset[str]:
        """The modules of the conv sites (their convs and norms): the network without its classifier head,
        what ``--features-only`` keeps (a VGG's ``features``)."""
        return frozenset(m for s in self.sites for m in (s.conv, s.bn) if m is not None)

    def stream_of(self, key: str) -> Stream | None:
        return next((s for s in self.streams if key in s.sites), None)

    def check(self) -> None:
        """Raise ``CheckpointError`` naming the refusals (at most three) when there are any."""
        if self.refusals:
            shown = "; ".join(str(r) for r in self.refusals[:3])
            more = f" (and {len(self.refusals) - 3} more)" if len(self.refusals) > 3 else ""
            raise CheckpointError(f"cannot normalize this model: {shown}{more}. `vggnorm inspect` lists every site")
        if not self.sites:
            raise CheckpointError("the model has no Conv2d -> activation sites to normalize")


def find_topology(model: nn.Module, *, add_affine: bool = False) -> Topology:
    """Trace ``model`` and return its sites, what the fold divides and compensates, and its refusals
    (see the module docstring).

    ``add_affine`` accepts a norm without affine parameters as a site's norm, as if it had weight 1
    and bias 0 (``with_affine`` makes the model so). Nothing is refused by raising: the refusals are
    returned, and ``Topology.check()`` raises them.
    """
    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # the user's forward may raise anything under the tracer
        return Topology((), refusals=(_untraceable(tracer, e),))
    try:
        propagate_shapes(model, graph)
    except CheckpointError as e:
        return Topology((), refusals=(Refusal("<trace>", str(e)),))
    # Pass 1 gives every Conv2d, Linear and norm output a scale variable and walks the graph: which
    # activations would be sites, which variables residual adds join, and what each variable meets. The
    # variables joined to a site are kept, except those whose scale reaches the model's output (left
    # unscaled: the outputs stay unchanged); pass 2 walks again with only them, so every reader of a
    # kept variable -- a second activation, a side conv, an alias, an add -- compensates it, passes it
    # on, or is refused.
    discovery = Walk(model, graph, add_affine, active=None)
    discovery.walk()
    active = discovery.wanted()
    reach = {discovery.find_var(v) for v in discovery.reaching}
    unscaled = [
        s.relu for s in discovery.sites if any(discovery.find_var(u[0]) in reach for u in discovery.site_units[s.conv])
    ]
    while True:
        analysis = Walk(model, graph, add_affine, active=active)
        analysis.walk()
        reaching = {analysis.find_var(v) for v in analysis.reaching}
        if not reaching:
            topology = dataclasses.replace(analysis.topology(), left_unscaled=tuple(dict.fromkeys(unscaled)))
            return dataclasses.replace(topology, names=gatys_names(graph, analysis.modules, topology))
        dropped = {v for v in active if analysis.find_var(v) in reaching}
        unscaled += [s.relu for s in analysis.sites if any(u[0] in dropped for u in analysis.site_units[s.conv])]
        active = active - dropped


def _untraceable(tracer: Tracer, e: Exception) -> Refusal:
    """The refusal of a model ``torch.fx`` cannot trace, naming the module whose forward it failed in."""
    first = str(e).splitlines()[0] if str(e) else ""
    where, fix = "", "make forward traceable by torch.fx (no Python control flow on tensor values)"
    if tracer.failed_in is not None:
        path, module = tracer.failed_in
        name = type(module).__name__
        where = f" in {path} ({name})"
        if not type(module).__module__.startswith(("torch.", "torchvision.")) and not any(module.children()):
            fix = (
                f"make {name}'s forward traceable by torch.fx (no Python control flow on tensor values), or, if "
                f"{name} keeps each channel's scale in place (f(x / s) = f(x) / s per channel), register it: "
                f"vggnorm.analysis.register_module({name}, vggnorm.analysis.commutes)"
            )
    return Refusal("<trace>", f"torch.fx cannot trace the model{where} ({type(e).__name__}: {first})", fix)


class Walk:
    """One forward walk over the traced graph, carrying each value's scale state (``analysis.values``):
    each node's op is analyzed by its handler (``analysis.registry``), which reads and writes this state."""

    def __init__(
        self, model: nn.Module, graph: torch.fx.Graph, add_affine: bool, active: frozenset[str] | set[str] | None
    ) -> None:
        self.graph = graph
        self.active = active  # the scale variables kept (None: pass 1, all of them)
        self.modules = dict(model.named_modules())
        self.add_affine = add_affine
        self.state: dict[torch.fx.Node, State] = {}
        self.sites: list[Site] = []
        self.site_units: dict[str, tuple[Unit, ...]] = {}
        self.sited: set[str] = set()  # pre-activation values an activation has read
        self.compensations: list[tuple[str, tuple[Unit | None, ...], int, int, tuple[str, ...], float]] = []
        self.absorbs: list[tuple[str, tuple[Unit | None, ...]]] = []
        self.origins: dict[str, str] = {}  # variable (module path) -> rows or affine
        self.refusals: list[Refusal] = []
        self.problems: list[tuple[set[str], Refusal]] = []  # refusals if their variables are kept
        self.reaching: set[str] = set()
        self.parent: dict[Unit, Unit] = {}
        self.var_parent: dict[str, str] = {}
        self.calls: dict[str, int] = {}
        self.not_sites: list[str] = []
        self.affine_added: dict[str, int] = {}
        self.blocked_vars: dict[str, tuple[str, str, str]] = {}  # norm path -> (its label, why, fix)
        self.ordinal = 0
        self.labels = _activation_labels(graph, self.modules)

    # -- union-find over units and variables ---------------------------------------------------------

    def find(self, u: Unit) -> Unit:
        while self.parent.get(u, u) != u:
            self.parent[u] = self.parent.get(self.parent[u], self.parent[u])
            u = self.parent[u]
        return u

    def find_var(self, v: str) -> str:
        while self.var_parent.get(v, v) != v:
            v = self.var_parent[v]
        return v

    def union(self, a: Unit, b: Unit) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        va, vb = self.find_var(a[0]), self.find_var(b[0])
        if va != vb:
            self.var_parent[vb] = va

    def wanted(self) -> set[str]:
        """Pass 1's verdict: the variables joined to a site, less those whose scale reaches the output."""
        with_site = {self.find_var(u[0]) for units in self.site_units.values() for u in units}
        reaching = {self.find_var(v) for v in self.reaching}
        return {v for v in self.origins if self.find_var(v) in with_site and self.find_var(v) not in reaching}

    # -- refusals -----------------------------------------------------------------------------------
    # -- refusals -----------------------------------------------------------------------------------

    def refuse(self, node: torch.fx.Node, reason: str, fix: str = "") -> None:
        self.refusals.append(Refusal(self.label(node), reason, fix))

    def problem(self, node: torch.fx.Node, x: State | Sequence[State], reason: str, fix: str = "") -> None:
        """A refusal if the scales ``x`` carries are kept (pass 2 keeps only those; pass 1 notes it)."""
        states: list[State] = list(x) if isinstance(x, (list, tuple)) else [x]  # type: ignore[list-item]
        variables = {u[0] for s in states for u in units(s)}
        if variables:
            self.problems.append((variables, Refusal(self.label(node), reason, fix)))

    def label(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.modules[str(node.target)]).__name__})"
        if node.op in ("call_function", "call_method"):
            return f"{node.name} ({_target_name(node.target)})"
        return node.name

    # -- the walk -----------------------------------------------------------------------------------

    def walk(self) -> None:
        for node in self.graph.nodes:
            states = [self.state.get(a) for a in node.all_input_nodes]
            if node.op == "call_module":
                self.calls[str(node.target)] = self.calls.get(str(node.target), 0) + 1
                self.state[node] = self._module(node, self.modules[str(node.target)], states)
            elif node.op in ("call_function", "call_method"):
                self.state[node] = self._function(node, states)
            elif node.op == "output":
                self.reaching |= {u[0] for s in states for u in units(s)}
            else:
                self.state[node] = None

    def _module(self, node: torch.fx.Node, m: nn.Module, states: list[State]) -> State:
        if any(isinstance(s, Pieces) for s in states):
            self.problem(node, states, "receives the pieces of a split of scaled channels")
            return None
        entry = registry.module_entry(m)
        return (entry.handler if entry is not None else unknown_module)(self, node, m, states)

    def _function(self, node: torch.fx.Node, states: list[State]) -> State:
        entry = registry.function_entry(node.target)
        x = states[0] if states else None
        if not (entry is not None and entry.pieces) and any(isinstance(s, Pieces) for s in states):
            self.problem(node, states, "uses the pieces of a split of scaled channels")
            return None
        if not (entry is not None and entry.spread) and isinstance(x, Value) and x.grid is not None:
            self.problem(node, states, "uses channels spread over several dimensions")
            return None
        return (entry.handler if entry is not None else unknown_function)(self, node, node.target, states)

    def fresh(self, var: str, kind: str, channels: int) -> tuple[Unit | None, ...]:
        """A new scale variable for ``var``'s output (None labels when pass 2 does not keep it)."""
        self.origins[var] = kind
        if self.active is not None and var not in self.active:
            return (None,) * channels
        return tuple((var, c) for c in range(channels))

    def activation(self, node: torch.fx.Node, kind: str, m: nn.Module | None, x: State) -> State:
        """A call of ReLU, LeakyReLU or PReLU (a module or a function): a site when it reads a
        pre-activation value whose every channel has a scale variable."""
        call, self.ordinal = self.ordinal, self.ordinal + 1
        label = self.labels.get(node, node.name)
        if isinstance(x, Pieces):
            self.problem(node, x, "activates the pieces of a split of scaled channels")
            return None
        if not isinstance(x, Value):
            self.not_sites.append(label)
            return None
        if x.pre and x.blocked:
            self.refuse(
                _node_named(self.graph, x.norm) or node,
                f"{x.blocked}, but the activation {label} after {x.producer} is to be normalized",
                x.fix,
            )
            return None
        channels = len(x.labels)
        if isinstance(m, nn.PReLU) and m.num_parameters not in (1, channels):
            self.refuse(node, f"has {m.num_parameters} parameters for {channels} channels")
            return None
        if kind == "PReLU" and m is None and _prelu_weights(node) not in (1, channels, None):
            self.refuse(node, f"has {_prelu_weights(node)} parameters for {channels} channels")
            return None
        site_ok = x.pre and x.pre not in self.sited and x.grid is None and all(u is not None for u in x.labels)
        if x.pre:
            self.sited.add(x.pre)
        if not site_ok:
            if not x.scaled and not x.pre:
                self.not_sites.append(label)
            read = x.read()
            return read.through(label) if read is not None else None
        shape = shape_of(node) or ()
        key = x.producer if x.producer and x.producer not in self.site_units else label
        site = Site(
            key,
            label,
            x.norm if x.producer and x.norm and x.producer != x.norm else None,
            x.in_channels if key == x.producer else channels,
            channels,
            "linear" if len(shape) == 2 or x.positions > 1 else "conv",
            x.norm_type if x.norm else "",
            kind,
            x.added_affine,
            call,
        )
        self.sites.append(site)
        self.site_units[key] = tuple(u for u in x.labels if u is not None)
        return x.read()

    # -- the result ---------------------------------------------------------------------------------

    def topology(self) -> Topology:
        """Pass 2's result: sites, origins, absorptions, compensations and streams, in terms of the sites'
        scales; the refusals (its problems all concern kept variables)."""
        rep, members = self._classes()
        kept = set(self.active or ())
        origins = tuple(
            Origin(var, kind, self._runs(rep, tuple((var, c) for c in range(_channels_of(self, var)))))
            for var, kind in self.origins.items()
            if var in kept
        )
        origins = tuple(o for o in origins if any(k is not None for k, _, _ in o.runs))
        compensations = tuple(
            Compensation(path, self._runs(rep, labels), positions, groups, via, factor)
            for path, labels, positions, groups, via, factor in self.compensations
        )
        absorbs = tuple(Absorb(path, self._runs(rep, labels)) for path, labels in self.absorbs)
        carrying = {o.module for o in origins} | {a.module for a in absorbs}
        classifier = next((c for c in compensations if c.positions > 1), None)
        return Topology(
            tuple(s for s in self.sites if s.kind == "conv"),
            classifier=classifier.module if classifier else None,
            classifier_in_features=sum(n for _, _, n in classifier.runs) * classifier.positions if classifier else None,
            fc_sites=tuple(s for s in self.sites if s.kind == "linear"),
            compensations=compensations,
            refusals=tuple(dict.fromkeys(self._refusals())),
            not_sites=tuple(dict.fromkeys(self.not_sites)),
            origins=origins,
            absorbs=absorbs,
            streams=self._streams(members, origins, compensations),
            activation_calls=self.ordinal,
            added_affine=tuple((path, n) for path, n in self.affine_added.items() if path in carrying),
        )

    def _refusals(self) -> list[Refusal]:
        """The refusals: the walk's own, its problems that concern kept variables, the norms that cannot carry
        the scale a kept variable asks of them, and the modules called several times that carry a scale."""
        refusals = list(self.refusals)
        refusals += [r for variables, r in self.problems if self.active is None or variables & set(self.active)]
        for path, (label, why, fix) in self.blocked_vars.items():
            if self.active is not None and path in self.active and not any(r.node == label for r in refusals):
                refusals.append(
                    Refusal(label, f"{why}, but a residual add or a cat joins it to normalized activations", fix)
                )
        for path, n in self.calls.items():
            m = self.modules[path]
            used = (
                path in self.origins
                and self.active is not None
                and path in self.active
                or any(c[0] == path for c in self.compensations)
                or any(a[0] == path for a in self.absorbs)
            )
            if n > 1 and used and not isinstance(m, HOMOGENEOUS):
                refusals.append(
                    Refusal(
                        f"{path} ({type(m).__name__})",
                        f"is called {n} times in forward: one module cannot carry several scales",
                        "give each use its own module",
                    )
                )
        return refusals

    def _classes(self) -> tuple[dict[Unit, tuple[str, int]], dict[Unit, list[tuple[str, int]]]]:
        """Each class of joined units shares one scale: the site channel that stands for it (the first site's,
        in order), and every site channel that measures it."""
        rep: dict[Unit, tuple[str, int]] = {}
        members: dict[Unit, list[tuple[str, int]]] = {}
        for site in self.sites:
            for c, u in enumerate(self.site_units[site.conv]):
                root = self.find(u)
                rep.setdefault(root, (site.conv, c))
                members.setdefault(root, []).append((site.conv, c))
        return rep, members

    def _runs(self, rep: dict[Unit, tuple[str, int]], labels: tuple[Unit | None, ...]) -> tuple[Run, ...]:
        """``labels`` as runs of consecutive channels of one site's scale (``Compensation.runs``)."""
        out: list[list[Any]] = []
        for u in labels:
            r = rep.get(self.find(u)) if u is not None else None
            key, channel = r if r is not None else (None, 0)
            last = out[-1] if out else None
            if last is not None and last[0] == key and (key is None or last[1] + last[2] == channel):
                last[2] += 1
            else:
                out.append([key, channel, 1])
        return tuple((k, s, n) for k, s, n in out)

    def _streams(
        self,
        members: dict[Unit, list[tuple[str, int]]],
        origins: tuple[Origin, ...],
        compensations: tuple[Compensation, ...],
    ) -> tuple[Stream, ...]:
        """Sites joined by a class of units that more than one site channel measures."""
        parent: dict[str, str] = {}

        def find(k: str) -> str:
            while parent.get(k, k) != k:
                k = parent[k]
            return k

        shared = [m for m in members.values() if len(m) > 1]
        for m in shared:
            for key, _ in m[1:]:
                a, b = find(m[0][0]), find(key)
                if a != b:
                    parent[b] = a
        groups: dict[str, list[str]] = {}
        for m in shared:
            for key, _ in m:
                group = groups.setdefault(find(key), [])
                if key not in group:
                    group.append(key)
        order = {s.conv: i for i, s in enumerate(self.sites)}
        out = []
        for keys in groups.values():
            keys = sorted(keys, key=order.__getitem__)
            numbers: dict[Unit, int] = {}
            classes = tuple(
                tuple(numbers.setdefault(self.find(u), len(numbers)) for u in self.site_units[k]) for k in keys
            )
            inside = set(keys)
            writers = tuple(o.module for o in origins if any(k in inside for k, _, _ in o.runs))
            readers = tuple(c.module for c in compensations if any(k in inside for k in c.sites))
            out.append(Stream(tuple(keys), classes, writers, readers))
        return tuple(out)


def _channels_of(walk: Walk, var: str) -> int:
    m = walk.modules[var]
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return norm_channels(m, _node_named(walk.graph, var))


def _prelu_weights(node: torch.fx.Node) -> int | None:
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = shape_of(w) if isinstance(w, torch.fx.Node) else None
    return math.prod(shape) if shape is not None else None


def _activation_labels(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, str]:
    """A label per activation call: the module's path (``:k`` on its k-th call when it is called several
    times), or the module whose forward calls the function and the function (``conv1.relu``)."""
    bases: dict[torch.fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), HOMOGENEOUS):
            bases[node] = str(node.target)
        elif node.op in ("call_function", "call_method") and node.target in HOMOGENEOUS_FNS:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            owner = stack[-1][0] if stack else ""
            bases[node] = f"{owner}.{_target_name(node.target)}" if owner else _target_name(node.target)
    total: dict[str, int] = {}
    for base in bases.values():
        total[base] = total.get(base, 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for node, base in bases.items():
        seen[base] = seen.get(base, 0) + 1
        out[node] = base if total[base] == 1 else f"{base}:{seen[base]}"
    return out


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _node_named(graph: torch.fx.Graph, target: str | None) -> torch.fx.Node | None:
    return next((n for n in graph.nodes if n.op == "call_module" and n.target == target), None)


def with_affine(model: nn.Module, topology: Topology) -> nn.Module:
    """``model`` with the norms ``--add-affine`` gave affine parameters (those that carry or absorb a scale
    and have none) given weight 1 and bias 0 (the same function); in place."""
    modules = dict(model.named_modules())
    like = next((t for t in model.parameters() if t.is_floating_point()), torch.empty(0))
    for path, channels in topology.added_affine:
        norm = modules.get(path)
        if norm is not None and getattr(norm, "weight", None) is None:
            norm.weight = nn.Parameter(torch.ones(channels, device=like.device, dtype=like.dtype))
            norm.bias = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))
            if hasattr(norm, "affine"):
                norm.affine = True
            else:
                norm.elementwise_affine = True
    return model
