"""Each shim of vggnorm.compat (the private torch and torchvision APIs vggnorm uses) against the installed torch."""

import logging
import subprocess
import sys

import torch
from torch import nn

from vggnorm import compat


def test_importing_compat_imports_no_torch():
    code = "import sys, vggnorm.compat; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_fake_tensor_mode_gives_shapes_without_arithmetic_on_real_weights():
    conv = nn.Conv2d(3, 5, 3)
    mode = compat.fake_tensor_mode()
    x = mode.from_tensor(torch.empty(2, 3, 9, 9))
    with mode:
        y = conv(x)
    assert y.shape == (2, 5, 7, 7) and type(y) is not torch.Tensor  # a fake tensor, real weights accepted


def test_the_fake_tensor_logger_is_the_one_torch_logs_to():
    import torch._subclasses.fake_tensor as fake_tensor

    assert fake_tensor.log.name == compat.FAKE_TENSOR_LOGGER
    assert logging.getLogger(compat.FAKE_TENSOR_LOGGER) is fake_tensor.log


def test_the_norm_and_dropout_base_classes_are_torchs():
    (dropout,) = compat.dropout_classes()
    assert all(isinstance(m, dropout) for m in (nn.Dropout(), nn.Dropout2d(), nn.AlphaDropout()))
    assert not isinstance(nn.Identity(), dropout)
    norms = (nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.InstanceNorm2d(4))
    assert all(isinstance(m, compat.norm_base_class()) for m in norms)
    assert not isinstance(nn.GroupNorm(2, 4), compat.norm_base_class())
    assert isinstance(nn.BatchNorm1d(4), compat.batch_norm_class())
    assert not isinstance(nn.InstanceNorm2d(4), compat.batch_norm_class())
    assert isinstance(nn.InstanceNorm3d(4), compat.instance_norm_class())
    assert not isinstance(nn.BatchNorm2d(4), compat.instance_norm_class())


def test_pair_reads_a_pooling_argument_as_torch_does():
    assert compat.pair(3) == (3, 3) and compat.pair((2, 5)) == (2, 5)


def test_forward_hooks_are_seen():
    m = nn.ReLU()
    assert not compat.has_forward_hooks(m)
    handle = m.register_forward_pre_hook(lambda module, args: None)
    assert compat.has_forward_hooks(m)
    handle.remove()
    handle = m.register_forward_hook(lambda module, args, output: None)
    assert compat.has_forward_hooks(m)
    handle.remove()
    assert not compat.has_forward_hooks(m)


def test_own_tensors_are_the_dicts_a_forward_reads():
    bn = nn.BatchNorm2d(2).eval()
    parameters, buffers = compat.own_tensors(bn)
    assert set(parameters) == {"weight", "bias"} and {"running_mean", "running_var"} <= set(buffers)
    assert compat.own_tensors(nn.Sequential(bn)) == ({}, {})  # a child's are not its parent's
    x = torch.randn(1, 2, 3, 3)
    buffers["running_mean"] = torch.full((2,), 100.0)  # swapped in: the forward reads it
    assert bn(x).mean() < -10


def test_the_image_classification_transform_is_torchvisions_weights_transform():
    import torchvision

    ours = compat.image_classification_transform(
        crop=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear"
    )
    theirs = torchvision.models.VGG19_Weights.IMAGENET1K_V1.transforms()
    image = torch.randint(0, 256, (3, 300, 280), dtype=torch.uint8)
    assert type(ours) is type(theirs)
    assert torch.equal(ours(image), theirs(image))
