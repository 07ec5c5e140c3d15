"""Random small ReLU-CNN graphs from a grammar, run through vggnorm and checked by our own oracle.

A program is a list of op tuples; op ``i`` makes value ``i + 1`` (value 0 is the image) and refers
to earlier values by index. One ``nn.Module`` (``ProgramNet``) interprets it: its forward loops
over the program, so ``torch.fx`` traces straight through. The property: accepted => the contract
(``contract.check_contract``: outputs unchanged, every live filter's mean 1, statistics as the model
runs); refused => a ``VggnormError`` naming the refused node; never another exception.

``VGGNORM_FUZZ_EXAMPLES`` sets the number of examples (default 200); ``make fuzz`` runs 3000 and
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

EXAMPLES = int(os.environ.get("VGGNORM_FUZZ_EXAMPLES", 200))
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
            else:
                v = torch.flatten(vals[op[1]], 1)
            vals.append(v)
        if len(self.outputs) == 1:
            return vals[self.outputs[0]]
        return tuple(vals[i] for i in self.outputs)


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
        elif op[0] in ("cat", "add"):
            fixed.append(fixed[op[1]] and fixed[op[2]])
        else:
            fixed.append(len(shape) == 1 or fixed[op[1]])

    def norm_ok(s, norm) -> bool:
        return len(s) == 3 and (norm not in ("in", "bn_untracked") or s[1] * s[2] > 1)

    def emit_act(i: int) -> None:
        s = shapes[i]
        act = draw(st.sampled_from(["relu", "relu", "leaky", "prelu"]))
        channels = 1
        if act == "prelu" and draw(st.booleans()):
            channels = s[0]
        inplace = act != "prelu" and kinds[i] not in ("input", "view") and draw(st.integers(0, 3)) == 3
        name = new_module(("act", act, channels, inplace))
        emit(("call", i, name), s, "act")

    def emit_norm(i: int) -> None:
        s = shapes[i]
        norm = draw(st.sampled_from(["bn", "bn", "gn", "in", "ln"]))
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


def readers_of(prog: Program) -> set[int]:
    used: set[int] = set()
    for op in prog.ops:
        if op[0] in ("cat", "add"):
            used |= {op[1], op[2]}
        else:
            used.add(op[1])
    return used


def taint_unscaled(prog: Program, sites) -> set[str]:
    """The activation paths of the sites whose scale reaches the model's output uncompensated.

    The values a site's norm and activation produce carry its scale (and its conv's, when there is no
    norm: with a norm, the norm's affine parameters may carry the scale and the conv's output stays as
    it was; were it scaled, the outputs check would tell); a conv or Linear that is not one of them
    compensates (clears) it; every other op passes its inputs' scales on."""
    owner: dict[str, set[str]] = {}
    for s in sites:
        for path in (s.conv if s.bn is None else None, s.bn, s.relu):
            if path is not None:
                owner.setdefault(path, set()).add(s.relu)
    taint: list[set[str]] = [set()]
    for op in prog.ops:
        if op[0] == "call":
            path = f"layers.{op[2]}"
            spec = prog.modules[op[2]]
            t = set() if spec[0] in ("conv", "linear") else set(taint[op[1]])  # a conv/Linear compensates
            t |= owner.get(path, set())
        elif op[0] in ("cat", "add"):
            t = taint[op[1]] | taint[op[2]]
        else:
            t = set(taint[op[1]])
        taint.append(t)
    out: set[str] = set()
    for i in prog.outputs:
        out |= taint[i]
    return out


def reaches_output(prog: Program) -> set[int]:
    """The values that reach the model's output through no conv or Linear."""
    consumers: dict[int, list[int]] = {}
    for j, op in enumerate(prog.ops):
        srcs = (op[1], op[2]) if op[0] in ("cat", "add") else (op[1],)
        for v in srcs:
            consumers.setdefault(v, []).append(j + 1)
    reach: set[int] = set(prog.outputs)
    for v in range(len(prog.ops), -1, -1):
        for c in consumers.get(v, []):
            op = prog.ops[c - 1]
            compensates = op[0] == "call" and prog.modules[op[2]][0] in ("conv", "linear")
            if c in reach and not compensates:
                reach.add(v)
    return reach


def clean_sites(prog: Program) -> list[str]:
    """Activation calls that are plainly sites: conv/linear -> [norm] -> activation, each module
    called once, the conv's (and the norm's) value read only by the next op of the chain."""
    calls = Counter(op[2] for op in prog.ops if op[0] == "call")
    readers: Counter[int] = Counter()
    for op in prog.ops:
        if op[0] in ("cat", "add"):
            readers[op[1]] += 1
            readers[op[2]] += 1
        else:
            readers[op[1]] += 1

    def made_by(v: int, kind: str) -> str | None:
        if v == 0:
            return None
        op = prog.ops[v - 1]
        if op[0] != "call" or prog.modules[op[2]][0] != kind or calls[op[2]] != 1 or readers[v] != 1:
            return None
        return op[2]

    reach = reaches_output(prog)
    out = []
    for i, op in enumerate(prog.ops):
        if op[0] != "call" or prog.modules[op[2]][0] != "act" or calls[op[2]] != 1 or (i + 1) in reach:
            continue  # an activation whose output is (part of) the model's output may be left out of the sites
        v = op[1]
        if made_by(v, "norm") is not None:
            v = prog.ops[v - 1][1]
        if made_by(v, "conv") is not None or made_by(v, "linear") is not None:
            out.append(f"layers.{prog.ops[i][2]}")
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

    def unscaled_of(sites):
        return taint_unscaled(prog, sites)

    outcome = check_contract(
        model, x, add_affine=prog.add_affine, unscaled_of=unscaled_of, required_sites=clean_sites(prog)
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
    if kind == "means":
        raise AssertionError(msg)
    if kind == "untracked":
        raise AssertionError(msg)
    raise AssertionError(msg)
