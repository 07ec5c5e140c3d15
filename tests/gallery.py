"""A gallery of small CNN structures with the verdict vggnorm must reach on each.

Each entry is a factory returning an fx-traceable ``nn.Module`` and the expected verdict:

* ``"exact"``: accepted, and the contract holds (outputs unchanged, every live filter's mean 1);
* ``"refused"``: ``measure_means`` raises a ``VggnormError`` naming the refused node;
* ``"either"``: both are sound; if accepted, it must be exact.

Activations are named by module path (all the calls of that module) or by call index: the index of
the call among all calls of positively homogeneous activations (ReLU/LeakyReLU/PReLU modules, F.relu,
torch.relu, x.relu(), relu_, F.leaky_relu, F.prelu) in one ``model(x)``, what ``Site.call`` says.

``unscaled``: activations whose output reaches the model's output uncompensated (their site must keep
scale 1; a stream with one such member keeps 1 at all its members). ``sites``: activations that must
be listed as sites when accepted (default for "exact": every activation call but the unscaled ones).
``streams``: the streams of two or more sites the analysis must report, as groups of calls (default for
"exact": none; for "either": not checked). ``stream_scale``: the policy passed to ``normalize_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.densenet import DenseNet
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.shufflenetv2 import InvertedResidual
from torchvision.ops.misc import SqueezeExcitation

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


class Fwd(nn.Module):
    """A module whose forward is ``fn(self, x)``; the keyword modules are its children."""

    def __init__(self, fn: Callable, buffers: dict[str, torch.Tensor] | None = None, **modules: nn.Module) -> None:
        super().__init__()
        self._fn = fn
        for name, m in modules.items():
            self.add_module(name, m)
        for name, t in (buffers or {}).items():
            self.register_buffer(name, t)

    def forward(self, x):
        return self._fn(self, x)


def conv(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    kw.setdefault("padding", k // 2)
    return nn.Conv2d(cin, cout, k, **kw)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[[], nn.Module]
    verdict: str  # "exact" | "refused" | "either"
    size: int = 16
    add_affine: bool = False
    unscaled: tuple[str | int, ...] = ()
    sites: tuple[str | int, ...] | None = None
    streams: tuple[tuple[int, ...], ...] | None = None
    stream_scale: str = "geometric"
    note: str = ""

    def required_sites(self, model: nn.Module) -> tuple[str | int, ...] | str:
        if self.sites is not None:
            return self.sites
        # every activation call; a site left unscaled may be reported apart from the sites: not required
        return "all" if self.verdict == "exact" else ()

    def expected_streams(self) -> tuple[tuple[int, ...], ...] | None:
        if self.streams is not None:
            return self.streams
        return () if self.verdict == "exact" else None


# ---------------------------------------------------------------- exact


def vgg_chain() -> nn.Module:
    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2), conv(4, 6), nn.ReLU(), nn.MaxPool2d(2)
            )
            self.classifier = nn.Sequential(nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3))

        def forward(self, x):
            x = self.features(x)
            x = torch.flatten(x, 1)
            return self.classifier(x)

    return VGG()


def _head(c: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


def conv_bn_relu() -> nn.Module:
    return nn.Sequential(
        conv(3, 4), nn.BatchNorm2d(4), nn.ReLU(), conv(4, 5, bias=False), nn.BatchNorm2d(5), nn.ReLU(), _head(5)
    )


def conv_gn_relu() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.GroupNorm(2, 4), nn.ReLU(), conv(4, 4), nn.GroupNorm(1, 4), nn.ReLU(), _head(4))


def conv_in_affine() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.InstanceNorm2d(4, affine=True), nn.ReLU(), conv(4, 3), _head(3))


def conv_layernorm2d() -> nn.Module:
    return nn.Sequential(conv(3, 4), LayerNorm2d(4), nn.ReLU(), conv(4, 4), nn.ReLU(), _head(4))


def conv_in_noaffine() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.InstanceNorm2d(4), nn.ReLU(), conv(4, 3), nn.ReLU(), _head(3))


def leaky() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.LeakyReLU(0.1), conv(4, 4), nn.LeakyReLU(0.3), _head(4))


def prelu_one() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.PReLU(), conv(4, 4), nn.PReLU(), _head(4))


def prelu_channels() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.PReLU(4), conv(4, 5), nn.BatchNorm2d(5), nn.PReLU(5), _head(5))


def relu_inplace() -> nn.Module:
    return nn.Sequential(
        conv(3, 4), nn.ReLU(inplace=True), conv(4, 4), nn.BatchNorm2d(4), nn.ReLU(inplace=True), _head(4)
    )


def module_pools() -> nn.Module:
    return nn.Sequential(
        conv(3, 4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        conv(4, 4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        conv(4, 4),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(2),
        conv(4, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def functional_pools() -> nn.Module:
    def fwd(m, x):
        x = F.max_pool2d(m.r1(m.c1(x)), 2)
        x = F.avg_pool2d(m.r2(m.c2(x)), kernel_size=2, stride=2)
        x = F.adaptive_avg_pool2d(m.r3(m.c3(x)), 1)
        return m.fc(x.flatten(1))

    return Fwd(
        fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), c3=conv(4, 5), r3=nn.ReLU(), fc=nn.Linear(5, 2)
    )


def pads() -> nn.Module:
    def fwd(m, x):
        x = m.r1(m.c1(x))
        x = m.c2(m.zero(x))
        x = m.r2(x)
        x = m.c3(m.refl(x))
        x = m.r3(x)
        x = m.c4(m.repl(x))
        x = m.r4(x)
        x = m.c5(F.pad(x, (1, 1, 1, 1)))
        x = m.r5(x)
        x = m.c6(F.pad(x, (1, 0, 0, 1), mode="constant", value=0.0))
        return x.mean([2, 3])

    return Fwd(
        fwd,
        c1=conv(3, 4),
        r1=nn.ReLU(),
        zero=nn.ZeroPad2d(1),
        c2=conv(4, 4, padding=0),
        r2=nn.ReLU(),
        refl=nn.ReflectionPad2d(1),
        c3=conv(4, 4, padding=0),
        r3=nn.ReLU(),
        repl=nn.ReplicationPad2d(1),
        c4=conv(4, 4, padding=0),
        r4=nn.ReLU(),
        c5=conv(4, 4, padding=0),
        r5=nn.ReLU(),
        c6=conv(4, 3, k=2, padding=0),
    )


def dropout() -> nn.Module:
    return nn.Sequential(
        conv(3, 4),
        nn.ReLU(),
        nn.Dropout2d(0.3),
        conv(4, 4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4, 3),
    )


def view_flatten() -> nn.Module:
    def fwd(m, x):
        x = m.pool(m.r2(m.c2(m.r1(m.c1(x)))))
        x = x.view(x.size(0), -1)
        return m.fc2(m.r3(m.fc1(x)))

    return Fwd(
        fwd,
        c1=conv(3, 4),
        r1=nn.ReLU(),
        c2=conv(4, 4),
        r2=nn.ReLU(),
        pool=nn.MaxPool2d(4),
        fc1=nn.Linear(4 * 16, 6),
        r3=nn.ReLU(),
        fc2=nn.Linear(6, 2),
    )


def torch_flatten() -> nn.Module:
    def fwd(m, x):
        x = F.max_pool2d(m.r1(m.c1(x)), 4)
        return m.fc(torch.flatten(x, start_dim=1))

    return Fwd(fwd, c1=conv(3, 5), r1=nn.ReLU(), fc=nn.Linear(5 * 16, 3))


def cat_two_sites() -> nn.Module:
    def fwd(m, x):
        y = torch.cat([m.ra(m.ca(x)), m.rb(m.bnb(m.cb(x)))], dim=1)
        return m.head(m.r(m.c(y)))

    return Fwd(
        fwd,
        ca=conv(3, 3),
        ra=nn.ReLU(),
        cb=conv(3, 2, k=1),
        bnb=nn.BatchNorm2d(2),
        rb=nn.ReLU(),
        c=conv(5, 4),
        r=nn.ReLU(),
        head=_head(4),
    )


def cat_with_image() -> nn.Module:
    def fwd(m, x):
        y = torch.cat((m.r1(m.c1(x)), x), 1)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(7, 4), r2=nn.ReLU(), head=_head(4))


def grouped_after_cat() -> nn.Module:
    def fwd(m, x):
        y = torch.cat([m.ra(m.ca(x)), m.rb(m.cb(x))], dim=1)
        return m.head(m.r(m.g(y)))

    return Fwd(
        fwd,
        ca=conv(3, 2),
        ra=nn.ReLU(),
        cb=conv(3, 4),
        rb=nn.ReLU(),
        g=conv(6, 4, groups=2),
        r=nn.ReLU(),
        head=_head(4),
    )


def depthwise_after_cat() -> nn.Module:
    def fwd(m, x):
        y = torch.cat([m.ra(m.ca(x)), m.rb(m.cb(x))], dim=1)
        y = m.rd(m.dw(y))
        return m.head(m.rp(m.pw(y)))

    return Fwd(
        fwd,
        ca=conv(3, 3),
        ra=nn.ReLU(),
        cb=conv(3, 3),
        rb=nn.LeakyReLU(0.2),
        dw=conv(6, 6, groups=6),
        rd=nn.ReLU(),
        pw=conv(6, 4, k=1),
        rp=nn.ReLU(),
        head=_head(4),
    )


def mul_const(c: float) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        def fwd(m, x):
            y = m.r1(m.c1(x)) * c
            y = m.r2(m.c2(y))
            return m.head(y / 3.0)

        return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))

    return make


def global_mean_linear() -> nn.Module:
    def fwd(m, x):
        y = m.r2(m.c2(m.r1(m.c1(x))))
        return m.fc(y.mean([2, 3]))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 5), r2=nn.ReLU(), fc=nn.Linear(5, 3))


def lpips_input_transform() -> nn.Module:
    class Scaling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2), conv(4, 3))
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        def forward(self, x):
            return self.features((x - self.shift) / self.scale)

    return Scaling()


def stem_before_features() -> nn.Module:
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv(3, 4)
            self.stem_act = nn.ReLU()
            self.features = nn.Sequential(conv(4, 4), nn.ReLU(), nn.MaxPool2d(2), conv(4, 4), nn.ReLU())
            self.fc = nn.Linear(4 * 64, 3)

        def forward(self, x):
            x = self.stem_act(self.stem(x))
            return self.fc(self.features(x).flatten(1))

    return Stem()


def padding_mode(mode: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(
            conv(3, 4, padding_mode=mode),
            nn.ReLU(),
            conv(4, 4, padding_mode=mode),
            nn.ReLU(),
            conv(4, 3, padding_mode=mode),
            _head(3),
        )

    return make


def two_acts_one_conv() -> nn.Module:
    def fwd(m, x):
        y = m.c1(x)
        return m.head(m.c2(torch.cat([m.ra(y), m.rb(y)], 1)))

    return Fwd(fwd, c1=conv(3, 4), ra=nn.ReLU(), rb=nn.LeakyReLU(0.2), c2=conv(8, 4), head=_head(4))


def preact_side_conv() -> nn.Module:
    def fwd(m, x):
        y = m.c1(x)
        a = m.c2(m.r1(y))
        return m.head(m.r2(a + m.side(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), side=conv(4, 4, k=1), r2=nn.ReLU(), head=_head(4))


def act_read_by_two_convs() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        a = m.ra(m.ca(y))
        b = m.rb(m.cb(y))
        return m.head(m.c3(torch.cat([a, b], 1)))

    return Fwd(
        fwd,
        c1=conv(3, 4),
        r1=nn.ReLU(),
        ca=conv(4, 3),
        ra=nn.ReLU(),
        cb=conv(4, 2, k=1),
        rb=nn.ReLU(),
        c3=conv(5, 4),
        head=_head(4),
    )


def last_op_relu() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), nn.MaxPool2d(2), conv(4, 5), nn.BatchNorm2d(5), nn.ReLU())


def tuple_output() -> nn.Module:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(conv(3, 4), nn.ReLU(), nn.MaxPool2d(2), conv(4, 5), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(20, 3)

        def forward(self, x):
            f = self.pool(self.features(x))
            return f, self.fc(torch.flatten(f, 1))

    return Two()


def mlp_sites() -> nn.Module:
    return nn.Sequential(
        conv(3, 3, k=1),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(48, 8),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.LeakyReLU(0.05),
        nn.Linear(6, 6),
        nn.PReLU(6),
        nn.Linear(6, 2),
    )


def strided_grouped_site() -> nn.Module:
    return nn.Sequential(
        conv(3, 4, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        conv(4, 6, groups=2, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        conv(6, 6, k=1, groups=3),
        nn.ReLU(),
        _head(6),
    )


def nested_blocks() -> nn.Module:
    class Block(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = conv(cin, cout)
            self.bn = nn.BatchNorm2d(cout)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(Block(3, 4), nn.MaxPool2d(2), Block(4, 4), Block(4, 5))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(5 * 4, 2))

        def forward(self, x):
            return self.head(self.body(x))

    return Net()


def cat_negative_dim() -> nn.Module:
    def fwd(m, x):
        return m.head(m.r(m.c(torch.cat([m.ra(m.ca(x)), m.rb(m.cb(x))], dim=-3))))

    return Fwd(fwd, ca=conv(3, 2), ra=nn.ReLU(), cb=conv(3, 3), rb=nn.ReLU(), c=conv(5, 4), r=nn.ReLU(), head=_head(4))


def squeeze_mean_conv() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.fc(m.r2(m.c2(y.mean([2, 3], keepdim=True))).flatten(1))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 5, k=1), r2=nn.ReLU(), fc=nn.Linear(5, 2))


def functional_dropout() -> nn.Module:
    def fwd(m, x):
        y = F.dropout(m.r1(m.c1(x)), 0.5, m.training)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def cat_then_flatten_linear() -> nn.Module:
    def fwd(m, x):
        y = torch.cat([m.ra(m.ca(x)), m.rb(m.cb(x))], 1)
        return m.fc(torch.flatten(m.pool(y), 1))

    return Fwd(
        fwd, ca=conv(3, 2), ra=nn.ReLU(), cb=conv(3, 3), rb=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(2), fc=nn.Linear(20, 3)
    )


def act_read_by_conv_and_linear() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.head(m.r2(m.c2(y))) + m.fc(m.pool(y).flatten(1))

    return Fwd(
        fwd,
        c1=conv(3, 4),
        r1=nn.ReLU(),
        c2=conv(4, 4),
        r2=nn.ReLU(),
        head=_head(4),
        pool=nn.AdaptiveMaxPool2d(2),
        fc=nn.Linear(16, 3),
    )


def dead_filters() -> nn.Module:
    m = nn.Sequential(conv(3, 5), nn.ReLU(), conv(5, 4), nn.ReLU(), _head(4))
    with torch.no_grad():
        m[0].bias[1] = -100.0  # never fires: mean 0
        m[0].weight[3] *= 1e-4  # fires a little: below 1e-3 x the median mean
        m[0].bias[3] = 0.0
    return m


def all_dead_site() -> nn.Module:
    m = nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), conv(4, 3), _head(3))
    with torch.no_grad():
        m[2].bias.fill_(-100.0)
    return m


def leaky_negative_slope() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.LeakyReLU(-0.5), conv(4, 4), nn.LeakyReLU(1.5), _head(4))


def negative_mul_then_maxpool() -> nn.Module:
    def fwd(m, x):
        y = F.max_pool2d(m.r1(m.c1(x)) * -1.0, 2)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def norms_without_affine() -> nn.Module:
    return nn.Sequential(
        conv(3, 4, bias=False),
        nn.BatchNorm2d(4, affine=False),
        nn.ReLU(),
        conv(4, 4),
        nn.GroupNorm(2, 4, affine=False),
        nn.ReLU(),
        conv(4, 4),
        LayerNorm2d(4, elementwise_affine=False),
        nn.ReLU(),
        conv(4, 3),
        _head(3),
    )


def classifier_ends_in_relu() -> nn.Module:
    return nn.Sequential(
        conv(3, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
        nn.ReLU(),
    )


def dict_output() -> nn.Module:
    def fwd(m, x):
        pooled = m.pool(m.r2(m.c2(m.r1(m.c1(x)))))
        return {"logits": m.fc(pooled.flatten(1)), "pooled": pooled}

    return Fwd(
        fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(4, 2)
    )


# ---------------------------------------------------------------- either (both sound)


def upsample_between() -> nn.Module:
    def fwd(m, x):
        y = F.interpolate(m.r1(m.c1(x)), scale_factor=2.0, mode="nearest")
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def linear_bn1d() -> nn.Module:
    return nn.Sequential(
        conv(3, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 2),
    )


def preact_to_output() -> nn.Module:
    def fwd(m, x):
        y = m.c1(x)
        return m.head(m.c2(m.r1(y))), y

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), head=_head(4))


def product_of_sites() -> nn.Module:
    def fwd(m, x):
        y = m.ra(m.ca(x)) * m.rb(m.cb(x))
        return m.head(m.c(y))

    return Fwd(fwd, ca=conv(3, 4), ra=nn.ReLU(), cb=conv(3, 4), rb=nn.ReLU(), c=conv(4, 4), head=_head(4))


def inplace_preact_output() -> nn.Module:
    def fwd(m, x):
        y = m.c1(x)
        a = m.r1(y)  # in place: y IS the activation afterwards
        return m.head(m.c2(a)), y

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(inplace=True), c2=conv(4, 4), head=_head(4))


def pool_between_conv_and_relu() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), nn.MaxPool2d(2), nn.ReLU(), conv(4, 4), nn.ReLU(), _head(4))


def linear_to_conv_view() -> nn.Module:
    def fwd(m, x):
        z = m.r1(m.fc(m.pool(m.r0(m.c0(x))).flatten(1)))
        return m.head(m.r2(m.c(z.view(z.size(0), 2, 4, 4))))

    return Fwd(
        fwd,
        c0=conv(3, 3, k=1),
        r0=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(2),
        fc=nn.Linear(12, 32),
        r1=nn.ReLU(),
        c=conv(2, 4),
        r2=nn.ReLU(),
        head=_head(4),
    )


def channel_shuffle() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4, groups=2), r2=nn.ReLU(), head=_head(4))


def amax_spatial_linear() -> nn.Module:
    def fwd(m, x):
        return m.fc(torch.amax(m.r1(m.c1(x)), dim=(2, 3)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), fc=nn.Linear(4, 2))


def conv_transpose_after_act() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU(), conv(4, 3), _head(3))


def registered_out_of_order() -> nn.Module:
    """The image's conv is not the first Conv2d registered (nothing else unusual)."""

    def fwd(m, x):
        return m.head(m.r2(m.c2(m.r1(m.c1(x)))))

    return Fwd(fwd, c2=conv(4, 4), r2=nn.ReLU(), c1=conv(3, 4), r1=nn.ReLU(), head=_head(4))


def dilated_conv() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4, padding=2, dilation=2), nn.ReLU(), conv(4, 3), _head(3))


def channel_mean_into_conv() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.head(m.r2(m.c2(torch.cat([y, y.mean(1, keepdim=True)], 1))))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(5, 4), r2=nn.ReLU(), head=_head(4))


def site_plus_itself() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.head(m.r2(m.c2(y * 0.25 + y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def squeeze_excite() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        gate = torch.sigmoid(m.fc2(m.rf(m.fc1(y.mean([2, 3])))))
        return m.head(m.r2(m.c2(y * gate[:, :, None, None])))

    return Fwd(
        fwd,
        c1=conv(3, 4),
        r1=nn.ReLU(),
        fc1=nn.Linear(4, 2),
        rf=nn.ReLU(),
        fc2=nn.Linear(2, 4),
        c2=conv(4, 4),
        r2=nn.ReLU(),
        head=_head(4),
    )


def channels_last_linear() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x)).permute(0, 2, 3, 1)
        y = m.r2(m.pw(y)).permute(0, 3, 1, 2)
        return m.head(y)

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), pw=nn.Linear(4, 5), r2=nn.ReLU(), head=_head(5))


class PlainReLU(nn.ReLU):
    """A subclass that changes nothing."""


def relu_subclass() -> nn.Module:
    return nn.Sequential(conv(3, 4), PlainReLU(), conv(4, 4), PlainReLU(), _head(4))


