"""Never lose data, never crash, round two: each row of the red-team pass as a test.

Each test is named after what it guarantees; the docs' "What vggnorm guarantees against bad input"
lists them.
"""

import contextlib
import json
import os
import shutil
import signal

import h5py
import numpy as np
import pytest
import torch

from conftest import TINY, invoke, one_line_error
from vggnorm.io.statsfile import read_stats

MODEL = ["--model", TINY["tiny"]]
SMALL = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]
QUICK = ["--workers", 0, "--no-progress"]


@pytest.fixture
def data(photos, tmp_path):
    """A private copy of the photos (tests add files to it)."""
    d = tmp_path / "photos"
    shutil.copytree(photos, d)
    return d


@pytest.fixture
def run(data, checkpoints, tmp_path):
    """A finished compute-stats -> apply on the look-alike, in tmp_path."""
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(checkpoints["tiny"].read_bytes())
    stats, out = tmp_path / "s.h5", tmp_path / "n.pth"
    r = invoke("compute-stats", data, *MODEL, "--weights", ckpt, "-o", stats, *SMALL)
    assert r.exit_code == 0, r.output
    r = invoke("apply", ckpt, "--stats", stats, "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    return {"ckpt": ckpt, "stats": stats, "out": out, "data": data}


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- A1: no output of verify lands in --data ---------------------------------------------------------------


def test_verify_never_writes_into_its_data_folder_even_with_force(run, tmp_path):
    """Before: --junit-xml photos/x.JPEG --force overwrote the image with XML; --report photos/moon
    dropped moon.json/.md/.png into the calibration folder."""
    data = run["data"]
    before = snapshot(data)
    image = sorted(data.iterdir())[0]
    verify = ["verify", run["out"], "--data", data, *QUICK, *MODEL]
    r = invoke(*verify, "--junit-xml", image, "--force")
    one_line_error(r, "--data", str(data))
    r = invoke(*verify, "--report", image.with_suffix(""), "--force")
    one_line_error(r, "--data")
    r = invoke(*verify, "--report", data / "new-report")
    one_line_error(r, "--data")
    assert snapshot(data) == before
    # a symlink to the data folder is the data folder
    (tmp_path / "alias").symlink_to(data)
    r = invoke(*verify, "--report", tmp_path / "alias" / "r", "--force")
    one_line_error(r, "--data")
    assert snapshot(data) == before
    # a symlinked subfolder of the data: its files are images of the next run
    (tmp_path / "elsewhere").mkdir()
    (data / "more").symlink_to(tmp_path / "elsewhere")
    r = invoke(*verify, "--report", tmp_path / "elsewhere" / "r")
    one_line_error(r, "--data")
    assert list((tmp_path / "elsewhere").iterdir()) == []
    r = invoke(*verify, "--report", tmp_path / "r", "--junit-xml", tmp_path / "j.xml")
    assert r.exit_code == 0, r.output


# --- A2: files that are not regular files --------------------------------------------------------------------


class Hung(BaseException):  # not an Exception: nothing in vggnorm may swallow it as a bad file
    pass


def _with_timeout(seconds, fn):
    """``fn()``, or None when it is still running after ``seconds`` (an alarm interrupts a blocked open)."""

    def on_alarm(signum, frame):
        raise Hung

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        return fn()
    except Hung:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_named_like_an_image_is_skipped_and_recorded_not_waited_on(run, tmp_path):
    """Before: compute-stats hung forever on open() of pipe.jpg (and --resume and verify --data again)."""
    data = run["data"]
    fifo = data / "pipe.jpg"
    os.mkfifo(fifo)
    stats = tmp_path / "fifo.h5"
    try:
        r = _with_timeout(
            30, lambda: invoke("compute-stats", data, *MODEL, "--weights", run["ckpt"], "-o", stats, *SMALL)
        )
        assert r is not None, "compute-stats hung on a FIFO"
        assert r.exit_code == 0, r.output
        st = read_stats(stats)
        assert st.num_images == 8 and [p for p, _ in st.skipped] == [str(fifo)]
        assert "not a regular file" in st.skipped[0][1]
        with h5py.File(stats, "r+") as f:  # as if interrupted after 4 of the 9 files: --resume reaches the FIFO
            f.attrs["complete"], f.attrs["position"] = False, 4
        args = ["-o", stats, *SMALL, "--resume"]
        r = _with_timeout(30, lambda: invoke("compute-stats", data, *MODEL, "--weights", run["ckpt"], *args))
        assert r is not None, "compute-stats --resume hung on a FIFO"
        assert r.exit_code == 0, r.output
        r = _with_timeout(30, lambda: invoke("verify", run["out"], "--data", data, *QUICK, *MODEL))
        assert r is not None, "verify --data hung on a FIFO"
        assert r.exit_code == 0 and "1 skipped" in r.stdout, r.output
    finally:
        # a reader still blocked on it (the unfixed code) is released by a writer's open and close
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        fifo.unlink()


def test_verify_never_writes_over_an_image_of_its_data_through_a_hard_link(run, tmp_path):
    data = run["data"]
    image = sorted(data.iterdir())[0]
    before = image.read_bytes()
    os.link(image, tmp_path / "j.xml")
    r = invoke("verify", run["out"], "--data", data, *QUICK, *MODEL, "--junit-xml", tmp_path / "j.xml", "--force")
    one_line_error(r, "--data")
    assert image.read_bytes() == before


# --- A3: apply never writes non-finite or underflowed weights ----------------------------------------------


def edit_stats(src, dst, edit):
    """A copy of the statistics file ``src`` at ``dst``, changed by ``edit(h5py.File)``."""
    if src != dst:
        shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def set_layer(name, **values):
    def edit(f):
        for key, value in values.items():
            del f[f"layers/{name}/{key}"]
            f[f"layers/{name}/{key}"] = value

    return edit


def test_apply_refuses_to_write_weights_that_overflow_or_underflow(run, tmp_path):
    """Before: a finite but huge sum (1e300) in every layer gave all-zero features.0 weights, self-check
    PASS, exit 0 (--features-only: no logits to catch it)."""
    bad = tmp_path / "bad.h5"
    shutil.copyfile(run["stats"], bad)
    for layer in read_stats(run["stats"]).layers.values():
        total = (layer.sum * 0 + 1e300).numpy()
        edit_stats(bad, bad, set_layer(layer.conv, sum=total, mean=total / layer.count))
    out = tmp_path / "bad.pth"
    r = invoke("apply", run["ckpt"], "--stats", bad, "-o", out, "--features-only", *MODEL)
    one_line_error(r, "underflows", "features.0.weight", "nothing was written")
    assert not out.exists() and not (tmp_path / "bad.report.json").exists()


# --- A4, A5: per-class statistics ---------------------------------------------------------------------------


@pytest.fixture
def classes(photos, tmp_path):
    """Class subfolders: cat (the 8 photos) and ghost, whose only image cannot be decoded."""
    root = tmp_path / "classes"
    shutil.copytree(photos, root / "cat")
    (root / "ghost").mkdir()
    (root / "ghost" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_centers_never_write_a_nan_row_for_a_class_without_images(classes, checkpoints, tmp_path, caplog):
    """Before: centers wrote a NaN row for ghost (0 images), exit 0."""
    stats, out = tmp_path / "s.h5", tmp_path / "c.pt"
    r = invoke("compute-stats", classes, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL, "--per-class")
    assert r.exit_code == 0, r.output
    r = invoke("centers", stats, "--layer", "features.3", "-o", out)
    assert r.exit_code == 0, r.output
    saved = torch.load(out, weights_only=True)
    assert saved["classes"] == ["cat"] and saved["centers"].shape[0] == 1
    assert bool(torch.isfinite(saved["centers"]).all())
    assert "left out 1 class(es) with no image" in caplog.text and "ghost" in caplog.text, caplog.text


def test_a_labels_file_with_a_utf8_bom_has_no_extra_class(data, checkpoints, tmp_path):
    """Before: a BOM at the start of --labels made a class "\\ufeffa" beside "a"."""
    names = sorted(p.name for p in data.iterdir())
    csv = "".join(f"{n},{c}\n" for n, c in zip(names, "aabbaabb", strict=True))
    for text in ["".join(f"{c}\n" for c in "aabbaabb"), csv]:
        labels = tmp_path / "labels.txt"
        labels.write_bytes(b"\xef\xbb\xbf" + text.encode())
        stats = tmp_path / "s.h5"
        args = ["--per-class", "--labels", labels, "--force"]
        r = invoke("compute-stats", data, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL, *args)
        assert r.exit_code == 0, r.output
        assert read_stats(stats).classes == ["a", "b"]


# --- A6: an image that resizing would make enormous --------------------------------------------------------


def test_an_elongated_image_is_skipped_and_recorded_before_it_is_resized(data, checkpoints, tmp_path):
    """Before: a 20000x1 PNG (a few hundred bytes) was resized to a shorter side of 256: 5,120,000 x 256,
    6.1 GB of peak RSS; at --resize 40 here, 800000 x 40."""
    from PIL import Image

    Image.new("RGB", (20000, 1), (200, 10, 10)).save(data / "strip.png")
    assert (data / "strip.png").stat().st_size < 1000
    stats = tmp_path / "s.h5"
    r = invoke("compute-stats", data, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL)
    assert r.exit_code == 0, r.output
    st = read_stats(stats)
    assert st.num_images == 8 and [os.path.basename(p) for p, _ in st.skipped] == ["strip.png"]
    assert "too large once resized: 20000x1" in st.skipped[0][1]


# --- A7: a shard is not the statistics of the data -----------------------------------------------------------


def test_apply_refuses_a_single_shard_and_says_to_merge_first(data, checkpoints, tmp_path):
    """Before: apply --stats s0.h5 (shard 0/2) normalized on half of the images without a word."""
    shard, out = tmp_path / "s0.h5", tmp_path / "n.pth"
    r = invoke("compute-stats", data, *MODEL, "--weights", checkpoints["tiny"], "-o", shard, *SMALL, "--shard", "0/2")
    assert r.exit_code == 0, r.output
    r = invoke("apply", checkpoints["tiny"], "--stats", shard, "-o", out, *MODEL)
    one_line_error(r, "shard 0/2", "merge-stats")
    assert not out.exists()


# --- A8: half-precision checkpoints, and checks that did not run ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_measured_folded_and_written_in_float32_and_say_so(
    data, checkpoints, tmp_path, dtype, caplog
):
    """Before: an fp16/bf16 checkpoint was measured in half precision (recorded as fp32: means off by
    ~1e-3), and apply's self-check then failed."""
    sd = torch.load(checkpoints["tiny"], weights_only=True)
    half, upcast = tmp_path / "half.pth", tmp_path / "upcast.pth"
    torch.save({k: v.to(dtype) for k, v in sd.items()}, half)
    torch.save({k: v.to(dtype).float() for k, v in sd.items()}, upcast)  # the same values, stored as float32
    for w in (half, upcast):
        r = invoke("compute-stats", data, *MODEL, "--weights", w, "-o", w.with_suffix(".h5"), *SMALL)
        assert r.exit_code == 0, r.output
    measured, exact = read_stats(half.with_suffix(".h5")), read_stats(upcast.with_suffix(".h5"))
    for name, layer in measured.layers.items():
        assert torch.equal(layer.sum, exact.layers[name].sum), name
    assert "holds " + str(dtype).removeprefix("torch.") + " tensors" in caplog.text, caplog.text
    out = tmp_path / "n.pth"
    r = invoke("apply", half, "--stats", half.with_suffix(".h5"), "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    assert "written as float32" in r.stderr
    assert {v.dtype for v in torch.load(out, weights_only=True).values()} == {torch.float32}
    r = invoke("verify", out, "--original", half, "--stats", half.with_suffix(".h5"), "--data", data, *QUICK, *MODEL)
    assert r.exit_code == 0 and "4 passed, 0 failed" in r.stdout, r.output


def test_a_failed_self_check_names_only_the_checks_that_failed(run, tmp_path, monkeypatch):
    """Before: a check that did not run was listed as failed, as "logits: None > None"."""
    from vggnorm.commands import apply as apply_mod
    from vggnorm.core.checks import FAIL, Check, not_run

    def checks(*args, **kwargs):
        return [Check("activations", "", FAIL, 0.5, 1e-4, "worst layer features.3"), not_run("logits", "", "n/a")]

    monkeypatch.setattr(apply_mod, "check_function", checks)
    r = invoke("apply", run["ckpt"], "--stats", run["stats"], "-o", tmp_path / "x.pth", *MODEL)
    one_line_error(r, "activations: 0.5 > 0.0001 (worst layer features.3)")
    assert "None" not in r.stderr and "logits" not in r.stderr


# --- A9: fp64 means the whole input pipeline ---------------------------------------------------------------


def float64_inputs(files, measurement):
    """The images resized and cropped (8-bit pixels), then everything in float64 arithmetic."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from vggnorm.io.data import load_rgb

    out = []
    preprocess = measurement.transform
    for f in files:
        img = F.resize(load_rgb(f), [preprocess.resize], InterpolationMode(preprocess.interpolation), antialias=True)
        x = F.pil_to_tensor(F.center_crop(img, [preprocess.crop])).double()
        mean, std = (
            torch.tensor(preprocess.mean, dtype=torch.float64),
            torch.tensor(preprocess.std, dtype=torch.float64),
        )
        if measurement.convention == "caffe":
            x = x.flip(0) - mean.view(3, 1, 1)
        else:
            x = (x / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("preprocess", ["caffe", "torchvision"])
def test_fp64_preprocesses_in_float64_too(data, checkpoints, tmp_path, preprocess):
    """Before: with --precision fp64 the Caffe mean (103.939, ...) was subtracted in float32 (and the
    ImageNet mean/std applied in float32): means 1e-8 off a float64 computation."""
    from lookalikes import TinyVGG
    from vggnorm.io.data import Measurement, default_transform, find_images
    from vggnorm.options import InputConvention

    stats = tmp_path / "s.h5"
    args = ["--precision", "fp64", "--preprocess", preprocess, "--batch-size", 3]
    r = invoke("compute-stats", data, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL, *args)
    assert r.exit_code == 0, r.output
    st = read_stats(stats)
    p = Measurement.from_attrs(st.provenance.preprocess)
    convention = InputConvention(preprocess)
    assert p.convention == convention
    assert p.transform == default_transform(TINY["tiny"], resize=40, crop=32, convention=convention)
    model = TinyVGG()
    model.load_state_dict(torch.load(checkpoints["tiny"], weights_only=True))
    x, conv = float64_inputs(find_images(data), p), None
    with torch.no_grad():
        for i, m in enumerate(model.double().eval().features):
            x = m(x)
            conv = f"features.{i}" if isinstance(m, torch.nn.Conv2d) else conv
            if isinstance(m, torch.nn.ReLU):
                expected = x.mean(dim=(0, 2, 3))
                torch.testing.assert_close(st.layers[conv].mean, expected, rtol=1e-12, atol=0)


# --- B: statistics files are read through one validating schema ----------------------------------------------


@pytest.fixture(scope="module")
def made(photos, checkpoints, tmp_path_factory):
    """One compute-stats -> apply for the crafted-file tests (which only read these files)."""
    d = tmp_path_factory.mktemp("made")
    ckpt, stats, out = d / "w.pth", d / "s.h5", d / "n.pth"
    ckpt.write_bytes(checkpoints["tiny"].read_bytes())
    r = invoke("compute-stats", photos, *MODEL, "--weights", ckpt, "-o", stats, *SMALL, "--shard", "0/1")
    assert r.exit_code == 0, r.output
    with h5py.File(stats, "r+") as f:  # a one-shard file: merge-stats reads it; apply takes the whole
        f.attrs["shard"] = ""
    r = invoke("apply", ckpt, "--stats", stats, "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    return {"ckpt": ckpt, "stats": stats, "out": out, "data": photos}


def attr(**values):
    def edit(f):
        for key, value in values.items():
            f.attrs[key] = value

    return edit


def replace_dataset(name, **create):
    def edit(f):
        del f[name]
        f.create_dataset(name, **create)

    return edit


def soft_link_loop(f):
    del f["layers/features.3"]
    f["layers/features.3"] = h5py.SoftLink("/layers/features.3")


def external_link(f):
    other = os.path.join(os.path.dirname(f.filename), "other.h5")
    with h5py.File(other, "w") as o:
        o["sum"] = np.ones(8)
    del f["layers/features.3/sum"]
    f["layers/features.3/sum"] = h5py.ExternalLink(other, "/sum")


CRAFTED = {
    "crop=-5": (attr(crop=-5), "crop is -5"),
    "crop='abc'": (attr(crop="abc"), "crop is 'abc'"),
    "resize an array": (attr(resize=np.array([40, 40])), "resize is an array"),
    "mean='abc'": (attr(mean="abc"), "mean is 'abc'"),
    "interpolation='bogus'": (attr(interpolation="bogus"), "interpolation is 'bogus'"),
    "sum of 1e12 elements": (
        replace_dataset("layers/features.3/sum", shape=(10**12,), dtype="f8", chunks=(1024,)),
        "declares shape (1000000000000,)",
    ),
    "a billion skipped files": (
        lambda f: (
            attr(num_files=2**31 - 1, position=2**31 - 1)(f),
            replace_dataset("skipped/reason", shape=(10**9,), dtype=h5py.string_dtype(), chunks=(1024,))(f),
        ),
        "'reason' declares shape (1000000000,)",
    ),
    "soft-link loop": (soft_link_loop, "SoftLink"),
    "external link": (external_link, "ExternalLink"),
    "shard='abc'": (attr(shard="abc"), "shard is 'abc'"),
    "classes but no class_sum": (attr(classes='["a", "b", "c"]'), "no class_sum"),
    "position=500": (attr(position=500), "position is 500"),
    "position=-4": (attr(position=-4), "position is -4"),
    "std=[0,0,0]": (attr(std=np.zeros(3)), "std is [0.0, 0.0, 0.0]"),
    "preprocess='bogus'": (attr(preprocess="bogus"), "preprocess is 'bogus'"),
    "a float count": (replace_dataset("layers/features.3/count", data=np.float64(8192.0)), "'count' holds float64"),
    "complete='False'": (attr(complete="False"), "complete is 'False'"),
    "layer_order not JSON": (attr(layer_order="[features.0"), "layer_order is not JSON"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_statistics_file_is_one_line_in_every_command(made, tmp_path, case):
    """Before: each of these was a traceback (ValueError, TypeError, RecursionError, an 8 TB allocation...),
    or worse, was read as something else (complete='False' as True, a shard 'abc' split on '/')."""
    edit, words = CRAFTED[case]
    bad = edit_stats(made["stats"], tmp_path / "bad.h5", edit)
    r = invoke("apply", made["ckpt"], "--stats", bad, "-o", tmp_path / "o.pth", *MODEL)
    one_line_error(r, "bad.h5", words, "measure it again")
    r = invoke("verify", made["out"], "--original", made["ckpt"], "--stats", bad, *QUICK, *MODEL)
    one_line_error(r, words)
    r = invoke("merge-stats", bad, "-o", tmp_path / "m.h5")
    one_line_error(r, words)
    r = invoke("centers", bad, "--layer", "features.3", "-o", tmp_path / "c.pt")
    one_line_error(r, words)
    # an unfinished run continued with --resume
    with h5py.File(bad, "r+") as f:
        if case != "complete='False'":
            f.attrs["complete"] = False
        if not case.startswith("position"):
            f.attrs["position"] = 4
    r = invoke("compute-stats", made["data"], *MODEL, "--weights", made["ckpt"], "-o", bad, *SMALL, "--resume")
    one_line_error(r, words)
    assert not (tmp_path / "o.pth").exists() and not (tmp_path / "m.h5").exists()


def _policy_with(**changes):
    return lambda real: json.dumps({**real, **changes})


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (lambda real: "{not json", "policy is not JSON"),
        (lambda real: "[1, 2]", "policy is [1, 2]; expected a mapping"),
        (_policy_with(crop="abc"), "crop is 'abc'"),
        (_policy_with(rel_eps="x"), "rel_eps is 'x'; expected a number"),
        (_policy_with(resize=100000), "resize is 100000"),
        (_policy_with(std=[0, 0, 0]), "std is [0.0, 0.0, 0.0]"),
        (lambda real: "null", "policy is None; expected a mapping"),
    ],
)
def test_a_crafted_policy_in_safetensors_metadata_is_one_line(made, tmp_path, policy, words):
    """Before: bad JSON, a list, crop "abc" or rel_eps "x" in the metadata apply writes were tracebacks
    (JSONDecodeError, TypeError, ValueError) in verify; resize 100000 and std [0, 0, 0] said "none of the
    images could be decoded"."""
    from safetensors.torch import save_file

    real = json.loads((made["out"].parent / "n.report.json").read_text())["inputs"]["policy"]
    path = tmp_path / "n.safetensors"
    sd = torch.load(made["out"], weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"policy": policy(real)})
    r = invoke("verify", path, "--data", made["data"], *QUICK, *MODEL)
    one_line_error(r, "safetensors metadata", words)


def test_a_resize_no_image_can_be_measured_at_is_a_usage_error(made, tmp_path):
    """Before: compute-stats --resize 100000 decoded every image and tried to resize it to 100000x100000
    (a MemoryError, or each file skipped as undecodable)."""
    r = invoke(
        "compute-stats",
        made["data"],
        *MODEL,
        "--weights",
        made["ckpt"],
        "-o",
        tmp_path / "s.h5",
        *QUICK,
        "--resize",
        100000,
        "--crop",
        32,
    )
    assert r.exit_code == 2 and "100000 is not in the range 1<=x<=4096" in r.stderr, r.output
    assert not (tmp_path / "s.h5").exists()
    from vggnorm.errors import DataError
    from vggnorm.io.data import ImageTransform

    with pytest.raises(DataError, match="resize 100000: expected a whole number of pixels from 1 to 4096"):
        ImageTransform(resize=100000)


# --- checkpoints: integer weights, BatchNorm without its counter ----------------------------------------------


def test_integer_weights_are_refused_by_inspect_and_compute_stats_naming_the_tensors(data, checkpoints, tmp_path):
    """Before: inspect said int32 weights fit; compute-stats then failed with torch's multi-line error, and
    verify --data with a traceback."""
    sd = torch.load(checkpoints["tiny"], weights_only=True)
    torch.save({k: (v * 100).to(torch.int32) for k, v in sd.items()}, tmp_path / "int.pth")
    r = invoke("inspect", TINY["tiny"], "--weights", tmp_path / "int.pth")
    one_line_error(r, "not floating-point", "features.0.weight (int32)")
    r = invoke("compute-stats", data, *MODEL, "--weights", tmp_path / "int.pth", "-o", tmp_path / "s.h5", *SMALL)
    one_line_error(r, "not floating-point", "features.0.weight (int32)")
    r = invoke("verify", tmp_path / "int.pth", "--data", data, *QUICK, *MODEL)  # an integer checkpoint under test
    one_line_error(r, "not floating-point", "features.0.weight (int32)")


def test_a_batchnorm_checkpoint_without_num_batches_tracked_is_accepted_as_torch_loads_it(data, checkpoints, tmp_path):
    """Before: refused as "missing keys: ...num_batches_tracked", though load_state_dict(strict=True) takes it."""
    model = ["--model", TINY["tiny_bn"]]
    sd = torch.load(checkpoints["tiny_bn"], weights_only=True)
    ckpt, stats, out = tmp_path / "bn.pth", tmp_path / "s.h5", tmp_path / "n.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, ckpt)
    r = invoke("compute-stats", data, *model, "--weights", ckpt, "-o", stats, *SMALL)
    assert r.exit_code == 0, r.output
    r = invoke("apply", ckpt, "--stats", stats, "-o", out, *model)
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", data, *QUICK, *model)
    assert r.exit_code == 0 and "4 passed" in r.stdout, r.output


# --- a full disk under centers -o ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_centers_on_a_full_disk_is_one_line_and_leaves_nothing(classes, checkpoints, tmp_path, suffix):
    """Before: torch.save's "unexpected pos" RuntimeError, a traceback (the file-size limit stands in for a
    full disk: the write fails with EFBIG, as with ENOSPC)."""
    import resource
    import subprocess
    import sys

    stats, out = tmp_path / "s.h5", tmp_path / f"c{suffix}"
    r = invoke("compute-stats", classes, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL, "--per-class")
    assert r.exit_code == 0, r.output

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run(
        [sys.executable, "-m", "vggnorm", "centers", str(stats), "--layer", "features.3", "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        env=env,
        timeout=300,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "File too large" in p.stderr and "nothing was written" in p.stderr, p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["classes", "s.h5"]


# --- C: messages name only what the command has; exit statuses agree -----------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """torchvision's weights cannot be downloaded (and are not cached)."""
    import torchvision

    def fail(self, progress, check_hash):
        raise OSError("offline")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fail)


def test_offline_torchvision_weights_name_the_option_of_each_command_and_exit_1(offline, made, tmp_path):
    """Before: apply and verify --original said to pass `--weights PATH.pth`, an option they lack; verify
    exited 2 where compute-stats and apply exit 1."""
    features = tmp_path / "v11.pth"
    from conftest import features_state_dict

    torch.save(features_state_dict("vgg11"), features)
    stats = tmp_path / "s.h5"
    r = invoke("compute-stats", made["data"], "--arch", "vgg11", "-o", stats, *SMALL)
    one_line_error(r, "--weights PATH.pth")
    r = invoke("compute-stats", made["data"], "--arch", "vgg11", "--weights", features, "-o", stats, *SMALL)
    assert r.exit_code == 0, r.output
    r = invoke("apply", "IMAGENET1K_V1", "--stats", stats, "-o", tmp_path / "n.pth")
    one_line_error(r, "`vggnorm apply PATH.pth --stats ...`")
    assert "--weights" not in r.stderr
    r = invoke("apply", features, "--stats", stats, "-o", tmp_path / "n.pth")
    assert r.exit_code == 0, r.output
    r = invoke("verify", tmp_path / "n.pth", "--original", "IMAGENET1K_V1", "--stats", stats, *QUICK)
    one_line_error(r, "--original PATH.pth")
    assert "--weights" not in r.stderr


def test_inspect_names_the_other_arch_as_inspect_takes_it(tmp_path):
    """Before: `inspect vgg13 --weights vgg11.pth` said "pass --arch vgg11"; inspect has no --arch."""
    from conftest import features_state_dict

    torch.save(features_state_dict("vgg11"), tmp_path / "v11.pth")
    r = invoke("inspect", "vgg13", "--weights", tmp_path / "v11.pth")
    one_line_error(r, f"run `vggnorm inspect vgg11 --weights {tmp_path / 'v11.pth'}`")
    assert "--arch" not in r.stderr


@pytest.mark.parametrize("key", ["model_state_dict", "net"])
def test_a_training_checkpoint_names_the_key_that_holds_the_weights_and_how_to_extract_them(made, tmp_path, key):
    """Before: "does not hold a state_dict", without saying where the weights were."""
    sd = torch.load(made["ckpt"], weights_only=True)
    torch.save({key: sd, "optimizer_state_dict": {"param_groups": [{"lr": 0.1}]}, "epoch": 3}, tmp_path / "t.pth")
    r = invoke("inspect", TINY["tiny"], "--weights", tmp_path / "t.pth")
    one_line_error(r, f"under {key!r}", f"torch.load('{tmp_path / 't.pth'}', weights_only=True)[{key!r}]")


def test_a_failed_write_in_verify_exits_1_as_everywhere(made, tmp_path, monkeypatch):
    """Before: a full disk under verify --report exited 2 (usage), while the docs promise 1."""
    import errno

    from vggnorm.io.report import Report

    def full(self, json_path, md_path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Report, "write", full)
    r = invoke("verify", made["out"], "--data", made["data"], *QUICK, *MODEL, "--report", tmp_path / "r")
    one_line_error(r, "No space left on device", "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_centers_takes_the_layer_names_verify_prints_and_an_unknown_layer_is_a_usage_error(classes, tmp_path):
    """Before: `--layer relu5_4` (as verify prints the layers) and the activation's path were refused, and an
    unknown --layer exited 1 (a bad option value: 2 everywhere else)."""
    stats = tmp_path / "s.h5"
    arch = ["--arch", "vgg11", "--weights", "random:0", "--resize", 36, "--crop", 32, *QUICK, "--per-class"]
    r = invoke("compute-stats", classes, *arch, "-o", stats)
    assert r.exit_code == 0, r.output
    for name in ("features.3", "conv2_1", "relu2_1", "features.4"):
        r = invoke("centers", stats, "--layer", name, "-o", tmp_path / f"{name}.pt")
        assert r.exit_code == 0, r.output
        assert torch.load(tmp_path / f"{name}.pt", weights_only=True)["layer"] == "features.3"
    r = invoke("centers", stats, "--layer", "relu9_9", "-o", tmp_path / "c.pt")
    one_line_error(r, "--layer relu9_9", "features.3 (conv2_1)", code=2)


def test_the_progress_bar_prints_its_last_line_once(data, checkpoints, tmp_path):
    """Before: "100%| 8/8 ..." twice in a log (once when the last batch arrived, once when the bar closed)."""
    for batch in (32, 3):
        args = ["--resize", 40, "--crop", 32, "--workers", 0, "--batch-size", batch, "--force"]
        r = invoke("compute-stats", data, *MODEL, "--weights", checkpoints["tiny"], "-o", tmp_path / "s.h5", *args)
        assert r.exit_code == 0, r.output
        assert r.stderr.count("8/8") == 1, r.stderr
    r = invoke("verify", checkpoints["tiny"], "--data", data, *MODEL, "--workers", 0)  # an audit: its own bar
    assert "verifying" in r.stderr and r.stderr.count("8/8") == 1, r.stderr


def test_the_suite_keeps_its_temporaries_where_a_passing_run_removes_them(tmp_path_factory):
    """Before: a passing `make test` left torchrun's torchelastic_* folders (and torch's caches) in /tmp."""
    import tempfile
    from pathlib import Path

    base = tmp_path_factory.getbasetemp()
    assert Path(tempfile.gettempdir()).is_relative_to(base)
    assert Path(os.environ["TMPDIR"]).is_relative_to(base)
    assert tmp_path_factory._retention_policy == "failed"  # pyproject.toml: removed when every test passes


def test_per_class_statistics_whose_classes_outnumber_class_sum_are_one_line(classes, checkpoints, tmp_path):
    """Before: `classes` longer than `class_sum` was read as is: centers wrote 2 rows under 3 class names,
    exit 0."""
    stats = tmp_path / "s.h5"
    r = invoke("compute-stats", classes, *MODEL, "--weights", checkpoints["tiny"], "-o", stats, *SMALL, "--per-class")
    assert r.exit_code == 0, r.output
    with h5py.File(stats, "r+") as f:
        f.attrs["classes"] = json.dumps(["cat", "dog", "ghost"])
    r = invoke("centers", stats, "--layer", "features.3", "-o", tmp_path / "c.pt")
    one_line_error(r, "class_sum (2, 4) and class_count (2,) do not match the 3 classes")
    r = invoke("apply", checkpoints["tiny"], "--stats", stats, "--weighting", "class", "-o", tmp_path / "n.pth", *MODEL)
    one_line_error(r, "do not match the 3 classes")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's decoders (see decode_jpegs)
def test_device_decoding_skips_the_same_elongated_images_as_the_cpu_decoder(data):
    """Before: --decode gpu read a 20000x1 PNG (PIL) or JPEG (the device) and resized it on the GPU unbounded."""

    from PIL import Image

    from vggnorm.io.data import default_transform, find_images, make_loader
    from vggnorm.options import Decoder

    Image.new("RGB", (20000, 1), (200, 10, 10)).save(data / "strip.png")
    Image.new("RGB", (1, 20000), (10, 200, 10)).save(data / "strip.jpg", "JPEG")
    files = find_images(data)
    transform = default_transform(TINY["tiny"], resize=40, crop=32)
    for decoder in Decoder:
        batches = list(
            make_loader(files, transform, decoder=decoder, batch_size=4, workers=0, device=torch.device("cpu"))
        )
        failures = {files[i].name: reason for b in batches for i, reason in b.failures}
        assert sorted(failures) == ["strip.jpg", "strip.png"], (decoder, failures)
        assert all(r.startswith("too large once resized") for r in failures.values()), failures
        assert sum(len(b.indices) for b in batches) == 8


def test_the_docs_table_names_exactly_the_tests_of_this_file():
    """Each row of "What vggnorm guarantees against bad input" (docs/reference/guarantees.md) names a test of
    this file, and each test of this file is named there."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "guarantees.md").read_text()
    section = page.split("## What vggnorm guarantees against bad input", 1)[1].split("\n#", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    here = set(re.findall(r"^def (test_\w+)", Path(__file__).read_text(), flags=re.M))
    assert named and named <= here, sorted(named - here)
    assert here - named == {"test_the_docs_table_names_exactly_the_tests_of_this_file"}, sorted(here - named)


# --- C, continued: reports, figures, inspect -----------------------------------------------------------------


def test_apply_never_writes_over_another_checkpoints_report_even_with_force(made, tmp_path):
    """Before: `apply -o x.safetensors --force` replaced x.pth's report, which verify reads as x.pth's policy."""
    out = tmp_path / "x.pth"
    r = invoke("apply", made["ckpt"], "--stats", made["stats"], "-o", out, *MODEL)
    assert r.exit_code == 0, r.output
    report = tmp_path / "x.report.json"
    before = report.read_text()
    r = invoke("apply", made["ckpt"], "--stats", made["stats"], "-o", tmp_path / "x.safetensors", "--force", *MODEL)
    assert r.exit_code == 1 and "is the report of" in r.stderr and "Traceback" not in r.output, r.output
    assert report.read_text() == before and not (tmp_path / "x.safetensors").exists()


def test_a_fold_failure_names_the_element_and_both_values():
    """Before: a bias zeroed where the fold gives 0 read `fold 8.51e+35`, a figure nobody can use."""
    from vggnorm.core.checks import check_fold

    expected = {"b": torch.tensor([0.0, 0.25, -0.5])}
    check = check_fold({"b": torch.tensor([0.125, 0.25, -0.5])}, expected)
    assert check.status == "fail" and "element [0] is 0.125 where the fold gives 0" in check.detail


def test_inspect_names_gatys_layers_only_for_chains_and_says_a_repeated_refusal_once():
    """Before: resnet18's convs were called conv2_18 and the like; mobilenet_v2's one refusal was printed 35 times."""
    r = invoke("inspect", "resnet18")
    assert r.exit_code == 0 and "conv2_" not in r.output and "conv1_1" not in r.output
    r = invoke("inspect", "mobilenet_v2")
    assert r.exit_code == 1 and r.output.count("REFUSED") == 1 and "the same at 34 other node(s)" in r.output
    assert "output: unchanged" not in r.output
    r = invoke("inspect", "vgg11")
    assert r.exit_code == 0 and "conv1_1" in r.output


def test_verify_names_its_figure_and_the_reports_read_as_text(made, tmp_path):
    """Before: verify wrote its .png without a word, and the Markdown report printed the policy as a Python dict."""
    report = tmp_path / "r"
    r = invoke("verify", made["out"], "--data", made["data"], "--report", report, "--workers", 0, *MODEL)
    assert r.exit_code == 0, r.output
    assert "r.png" in r.stdout and (tmp_path / "r.png").exists()
    md = (tmp_path / "r.md").read_text()
    assert "{'" not in md and "  - preprocess: `torchvision`" in md
    applied = made["out"].with_name("n.report.md").read_text()  # apply's: the policy it recorded
    assert "{'" not in applied and "- policy:\n" in applied and "  - weighting: `image`" in applied


def test_the_figure_shows_each_live_filters_distance_from_one_and_draws_no_dead_filter(monkeypatch, tmp_path):
    """Before: the 'after' panel was a flat line at 1 on a ten-decade axis, and dead filters were red crosses at
    a fixed floor that looked measured."""
    import matplotlib.pyplot as plt

    from vggnorm.io.figures import plot_means

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    before = {"a": torch.tensor([0.5, 2.0, 0.0]), "b": torch.tensor([1.5, 0.25])}
    after = {"a": torch.tensor([1.0 + 2e-4, 1.0 - 5e-5, 0.0]), "b": torch.tensor([1.0, 1.0 + 1e-5])}
    plot_means(before, after, {"a": [2], "b": []}, tmp_path / "f.png", title="t", after_label="after")
    fig = figures[0]
    top, bottom = fig.axes[0], fig.axes[1]
    assert bottom.get_ylabel() == "|mean - 1|"
    plotted = [float(y) for c in bottom.collections for _, y in c.get_offsets()]
    assert sorted(plotted) == pytest.approx(sorted([2e-4, 5e-5, 1e-18, 1e-5]), rel=1e-2)  # no dead filter
    assert all(float(y) > 0.1 for c in top.collections for _, y in c.get_offsets())  # the dead 0 is not drawn
    assert any("1 dead" in t.get_text() for t in top.texts)


# --- F: a user model is its file, whatever the spelling; the weights' path is recorded resolved too ----------


def test_a_user_model_is_its_resolved_file_under_any_spelling_and_the_weights_path_is_recorded_resolved(
    data, checkpoints, tmp_path, monkeypatch
):
    from vggnorm.io import models

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "m.py").write_text("from lookalikes import TinyVGG\n\n\ndef Net():\n    return TinyVGG()\n")
    (a / "w.pth").write_bytes(checkpoints["tiny"].read_bytes())  # the look-alike's weights fit Net
    key = f"{(a / 'm.py').resolve()}:Net"

    def new_process():  # each command imports --model afresh, as a new process does
        for k in [k for k in models._USER_MODELS if k.endswith(":Net")]:
            del models._USER_MODELS[k]

    monkeypatch.chdir(a)
    r = invoke("compute-stats", data, "--model", "m.py:Net", "--weights", "w.pth", "-o", "t.h5", *SMALL)
    assert r.exit_code == 0, r.output
    m = read_stats(a / "t.h5").provenance
    assert (m.arch, m.weights, m.weights_path) == (key, "w.pth", str((a / "w.pth").resolve()))

    monkeypatch.chdir(b)  # elsewhere, the same file spelled otherwise
    for spelling in ("./../a/m.py:Net", str(a / "m.py") + ":Net"):
        new_process()
        r = invoke("apply", "../a/w.pth", "--stats", "../a/t.h5", "-o", "n.pth", "--model", spelling, "--force")
        assert r.exit_code == 0, (spelling, r.output)
        new_process()
        r = invoke("verify", "n.pth", "--original", "../a/w.pth", "--stats", "../a/t.h5", "--model", spelling)
        assert r.exit_code == 0, (spelling, r.output)
    # other weights: the refusal says which file the statistics were measured on, wherever it runs
    new_process()
    r = invoke("apply", "random:1", "--stats", "../a/t.h5", "-o", "x.pth", "--model", "../a/m.py:Net")
    one_line_error(r, f"w.pth, i.e. {(a / 'w.pth').resolve()}")


# --- G: compare takes weights in any form and summarizes the live filters, as apply's report ----------------------------


def test_compare_takes_any_weight_spec_and_its_medians_are_apply_reports_over_live_filters(run, tmp_path):
    from vggnorm.commands.compare import compare_checkpoints
    from vggnorm.core.fold import DeadRule

    out, rule = tmp_path / "d.pth", ["--rel-eps", "0.5"]  # half of each layer's filters or so dead
    r = invoke("apply", run["ckpt"], "--stats", run["stats"], "-o", out, *rule, *MODEL)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d.report.json").read_text())["layers"]
    assert any(layer["dead"] for layer in report)
    result = compare_checkpoints(run["ckpt"], out, stats_path=run["stats"], rule=DeadRule(rel_eps=0.5))
    assert result.rescaling, result.broken
    for ours, theirs in zip(result.layers, report, strict=True):
        assert ours.conv == theirs["conv"] and ours.dead == len(theirs["dead"])
        for key, value in (("median", ours.median), ("min", ours.low), ("max", ours.high)):
            assert value == pytest.approx(theirs[key], rel=1e-6), (ours.conv, key)
    # the look-alike's random:0 is the checkpoint's weights: compare takes it as apply does
    r = invoke("compare", "random:0", out, "--stats", run["stats"], *rule, *MODEL)
    assert r.exit_code == 0 and "is a positive per-filter rescaling of random:0" in r.stdout, r.output
    assert "dead)" in r.stdout and "live filters" in r.stdout, r.stdout
    r = invoke("compare", out, "random:1", *MODEL)
    assert r.exit_code == 1 and "NOT a rescaling" in r.stdout, r.output


# --- H: random:SEED is built once, without torchvision's import or its discarded default initialization -----


def test_random_weights_are_torchvisions_seeded_init_built_without_importing_torchvision(monkeypatch):
    import sys

    import torchvision

    from vggnorm.io.checkpoint import state_dict_sha256
    from vggnorm.io.weights import random_state_dict

    state = torch.random.get_rng_state()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchvision", None)  # importing it raises: random:SEED must not need it (1.7 s)
        ours = random_state_dict("vgg11_bn", 0)
    assert torch.equal(torch.random.get_rng_state(), state), "the global generator moved"
    torch.manual_seed(0)
    theirs = torchvision.models.vgg11_bn(weights=None).state_dict()
    torch.random.set_rng_state(state)
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    assert state_dict_sha256(ours) == state_dict_sha256(theirs)  # random:0's recorded hash is unchanged


def test_applys_loads_check_needs_no_torchvision_and_still_fails_a_missing_key(monkeypatch):
    """apply's ``loads`` check builds a torchvision VGG as vggnorm's VGG (its keys and shapes are torchvision's: tests/test_models.py), so
    apply of a VGG never imports torchvision (1.2 s of its run); a key missing still fails it, naming the key."""
    import sys

    from vggnorm.commands.apply import check_loads
    from vggnorm.io.models import VGG

    with torch.device("meta"):
        state = VGG("vgg11_bn").state_dict()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it raises
    assert check_loads(state, "vgg11_bn", features_only=False).status == "pass"
    del state["features.1.running_var"]
    failed = check_loads(state, "vgg11_bn", features_only=False)
    assert failed.status == "fail" and "features.1.running_var" in failed.detail


def test_verify_preprocesses_in_float64_when_asked_for_fp64(made, monkeypatch):
    """Before: verify's --precision fp64 re-measurement preprocessed its images in float32."""
    from vggnorm.io import data as data_mod

    dtypes = []
    real = data_mod.make_loader

    def recording(*args, **kwargs):
        dtypes.append(kwargs.get("dtype", torch.float32))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "make_loader", recording)
    r = invoke("verify", made["out"], "--data", made["data"], "--precision", "fp64", "--workers", 0, *MODEL)
    assert r.exit_code == 0, r.output
    assert dtypes == [torch.float64]


def test_an_interrupt_while_apply_writes_leaves_nothing_and_is_one_line(made, tmp_path, monkeypatch):
    """Ctrl-C while the checkpoint is being written: no output, no temporary, no traceback."""
    import vggnorm.commands.apply

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vggnorm.commands.apply, "write_state_dict", interrupted)
    r = invoke("apply", made["ckpt"], "--stats", made["stats"], "-o", tmp_path / "n.pth", *MODEL)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []
