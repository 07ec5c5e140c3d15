"""Random small ReLU-CNN graphs from a grammar, run through vggnorm and checked by our own oracle.

A program is a list of op tuples; op ``i`` makes value ``i + 1`` (value 0 is the image) and refers
to earlier values by index. One ``nn.Module`` (``ProgramNet``) interprets it: its forward loops
over the program, so ``torch.fx`` traces straight through. The property: accepted => the contract
(``contract.check_contract``: outputs unchanged, every live filter's mean 1 outside streams and the
stream divisor inside them, statistics as the model runs, per activation call); refused => a
``VggnormError`` naming the refused node; never another exception.

The grammar: conv/linear -> [norm] -> activation blocks, activations as modules (one module may be
called at several sites) or as functions (F.relu, torch.relu, x.relu(), the in-place spellings,
F.leaky_relu, F.prelu), norms anywhere (receiving a scale too), pools, cat, slices, splits, chunks,
channel shuffles, constants, flatten, Linear heads, residual blocks (identity or projection shortcut,
the post-add activation often the block's first module again), squeeze-and-excitation gates (sigmoid,
or a non-homogeneous ReLU6/hardsigmoid), products of two values, and reuse of any module.

``VGGNORM_FUZZ_EXAMPLES`` sets the number of examples (default 150); ``make fuzz`` runs 3000 and
prints the verdict counts (also written to ``$VGGNORM_FUZZ_COUNTS`` when that is set).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from contract import check_contract, images, one_thread, randomize

EXAMPLES = int(os.environ.get("VGGNORM_FUZZ_EXAMPLES", 150))
SIZE = 16
COUNTS: Counter[str] = Counter()

CONSTS_MUL = (-1.5, -0.5, 0.5, 2.0)
CONSTS_ADD = (0.5, -0.3)

# op tuples (value indices are ints, module names strs):
#   ("call", src, name)              call module ``layers[name]`` (conv, linear, norm, act; reuse = a second call)
#   ("pool", src, kind)              max2 | avg2 | amax1 | aavg2
#   ("cat", a, b)                    torch.cat along channels
#   ("slice", src, start, stop)      v[:, start:stop]
#   ("split", src, first, index, C)  torch.split(v, [first, C - first], 1)[index]
#   ("mul", src, c) / ("addc", src, c)
#   ("add", a, b)                    equal shapes
#   ("flatten", src)
#   ("fact", src, variant)           a functional activation (FUNCTIONAL_ACTS)
#   ("shuffle", src, groups)         view(n, g, C // g, h, w).transpose(1, 2).contiguous().view(n, C, h, w)
#   ("chunk", src, index)            v.chunk(2, dim=1)[index]
#   ("unary", src, kind)             sigmoid | relu6 | hardsigmoid
#   ("mulv", a, b)                   a * b (b's shape equal, or (C, 1, 1))

FUNCTIONAL_ACTS = (
    "F.relu",
    "torch.relu",
    "method",
    "F.relu_",
    "torch.relu_",
    "method_",
    "F.relu(inplace)",
    "leaky",
    "leaky(inplace)",
    "prelu",
)
INPLACE_ACTS = ("F.relu_", "torch.relu_", "method_", "F.relu(inplace)", "leaky(inplace)")


def conv_out(size: int, stride: int) -> int:
    """A conv's output size (kernel 1 or 3 with padding k // 2)."""
    return (size - 1) // stride + 1


def make_module(spec: tuple) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, cin, cout, k, groups, stride, mode, dead = spec
        conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, padding_mode=mode)
        if dead:  # filter 0 never fires after a ReLU (a dead filter keeps scale 1)
            with torch.no_grad():
                conv.bias[0] = -100.0
        return conv
    if kind == "linear":
        _, fin, fout = spec
        return nn.Linear(fin, fout)
    if kind == "norm":
        _, norm, c, affine, track = spec
        if norm == "bn":
            return nn.BatchNorm2d(c, affine=affine, track_running_stats=track)
        if norm == "gn":
            return nn.GroupNorm(2 if c % 2 == 0 else 1, c, affine=affine)
        if norm == "in":
            return nn.InstanceNorm2d(c, affine=affine)
        return LayerNorm2d(c, elementwise_affine=affine)
    if kind == "act":
        _, act, channels, inplace = spec
        if act == "relu":
            return nn.ReLU(inplace=inplace)
        if act == "leaky":
            return nn.LeakyReLU(0.1, inplace=inplace)
        return nn.PReLU(channels)
    raise ValueError(spec)


@dataclass
class Program:
    modules: dict[str, tuple] = field(default_factory=dict)
    ops: list[tuple] = field(default_factory=list)
    outputs: tuple[int, ...] = ()
    add_affine: bool = False

    def __repr__(self) -> str:
        mods = "\n".join(f"    {n}: {s}," for n, s in self.modules.items())
        ops = "\n".join(f"    v{i + 1} = {op}," for i, op in enumerate(self.ops))
        return f"Program(add_affine={self.add_affine}, outputs={self.outputs},\n  modules=\n{mods}\n  ops=\n{ops})"


class ProgramNet(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = [tuple(op) for op in program.ops]
        self.outputs = tuple(program.outputs)
        self.layers = nn.ModuleDict({n: make_module(s) for n, s in program.modules.items()})
        self.slope = nn.Parameter(torch.tensor([0.2]))  # F.prelu's

    def forward(self, x):
        vals = [x]
        for op in self.program:
            kind = op[0]
            if kind == "call":
                v = self.layers[op[2]](vals[op[1]])
            elif kind == "pool":
                v = vals[op[1]]
                if op[2] == "max2":
                    v = F.max_pool2d(v, 2)
                elif op[2] == "avg2":
                    v = F.avg_pool2d(v, 2)
                elif op[2] == "amax1":
                    v = F.adaptive_max_pool2d(v, 1)
                elif op[2] == "aavg1":
                    v = F.adaptive_avg_pool2d(v, 1)
                else:
                    v = F.adaptive_avg_pool2d(v, 2)
            elif kind == "cat":
                v = torch.cat([vals[op[1]], vals[op[2]]], dim=1)
            elif kind == "slice":
                v = vals[op[1]][:, op[2] : op[3]]
            elif kind == "split":
                v = torch.split(vals[op[1]], [op[2], op[4] - op[2]], dim=1)[op[3]]
            elif kind == "mul":
                v = vals[op[1]] * op[2]
            elif kind == "addc":
                v = vals[op[1]] + op[2]
            elif kind == "add":
                v = vals[op[1]] + vals[op[2]]
            elif kind == "fact":
                v = self.functional(vals[op[1]], op[2])
            elif kind == "shuffle":
                v = vals[op[1]]
                n, c, h, w = v.shape
                v = v.view(n, op[2], c // op[2], h, w).transpose(1, 2).contiguous().view(n, c, h, w)
            elif kind == "chunk":
                v = vals[op[1]].chunk(2, dim=1)[op[2]]
            elif kind == "unary":
                v = vals[op[1]]
                v = torch.sigmoid(v) if op[2] == "sigmoid" else F.relu6(v) if op[2] == "relu6" else F.hardsigmoid(v)
            elif kind == "mulv":
                v = vals[op[1]] * vals[op[2]]
            else:
                v = torch.flatten(vals[op[1]], 1)
            vals.append(v)
        if len(self.outputs) == 1:
            return vals[self.outputs[0]]
        return tuple(vals[i] for i in self.outputs)

    def functional(self, v, variant: str):
        if variant == "F.relu":
            return F.relu(v)
        if variant == "torch.relu":
            return torch.relu(v)
        if variant == "method":
            return v.relu()
        if variant == "F.relu_":
            return F.relu_(v)
        if variant == "torch.relu_":
            return torch.relu_(v)
        if variant == "method_":
            return v.relu_()
        if variant == "F.relu(inplace)":
            return F.relu(v, inplace=True)
        if variant == "leaky":
            return F.leaky_relu(v, 0.1)
        if variant == "leaky(inplace)":
            return F.leaky_relu(v, 0.2, inplace=True)
        return F.prelu(v, self.slope)


@st.composite
def programs(draw) -> Program:
    prog = Program()
    shapes: list[tuple[int, ...]] = [(3, SIZE, SIZE)]
    kinds: list[str] = ["input"]  # what made each value (in-place activations avoid views and the input)
    # whether a value's spatial size is independent of the input's (after an adaptive pool): a Linear
    # on it takes any input size, which vggnorm's shape inference finds fast
    fixed: list[bool] = [False]
    n_ops = draw(st.integers(2, 8))

    def src(pred=lambda s: True) -> int | None:
        ok = [i for i, s in enumerate(shapes) if pred(s)]
        if not ok:
            return None
        if ok[-1] == len(shapes) - 1 and not draw(st.booleans()):
            return ok[-1]  # mostly a chain (the simplest choice, what shrinking goes to)
        return draw(st.sampled_from(ok))

    def new_module(spec: tuple) -> str:
        name = f"m{len(prog.modules)}"
        prog.modules[name] = spec
        return name

    def emit(op: tuple, shape: tuple[int, ...], kind: str) -> None:
        prog.ops.append(op)
        shapes.append(shape)
        kinds.append(kind)
        if kind == "pool" and op[2].startswith("a"):
            fixed.append(True)
        elif op[0] in ("cat", "add", "mulv"):
            fixed.append(fixed[op[1]] and fixed[op[2]])
        else:
            fixed.append(len(shape) == 1 or fixed[op[1]])

    def norm_ok(s, norm) -> bool:
        return len(s) == 3 and (norm not in ("in", "bn_untracked") or s[1] * s[2] > 1)

    def act_fits(spec: tuple, i: int) -> bool:
        return (spec[2] == 1 or spec[2] == shapes[i][0]) and not (spec[3] and kinds[i] in ("input", "view"))

    def emit_act(i: int, module: str | None = None) -> str | None:
        """An activation on value i: ``module`` (if it fits), a new module, a module again, or a function."""
        s = shapes[i]
        if module is not None and act_fits(prog.modules[module], i):
            emit(("call", i, module), s, "act")
            return module
        how = draw(st.sampled_from(["module", "module", "module", "shared", "function", "function"]))
        if how == "shared":
            ok = [n for n, spec in prog.modules.items() if spec[0] == "act" and act_fits(spec, i)]
            if ok:
                name = draw(st.sampled_from(ok))
                emit(("call", i, name), s, "act")
                return name
        if how == "function":
            variants = [v for v in FUNCTIONAL_ACTS if v not in INPLACE_ACTS or kinds[i] not in ("input", "view")]
            emit(("fact", i, draw(st.sampled_from(variants))), s, "act")
            return None
        act = draw(st.sampled_from(["relu", "relu", "leaky", "prelu"]))
        channels = 1
        if act == "prelu" and draw(st.booleans()):
            channels = s[0]
        inplace = act != "prelu" and kinds[i] not in ("input", "view") and draw(st.integers(0, 3)) == 3
        name = new_module(("act", act, channels, inplace))
        emit(("call", i, name), s, "act")
        return name

    def emit_conv(i: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> int:
        cin, h, w = shapes[i]
        name = new_module(("conv", cin, cout, k, groups, stride, "zeros", draw(st.integers(0, 7)) == 7))
        emit(("call", i, name), (cout, conv_out(h, stride), conv_out(w, stride)), "conv")
        return len(shapes) - 1

    def emit_norm(i: int, norm: str | None = None) -> None:
        s = shapes[i]
        norm = norm or draw(st.sampled_from(["bn", "bn", "gn", "in", "ln"]))
        affine = draw(st.integers(0, 7)) != 7
        track = True
        if norm == "bn" and draw(st.integers(0, 7)) == 7:
            track = False
        if norm == "in" and s[1] * s[2] <= 1 or not track and s[1] * s[2] <= 1:
            norm, track = "bn", True
        name = new_module(("norm", norm, s[0], affine, track))
        emit(("call", i, name), s, "norm")

    for step in range(n_ops):
        choice = (
            "block"
            if step == 0
            else draw(
                st.sampled_from(
                    [
                        *["block"] * 4,
                        "conv",
                        "act",
                        "norm",
                        "pool",
                        "pool",
                        "cat",
                        "cat",
                        "slice" if draw(st.booleans()) else "split",
                        "mul",
                        "addc" if draw(st.integers(0, 2)) == 2 else "mul",
                        "add",
                        "flatten",
                        "fc_block",
                        "fc_block",
                        "reuse",
                        *["res"] * 3,
                        "norm_act",
                        "norm_act",
                        "shuffle" if draw(st.booleans()) else "chunk",
                        "se",
                        "mulv",
                    ]
                )
            )
        )
        if choice in ("block", "conv"):
            i = src(lambda s: len(s) == 3)
            cin, h, w = shapes[i]
            cout = draw(st.integers(2, 6))
            k = draw(st.sampled_from([1, 3]))
            stride = 2 if h >= 4 and draw(st.integers(0, 5)) == 5 else 1
            mode = "zeros"
            if k == 3 and h >= 2:
                mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular"]))
            dead = draw(st.integers(0, 5)) == 5
            groups = 1
            g = draw(st.sampled_from([1, 1, 1, 2, cin]))
            if cin % g == 0 and cout % g == 0:
                groups = g
            name = new_module(("conv", cin, cout, k, groups, stride, mode, dead))
            emit(("call", i, name), (cout, conv_out(h, stride), conv_out(w, stride)), "conv")
            if choice == "block":
                if draw(st.booleans()):
                    emit_norm(len(shapes) - 1)
                emit_act(len(shapes) - 1)
        elif choice == "fc_block":
            i = src(lambda s: len(s) == 1)
            if i is None:
                continue
            fout = draw(st.integers(2, 6))
            name = new_module(("linear", shapes[i][0], fout))
            emit(("call", i, name), (fout,), "linear")
            if draw(st.integers(0, 3)) != 3:
                emit_act(len(shapes) - 1)
        elif choice == "act":
            emit_act(src(lambda s: True))
        elif choice == "norm":
            i = src(lambda s: len(s) == 3)
            emit_norm(i)
        elif choice == "pool":
            i = src(lambda s: len(s) == 3 and s[1] >= 2)
            if i is None:
                continue
            c, h, w = shapes[i]
            kind = draw(st.sampled_from(["max2", "avg2", "amax1", "aavg2"]))
            out = {"max2": (c, h // 2, w // 2), "avg2": (c, h // 2, w // 2), "amax1": (c, 1, 1), "aavg2": (c, 2, 2)}
            emit(("pool", i, kind), out[kind], "pool")
        elif choice == "cat":
            a = src(lambda s: len(s) == 3)
            b = src(lambda s, a=a: len(s) == 3 and s[1:] == shapes[a][1:])
            emit(("cat", a, b), (shapes[a][0] + shapes[b][0], *shapes[a][1:]), "cat")
        elif choice in ("slice", "split"):
            i = src(lambda s: len(s) == 3 and s[0] >= 2)
            if i is None:
                continue
            c = shapes[i][0]
            first = draw(st.integers(1, c - 1))
            if choice == "slice":
                start = draw(st.integers(0, first - 1))
                emit(("slice", i, start, first), (first - start, *shapes[i][1:]), "view")
            else:
                index = draw(st.integers(0, 1))
                emit(("split", i, first, index, c), (first if index == 0 else c - first, *shapes[i][1:]), "view")
        elif choice == "mul":
            i = src()
            emit(("mul", i, draw(st.sampled_from(CONSTS_MUL))), shapes[i], "mul")
        elif choice == "addc":
            i = src()
            emit(("addc", i, draw(st.sampled_from(CONSTS_ADD))), shapes[i], "addc")
        elif choice == "add":
            a = src()
            b = src(lambda s, a=a: s == shapes[a])
            emit(("add", a, b), shapes[a], "add")
        elif choice == "flatten":
            ok = [i for i, s in enumerate(shapes) if len(s) == 3 and s[0] * s[1] * s[2] <= 96]
            if draw(st.integers(0, 4)) != 4:  # mostly after an adaptive pool (see ``fixed``)
                ok = [i for i in ok if fixed[i]]
            if not ok:
                continue
            i = ok[-1] if ok[-1] == len(shapes) - 1 and not draw(st.booleans()) else draw(st.sampled_from(ok))
            c, h, w = shapes[i]
            emit(("flatten", i), (c * h * w,), "view")
        elif choice == "res":
            # a residual block: conv-bn-act, conv-bn, + the identity (or a projection: 1x1 conv-bn), act (mostly
            # the block's first activation module again, as torchvision's ResNet does)
            i = src(lambda s: len(s) == 3)
            c, h, w = shapes[i]
            project = draw(st.integers(0, 2)) == 2
            stride = 2 if project and h >= 4 and draw(st.booleans()) else 1
            cout = draw(st.integers(2, 6)) if project else c
            a = emit_conv(i, cout, 3, stride)
            emit_norm(a, "bn")
            first = emit_act(len(shapes) - 1)
            b = emit_conv(len(shapes) - 1, cout, draw(st.sampled_from([1, 3])))
            if draw(st.integers(0, 3)) != 3:
                emit_norm(b, "bn")
            main = len(shapes) - 1
            short = i
            if project:
                short = emit_conv(i, cout, 1, stride)
                if draw(st.booleans()):
                    emit_norm(short, "bn")
                short = len(shapes) - 1
            emit(("add", main, short) if draw(st.booleans()) else ("add", short, main), shapes[main], "add")
            emit_act(len(shapes) - 1, first if draw(st.integers(0, 3)) != 3 else None)
        elif choice == "norm_act":
            # a norm reading whatever is there (a scaled value, often), then an activation: DenseNet's BN-ReLU-conv
            i = src(lambda s: len(s) == 3)
            emit_norm(i, draw(st.sampled_from(["bn", "bn", "bn", "gn", "in", "ln"])))
            emit_act(len(shapes) - 1)
        elif choice == "shuffle":
            i = src(lambda s: len(s) == 3 and s[0] >= 4 and s[0] % 2 == 0)
            if i is None:
                continue
            c = shapes[i][0]
            groups = draw(st.sampled_from([g for g in (2, 3) if c % g == 0]))
            emit(("shuffle", i, groups), shapes[i], "view")
        elif choice == "chunk":
            i = src(lambda s: len(s) == 3 and s[0] >= 2 and s[0] % 2 == 0)
            if i is None:
                continue
            index = draw(st.integers(0, 1))
            emit(("chunk", i, index), (shapes[i][0] // 2, *shapes[i][1:]), "view")
        elif choice == "se":
            # squeeze-and-excitation: v * gate(conv(act(conv(avgpool(v)))))
            i = src(lambda s: len(s) == 3)
            c = shapes[i][0]
            emit(("pool", i, "aavg1"), (c, 1, 1), "pool")
            emit_conv(len(shapes) - 1, draw(st.integers(1, 3)), 1)
            emit_act(len(shapes) - 1)
            emit_conv(len(shapes) - 1, c, 1)
            gate = draw(st.sampled_from(["sigmoid", "sigmoid", "sigmoid", "relu6", "hardsigmoid"]))
            emit(("unary", len(shapes) - 1, gate), (c, 1, 1), "unary")
            emit(("mulv", i, len(shapes) - 1), shapes[i], "mul")
        elif choice == "mulv":
            a = src(lambda s: len(s) == 3)
            b = src(lambda s, a=a: s == shapes[a] or s == (shapes[a][0], 1, 1))
            emit(("mulv", a, b), shapes[a], "mul")
        elif choice == "reuse":
            i = src()
            s = shapes[i]
            ok = []
            for name, spec in prog.modules.items():
                if spec[0] == "conv" and len(s) == 3 and spec[1] == s[0] and (spec[6] == "zeros" or s[1] >= 2):
                    ok.append((name, (spec[2], conv_out(s[1], spec[5]), conv_out(s[2], spec[5])), "conv"))
                elif spec[0] == "linear" and len(s) == 1 and spec[1] == s[0]:
                    ok.append((name, (spec[2],), "linear"))
                elif spec[0] == "norm" and len(s) == 3 and spec[2] == s[0] and norm_ok(s, spec[1]):
                    ok.append((name, s, "norm"))
                elif (
                    spec[0] == "act"
                    and (spec[2] == 1 or spec[2] == s[0])
                    and not (spec[3] and kinds[i] in ("input", "view"))
                ):
                    ok.append((name, s, "act"))
            if not ok:
                continue
            name, shape, kind = draw(st.sampled_from(ok))
            emit(("call", i, name), shape, kind)

    # a head (1x1 conv, or Linear) on each value nothing reads, mostly: the sites before it are compensated
    used = readers_of(prog)
    if draw(st.integers(0, 4)) != 4:
        for i in [i for i in range(1, len(shapes)) if i not in used]:
            s = shapes[i]
            if len(s) == 3:
                name = new_module(("conv", s[0], 2, 1, 1, 1, "zeros", False))
                emit(("call", i, name), (2, *s[1:]), "conv")
            else:
                name = new_module(("linear", s[0], 2))
                emit(("call", i, name), (2,), "linear")
    used = readers_of(prog)
    prog.outputs = tuple(i for i in range(1, len(shapes)) if i not in used) or (len(shapes) - 1,)
    prog.add_affine = any(s[0] == "norm" and not s[3] for s in prog.modules.values()) and draw(st.booleans())
    return prog


def srcs(op: tuple) -> tuple[int, ...]:
    """The values an op reads."""
    return (op[1], op[2]) if op[0] in ("cat", "add", "mulv") else (op[1],)


def readers_of(prog: Program) -> set[int]:
    return {v for op in prog.ops for v in srcs(op)}


def is_act(prog: Program, op: tuple) -> bool:
    return op[0] == "fact" or (op[0] == "call" and prog.modules[op[2]][0] == "act")


def compensates(prog: Program, op: tuple) -> bool:
    return op[0] == "call" and prog.modules[op[2]][0] in ("conv", "linear")


def act_calls(prog: Program) -> dict[int, int]:
    """Value index -> its activation call index (ops run in order, one call each)."""
    out: dict[int, int] = {}
    for j, op in enumerate(prog.ops):
        if is_act(prog, op):
            out[j + 1] = len(out)
    return out


def scale_groups(prog: Program) -> tuple[list[set[int]], set[int]]:
    """(groups of activation calls that residual adds may join into streams, the calls whose scale may reach
    the model's output uncompensated), over-approximated.

    A call's scale may be carried by its output, by its input (the writer divides it) and, when that input
    is a norm's output, by the norm's input; it flows through every op but a conv or Linear (which
    compensates). An add joins the groups of everything it carries; a group with a call reaching an output
    may be left unscaled as a whole."""
    calls = act_calls(prog)
    own: dict[int, set[int]] = {}
    for v, c in calls.items():
        own.setdefault(v, set()).add(c)
        w = prog.ops[v - 1][1]
        own.setdefault(w, set()).add(c)
        if w > 0:
            op = prog.ops[w - 1]
            if op[0] == "call" and prog.modules[op[2]][0] == "norm":
                own.setdefault(op[1], set()).add(c)
    parent = {c: c for c in calls.values()}

    def root(c: int) -> int:
        while parent[c] != c:
            c = parent[c]
        return c

    taint: list[set[int]] = [set(own.get(0, ()))]
    for j, op in enumerate(prog.ops):
        t = set() if compensates(prog, op) else set().union(*(taint[v] for v in srcs(op)))
        t |= own.get(j + 1, set())
        if op[0] == "add" and t:
            first = root(min(t))
            for c in t:
                parent[root(c)] = first
        taint.append(t)
    groups: dict[int, set[int]] = {}
    for c in parent:
        groups.setdefault(root(c), set()).add(c)
    reach = set().union(*(taint[i] for i in prog.outputs))
    may = set().union(*(g for g in groups.values() if g & reach)) if reach else set()
    return list(groups.values()), may


def reaches_output(prog: Program) -> set[int]:
    """The values that reach the model's output through no conv or Linear."""
    consumers: dict[int, list[int]] = {}
    for j, op in enumerate(prog.ops):
        for v in srcs(op):
            consumers.setdefault(v, []).append(j + 1)
    reach: set[int] = set(prog.outputs)
    for v in range(len(prog.ops), -1, -1):
        for c in consumers.get(v, []):
            op = prog.ops[c - 1]
            if c in reach and not compensates(prog, op):
                reach.add(v)
    return reach


def clean_sites(prog: Program) -> list[int]:
    """Activation calls that are plainly sites: conv/linear -> [norm] -> activation (a module, called there
    or elsewhere too, or a function), the conv and the norm each called once, their value read only by
    the next op of the chain, the activation's output not (part of) the model's output."""
    calls = Counter(op[2] for op in prog.ops if op[0] == "call")
    readers: Counter[int] = Counter(v for op in prog.ops for v in srcs(op))

    def made_by(v: int, kind: str) -> str | None:
        if v == 0:
            return None
        op = prog.ops[v - 1]
        if op[0] != "call" or prog.modules[op[2]][0] != kind or calls[op[2]] != 1 or readers[v] != 1:
            return None
        return op[2]

    reach = reaches_output(prog)
    out = []
    for v, c in act_calls(prog).items():
        if v in reach:
            continue  # an activation whose output is (part of) the model's output may be left out of the sites
        w = prog.ops[v - 1][1]
        if made_by(w, "norm") is not None:
            w = prog.ops[w - 1][1]
        if made_by(w, "conv") is not None or made_by(w, "linear") is not None:
            out.append(c)
    return out


def bucket(outcome) -> str:
    """'<op or module type>: <the reason's first words>' of the first refusal."""
    node, _, _ = outcome.refusal.partition(": ")
    what = node[node.find("(") + 1 : node.rfind(")")] if "(" in node else node
    words = outcome.reason.split("(")[0].split(":")[0].split()
    return f"{what}: {' '.join(words[:6])}" if outcome.reason != "no site" else "no site"


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    COUNTS.clear()
    with one_thread():
        yield
    exact = COUNTS["exact"]
    refused = {k[len("refused: ") :]: v for k, v in COUNTS.items() if k.startswith("refused: ")}
    n_ref = sum(refused.values())
    by = ", ".join(f"{v} {k}" for k, v in sorted(refused.items(), key=lambda kv: -kv[1]))
    line = f"{exact} exact, {n_ref} refused (by reason: {by})"
    if COUNTS["NOT EXACT"]:
        line += f"; {COUNTS['NOT EXACT']} accepted but NOT exact (runs while shrinking included)"
    print(f"\nvggnorm fuzz: {line}")
    path = os.environ.get("VGGNORM_FUZZ_COUNTS")
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=False,
    database=None,  # derandomized: the same examples every run, nothing written to .hypothesis/
)
@given(prog=programs())
def test_generated_program(prog: Program):
    torch.manual_seed(0)
    model = randomize(ProgramNet(prog), seed=0)
    x = images(SIZE)

    groups, may = scale_groups(prog)
    outcome = check_contract(
        model,
        x,
        add_affine=prog.add_affine,
        may_unscale_of=lambda sites: may,
        required_sites=clean_sites(prog),
        stream_bounds_of=lambda sites: groups,
    )
    if outcome.accepted:
        COUNTS["exact" if not outcome.problems else "NOT EXACT"] += 1
    else:
        COUNTS[f"refused: {bucket(outcome)}"] += 1
    untracked = any(s[0] == "norm" and not s[4] for s in prog.modules.values())
    if outcome.accepted and untracked:
        outcome.problems.append(
            "[untracked] accepted a BatchNorm2d(track_running_stats=False): its means depend on the batch"
        )
    if outcome.problems:
        fail(outcome)


def fail(outcome) -> None:
    """One raise per kind of problem, each on its own line: Hypothesis reports (and shrinks) each kind
    of failure separately instead of only the first one it finds."""
    kind, msg = outcome.categories()[0] if outcome.categories() else "", outcome.describe()
    if kind == "crash":
        raise AssertionError(msg)
    if kind == "message":
        raise AssertionError(msg)
    if kind == "missing-site":
        raise AssertionError(msg)
    if kind == "twice":
        raise AssertionError(msg)
    if kind == "late-error":
        raise AssertionError(msg)
    if kind == "output":
        raise AssertionError(msg)
    if kind == "stats":
        raise AssertionError(msg)
    if kind == "call":
        raise AssertionError(msg)
    if kind == "stream":
        raise AssertionError(msg)
    if kind == "scales":
        raise AssertionError(msg)
    if kind == "means":
        raise AssertionError(msg)
    if kind == "untracked":
        raise AssertionError(msg)
    raise AssertionError(msg)