def weight_norm_conv() -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(conv(3, 4), nn.ReLU(), weight_norm(conv(4, 4)), nn.ReLU(), conv(4, 3), _head(3))


def tied_conv_weights() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        y = m.r2(m.ca(y))
        y = m.r3(m.cb(y))
        return m.head(y)

    m = Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), ca=conv(4, 4), r2=nn.ReLU(), cb=conv(4, 4), r3=nn.ReLU(), head=_head(4))
    m.cb.weight = m.ca.weight  # one Parameter, two modules
    return m


# ---------------------------------------------------------------- per-call sites, streams, norms receiving a scale


def resnet_basic() -> nn.Module:
    """torchvision's BasicBlock (one ReLU module called twice per block): stem, maxpool, a block without and
    one with a downsample, one more, avgpool + flatten + Linear. Calls: stem 0; blocks (1, 2), (3, 4), (5, 6),
    the second of each after the add. Streams: the stem and the post-add ReLU up to the downsample {0, 2};
    after it {4, 6}."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = conv(3, 4, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            ds = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
            self.layer1 = nn.Sequential(BasicBlock(4, 4))
            self.layer2 = nn.Sequential(BasicBlock(4, 6, stride=2, downsample=ds), BasicBlock(6, 6))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer2(self.layer1(x))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return Net()


def resnet_bottleneck() -> nn.Module:
    """torchvision's Bottleneck (one ReLU called three times), ResNeXt-style groups in the second block.
    Calls: stem 0; blocks (1, 2, 3) with a downsample, (4, 5, 6). Stream: {3, 6} (block 1's output through
    block 2's identity)."""

    def ds(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def fwd(m, x):
        x = m.pool(m.relu(m.bn(m.stem(x))))
        return m.fc(torch.flatten(m.avg(m.blocks(x)), 1))

    return Fwd(
        fwd,
        stem=conv(3, 4, bias=False),
        bn=nn.BatchNorm2d(4),
        relu=nn.ReLU(inplace=True),
        pool=nn.MaxPool2d(2),
        blocks=nn.Sequential(
            Bottleneck(4, 2, downsample=ds(4, 8, 1)),
            Bottleneck(8, 2, groups=2, base_width=64),
        ),
        avg=nn.AdaptiveAvgPool2d(1),
        fc=nn.Linear(8, 3),
    )


def residual_two_branches_post_relu() -> nn.Module:
    def fwd(m, x):
        y = m.r(m.ra(m.ca(x)) + m.rb(m.cb(x)))
        return m.head(m.c(y))

    return Fwd(
        fwd, ca=conv(3, 4), ra=nn.ReLU(), cb=conv(3, 4, k=1), rb=nn.ReLU(), r=nn.ReLU(), c=conv(4, 4), head=_head(4)
    )


def residual_to_output() -> nn.Module:
    """A stream {0, 2} whose post-add ReLU is the model's output (spatially averaged): nothing compensates it."""

    def fwd(m, x):
        h = m.r0(m.c0(x))
        out = m.r2(m.bn2(m.c2(m.r1(m.c1(h)))) + h)
        return out.mean([2, 3])

    return Fwd(
        fwd,
        c0=conv(3, 4),
        r0=nn.ReLU(),
        c1=conv(4, 4),
        r1=nn.ReLU(),
        c2=conv(4, 4),
        bn2=nn.BatchNorm2d(4),
        r2=nn.ReLU(),
    )


def add_raw_image() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x)) + x
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 3), r1=nn.ReLU(), c2=conv(3, 4), r2=nn.ReLU(), head=_head(4))


