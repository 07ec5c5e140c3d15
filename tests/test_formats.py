"""Keras (HDF5) and MatConvNet (.mat) VGGs: read, normalized, written back, and loaded by their own code.

The Keras files are made and loaded by Keras 3 itself (torch backend, no TensorFlow). The .mat files
are read back by a re-implementation, in numpy, of the indexing that anishathalye/neural-style's and
lengstrom/fast-style-transfer's ``vgg.py`` apply to ``scipy.io.loadmat``'s result. Both then run on
the calibration images, and every live filter's mean ReLU output there is 1.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import features_state_dict, invoke
from vggnorm.io.data import find_images, load_rgb
from vggnorm.io.models import feature_kinds

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
scipy_io = pytest.importorskip("scipy.io")

# Keras' torch backend converts tensors with np.array(x), which numpy 2 warns about on every call
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZE = ["--resize", "32", "--crop", "32", "--workers", 0, "--no-progress"]  # VGG's smallest input: fast
MEAN_RGB = (123.68, 116.779, 103.939)


def pixels(photos) -> np.ndarray:
    """The calibration photos resized and cropped as compute-stats does (32x32): RGB, 0-255, NHWC."""
    from torchvision.transforms import functional as F

    crops = [F.center_crop(F.resize(load_rgb(f), [32], antialias=True), [32]) for f in find_images(photos)]
    return np.stack([np.asarray(c, dtype=np.float32) for c in crops])


def live_mask(report_json, layer: str, filters: int) -> np.ndarray:
    dead = {entry["conv"]: entry["dead"] for entry in json.loads(report_json.read_text())["layers"]}[layer]
    live = np.ones(filters, dtype=bool)
    live[dead] = False
    return live


def assert_means_are_one(outputs: list[np.ndarray], report_json, convs: list[str]) -> None:
    assert len(outputs) == len(convs)
    for out, conv in zip(outputs, convs, strict=True):
        means = out.astype(np.float64).mean(axis=(0, 1, 2))  # NHWC
        live = live_mask(report_json, conv, means.size)
        assert live.sum() > 0.5 * means.size, conv
        np.testing.assert_allclose(means[live], 1.0, rtol=1e-3, atol=0, err_msg=conv)


# ---------------------------------------------------------------- Keras


@pytest.fixture(scope="session")
def keras_vgg16(tmp_path_factory):
    """Keras' own VGG16 without the top (random weights, biases made non-zero), saved by Keras in
    both layouts: legacy HDF5 (Keras' legacy saver, the layout keras.applications downloads) and
    Keras 3's .weights.h5 (model.save_weights)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    d = tmp_path_factory.mktemp("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.weights:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype("float32"))
    with h5py.File(d / "vgg16_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    model.save_weights(d / "vgg16_notop.weights.h5")
    return d


def keras_conv_outputs(weights, images: np.ndarray) -> list[np.ndarray]:
    """Keras loads ``weights`` into keras.applications.VGG16 and runs it, fed as its users feed it
    (vgg16.preprocess_input): every conv layer's output, after its ReLU."""
    model = keras.applications.VGG16(weights=str(weights), include_top=False, input_shape=(32, 32, 3))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    probe = keras.Model(model.input, [layer.output for layer in convs])
    x = keras.applications.vgg16.preprocess_input(images.copy())
    return [keras.ops.convert_to_numpy(y) for y in probe(x)]


@pytest.fixture(scope="module", autouse=True)
def no_figures():
    """apply's and verify's figures cost a second or two each (matplotlib) and are tested elsewhere."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr("vggnorm.commands.apply.have_matplotlib", lambda: False)
        m.setattr("vggnorm.commands.verify.have_matplotlib", lambda: False)
        yield


@pytest.fixture(scope="module")
def keras_runs(keras_vgg16, photos, no_figures):
    """compute-stats -> apply --layout keras (both layouts; the statistics are one: the weights' hash
    does not depend on the file format) -> verify, through the CLI."""
    d = keras_vgg16
    r = invoke("compute-stats", photos, "--arch", "vgg16", "--weights", d / "vgg16_notop.h5", *SIZE, "-o", d / "s.h5")
    assert r.exit_code == 0, r.output
    assert "preprocessing: caffe, mean (103.939, 116.779, 123.68) (the file's own, recorded" in r.stdout
    for src, out in (("vgg16_notop.h5", "n.h5"), ("vgg16_notop.weights.h5", "n.weights.h5")):
        r = invoke("apply", d / src, "--stats", d / "s.h5", "--layout", "keras", "-o", d / out)
        assert r.exit_code == 0, r.output
        assert "keras.applications.VGG16(weights=OUT, include_top=False) loads it" in r.stderr
        assert "preprocess_input (caffe), as measured" in r.stderr
    return d


def test_keras_files_normalized_load_into_keras_with_means_one(keras_runs, photos):
    from vggnorm.io.statsfile import read_stats

    d = keras_runs
    stats = read_stats(d / "s.h5")
    policy = stats.provenance.preprocess
    assert policy["preprocess"] == "caffe" and tuple(policy["mean"]) == (103.939, 116.779, 123.68)
    assert "Keras legacy HDF5" in stats.provenance.weights_format
    images = pixels(photos)
    convs = list(stats.layers)
    for out in ("n.h5", "n.weights.h5"):
        assert_means_are_one(keras_conv_outputs(d / out, images), d / out.replace(".h5", ".report.json"), convs)
    # the original, loaded by Keras the same way, is not normalized
    before = keras_conv_outputs(d / "vgg16_notop.h5", images)
    assert abs(float(before[-1].mean()) - 1) > 0.1


def test_keras_outputs_verify_compare_and_inspect_like_a_pth(keras_runs, photos):
    d = keras_runs
    r = invoke(
        "verify", d / "n.h5", "--original", d / "vgg16_notop.h5", "--stats", d / "s.h5", "--data", photos, *SIZE[4:]
    )
    assert r.exit_code == 0 and "3 passed" in r.stdout and "caffe preprocessing" in r.stdout, r.output
    r = invoke("verify", d / "n.h5", "--original", d / "vgg16_notop.h5", "--stats", d / "s.h5", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.stdout)["inputs"]["layout"] == "keras", r.output
    # an audit with --data alone measures as apply recorded beside the file (caffe); without the
    # statistics' dead filters, the rule applies to the measured means (a near-dead one stays live at 1e-3)
    r = invoke("verify", d / "n.weights.h5", "--data", photos, "--workers", 0, "--no-progress", "--rel-eps", "0.01")
    assert r.exit_code == 0 and "caffe preprocessing" in r.stdout and "n.weights.report.json" in r.stdout, r.output
    r = invoke("compare", d / "vgg16_notop.weights.h5", d / "n.h5", "--stats", d / "s.h5")
    assert r.exit_code == 0 and "positive per-filter rescaling" in r.stdout, r.output
    r = invoke("inspect", "vgg16", "--weights", d / "n.weights.h5")
    assert r.exit_code == 0 and "vgg16 weights in Keras 3 .weights.h5 (model.save_weights), without the top" in r.stdout


def torch_features(arch: str, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``arch``'s features (vggnorm's copy of torchvision's module tree) holding ``state_dict``."""
    from vggnorm.io.models import build_model

    features = build_model(arch, device="meta").features
    features.load_state_dict({k.removeprefix("features."): v for k, v in state_dict.items()}, assign=True)
    return features.eval()


def test_keras_files_read_exactly_as_keras_computes(keras_vgg16):
    """vggnorm's reading of both layouts, run in torch, equals Keras' own forward pass."""
    from vggnorm.io.formats import read_foreign

    x = np.random.default_rng(1).normal(0, 50, (2, 32, 32, 3)).astype("float32")
    model = keras.applications.VGG16(
        weights=str(keras_vgg16 / "vgg16_notop.h5"), include_top=False, input_shape=(32, 32, 3)
    )
    expected = keras.ops.convert_to_numpy(model(x))
    for name in ("vgg16_notop.h5", "vgg16_notop.weights.h5"):
        foreign = read_foreign(keras_vgg16 / name)
        assert foreign is not None and foreign.arch == "vgg16" and not foreign.top
        features = torch_features("vgg16", foreign.state_dict)
        with torch.no_grad():
            got = features(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_fc1_rows_follow_keras_flatten_order():
    """Keras' Flatten of a channels-last 7x7x512 map is in (h, w, c) order, torchvision's in (c, h, w):
    fc1's rows are reordered so both compute the same, and back."""
    from vggnorm.io.keras_h5 import fc1_from_keras, fc1_to_keras

    rng = np.random.default_rng(0)
    feature_map = rng.normal(size=(7, 7, 512))  # (h, w, c), as Keras holds it
    kernel = rng.normal(size=(7 * 7 * 512, 8))  # Keras' Dense kernel [in, out]
    keras_out = feature_map.reshape(-1) @ kernel
    weight = fc1_from_keras(kernel)  # torchvision's [out, in]
    torch_out = weight @ feature_map.transpose(2, 0, 1).reshape(-1)
    np.testing.assert_allclose(torch_out, keras_out, rtol=1e-10)
    np.testing.assert_array_equal(fc1_to_keras(weight), kernel)


# ---------------------------------------------------------------- MatConvNet


def test_matconvnet_preprocessing_is_rgb_0_255_minus_the_mean_pixel():
    from PIL import Image

    from vggnorm.io.data import default_transform
    from vggnorm.options import InputConvention

    mcn = InputConvention.MATCONVNET
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    x = default_transform("vgg19", resize=8, crop=8, convention=mcn).module(mcn)(img)
    torch.testing.assert_close(x[:, 4, 4], torch.tensor([10 - MEAN_RGB[0], 20 - MEAN_RGB[1], 30 - MEAN_RGB[2]]))
    own = default_transform("vgg19", resize=8, crop=8, convention=mcn, mean_pixel=(1.0, 2.0, 3.0))
    torch.testing.assert_close(own.module(mcn)(img)[:, 4, 4], torch.tensor([9.0, 18.0, 27.0]))
    x64 = own.module(mcn, torch.float64)(img)  # --precision fp64's preset: the same, in float64
    torch.testing.assert_close(x64[:, 4, 4], torch.tensor([9.0, 18.0, 27.0], dtype=torch.float64))
    assert own.std == (1.0, 1.0, 1.0)


def mat_struct(**fields) -> np.ndarray:
    """A 1x1 MATLAB struct for scipy.io.savemat, fields in the order given."""
    s = np.empty((1, 1), dtype=[(name, object) for name in fields])
    for name, value in fields.items():
        s[0, 0][name] = value
    return s


def mat_cell(*items) -> np.ndarray:
    c = np.empty((1, len(items)), dtype=object)
    for i, item in enumerate(items):
        c[0, i] = item
    return c


def gatys_names(arch: str) -> list[str]:
    """conv1_1, relu1_1, ..., pool1, ...: the loaders' list of layer names."""
    names, block, index = [], 1, 1
    for kind in feature_kinds(arch):
        if kind == "pool":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names.append(f"{kind}{block}_{index}")
            index += kind == "relu"
    return names


def write_matconvnet_vgg19(path, sd: dict[str, torch.Tensor], *, newer: bool) -> None:
    """A features-only imagenet-vgg-verydeep-19.mat in MatConvNet's structure: the older layout
    (top-level normalization with a 224x224 average image; each conv's weights its first field) or the
    newer one (meta.normalization.averageImage one pixel, its third field; name, type, weights first)."""
    layers = []
    for i, (kind, name) in enumerate(zip(feature_kinds("vgg19"), gatys_names("vgg19"), strict=True)):
        weights = mat_cell()
        if kind == "conv":  # MatConvNet's [w, h, in, out]; biases a column
            kernel = sd[f"features.{i}.weight"].numpy().transpose(3, 2, 1, 0)
            weights = mat_cell(kernel, sd[f"features.{i}.bias"].numpy().reshape(-1, 1))
        extra = {"conv": {"pad": np.array([[1.0, 1, 1, 1]]), "stride": np.array([[1.0, 1]])}, "relu": {}}.get(
            kind, {"method": "max", "pool": np.array([[2.0, 2]]), "stride": np.array([[2.0, 2]])}
        )
        if newer:
            layers.append(mat_struct(name=name, type=kind, weights=weights, precious=False, **extra))
        elif kind == "conv":
            layers.append(mat_struct(weights=weights, type=kind, name=name, **extra))
        else:
            layers.append(mat_struct(type=kind, name=name, **extra))
    classes = mat_struct(name=mat_cell("n01440764"), description=mat_cell("tench"))
    if newer:
        norm = mat_struct(
            imageSize=np.array([[224.0, 224, 3]]),
            interpolation="bilinear",
            averageImage=np.array(MEAN_RGB, dtype=np.float32).reshape(1, 1, 3),
            keepAspect=True,
        )
        content = {"layers": mat_cell(*layers), "meta": mat_struct(classes=classes, normalization=norm)}
    else:
        average = np.broadcast_to(np.array(MEAN_RGB, dtype=np.float32), (224, 224, 3)).copy()
        norm = mat_struct(averageImage=average, keepAspect=True, imageSize=np.array([[224.0, 224, 3]]))
        content = {"layers": mat_cell(*layers), "classes": classes, "normalization": norm}
    scipy_io.savemat(str(path), content, do_compression=False, oned_as="row")


def loaders_view(path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """What neural-style's and fast-style-transfer's vgg.py take from a .mat file (their indexing,
    re-implemented here in numpy): each conv's TensorFlow kernel [h, w, in, out] and bias, and the
    mean pixel the image is centred with."""
    data = scipy_io.loadmat(str(path))
    if "normalization" in data:  # older files: the average image, averaged to one pixel
        mean_pixel = np.mean(data["normalization"][0][0][0], axis=(0, 1))
    else:  # newer files: meta.normalization's third field is the pixel
        mean_pixel = data["meta"]["normalization"][0][0][0][0][2][0][0]
    cells = data["layers"][0]
    params = {}
    for i, name in enumerate(gatys_names("vgg19")):
        if name.startswith("conv"):
            record = cells[i][0][0]
            older = isinstance(record[0][0], np.ndarray)  # the weights cell first, not the name
            kernel, bias = record[0][0] if older else record[2][0]
            params[name] = (np.transpose(kernel, (1, 0, 2, 3)), bias.reshape(-1))
    return params, mean_pixel


def loaders_relus(path, images: np.ndarray) -> list[np.ndarray]:
    """The loaders' network on ``images`` (RGB, 0-255, NHWC, minus their mean pixel): TensorFlow's
    conv2d 'SAME' + bias, ReLU, 2x2 max pooling, run in torch; every ReLU's output (NHWC)."""
    params, mean_pixel = loaders_view(path)
    x = torch.from_numpy((images - mean_pixel).astype(np.float64)).permute(0, 3, 1, 2)
    out = []
    for name in gatys_names("vgg19"):
        if name.startswith("conv"):
            kernel, bias = params[name]
            w = torch.from_numpy(kernel.astype(np.float64)).permute(3, 2, 0, 1)  # [h, w, in, out] -> torch's
            x = torch.nn.functional.conv2d(x, w, torch.from_numpy(bias.astype(np.float64)), padding=1)
        elif name.startswith("relu"):
            x = torch.relu(x)
            out.append(x.permute(0, 2, 3, 1).numpy())
        else:
            x = torch.nn.functional.max_pool2d(x, 2, 2)
    return out


def test_matconvnet_fc6_reads_as_torchvision_flatten_order():
    """fc6 is a 7x7 conv over the 7x7x512 map, its kernel [w, h, in, out] as the convs' (the loaders'
    convention: transposed to TensorFlow's [h, w, in, out]); as a Linear it reads torchvision's (c, h, w)."""
    from vggnorm.io.matconvnet import linear_from_matconvnet, linear_to_matconvnet

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(7, 7, 512, 8))
    feature_map = rng.normal(size=(7, 7, 512))  # (h, w, c): NHWC, as the loaders run
    conv_out = np.einsum("hwc,hwco->o", feature_map, kernel.transpose(1, 0, 2, 3))  # one 'VALID' position
    weight = linear_from_matconvnet(kernel)
    np.testing.assert_allclose(weight @ feature_map.transpose(2, 0, 1).reshape(-1), conv_out, rtol=1e-10)
    np.testing.assert_array_equal(linear_to_matconvnet(weight, kernel.shape), kernel)


@pytest.fixture(scope="module")
def mat_runs(photos, tmp_path_factory, no_figures):
    """A VGG19 .mat in each layout -> compute-stats -> apply --layout matconvnet (CLI); the older one verified."""
    d = tmp_path_factory.mktemp("mat")
    sd = features_state_dict("vgg19")
    g = torch.Generator().manual_seed(0)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if k.endswith("bias") else v for k, v in sd.items()}
    for newer in (False, True):
        name = "new" if newer else "old"
        write_matconvnet_vgg19(d / f"{name}.mat", sd, newer=newer)
    r = invoke("compute-stats", photos, "--weights", d / "old.mat", *SIZE, "-o", d / "s.h5")
    assert r.exit_code == 0, r.output
    assert "preprocessing: matconvnet, mean (123.68, 116.779, 103.939)" in r.stdout
    for name in ("old", "new"):  # one statistics file: the weights are the same
        r = invoke(
            "apply", d / f"{name}.mat", "--stats", d / "s.h5", "--layout", "matconvnet", "-o", d / f"n-{name}.mat"
        )
        assert r.exit_code == 0, r.output
        assert "RGB 0-255 minus the file's mean pixel, as measured" in r.stderr
    return d, sd


def test_mat_files_read_back_by_the_loaders_indexing_with_means_one(mat_runs, photos):
    d, sd = mat_runs
    images = pixels(photos)
    convs = [f"features.{i}" for i, kind in enumerate(feature_kinds("vgg19")) if kind == "conv"]
    for name in ("old", "new"):
        relus = loaders_relus(d / f"n-{name}.mat", images)
        assert_means_are_one(relus, d / f"n-{name}.report.json", convs)
        # the same structure as the input: the same variables, layers, fields and everything else
        before, after = scipy_io.loadmat(str(d / f"{name}.mat")), scipy_io.loadmat(str(d / f"n-{name}.mat"))
        assert sorted(k for k in before if not k.startswith("__")) == sorted(k for k in after if not k.startswith("__"))
        for a, b in zip(before["layers"][0], after["layers"][0], strict=True):
            assert a.dtype.names == b.dtype.names
            for field in a.dtype.names:
                if field != "weights":
                    np.testing.assert_array_equal(a[0, 0][field], b[0, 0][field])
    before = loaders_relus(d / "old.mat", images)
    assert abs(float(before[-1].mean()) - 1) > 0.1  # the original is not normalized


def test_mat_read_matches_the_loaders_network(mat_runs):
    """vggnorm's torchvision model of a .mat computes what the loaders' network computes."""
    from vggnorm.io.formats import read_foreign

    d, sd = mat_runs
    images = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3))
    for name in ("old", "new"):
        foreign = read_foreign(d / f"{name}.mat")
        assert foreign is not None and foreign.arch == "vgg19" and foreign.flavor == name
        if name == "new":  # the same weights: its reading is what the means test checks
            assert all(torch.equal(foreign.state_dict[k], v) for k, v in read_foreign(d / "old.mat").state_dict.items())
            continue
        assert foreign.preprocess == "matconvnet" and np.allclose(foreign.mean, MEAN_RGB)
        features = torch_features("vgg19", foreign.state_dict)[:-1].double()  # up to relu5_4, as the loaders
        x = torch.from_numpy(images - np.array(foreign.mean)).permute(0, 3, 1, 2)
        with torch.no_grad():
            got = features(x).permute(0, 2, 3, 1).numpy()
        # the loaders average the float32 average image in float32: their mean pixel differs by ~1e-6
        np.testing.assert_allclose(got, loaders_relus(d / f"{name}.mat", images)[-1], rtol=1e-5, atol=1e-5)


