"""A user's own op, unknown to vggnorm: refused by name, then accepted once registered, and exact per the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vggnorm
import vggnorm.analysis
from contract import check_contract, images, one_thread
from vggnorm.analysis.topology import find_topology

BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


def blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Anti-aliased downsampling: a fixed 3x3 binomial blur of each channel apart, then stride 2."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel, stride=2, groups=kernel.shape[0])


def blur_pool() -> type[nn.Module]:
    """A new class each time: registering it in one test does not register it for another."""

    class BlurPool(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            k = BINOMIAL[:, None] * BINOMIAL[None, :] / 16
            self.register_buffer("kernel", k.expand(channels, 1, 3, 3).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # blur's code, not blur: another test registers it
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel, stride=2, groups=x.shape[1])

    return BlurPool


class Net(nn.Module):
    """One blur after a ReLU (the next conv compensates its scale), one between a conv and its ReLU."""

    def __init__(self, pool: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.relu1, self.blur1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), pool(6)
        self.conv2, self.blur2, self.relu2 = nn.Conv2d(6, 8, 3, padding=1), pool(8), nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur1(self.relu1(self.conv1(x)))
        return self.head(self.relu2(self.blur2(self.conv2(x))).mean([2, 3]))


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_a_users_module_is_refused_by_name_then_accepted_once_registered_and_exact():
    pool = blur_pool()
    model = Net(pool).double().eval()
    refusals = find_topology(model).refusals
    assert refusals and "register_module(BlurPool, vggnorm.analysis.commutes)" in refusals[0].fix
    assert "blur1 (BlurPool)" in refusals[0].fix
    assert not check_contract(model, images(16)).accepted

    vggnorm.analysis.register_module(pool, vggnorm.analysis.commutes)
    topo = find_topology(model)
    assert not topo.refusals and [s.conv for s in topo.sites] == ["conv1", "conv2"]
    assert [(c.module, c.via) for c in topo.compensations] == [("conv2", ("blur1",)), ("head", ("mean",))]
    outcome = check_contract(model, images(16), required_sites="all")
    assert outcome.accepted and not outcome.problems, outcome.describe()


def test_a_users_function_once_registered_is_traced_as_one_call():
    class FunctionalNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 1)
            k = BINOMIAL[:, None] * BINOMIAL[None, :] / 16
            self.register_buffer("kernel", k.expand(6, 1, 3, 3).clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(blur(self.relu(self.conv(x)), self.kernel))

    model = FunctionalNet().double().eval()
    assert "conv2d (conv2d): receives per-channel scaled channels" in str(find_topology(model).refusals[0])
    vggnorm.analysis.register_function(blur, vggnorm.analysis.commutes)
    topo = find_topology(model)
    assert not topo.refusals and [c.via for c in topo.compensations] == [("blur",)]
    outcome = check_contract(model, images(16), required_sites="all")
    assert outcome.accepted and not outcome.problems, outcome.describe()


def test_a_wrong_registration_is_accepted_on_the_users_word_and_the_oracle_finds_it_inexact():
    class AddOne(nn.Module):  # x + 1 does not keep a scale: (x / s) + 1 != (x + 1) / s
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), AddOne(), nn.Conv2d(4, 2, 1)).double().eval()
    assert "(x + c) / s != x / s + c" in str(find_topology(model).refusals[0])
    vggnorm.analysis.register_module(AddOne, vggnorm.analysis.commutes)
    assert not find_topology(model).refusals
    outcome = check_contract(model, images(16))
    assert outcome.accepted and outcome.problems  # the outputs change: the oracle says so
    batches = [images(16)]
    stats = vggnorm.measure_means(model, batches)
    report = vggnorm.verify_models(model, vggnorm.normalize_model(model, stats), stats, batches=batches)
    assert not report.passed  # and so does verify's witness, which shares nothing with the analysis


def test_a_users_untraceable_module_is_refused_by_name_then_accepted_once_registered_and_exact():
    class EvenPool(nn.Module):  # 2x2 average pooling that pads an odd size first: control flow, untraceable
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] % 2:
                x = F.pad(x, (0, 1, 0, 1), mode="replicate")
            return F.avg_pool2d(x, 2)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), EvenPool(), nn.Conv2d(4, 2, 1), nn.ReLU()).double().eval()
    refusal = find_topology(model).refusals[0]
    assert refusal.node == "<trace>" and "torch.fx cannot trace the model in 2 (EvenPool)" in refusal.reason
    assert "register_module(EvenPool, vggnorm.analysis.commutes)" in refusal.fix
    vggnorm.analysis.register_module(EvenPool, vggnorm.analysis.commutes)
    assert not find_topology(model).refusals
    outcome = check_contract(model, images(15), unscaled=[1], required_sites=[0])  # 15: odd; ReLU 1 is the output
    assert outcome.accepted and not outcome.problems, outcome.describe()


def test_registration_cannot_replace_what_vggnorm_analyzes():
    class MyReLU(nn.ReLU):
        pass

    with pytest.raises(ValueError, match="already analyzes ReLU"):
        vggnorm.analysis.register_module(MyReLU, vggnorm.analysis.commutes)
    with pytest.raises(ValueError, match="already analyzes MaxPool2d"):
        vggnorm.analysis.register_module(nn.MaxPool2d, vggnorm.analysis.commutes)
    with pytest.raises(ValueError, match="already analyzes relu"):
        vggnorm.analysis.register_function(F.relu, vggnorm.analysis.commutes)
    with pytest.raises(TypeError):
        vggnorm.analysis.register_module(blur, vggnorm.analysis.commutes)  # type: ignore[arg-type]


def test_a_handler_that_is_not_a_function_is_refused_when_registered_not_when_analyzed():
    """A handler given by its name ("commutes", as options take strings) is refused at once, naming the two
    handlers: it was accepted, and the analysis then failed with "'str' object is not callable"."""

    class Gain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    for handler in ("commutes", None):
        with pytest.raises(TypeError, match="vggnorm.analysis.commutes or vggnorm.analysis.not_homogeneous"):
            vggnorm.analysis.register_module(Gain, handler)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="vggnorm.analysis.commutes or vggnorm.analysis.not_homogeneous"):
            vggnorm.analysis.register_function("my_gain", handler)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Gain(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    assert not vggnorm.analysis.registry.is_leaf(model[2])  # nothing was registered


def test_a_registered_op_that_moves_channels_is_refused():
    class Shuffle(nn.Module):  # not channelwise: it changes dim 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2]

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Shuffle(), nn.Conv2d(2, 2, 1)).double().eval()
    vggnorm.analysis.register_module(Shuffle, vggnorm.analysis.commutes)
    assert "channels on dim 1, kept in place" in str(find_topology(model).refusals[0])