def mul_two_sites_plus_one() -> nn.Module:
    """a * b + a: the product carries s_a * s_b, the other term s_a; no divisor but s_b = 1 joins them, and
    neither site is in a stream (no add joins two scaled values of the same scale)."""

    def fwd(m, x):
        a, b = m.ra(m.ca(x)), m.rb(m.cb(x))
        return m.head(m.c(a * b + a))

    return Fwd(fwd, ca=conv(3, 4), ra=nn.ReLU(), cb=conv(3, 4), rb=nn.ReLU(), c=conv(4, 4), head=_head(4))


def relu_module_three_sites() -> nn.Module:
    def fwd(m, x):
        y = m.r(m.c1(x))
        y = m.r(m.bn(m.c2(y)))
        y = m.r(m.fc(m.pool(y).flatten(1)))
        return m.out(y)

    return Fwd(
        fwd,
        c1=conv(3, 4),
        c2=conv(4, 4),
        bn=nn.BatchNorm2d(4),
        pool=nn.AdaptiveAvgPool2d(2),
        fc=nn.Linear(16, 5),
        r=nn.ReLU(),
        out=nn.Linear(5, 3),
    )


def functional_relu_family() -> nn.Module:
    """Every spelling of a functional ReLU at a site, in place or not."""

    def fwd(m, x):
        y = F.relu(m.c0(x))
        y = torch.relu(m.c1(y))
        y = m.c2(y).relu()
        y = F.relu_(m.c3(y))
        y = torch.relu_(m.c4(y))
        y = m.c5(y).relu_()
        y = F.relu(m.bn(m.c6(y)), inplace=True)
        return m.head(y)

    return Fwd(
        fwd,
        c0=conv(3, 4),
        c1=conv(4, 4),
        c2=conv(4, 5, k=1),
        c3=conv(5, 4),
        c4=conv(4, 4),
        c5=conv(4, 4),
        c6=conv(4, 4),
        bn=nn.BatchNorm2d(4),
        head=_head(4),
    )


def functional_leaky_prelu() -> nn.Module:
    def fwd(m, x):
        y = F.leaky_relu(m.c0(x), 0.1)
        y = F.leaky_relu(m.c1(y), negative_slope=0.2, inplace=True)
        y = F.prelu(m.c2(y), m.slopes)
        y = torch.prelu(m.c3(y), m.slope)
        return m.head(y)

    m = Fwd(fwd, c0=conv(3, 4), c1=conv(4, 4), c2=conv(4, 4), c3=conv(4, 4), head=_head(4))
    m.slopes = nn.Parameter(torch.tensor([0.1, 0.25, 0.05, 0.3]))
    m.slope = nn.Parameter(torch.tensor([0.15]))
    return m


def functional_relu6_site() -> nn.Module:
    def fwd(m, x):
        y = F.relu(m.c1(x))
        y = F.relu6(m.c2(y))
        return m.head(m.c3(y))

    return Fwd(fwd, c1=conv(3, 4), c2=conv(4, 4), c3=conv(4, 3), head=_head(3))


def tiny_densenet() -> nn.Module:
    """torchvision's DenseNet: BN -> ReLU -> conv on the cat of the previous (scaled) features, transitions
    BN -> ReLU -> conv -> avgpool, and norm5 -> F.relu -> pool -> Linear. 9 calls, every one a site."""
    return DenseNet(growth_rate=4, block_config=(2, 1), num_init_features=8, bn_size=2, num_classes=3)


def googlenet_inception() -> nn.Module:
    """torchvision's Inception block (BasicConv2d: conv -> BN -> F.relu(inplace=True)), four branches cat."""

    def fwd(m, x):
        return m.fc(torch.flatten(m.pool(m.block(m.stem(x))), 1))

    return Fwd(
        fwd,
        stem=BasicConv2d(3, 4, kernel_size=3, padding=1),
        block=Inception(4, 2, 2, 2, 2, 2, 2),
        pool=nn.AdaptiveAvgPool2d(1),
        fc=nn.Linear(8, 3),
    )


def shufflenet_blocks() -> nn.Module:
    """torchvision's ShuffleNetV2 units: a strided one (two branches, cat, channel shuffle by
    view/transpose/contiguous/view) and a plain one (x.chunk(2, dim=1), half passed through, cat, shuffle)."""

    def fwd(m, x):
        x = m.stage(m.stem(x))
        return m.fc(m.conv5(x).mean([2, 3]))

    def cbr(cin: int, cout: int, k: int) -> nn.Sequential:
        return nn.Sequential(conv(cin, cout, k=k, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return Fwd(
        fwd,
        stem=cbr(3, 4, 3),
        stage=nn.Sequential(InvertedResidual(4, 8, 2), InvertedResidual(8, 8, 1)),
        conv5=cbr(8, 8, 1),
        fc=nn.Linear(8, 3),
    )


def chunk_then_cat() -> nn.Module:
    def fwd(m, x):
        a, b = m.r1(m.c1(x)).chunk(2, dim=1)
        return m.head(m.r3(m.c3(torch.cat([b, m.r2(m.c2(a))], 1))))

    return Fwd(
        fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(2, 3), r2=nn.ReLU(), c3=conv(5, 4), r3=nn.ReLU(), head=_head(4)
    )


def split_then_cat() -> nn.Module:
    def fwd(m, x):
        a, b = torch.split(m.r1(m.c1(x)), [1, 3], dim=1)
        return m.head(m.r3(m.c3(torch.cat([m.r2(m.c2(b)), a], 1))))

    return Fwd(
        fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(3, 2), r2=nn.ReLU(), c3=conv(3, 4), r3=nn.ReLU(), head=_head(4)
    )


def slice_then_cat() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        z = torch.cat([y[:, 2:], F.relu(m.c2(y[:, :2])), y[:, 1:2]], 1)
        return m.head(m.r3(m.c3(z)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(2, 3), r3=nn.ReLU(), c3=conv(6, 4), head=_head(4))


def se_block(gate: type[nn.Module]) -> Callable[[], nn.Module]:
    """torchvision's SqueezeExcitation (RegNet-Y, MobileNetV3's shape): x * gate(conv(relu(conv(avgpool(x)))))."""

    def make() -> nn.Module:
        return nn.Sequential(
            conv(3, 4),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            SqueezeExcitation(4, 2, scale_activation=gate),
            conv(4, 4, k=1),
            nn.ReLU(),
            _head(4),
        )

    return make


def regnet_y_blocks() -> nn.Module:
    """torchvision's RegNet-Y unit (ResBottleneckBlock with SE): calls stem 0; block 1 (1, 2, SE 3, post-add 4)
    with a projection; block 2 (5, 6, SE 7, post-add 8) with the identity. Stream {4, 8}."""

    def fwd(m, x):
        return m.head(m.blocks(m.stem(x)))

    return Fwd(
        fwd,
        stem=nn.Sequential(conv(3, 4, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)),
        blocks=nn.Sequential(
            ResBottleneckBlock(4, 8, 2, nn.BatchNorm2d, nn.ReLU, group_width=2, se_ratio=0.5),
            ResBottleneckBlock(8, 8, 1, nn.BatchNorm2d, nn.ReLU, group_width=2, se_ratio=0.25),
        ),
        head=_head(8),
    )


# ---------------------------------------------------------------- refused


def relu_of_negated_value() -> nn.Module:
    """relu(h) + relu(-h) (|h|): a negation is the constant -1; the second activation reads the same value."""

    def fwd(m, x):
        h = m.c(x)
        return m.head(m.r(h) + m.r(-h))

    return Fwd(fwd, c=conv(3, 4), r=nn.ReLU(), head=_head(4))


def add_of_an_affineless_batchnorm() -> nn.Module:
    """relu(conv(h) + bn(conv(h))) with a BatchNorm without affine parameters: the ReLU after the add would
    need the BatchNorm to carry its scale (found by make fuzz: measured without it, scaled with --add-affine)."""

    def fwd(m, x):
        h = m.r(m.c0(x))
        return m.head(m.r(m.c1(h) + m.bn(m.c2(h))))

    return Fwd(
        fwd, c0=conv(3, 4), c1=conv(4, 4), c2=conv(4, 4), bn=nn.BatchNorm2d(4, affine=False), r=nn.ReLU(), head=_head(4)
    )


def _valid_then(act: nn.Module) -> Callable[[], nn.Module]:
    """A valid first site, then conv -> ``act`` -> conv."""

    def make() -> nn.Module:
        return nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), act, conv(4, 3), _head(3))

    return make


def residual_identity() -> nn.Module:
    def fwd(m, x):
        h = m.r0(m.c0(x))
        out = m.bn2(m.c2(m.r1(m.bn1(m.c1(h)))))
        out = m.r2(out + h)
        return m.head(out)

    return Fwd(
        fwd,
        c0=conv(3, 4),
        r0=nn.ReLU(),
        c1=conv(4, 4),
        bn1=nn.BatchNorm2d(4),
        r1=nn.ReLU(),
        c2=conv(4, 4),
        bn2=nn.BatchNorm2d(4),
        r2=nn.ReLU(),
        head=_head(4),
    )


def residual_scaled_input() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x)) + 0.5 * m.proj(x)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), proj=conv(3, 4, k=1), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def add_const_then_conv() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x)) + 1.0
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def norm_after_act(norm: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(conv(3, 4), nn.ReLU(), norm(), conv(4, 4), nn.ReLU(), _head(4))

    return make


def in_noaffine_site() -> nn.Module:
    return conv_in_noaffine()


def bn_untracked_site() -> nn.Module:
    return nn.Sequential(
        conv(3, 4), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), conv(4, 4), nn.ReLU(), _head(4)
    )