def test_mat_verify_and_compare_like_a_pth(mat_runs, photos):
    d, _ = mat_runs
    r = invoke("verify", d / "n-old.mat", "--original", d / "old.mat", "--stats", d / "s.h5")  # means: see above
    assert r.exit_code == 0 and "2 passed" in r.stdout, r.output
    r = invoke("compare", d / "new.mat", d / "n-new.mat", "--stats", d / "s.h5")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- refusals


def refused(r, *phrases: str) -> None:
    assert r.exit_code in (1, 2), r.output
    assert "Traceback" not in r.output and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.output
    for phrase in phrases:
        assert phrase in r.stderr, r.output


def test_files_that_are_not_vgg16_or_vgg19_are_refused_with_the_reason(keras_vgg16, mat_runs, photos, tmp_path):
    d, _ = mat_runs
    run = ["compute-stats", photos, *SIZE, "-o", tmp_path / "s.h5", "--weights"]
    # an HDF5 file that is not Keras weights: a statistics file
    refused(invoke(*run, d / "s.h5"), "is a vggnorm statistics file, not weights")
    # a Keras model that is not a VGG
    small = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Conv2D(4, 3)])
    small.save_weights(tmp_path / "small.weights.h5")
    refused(invoke(*run, tmp_path / "small.weights.h5"), "2 conv and 0 dense layers", "not a Keras VGG16/VGG19")
    bn = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization()])
    bn.save_weights(tmp_path / "bn.weights.h5")
    refused(invoke(*run, tmp_path / "bn.weights.h5"), "holds 4 weights")
    # MATLAB files that are no MatConvNet VGG
    scipy_io.savemat(str(tmp_path / "x.mat"), {"x": np.ones(3)})
    refused(invoke(*run, tmp_path / "x.mat"), "without a 1xN cell array `layers`")
    data = scipy_io.loadmat(str(d / "old.mat"))
    data["layers"] = data["layers"][:, :-1]  # pool5 missing
    scipy_io.savemat(str(tmp_path / "cut.mat"), {k: v for k, v in data.items() if not k.startswith("__")})
    refused(invoke(*run, tmp_path / "cut.mat"), "cut.mat: layer 37 is 'missing' where vgg19 has 'pool'")
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file, Platform: GLNXA64" + bytes(200))
    refused(invoke(*run, tmp_path / "v73.mat"), "MATLAB 7.3 file")


def test_apply_refuses_layouts_and_names_that_do_not_fit(keras_runs, mat_runs, checkpoints, tmp_path):
    k = keras_runs
    d, _ = mat_runs
    apply = ["apply", k / "vgg16_notop.h5", "--stats", k / "s.h5", "-o"]
    refused(invoke(*apply, tmp_path / "x.h5"), "writes a PyTorch state_dict, not HDF5", "--layout keras")
    refused(invoke(*apply, tmp_path / "x.weights.h5", "--layout", "keras"), "not .weights.h5")
    refused(invoke(*apply, tmp_path / "x.mat", "--layout", "matconvnet"), "CKPT must be a MatConvNet")
    r = invoke(
        "apply", k / "vgg16_notop.weights.h5", "--stats", k / "s.h5", "--layout", "keras", "-o", tmp_path / "x.h5"
    )
    refused(r, "ending in .weights.h5")
    refused(invoke("apply", d / "old.mat", "--stats", d / "s.h5", "--layout", "keras"), "CKPT must be a Keras")
    assert not list(tmp_path.iterdir())


def test_scipy_missing_is_said(mat_runs, monkeypatch):
    from vggnorm.errors import VggnormError
    from vggnorm.io.formats import read_foreign

    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(VggnormError, match="needs scipy, which is not installed: pip install scipy"):
        read_foreign(mat_runs[0] / "old.mat")


