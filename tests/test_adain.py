"""The AdaIN layout and --padding reflect: the file drops into AdaIN's encoder and is normalized there."""

import json

import pytest
import torch
from torch import nn

from conftest import features_state_dict, invoke, vgg_features
from vggnorm.io.data import ImageTransform, find_images, load_rgb
from vggnorm.io.statsfile import read_stats

SIZE = ["--resize", "64", "--crop", "64", "--workers", 0, "--no-progress"]
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


def adain_encoder() -> nn.Sequential:
    """AdaIN's VGG encoder as its authors define it (pytorch-AdaIN's ``net.vgg``): a 1x1 conv, then
    ReflectionPad2d + 3x3 conv (no padding) + ReLU per conv, ceil-mode max pooling, up to relu5_4."""
    layers: list[nn.Module] = [nn.Conv2d(3, 3, (1, 1))]
    c = 3
    for v in VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True))
        else:
            layers += [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(c, v, (3, 3)), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("adain")
    torch.save(features_state_dict("vgg19"), d / "vgg19.pth")
    base = ["--arch", "vgg19", "--weights", d / "vgg19.pth", *SIZE]
    assert invoke("compute-stats", photos, *base, "-o", d / "reflect.h5", "--padding", "reflect").exit_code == 0
    assert invoke("compute-stats", photos, *base, "-o", d / "zeros.h5").exit_code == 0
    r = invoke("apply", d / "vgg19.pth", "--stats", d / "reflect.h5", "-o", d / "adain.pth", "--layout", "adain")
    assert r.exit_code == 0, r.output
    assert "RGB in [0, 1]" in r.stderr
    r = invoke("apply", d / "vgg19.pth", "--stats", d / "reflect.h5", "-o", d / "tv.pth")
    assert r.exit_code == 0, r.output
    return d


def images(photos):
    """The calibration images resized and cropped as measured, RGB in [0, 1] (AdaIN's input)."""
    p = ImageTransform(resize=64, crop=64)
    return torch.stack([p.module()(load_rgb(f)) for f in find_images(photos)]), p


def relu_outputs(net, x):
    out = []
    for m in net:
        x = m(x)
        if isinstance(m, nn.ReLU):
            out.append(x.clone())
    return out


@pytest.mark.slow
def test_the_adain_file_loads_strictly_and_computes_the_normalized_relus(runs, photos):
    net = adain_encoder().eval()
    net.load_state_dict(torch.load(runs / "adain.pth", weights_only=True), strict=True)
    normalized_input, p = images(photos)
    std, mean = torch.tensor(p.std).view(1, 3, 1, 1), torch.tensor(p.mean).view(1, 3, 1, 1)
    rgb = normalized_input * std + mean  # back to [0, 1]
    reference = vgg_features("vgg19").eval()
    sd = torch.load(runs / "tv.pth", weights_only=True)
    reference.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()})
    for m in reference:
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "reflect"  # what --padding reflect measures
    with torch.no_grad():
        got, expected = (
            relu_outputs(net.double(), rgb.double()),
            relu_outputs(reference.double(), normalized_input.double()),
        )
    assert len(got) == len(expected) == 16
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    # and in AdaIN's encoder, on the calibration images, every live filter's mean is 1
    report = json.loads((runs / "adain.report.json").read_text())
    dead = {layer["conv"]: layer["dead"] for layer in report["layers"]}
    for (name, dead_filters), out in zip(dead.items(), got, strict=True):
        mean = out.mean(dim=(0, 2, 3))
        live = torch.ones_like(mean, dtype=torch.bool)
        live[dead_filters] = False
        torch.testing.assert_close(mean[live], torch.ones_like(mean[live]), rtol=1e-3, atol=0, msg=name)


def test_reflect_padding_is_measured_recorded_and_honoured(runs, photos, tmp_path):
    reflect, zeros = read_stats(runs / "reflect.h5"), read_stats(runs / "zeros.h5")
    assert reflect.provenance.preprocess["padding"] == "reflect" and zeros.provenance.preprocess["padding"] == "model"
    rel = (reflect.layers["features.0"].mean - zeros.layers["features.0"].mean).abs() / zeros.layers["features.0"].mean
    assert float(rel.max()) > 1e-3  # the border changes the means measurably
    r = invoke(
        "verify",
        runs / "tv.pth",
        "--original",
        runs / "vgg19.pth",
        "--stats",
        runs / "reflect.h5",
        "--data",
        photos,
        "--workers",
        0,
    )
    assert r.exit_code == 0 and "4 passed" not in r.stdout and "3 passed" in r.stdout, r.output
    assert "reflect padding" in r.stdout
    r = invoke("verify", runs / "tv.pth", "--data", photos, "--workers", 0, "--padding", "zeros")
    assert r.exit_code == 1, r.output  # measured under another padding, the means are not 1
    # the adain file is verified too: against the fold, and its means
    verify = ["--original", runs / "vgg19.pth", "--stats", runs / "reflect.h5", "--data", photos, "--workers", 0]
    r = invoke("verify", runs / "adain.pth", *verify)
    assert r.exit_code == 0, r.output
    # and compare recovers the measured means from it, through its preprocessing conv and reflection pads
    r = invoke("compare", runs / "vgg19.pth", runs / "adain.pth", "--stats", runs / "reflect.h5")
    assert r.exit_code == 0 and "features.34 (conv5_4)" in r.stdout, r.output


def test_the_adain_layout_refuses_what_it_cannot_be(runs, checkpoints, photos, tmp_path):
    r = invoke("apply", runs / "vgg19.pth", "--stats", runs / "zeros.h5", "-o", tmp_path / "a.pth", "--layout", "adain")
    assert r.exit_code == 1 and "--padding reflect" in r.stderr and not (tmp_path / "a.pth").exists()
    stats = tmp_path / "s.h5"
    base = ["--arch", "vgg11", "--weights", checkpoints["vgg11"], *SIZE]
    assert invoke("compute-stats", photos, *base, "-o", stats, "--padding", "reflect").exit_code == 0
    r = invoke("apply", checkpoints["vgg11"], "--stats", stats, "-o", tmp_path / "a.pth", "--layout", "adain")
    assert r.exit_code == 1 and "VGG19's encoder" in r.stderr
    # a run measured with one padding is not resumed (or merged) with the other
    import h5py

    with h5py.File(stats, "r+") as f:
        f.attrs["complete"], f.attrs["position"] = False, 3
    r = invoke("compute-stats", photos, *base, "-o", stats, "--resume")
    assert r.exit_code == 1 and "padding: 'reflect' in the file, 'model' now" in r.stderr


@pytest.mark.parametrize("preprocess", ["torchvision", "caffe", "matconvnet"])
def test_the_preprocessing_conv_is_the_measured_preprocessing(preprocess):
    from vggnorm.io.data import default_transform
    from vggnorm.io.layouts import preprocessing_conv
    from vggnorm.options import InputConvention

    convention = InputConvention(preprocess)
    policy = default_transform("vgg19", resize=8, crop=8, convention=convention)
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = policy.module(convention)(img)  # vggnorm's own preprocessing of the image
    w, b = preprocessing_conv(convention, policy.mean, policy.std)
    got = torch.nn.functional.conv2d(img.float().unsqueeze(0) / 255, w, b)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