def bn_untracked_input() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(3, track_running_stats=False), conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), _head(4)
    )


def bn_untracked_head() -> nn.Module:
    return nn.Sequential(
        conv(3, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
        nn.BatchNorm1d(4, track_running_stats=False),
    )


def layernorm_last_dim() -> nn.Module:
    class LastDimLN(nn.LayerNorm):
        pass

    # channels 8 and width 8 (16 px input, stride 2): LN over the last dim looks per-channel by its size
    return nn.Sequential(conv(3, 8, stride=2), nn.ReLU(), conv(8, 8), LastDimLN(8), nn.ReLU(), conv(8, 3), _head(3))


def act_called_twice() -> nn.Module:
    def fwd(m, x):
        y = m.r(m.c1(x))
        y = m.r(m.c2(y))
        return m.head(y)

    return Fwd(fwd, c1=conv(3, 4), c2=conv(4, 4), r=nn.ReLU(), head=_head(4))


def conv_called_twice() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        y = m.r2(m.c2(y))
        y = m.c2(y)
        return m.head(y)

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def functional_relu() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        y = F.relu(m.c2(y))
        return m.head(m.c3(y))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), c3=conv(4, 3), head=_head(3))


def sliced_activation() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.head(m.r2(m.c2(y[:, :2])))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(2, 4), r2=nn.ReLU(), head=_head(4))


def chunked_activation() -> nn.Module:
    def fwd(m, x):
        a, b = torch.chunk(m.r1(m.c1(x)), 2, dim=1)
        return m.head(torch.cat([m.r2(m.c2(a)), m.r3(m.c3(b))], 1))

    return Fwd(
        fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(2, 4), r2=nn.ReLU(), c3=conv(2, 4), r3=nn.ReLU(), head=_head(8)
    )


def preact_sigmoid_gate() -> nn.Module:
    def fwd(m, x):
        y = m.c1(x)
        return m.head(m.c2(m.r1(y) * torch.sigmoid(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), head=_head(4))


def weight_standardized() -> nn.Module:
    class WSConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    return nn.Sequential(conv(3, 4), nn.ReLU(), WSConv2d(4, 4, 3, padding=1), nn.ReLU(), conv(4, 3), _head(3))


def transpose_flatten() -> nn.Module:
    def fwd(m, x):
        y = F.max_pool2d(m.r1(m.c1(x)), 4)
        return m.fc(y.transpose(1, 3).flatten(1))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), fc=nn.Linear(4 * 16, 3))


def no_site() -> nn.Module:
    return nn.Sequential(conv(3, 4), conv(4, 4), nn.Tanh(), conv(4, 3), _head(3))


def softmax_channels() -> nn.Module:
    def fwd(m, x):
        y = torch.softmax(m.r1(m.c1(x)), dim=1)
        return m.head(m.r2(m.c2(y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def squared_activation() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.head(m.r2(m.c2(y * y)))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), c2=conv(4, 4), r2=nn.ReLU(), head=_head(4))


def sum_of_sites() -> nn.Module:
    def fwd(m, x):
        y = m.ra(m.ca(x)) + m.rb(m.cb(x))
        return m.head(m.r(m.c(y)))

    return Fwd(fwd, ca=conv(3, 4), ra=nn.ReLU(), cb=conv(3, 4), rb=nn.ReLU(), c=conv(4, 4), r=nn.ReLU(), head=_head(4))


def channel_sum_into_linear() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x))
        return m.fc(y.sum(1).flatten(1))

    return Fwd(fwd, c1=conv(3, 4), r1=nn.ReLU(), fc=nn.Linear(256, 3))


