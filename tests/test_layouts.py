"""vggnorm.io.layouts: each on-disk layout's key map, on in-memory state_dicts.

The expected keys are derived here from torchvision's own VGG configurations (``torchvision.models.vgg.cfgs``)
and from AdaIN's encoder as its authors write it; the tensors are tiny (the key maps do not read shapes), so
every VGG is covered in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs

from vggnorm.errors import CheckpointError, UsageError, VggnormError
from vggnorm.io.data import ImageTransform, Measurement
from vggnorm.io.layouts import (
    detect_layout,
    display_name,
    export_layout,
    from_adain_layout,
    from_gatys_layout,
    preprocessing_conv,
    to_adain_layout,
    to_gatys_layout,
    to_torchvision_layout,
)
from vggnorm.options import InputConvention, Layout, parse

CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
PLAIN = list(CFG)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POLICY = Measurement(ImageTransform(mean=MEAN, std=STD), InputConvention.TORCHVISION)


def vgg_convs(arch: str) -> dict[str, str]:
    """torchvision's conv paths -> Gatys names (``conv{block}_{i}``), by walking torchvision's config:
    a conv is followed by its BatchNorm (``_bn``) and its ReLU, a block ends at each "M"."""
    out, index, block, i = {}, 0, 1, 1
    for v in cfgs[CFG[arch.removesuffix("_bn")]]:
        if v == "M":
            index, block, i = index + 1, block + 1, 1
        else:
            out[f"features.{index}"] = f"conv{block}_{i}"
            index += 3 if arch.endswith("_bn") else 2
            i += 1
    return out


def adain_convs() -> list[int]:
    """The convs' indices in AdaIN's encoder (pytorch-AdaIN's ``net.vgg``): 0 is a 1x1 conv, then
    ReflectionPad2d, Conv2d, ReLU per conv and one MaxPool2d per block, up to relu5_4 (no last pool)."""
    out, index = [], 1
    for v in cfgs["E"][:-1]:
        if v == "M":
            index += 1
        else:
            out.append(index + 1)
            index += 3
    return out


def fake_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with ``arch``'s keys in torchvision's layout (classifier included), small distinct tensors:
    each conv 2 filters of 1x1, its BatchNorm a perturbed one."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for path in vgg_convs(arch):
        sd[f"{path}.weight"] = torch.randn(2, 1, 1, 1, generator=g)
        sd[f"{path}.bias"] = torch.randn(2, generator=g)
        if arch.endswith("_bn"):
            bn = "features." + str(int(path.split(".")[1]) + 1)
            sd[f"{bn}.weight"] = torch.rand(2, generator=g) + 0.5
            sd[f"{bn}.bias"] = torch.randn(2, generator=g)
            sd[f"{bn}.running_mean"] = torch.randn(2, generator=g)
            sd[f"{bn}.running_var"] = torch.rand(2, generator=g) + 0.5
            sd[f"{bn}.num_batches_tracked"] = torch.tensor(3)
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.randn(2, 2, generator=g)
        sd[f"classifier.{i}.bias"] = torch.randn(2, generator=g)
    return sd


def features(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith("features.")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- torchvision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_the_torchvision_layout_is_the_state_dict_itself_in_a_new_dict(arch):
    sd = fake_state_dict(arch)
    out = export_layout(sd, arch, "torchvision")
    assert_same(out, sd)
    assert list(out) == list(sd) and out is not sd
    assert detect_layout(out) == "torchvision"
    assert_same(to_torchvision_layout(out), sd)


# ---- gatys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", PLAIN)
def test_gatys_keys_are_the_convs_by_block_and_position_and_nothing_else(arch):
    sd = fake_state_dict(arch)
    out = export_layout(sd, arch, "gatys")
    names = vgg_convs(arch)
    assert set(out) == {f"{n}.{leaf}" for n in names.values() for leaf in ("weight", "bias")}
    for path, name in names.items():
        assert torch.equal(out[f"{name}.weight"], sd[f"{path}.weight"])
        assert torch.equal(out[f"{name}.bias"], sd[f"{path}.bias"])
    assert detect_layout(out) == "gatys"


@pytest.mark.parametrize("arch", PLAIN)
def test_gatys_round_trips_to_the_features_of_the_vgg_it_fits(arch):
    sd = fake_state_dict(arch)
    gatys = export_layout(sd, arch, "gatys")
    assert_same(to_torchvision_layout(gatys), features(sd))
    assert_same(from_gatys_layout(gatys, vgg_convs(arch)), features(sd))


@pytest.mark.parametrize("arch", ["vgg11_bn", "vgg19_bn"])
def test_gatys_of_a_bn_arch_has_the_plain_archs_keys_and_round_trips_to_it(arch):
    sd = fake_state_dict(arch)
    gatys = export_layout(sd, arch, "gatys")
    plain = arch.removesuffix("_bn")
    assert set(gatys) == set(export_layout(fake_state_dict(plain), plain, "gatys"))
    assert set(to_torchvision_layout(gatys)) == set(features(fake_state_dict(plain)))


def test_gatys_folds_a_batchnorm_into_its_conv_as_eval_mode_computes_it():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    sd = {f"features.0.{k}": v for k, v in conv.state_dict().items()}
    sd |= {f"features.1.{k}": v for k, v in bn.state_dict().items()}
    out = to_gatys_layout(sd, {"features.0": "conv1_1"}, {"features.0": ("features.1", 1e-3)})
    assert set(out) == {"conv1_1.weight", "conv1_1.bias"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = nn.Sequential(conv, bn).eval()(x)
    got = F.conv2d(x, out["conv1_1.weight"], out["conv1_1.bias"], padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert out["conv1_1.weight"].dtype == torch.float32


def test_a_conv_without_bias_stays_without_bias():
    sd = {"features.0.weight": torch.ones(2, 3, 1, 1)}
    assert set(to_gatys_layout(sd, {"features.0": "conv1_1"}, {})) == {"conv1_1.weight"}


def test_gatys_refuses_a_key_that_is_no_conv_of_it():
    gatys = export_layout(fake_state_dict("vgg11"), "vgg11", "gatys")
    with pytest.raises(CheckpointError, match="conv9_9.weight"):
        from_gatys_layout({**gatys, "conv9_9.weight": torch.ones(1)}, vgg_convs("vgg11"))


def test_a_gatys_state_dict_that_fits_no_vgg_is_refused_naming_its_convs():
    gatys = export_layout(fake_state_dict("vgg19"), "vgg19", "gatys")
    del gatys["conv5_4.weight"], gatys["conv5_4.bias"]
    with pytest.raises(CheckpointError, match="fit no VGG") as e:
        to_torchvision_layout(gatys)
    assert "conv5_3" in str(e.value)


# ---- adain -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vgg19", "vgg19_bn"])
def test_adain_keys_are_the_preprocessing_conv_then_the_convs_at_their_places_in_the_encoder(arch):
    sd = fake_state_dict(arch)
    out = export_layout(sd, arch, "adain", POLICY)
    indices = adain_convs()
    assert set(out) == {f"{i}.{leaf}" for i in [0, *indices] for leaf in ("weight", "bias")}
    assert list(out)[:2] == ["0.weight", "0.bias"] and indices[-1] == 51
    assert out["0.weight"].shape == (3, 3, 1, 1)
    if arch == "vgg19":  # no BatchNorm: the convs' own tensors, in torchvision's order
        for path, i in zip(vgg_convs(arch), indices, strict=True):
            assert torch.equal(out[f"{i}.weight"], sd[f"{path}.weight"])
            assert torch.equal(out[f"{i}.bias"], sd[f"{path}.bias"])
    assert detect_layout(out) == "adain"


def test_adain_round_trips_to_vgg19s_features_without_the_preprocessing_conv():
    sd = fake_state_dict("vgg19")
    adain = export_layout(sd, "vgg19", "adain", POLICY)
    assert_same(to_torchvision_layout(adain), features(sd))
    assert_same(from_adain_layout(adain), features(sd))


def test_adain_refuses_another_network_than_vgg19_and_a_key_that_is_no_conv():
    with pytest.raises(VggnormError, match="vgg16"):
        export_layout(fake_state_dict("vgg16"), "vgg16", "adain", POLICY)
    adain = export_layout(fake_state_dict("vgg19"), "vgg19", "adain", POLICY)
    with pytest.raises(CheckpointError, match=r"3\.weight"):  # module 3 is relu1_1
        from_adain_layout({**adain, "3.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="encoder.2.weight"):
        from_adain_layout({**adain, "encoder.2.weight": torch.ones(1)})


def test_adain_needs_the_measurement_policy():
    with pytest.raises(VggnormError, match="policy"):
        export_layout(fake_state_dict("vgg19"), "vgg19", "adain")


def test_a_first_weight_of_another_shape_is_not_adain():
    assert detect_layout({"0.weight": torch.ones(64, 3, 3, 3), "0.bias": torch.ones(64)}) == "torchvision"


@pytest.mark.parametrize(
    ("preprocess", "mean", "std", "expected"),
    [
        # torchvision: (x - mean) / std, RGB in [0, 1]
        ("torchvision", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), lambda x, m, s: (x - m) / s),
        # Caffe: BGR, 0-255, minus the (BGR) mean
        ("caffe", (103.9, 116.8, 123.7), (1.0, 1.0, 1.0), lambda x, m, s: x.flip(1) * 255 - m),
        # MatConvNet: RGB, 0-255, minus the mean
        ("matconvnet", (123.7, 116.8, 103.9), (1.0, 1.0, 1.0), lambda x, m, s: x * 255 - m),
    ],
)
def test_the_preprocessing_conv_turns_rgb_in_0_1_into_the_networks_input(preprocess, mean, std, expected):
    w, b = preprocessing_conv(preprocess, mean, std)
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    m, s = torch.tensor(mean, dtype=torch.float64)[:, None, None], torch.tensor(std, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(F.conv2d(x, w.double(), b.double()), expected(x, m, s), rtol=1e-5, atol=1e-4)


def test_the_adain_file_holds_the_policys_preprocessing():
    out = export_layout(fake_state_dict("vgg19"), "vgg19", "adain", POLICY)
    x = torch.rand(1, 3, 4, 4)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(F.conv2d(x, out["0.weight"], out["0.bias"]), (x - mean) / std)


def test_to_adain_layout_takes_its_preprocessing_as_arguments():
    sd = fake_state_dict("vgg19")
    a = to_adain_layout(sd, "vgg19", "caffe", (1.0, 2.0, 3.0), (1.0, 1.0, 1.0))
    assert torch.equal(a["0.bias"], -torch.tensor([1.0, 2.0, 3.0]))


# ---- the rest --------------------------------------------------------------------------------------------


def test_an_unknown_layout_is_refused_naming_the_known_ones():
    # export_layout takes a Layout; a string becomes one at the boundary, where a bad one is refused
    with pytest.raises(UsageError, match="--layout 'caffe'") as e:
        parse(Layout, "caffe", "--layout")
    assert "gatys" in str(e.value) and "adain" in str(e.value)


@pytest.mark.parametrize("arch", ["vgg11", "vgg19_bn"])
def test_display_names_carry_the_gatys_name_users_know(arch):
    for path, name in vgg_convs(arch).items():
        assert display_name(path, arch) == f"{path} ({name})"
    assert display_name("classifier.0", arch) == "classifier.0"


def test_display_names_of_an_unknown_arch_are_the_paths():
    assert display_name("features.0", None) == "features.0"
    assert display_name("features.0", "no-such-arch") == "features.0"
