"""Measurement policies: Caffe preprocessing and average pooling, recorded and honoured."""

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from conftest import TINY, invoke
from lookalikes import TinyVGG
from vggnorm.io.data import CAFFE_MEAN_BGR, default_transform
from vggnorm.options import InputConvention

SIZE = ["--resize", "64", "--crop", "64"]


def test_caffe_preset_is_bgr_0_255_mean_subtracted():
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    caffe = InputConvention.CAFFE
    x = default_transform("vgg11", resize=8, crop=8, convention=caffe).module(caffe)(img)
    expected = torch.tensor([30 - CAFFE_MEAN_BGR[0], 20 - CAFFE_MEAN_BGR[1], 10 - CAFFE_MEAN_BGR[2]])
    torch.testing.assert_close(x[:, 4, 4], expected)


def test_caffe_and_avg_pooling_are_measured_recorded_and_honoured(photos, checkpoints, tmp_path):
    ckpt, stats, out = checkpoints["tiny"], tmp_path / "s.h5", tmp_path / "n.pth"
    r = invoke(
        "compute-stats",
        photos,
        "--model",
        TINY["tiny"],
        "--weights",
        ckpt,
        "-o",
        stats,
        "--workers",
        0,
        "--preprocess",
        "caffe",
        "--pooling",
        "avg",
        *SIZE,
    )
    assert r.exit_code == 0, r.output
    with h5py.File(stats) as f:
        assert f.attrs["preprocess"] == "caffe" and f.attrs["pooling"] == "avg"
        assert np.allclose(f.attrs["mean"], CAFFE_MEAN_BGR) and np.allclose(f.attrs["std"], 1)
        measured = {n: torch.from_numpy(f[f"layers/{n}/mean"][()]) for n in f["layers"]}

    # independent float64 computation: Caffe input, max pooling swapped for average pooling
    model = TinyVGG()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model = model.double().eval()
    t = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.PILToTensor()])
    x = torch.stack([t(Image.open(p).convert("RGB")) for p in sorted(photos.iterdir())]).double()
    x = x[:, [2, 1, 0]] - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    conv = None
    with torch.no_grad():
        for i, m in enumerate(model.features):
            x = torch.nn.functional.avg_pool2d(x, 2) if isinstance(m, torch.nn.MaxPool2d) else m(x)
            conv = f"features.{i}" if isinstance(m, torch.nn.Conv2d) else conv
            if isinstance(m, torch.nn.ReLU):
                expected = x.mean(dim=(0, 2, 3))
                torch.testing.assert_close(measured[conv], expected, rtol=1e-4, atol=1e-4 * float(expected.max()))

    assert invoke("apply", ckpt, "--stats", stats, "-o", out).exit_code == 0
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, "--workers", 0)
    assert r.exit_code == 0 and "4 passed" in r.stdout, r.output
    r = invoke("verify", out, "--stats", stats, "--data", photos, "--pooling", "max")
    assert r.exit_code == 2 and "differs from the statistics' pooling avg" in r.stderr
    # an audit re-measures under the policy apply recorded beside the checkpoint, and says so
    r = invoke("verify", out, "--data", photos, "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "caffe preprocessing, avg pooling" in r.stdout and "n.report.json" in r.stdout
    # options override it: under torchvision's preprocessing and max pooling the means are not 1
    r = invoke("verify", out, "--data", photos, "--workers", 0, "--preprocess", "torchvision", "--pooling", "max")
    assert r.exit_code == 1 and "overridden by options" in r.stdout
    # a .safetensors file carries its policy inside
    st = tmp_path / "st.safetensors"
    assert invoke("apply", ckpt, "--stats", stats, "-o", st, "--model", TINY["tiny"]).exit_code == 0
    st.with_name("st.report.json").unlink()
    r = invoke("verify", st, "--data", photos, "--workers", 0)
    assert r.exit_code == 0 and "safetensors metadata" in r.stdout, r.output


def test_include_classifier_normalizes_fc6_fc7_and_keeps_logits(photos, checkpoints, tmp_path):
    ckpt, stats, out = checkpoints["tiny"], tmp_path / "s.h5", tmp_path / "n.pth"
    plain = tmp_path / "plain.h5"
    base = ["--model", TINY["tiny"], "--weights", ckpt, "--workers", 0, *SIZE]
    assert invoke("compute-stats", photos, *base, "-o", plain).exit_code == 0
    r = invoke("apply", ckpt, "--stats", plain, "-o", out, "--include-classifier")
    assert r.exit_code == 1 and "--include-classifier" in r.stderr and not out.exists()

    r = invoke("compute-stats", photos, *base, "-o", stats, "--include-classifier")
    assert r.exit_code == 0, r.output
    with h5py.File(stats) as f:
        assert f["layers/classifier.0/count"][()] == 8 and f["layers/classifier.3"].attrs["relu"] == "classifier.4"
    r = invoke("apply", ckpt, "--stats", stats, "-o", out, "--include-classifier")
    assert r.exit_code == 0, r.output
    sd, orig = torch.load(out, weights_only=True), torch.load(ckpt, weights_only=True)
    assert not torch.equal(sd["classifier.6.weight"], orig["classifier.6.weight"])  # fc8 compensates fc7
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    models = []
    for state in (orig, sd):
        m = TinyVGG()
        m.load_state_dict(state)
        models.append(m.double().eval())
    with torch.no_grad():
        y, y2 = models[0](x), models[1](x)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    # the default dead rule keeps only fc units float32 can normalize to verify's default tolerance
    r = invoke(
        "verify",
        out,
        "--original",
        ckpt,
        "--stats",
        stats,
        "--data",
        photos,
        "--workers",
        0,
        "--include-classifier",
    )
    assert r.exit_code == 0 and "4 passed" in r.stdout, r.output
    # without the flag, verify checks as apply recorded; told otherwise, it recomputes the conv-only
    # fold, which is not this file
    assert invoke("verify", out, "--original", ckpt, "--stats", stats).exit_code == 0
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--no-include-classifier")
    assert r.exit_code == 1


def test_decode_gpu_is_refused_on_cpu_and_its_stats_are_re_measured_only_on_cuda(photos, checkpoints, tmp_path):
    ckpt, stats, out = checkpoints["tiny"], tmp_path / "s.h5", tmp_path / "n.pth"
    base = ["--model", TINY["tiny"], "--weights", ckpt, "--workers", 0, *SIZE]
    r = invoke("compute-stats", photos, *base, "-o", stats, "--decode", "gpu", "--device", "cpu")
    assert r.exit_code == 1 and "--decode gpu" in r.stderr and "CUDA" in r.stderr and not stats.exists()
    assert invoke("compute-stats", photos, *base, "-o", stats).exit_code == 0
    assert invoke("apply", ckpt, "--stats", stats, "-o", out).exit_code == 0
    with h5py.File(stats, "r+") as f:  # as if measured with --decode gpu on a GPU machine
        f.attrs["decode"] = "gpu"
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, "--device", "cpu")
    # the fold still checks out; the means cannot be re-measured with the same pixels here: a failure
    assert r.exit_code == 1 and "3 passed, 1 failed" in r.stdout and "--decode gpu" in r.stdout, r.output