def parameterless() -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.LeakyReLU(0.1))


def cat_along_height() -> nn.Module:
    def fwd(m, x):
        y = torch.cat([m.ra(m.ca(x)), m.rb(m.cb(x))], dim=2)
        return m.head(m.r(m.c(y)))

    return Fwd(fwd, ca=conv(3, 4), ra=nn.ReLU(), cb=conv(3, 4), rb=nn.ReLU(), c=conv(4, 4), r=nn.ReLU(), head=_head(4))


class SwishReLU(nn.ReLU):
    """Says it is a ReLU, computes x * sigmoid(x)."""

    def forward(self, x):
        return x * torch.sigmoid(x)


def relu_subclass_own_forward() -> nn.Module:
    return nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4), SwishReLU(), conv(4, 3), _head(3))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


def linear_subclass_own_forward() -> nn.Module:
    return nn.Sequential(
        conv(3, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), ScaledLinear(6, 3)
    )


def add_buffer_to_activation() -> nn.Module:
    def fwd(m, x):
        y = m.r1(m.c1(x)) + m.offset
        return m.head(m.r2(m.c2(y)))

    return Fwd(
        fwd,
        buffers={"offset": torch.linspace(0.1, 0.4, 4).view(1, 4, 1, 1)},
        c1=conv(3, 4),
        r1=nn.ReLU(),
        c2=conv(4, 4),
        r2=nn.ReLU(),
        head=_head(4),
    )


