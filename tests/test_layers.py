import pytest
from torch import nn

from vggnorm.defaults import VGG_ARCHS
from vggnorm.errors import CheckpointError
from vggnorm.layers import find_topology
from vggnorm.models import topology

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


def test_unknown_module_between_conv_and_relu_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.ReLU())
    with pytest.raises(CheckpointError, match="Tanh"):
        find_topology(model)


def test_conv_without_relu_is_refused():
    with pytest.raises(CheckpointError, match="no ReLU"):
        find_topology(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