# ---------------------------------------------------------------- with the top (138M parameters: slow)


def write_keras_download_like(path, rng: np.random.Generator) -> None:
    """A VGG16 file in the legacy layout keras.applications downloads (vgg16_weights_tf_dim_ordering_tf_kernels.h5):
    every layer listed in layer_names, weights named as in that file (block1_conv1_W_1:0), random values."""
    import h5py

    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[tuple[str, list[tuple[str, np.ndarray]]]] = [("input_1", [])]
    block, index, c = 1, 1, 3
    for v in widths:
        if v == "M":
            layers.append((f"block{block}_pool", []))
            block, index = block + 1, 1
            continue
        name = f"block{block}_conv{index}"
        kernel = rng.normal(0, np.sqrt(2 / (9 * c)), (3, 3, c, v)).astype("float32")
        layers.append((name, [(f"{name}_W_1:0", kernel), (f"{name}_b_1:0", rng.normal(0, 0.05, v).astype("float32"))]))
        index, c = index + 1, v
    layers.append(("flatten", []))
    for name, (n_in, n_out) in (("fc1", (25088, 4096)), ("fc2", (4096, 4096)), ("predictions", (4096, 1000))):
        kernel = rng.normal(0, np.sqrt(2 / n_in), (n_in, n_out)).astype("float32")
        layers.append(
            (name, [(f"{name}_W_1:0", kernel), (f"{name}_b_1:0", rng.normal(0, 0.05, n_out).astype("float32"))])
        )
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [name.encode() for name, _ in layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.0.8"
        for name, weights in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = [w.encode() for w, _ in weights]
            for w, value in weights:
                g.create_dataset(w, data=value)


@pytest.mark.slow
@pytest.mark.heavy
def test_keras_vgg16_with_the_top_keeps_its_predictions(photos, tmp_path):
    """fc1 reads Keras' channels-last flatten: after normalization Keras' own VGG16 (with the top) gives
    the same logits as before; and --features-only writes a file include_top=False loads."""
    write_keras_download_like(tmp_path / "vgg16.h5", np.random.default_rng(0))
    run = ["--arch", "vgg16", "--weights", tmp_path / "vgg16.h5", *SIZE, "-o", tmp_path / "s.h5"]
    assert invoke("compute-stats", photos, *run).exit_code == 0
    r = invoke(
        "apply", tmp_path / "vgg16.h5", "--stats", tmp_path / "s.h5", "--layout", "keras", "-o", tmp_path / "n.h5"
    )
    assert r.exit_code == 0 and "include_top=True) loads it" in r.stderr, r.output
    x = keras.applications.vgg16.preprocess_input(np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)))
    model = keras.applications.VGG16(weights=str(tmp_path / "n.h5"), classifier_activation=None)  # as users load it
    normalized = keras.ops.convert_to_numpy(model(x.astype("float32")))
    model.load_weights(str(tmp_path / "vgg16.h5"))  # the original, through the same loader
    original = keras.ops.convert_to_numpy(model(x.astype("float32")))
    del model
    np.testing.assert_allclose(normalized, original, rtol=0, atol=1e-4 * np.abs(original).max())
    args = ["--layout", "keras", "--features-only", "-o", tmp_path / "f.h5"]
    r = invoke("apply", tmp_path / "vgg16.h5", "--stats", tmp_path / "s.h5", *args)
    assert r.exit_code == 0 and "include_top=False) loads it" in r.stderr, r.output
    keras.applications.VGG16(weights=str(tmp_path / "f.h5"), include_top=False, input_shape=(32, 32, 3))
    assert (tmp_path / "f.h5").stat().st_size < 0.2 * (tmp_path / "n.h5").stat().st_size  # the top is gone