GALLERY: list[Entry] = [
    # exact
    Entry("vgg_chain", vgg_chain, "exact"),
    Entry("conv_bn_relu", conv_bn_relu, "exact"),
    Entry("conv_groupnorm_relu", conv_gn_relu, "exact"),
    Entry("conv_instancenorm_affine", conv_in_affine, "exact"),
    Entry("conv_layernorm2d", conv_layernorm2d, "exact"),
    Entry("instancenorm_noaffine_add_affine", conv_in_noaffine, "exact", add_affine=True),
    Entry("leaky_relu", leaky, "exact"),
    Entry("prelu_one_param", prelu_one, "exact"),
    Entry("prelu_per_channel", prelu_channels, "exact"),
    Entry("relu_inplace", relu_inplace, "exact"),
    Entry("module_pools", module_pools, "exact"),
    Entry("functional_pools", functional_pools, "exact"),
    Entry("pads", pads, "exact"),
    Entry("dropout", dropout, "exact"),
    Entry("view_flatten_linear", view_flatten, "exact"),
    Entry("torch_flatten_linear", torch_flatten, "exact"),
    Entry("cat_two_sites", cat_two_sites, "exact"),
    Entry("cat_with_image", cat_with_image, "exact"),
    Entry("grouped_conv_after_cat", grouped_after_cat, "exact"),
    Entry("depthwise_conv_after_cat", depthwise_after_cat, "exact"),
    Entry("mul_positive_const", mul_const(2.5), "exact"),
    Entry("mul_negative_const", mul_const(-0.7), "exact"),
    Entry("global_mean_linear", global_mean_linear, "exact"),
    Entry("lpips_input_transform", lpips_input_transform, "exact"),
    Entry("stem_before_features", stem_before_features, "exact"),
    Entry("padding_mode_reflect", padding_mode("reflect"), "exact"),
    Entry("padding_mode_circular", padding_mode("circular"), "exact"),
    Entry("act_read_by_two_convs", act_read_by_two_convs, "exact"),
    Entry("last_op_relu", last_op_relu, "exact", unscaled=("5",)),
    Entry("tuple_features_logits", tuple_output, "exact", unscaled=("features.4",)),
    Entry("linear_sites_mlp", mlp_sites, "exact"),
    Entry("strided_grouped_sites", strided_grouped_site, "exact"),
    Entry("nested_blocks_inplace", nested_blocks, "exact"),
    Entry("dilated_conv", dilated_conv, "exact"),
    Entry("cat_negative_dim", cat_negative_dim, "exact"),
    Entry("keepdim_mean_then_1x1_conv", squeeze_mean_conv, "exact"),
    Entry("functional_dropout", functional_dropout, "exact"),
    Entry("cat_then_flatten_linear", cat_then_flatten_linear, "exact"),
    Entry("act_read_by_conv_and_linear", act_read_by_conv_and_linear, "exact"),
    Entry("dead_filters", dead_filters, "exact"),
    Entry("all_dead_site", all_dead_site, "exact"),
    Entry("leaky_negative_slope", leaky_negative_slope, "exact"),
    Entry("negative_mul_then_maxpool", negative_mul_then_maxpool, "exact"),
    Entry("norms_without_affine_add_affine", norms_without_affine, "exact", add_affine=True),
    Entry("classifier_ends_in_relu", classifier_ends_in_relu, "exact", unscaled=("7",)),
    Entry("dict_output", dict_output, "exact", unscaled=("r2",)),
    Entry("modules_registered_out_of_order", registered_out_of_order, "exact"),
    # exact since per-call sites, functional activations, streams, norms receiving a scale
    Entry("residual_identity", residual_identity, "exact", streams=((0, 2),)),
    Entry("sum_of_two_sites", sum_of_sites, "exact", streams=((0, 1),)),
    Entry("residual_two_branches_post_relu", residual_two_branches_post_relu, "exact", streams=((0, 1, 2),)),
    Entry(
        "residual_two_branches_last_policy",
        residual_two_branches_post_relu,
        "exact",
        streams=((0, 1, 2),),
        stream_scale="last",
    ),
    Entry("residual_stream_to_output", residual_to_output, "exact", unscaled=(0, 2), sites=(1,), streams=None),
    Entry("resnet_basic_blocks", resnet_basic, "exact", streams=((0, 2), (4, 6))),
    Entry("resnet_bottleneck_blocks", resnet_bottleneck, "exact", streams=((3, 6),)),
    Entry("act_module_called_twice", act_called_twice, "exact"),
    Entry("relu_module_three_sites", relu_module_three_sites, "exact"),
    Entry("functional_relu_site", functional_relu, "exact"),
    Entry("functional_relu_family", functional_relu_family, "exact"),
    Entry("functional_leaky_prelu", functional_leaky_prelu, "exact"),
    Entry("batchnorm_after_act", norm_after_act(lambda: nn.BatchNorm2d(4)), "exact"),
    Entry("densenet_tiny", tiny_densenet, "exact"),
    Entry("googlenet_inception_block", googlenet_inception, "exact"),
    Entry("shufflenet_v2_units", shufflenet_blocks, "exact"),
    Entry("chunk_then_cat", chunk_then_cat, "exact"),
    Entry("split_then_cat", split_then_cat, "exact"),
    Entry("slice_then_cat", slice_then_cat, "exact"),
    Entry("squeeze_excitation_sigmoid", se_block(nn.Sigmoid), "exact"),
    Entry("regnet_y_blocks", regnet_y_blocks, "exact", streams=((4, 8),)),
    # either
    Entry("two_acts_one_conv", two_acts_one_conv, "either"),
    Entry("preact_side_conv_added", preact_side_conv, "either"),
    Entry("preact_to_output", preact_to_output, "either"),
    Entry("upsample_nearest", upsample_between, "either"),
    Entry("linear_batchnorm1d", linear_bn1d, "either"),
    Entry("product_of_sites", product_of_sites, "either"),
    Entry("inplace_relu_preact_also_returned", inplace_preact_output, "either"),
    Entry("maxpool_between_conv_and_relu", pool_between_conv_and_relu, "either"),
    Entry("linear_viewed_as_conv_input", linear_to_conv_view, "either"),
    Entry("channel_shuffle", channel_shuffle, "either"),
    Entry("amax_spatial_linear", amax_spatial_linear, "either"),
    Entry("conv_transpose_after_act", conv_transpose_after_act, "either"),
    Entry("site_plus_scaled_itself", site_plus_itself, "either"),
    Entry("squeeze_excite_gate", squeeze_excite, "either"),
    Entry("channels_last_linear", channels_last_linear, "either"),
    Entry("relu_subclass_no_forward", relu_subclass, "either"),
    Entry("weight_norm_parametrized_conv", weight_norm_conv, "either"),
    Entry("tied_conv_weights", tied_conv_weights, "either"),
    Entry("residual_scaled_input", residual_scaled_input, "either"),
    Entry("sliced_activation", sliced_activation, "either"),
    Entry("chunked_activation", chunked_activation, "either"),
    Entry("transpose_flatten_linear", transpose_flatten, "either"),
    Entry("batchnorm_noaffine_after_act", norm_after_act(lambda: nn.BatchNorm2d(4, affine=False)), "either"),
    Entry("squeeze_excitation_relu6_gate", se_block(nn.ReLU6), "either"),
    # refused
    Entry("add_const_then_conv", add_const_then_conv, "refused"),
    Entry("gelu_after_conv", _valid_then(nn.GELU()), "refused"),
    Entry("silu_after_conv", _valid_then(nn.SiLU()), "refused"),
    Entry("relu_of_negated_value", relu_of_negated_value, "exact", sites=(0,), note="one site per value"),
    Entry("add_of_an_affineless_batchnorm", add_of_an_affineless_batchnorm, "refused"),
    Entry("add_of_an_affineless_batchnorm_add_affine", add_of_an_affineless_batchnorm, "exact", add_affine=True),
    Entry("relu6_after_conv", _valid_then(nn.ReLU6()), "refused"),
    Entry("tanh_after_conv", _valid_then(nn.Tanh()), "refused"),
    Entry("sigmoid_after_conv", _valid_then(nn.Sigmoid()), "refused"),
    Entry("groupnorm_after_act", norm_after_act(lambda: nn.GroupNorm(2, 4)), "refused"),
    Entry("instancenorm_after_act", norm_after_act(lambda: nn.InstanceNorm2d(4, affine=True)), "refused"),
    Entry("layernorm2d_after_act", norm_after_act(lambda: LayerNorm2d(4)), "refused"),
    Entry("layernorm_chw_after_act", norm_after_act(lambda: nn.LayerNorm([4, 16, 16])), "refused"),
    Entry("add_raw_image_to_site", add_raw_image, "refused"),
    Entry("mul_two_sites_plus_one", mul_two_sites_plus_one, "refused"),
    Entry("functional_relu6_site", functional_relu6_site, "refused"),
    Entry("instancenorm_noaffine_site", in_noaffine_site, "refused"),
    Entry("batchnorm_untracked_site", bn_untracked_site, "refused"),
    Entry("batchnorm_untracked_input", bn_untracked_input, "refused"),
    Entry("batchnorm1d_untracked_head", bn_untracked_head, "refused"),
    Entry("layernorm_last_dim_eq_channels", layernorm_last_dim, "refused"),
    Entry("compensating_conv_called_twice", conv_called_twice, "refused"),
    Entry("preact_sigmoid_gate", preact_sigmoid_gate, "refused"),
    Entry("weight_standardized_conv", weight_standardized, "refused"),
    Entry("no_site", no_site, "refused"),
    Entry("parameterless_no_site", parameterless, "refused"),
    Entry("softmax_over_channels", softmax_channels, "refused"),
    Entry("squared_activation", squared_activation, "refused"),
    Entry("channel_sum_into_linear", channel_sum_into_linear, "refused"),
    Entry("channel_mean_into_conv", channel_mean_into_conv, "refused"),
    Entry("cat_two_sites_along_height", cat_along_height, "refused"),
    Entry("norms_without_affine_no_add_affine", norms_without_affine, "refused"),
    Entry("relu_subclass_own_forward", relu_subclass_own_forward, "refused"),
    Entry("linear_subclass_own_forward", linear_subclass_own_forward, "refused"),
    Entry("add_buffer_to_activation", add_buffer_to_activation, "refused"),
]


def build(entry: Entry, seed: int = 0) -> nn.Module:
    from contract import randomize

    torch.manual_seed(seed)
    return randomize(entry.factory(), seed)


def entry_named(name: str) -> Entry:
    """The gallery's entry called ``name``."""
    for e in GALLERY:
        if e.name == name:
            return e
    raise KeyError(f"no gallery entry {name!r}")


def model_and_images(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Entry ``name``'s model (``build``) and the images it is checked on (``contract.images`` of its size)."""
    from contract import images

    e = entry_named(name)
    return build(e, seed), images(e.size)
