import pytest
import torch
from torch import nn

from vggnorm.analysis.topology import find_topology
from vggnorm.defaults import VGG_ARCHS
from vggnorm.io.models import topology

CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}


@pytest.mark.parametrize("arch", VGG_ARCHS)
def test_every_torchvision_vgg(arch):
    topo = topology(arch)
    assert len(topo.sites) == CONVS[arch.removesuffix("_bn")]
    assert topo.sites[0].conv == "features.0"
    if arch.endswith("_bn"):
        assert topo.sites[0].bn == "features.1" and topo.sites[0].relu == "features.2"
    else:
        assert topo.sites[0].bn is None and topo.sites[0].relu == "features.1"
    assert topo.classifier == "classifier.0"
    assert topo.positions_per_channel == 7 * 7
    assert topo.sites[-1].out_channels == 512
    # in-channels chain: each conv reads the previous conv's filters
    for a, b in zip(topo.sites, topo.sites[1:], strict=False):
        assert b.in_channels == a.out_channels


def test_tiny_lookalike(tiny_vgg):
    topo = find_topology(tiny_vgg(bn=True))
    assert [s.conv for s in topo.sites] == ["features.0", "features.4", "features.7", "features.11"]
    assert topo.positions_per_channel == 9


def _refusal(model: nn.Module) -> str:
    return "; ".join(str(r) for r in find_topology(model).refusals)


def test_unknown_module_between_conv_and_its_activation_is_refused():
    assert "0 (Conv2d)" not in _refusal(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert "1 (Tanh): is not positively homogeneous" in _refusal(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.ReLU())
    )


def test_each_call_of_an_activation_is_a_site_of_its_own_module_or_function():
    """Before: a ReLU module called twice, and a functional ReLU, were refused (one module hook, one site)."""
    shared = find_topology(_Shared())
    assert [(s.conv, s.relu, s.call) for s in shared.sites] == [("a", "relu:1", 0), ("b", "relu:2", 1)]
    functional = find_topology(_Functional())
    assert [(s.conv, s.relu, s.call) for s in functional.sites] == [("conv", "relu", 0)]
    assert not shared.refusals and not functional.refusals and functional.activation_calls == 1


def test_a_conv_without_activation_is_no_site_and_the_next_compensates():
    topo = find_topology(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    assert [s.conv for s in topo.sites] == ["0"] and [c.module for c in topo.compensations] == ["2"]
    assert not topo.refusals and not topo.left_unscaled


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.relu(self.b(self.relu(self.a(x)))))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor's value
            return self.relu(self.conv(x))
        return x


class _StandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / self.weight.std(dim=(1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, w, self.bias)


class _SwishNamedReLU(nn.ReLU):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _Scaled(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.a, self.relu, self.b, self.relu2, self.op = (
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 1),
            nn.ReLU(),
            op,
        )

    def forward(self, x):
        return self.relu2(self.b(self.op(self.relu(self.a(x)))))


@pytest.mark.parametrize(
    "model, words",
    [
        (_Untraceable(), "torch.fx cannot trace"),
        (nn.Sequential(_StandardizedConv(3, 4, 3), nn.ReLU()), "overrides Conv2d.forward"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), _SwishNamedReLU()), "overrides the forward of the activation"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1)),
            "2 (GroupNorm): receives",
        ),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LayerNorm(222), nn.ReLU()), "2 (LayerNorm): receives"),
        (_Scaled(lambda x: torch.cat([x, x], dim=2)), "along a dimension other than the channels"),
        (_Scaled(lambda x: x + 1), "(x + c) / s != x / s + c"),
        (_Scaled(lambda x: x[:, :2].repeat(1, 2, 1, 1)), "does not know whether it commutes"),
    ],
    ids=[
        "untraceable",
        "weight_standardized",
        "activation_subclass",
        "norm_after",
        "layernorm_after",
        "cat_dim2",
        "add_constant",
        "slice",
    ],
)
def test_refusals_name_the_node_and_the_reason(model, words):
    assert words in _refusal(model)


def test_scale_flows_through_what_commutes_with_it():
    model = _Scaled(lambda x: nn.functional.max_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect") * 2.0, 2))
    topo = find_topology(model)
    assert not topo.refusals and [c.module for c in topo.compensations] == ["b"]
    assert len(topo.compensations[0].via) == 3  # pad, mul, max_pool2d


def test_a_channelwise_layernorm_is_a_site_norm():
    from torchvision.models.convnext import LayerNorm2d

    topo = find_topology(nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    assert not topo.refusals and topo.sites[0].bn == "1" and topo.sites[0].norm == "LayerNorm2d"
    # a plain LayerNorm over the last (width) dimension is not per channel
    refused = find_topology(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(222), nn.ReLU()))
    assert "not per channel" in "; ".join(str(r) for r in refused.refusals)


WINDOWS = [
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 5, 11, stride=4, padding=2),
    nn.Conv2d(3, 5, (3, 5), stride=(2, 1), padding=(0, 2), dilation=2),
    nn.MaxPool2d(2),
    nn.MaxPool2d(3, 2, ceil_mode=True),
    nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.MaxPool2d(2, 2, dilation=2),
    nn.AvgPool2d(3, 2, 1),
    nn.AvgPool2d(2, ceil_mode=True),
    nn.AdaptiveAvgPool2d((6, 6)),
    nn.AdaptiveAvgPool2d((None, 3)),
    nn.AdaptiveMaxPool2d(2),
]


@pytest.mark.parametrize("module", WINDOWS, ids=repr)
def test_shapes_by_formula_equal_torch(module):
    """meta_shape stands in for running layers on the meta device (a second of verify's time): it must
    give torch's shapes, and refuse (raise) exactly where torch does."""
    from vggnorm.analysis.shapes import meta_shape

    for h in range(1, 40):
        for w in (1, 7, 32):
            try:
                real = tuple(module(torch.zeros(1, 3, h, w)).shape)
            except RuntimeError:
                real = None
            try:
                mine = meta_shape(module, (1, 3, h, w))
            except RuntimeError:
                mine = None
            assert mine == real, (h, w)
