"""The options with named values: one enum each, the same choices on the command line, in the API and in
the files, converted once at each boundary."""

import json
import subprocess
import sys

import pytest
import torch

import vggnorm
from conftest import invoke
from vggnorm.cli import EnumChoice, cli
from vggnorm.core.provenance import MeasurementRecord
from vggnorm.errors import UsageError
from vggnorm.io.data import ImageTransform, Measurement
from vggnorm.io.models import ForwardPolicy
from vggnorm.io.policy import Overrides, resolve_policy
from vggnorm.io.statsfile import read_stats, write_stats
from vggnorm.options import (
    Decoder,
    InputConvention,
    Interpolation,
    Layout,
    Padding,
    Pooling,
    Precision,
    StreamScale,
    Weighting,
)

# (command, option, the enum whose values it offers)
CHOICES = [
    ("compute-stats", "--preprocess", InputConvention),
    ("compute-stats", "--pooling", Pooling),
    ("compute-stats", "--padding", Padding),
    ("compute-stats", "--precision", Precision),
    ("compute-stats", "--decode", Decoder),
    ("apply", "--layout", Layout),
    ("apply", "--weighting", Weighting),
    ("apply", "--stream-scale", StreamScale),
    ("verify", "--preprocess", InputConvention),
    ("verify", "--pooling", Pooling),
    ("verify", "--padding", Padding),
    ("verify", "--weighting", Weighting),
    ("verify", "--stream-scale", StreamScale),
]


def _param(command, flag):
    (param,) = [p for p in cli.commands[command].params if flag in p.opts]
    return param


@pytest.mark.parametrize(("command", "flag", "kind"), CHOICES)
def test_the_command_line_offers_each_enums_values(command, flag, kind):
    param = _param(command, flag)
    assert isinstance(param.type, EnumChoice)
    assert [param.type.normalize_choice(c, None) for c in param.type.choices] == [m.value for m in kind]
    for member in kind:  # each value converts to its member
        assert param.type.convert(member.value, param, None) is member


def test_verify_offers_the_precisions_that_run_on_cpu():
    param = _param("verify", "--precision")
    assert [param.type.normalize_choice(c, None) for c in param.type.choices] == ["fp32", "fp64"]


@pytest.mark.parametrize(("command", "flag", "kind"), CHOICES)
def test_a_bad_value_is_a_usage_error_naming_the_choices(tmp_path, command, flag, kind):
    (tmp_path / "s.h5").touch()
    args = {
        "compute-stats": [tmp_path],
        "apply": ["random:0", "--stats", tmp_path / "s.h5"],
        "verify": [tmp_path / "s.h5"],
    }
    r = invoke(command, *args[command], flag, "bogus")
    assert r.exit_code == 2, r.output
    choices = ", ".join(repr(m.value) for m in kind)
    assert f"Invalid value for '{flag}': 'bogus' is not one of {choices}." in r.stderr, r.stderr


def test_the_command_line_hands_the_library_members(monkeypatch, tmp_path):
    import vggnorm.commands.compute as compute

    seen = {}

    def fake(directory, output, config, **kwargs):
        seen["config"] = config
        raise UsageError("stop here")

    monkeypatch.setattr(compute, "compute_stats", fake)
    args = [
        "--pooling",
        "avg",
        "--padding",
        "reflect",
        "--precision",
        "fp64",
        "--decode",
        "gpu",
        "--preprocess",
        "caffe",
    ]
    r = invoke("compute-stats", tmp_path, *args)
    assert r.exit_code == 2 and "stop here" in r.stderr
    config = seen["config"]
    assert config.forward == ForwardPolicy(Pooling.AVG, Padding.REFLECT)
    assert type(config.forward.pooling) is Pooling and type(config.forward.padding) is Padding
    assert config.precision is Precision.FP64 and config.decoder is Decoder.GPU
    assert config.convention is InputConvention.CAFFE
    invoke("compute-stats", tmp_path)
    defaults = seen["config"]
    assert defaults.forward == ForwardPolicy() and defaults.precision is Precision.FP32 and defaults.convention is None


def test_the_api_takes_a_member_or_its_string(tiny_vgg):
    model = tiny_vgg()
    batches = [torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))]
    by_name = vggnorm.measure_means(model, batches, precision="fp64")
    by_member = vggnorm.measure_means(model, batches, precision=Precision.FP64)
    assert all(torch.equal(by_name.layers[k].sum, by_member.layers[k].sum) for k in by_name.layers)
    a = vggnorm.scales(model, by_name, stream_scale="last")
    b = vggnorm.scales(model, by_name, stream_scale=StreamScale.LAST)
    assert all(torch.equal(a[k].scale, b[k].scale) for k in a)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: vggnorm.measure_means(m, [], precision="fp128"), "precision 'fp128': expected one of fp32, fp64"),
        (
            lambda m, s: vggnorm.scales(m, s, stream_scale="mean"),
            "stream_scale 'mean': expected one of geometric, last",
        ),
        (lambda m, s: vggnorm.normalize_model(m, s, stream_scale="MEAN"), "stream_scale 'MEAN': expected one of"),
        (
            lambda m, s: vggnorm.measure_folder(m, ".", convention="bgr"),
            "convention 'bgr': expected one of torchvision",
        ),
        (lambda m, s: vggnorm.measure_folder(m, ".", decoder="nvjpeg"), "decoder 'nvjpeg': expected one of cpu, gpu"),
    ],
)
def test_the_api_refuses_a_bad_value_naming_the_choices(tiny_vgg, call, message):
    model = tiny_vgg()
    stats = vggnorm.measure_means(model, [torch.randn(2, 3, 24, 24)])
    with pytest.raises(UsageError, match=message):
        call(model, stats)


def test_the_recorded_policy_is_the_same_strings():
    """What the statistics and apply's record hold: plain strings, as before the options were enums."""
    m = Measurement(
        ImageTransform(40, 32, Interpolation.BICUBIC, (1.0, 2.0, 3.0), (1.0, 1.0, 1.0)),
        InputConvention.MATCONVNET,
        ForwardPolicy(Pooling.AVG, Padding.REFLECT),
        Decoder.GPU,
    )
    attrs = m.as_attrs()
    assert attrs == {
        "resize": 40,
        "crop": 32,
        "interpolation": "bicubic",
        "mean": (1.0, 2.0, 3.0),
        "std": (1.0, 1.0, 1.0),
        "preprocess": "matconvnet",
        "pooling": "avg",
        "decode": "gpu",
        "padding": "reflect",
    }
    assert all(type(v) is str for v in attrs.values() if isinstance(v, str))
    assert Measurement.from_attrs(attrs) == m


# The measurement policy as vggnorm wrote it before its options were enums: ``dataclasses.asdict`` of
# ``io.data.Preprocess`` (the same keys, in this order); files from before --padding and --decode lack those two.
BEFORE = {
    "resize": 40,
    "crop": 32,
    "interpolation": "bilinear",
    "mean": (103.939, 116.779, 123.68),
    "std": (1.0, 1.0, 1.0),
    "preprocess": "caffe",
    "pooling": "avg",
    "decode": "cpu",
    "padding": "reflect",
}


@pytest.mark.parametrize("older", [False, True])
def test_a_statistics_file_written_before_reads_the_same(tiny_vgg, tmp_path, older):
    stats = vggnorm.measure_means(tiny_vgg(), [torch.randn(2, 3, 24, 24)])
    stats.provenance = MeasurementRecord(
        arch="vgg11",
        precision="fp64",
        preprocess={k: v for k, v in BEFORE.items() if not (older and k in ("decode", "padding"))},
    )
    write_stats(stats, tmp_path / "s.h5", force=False)
    back = read_stats(tmp_path / "s.h5")
    policy = resolve_policy(tmp_path / "n.pth", back, "vgg11")
    m = policy.measurement
    assert m.transform == ImageTransform(40, 32, Interpolation.BILINEAR, BEFORE["mean"], (1.0, 1.0, 1.0))
    assert m.convention is InputConvention.CAFFE and m.decoder is Decoder.CPU
    assert m.forward == ForwardPolicy(Pooling.AVG, Padding.ZEROS if older else Padding.REFLECT)
    assert type(m.forward.pooling) is Pooling and type(m.transform.interpolation) is Interpolation
    assert policy.describe().startswith("resize 40, crop 32, caffe preprocessing, avg pooling")
    with pytest.raises(Exception, match="differs from the statistics' pooling avg"):
        resolve_policy(tmp_path / "n.pth", back, "vgg11", Overrides(pooling=Pooling.MAX))


def test_a_report_apply_wrote_before_reads_the_same(tmp_path):
    recorded = {
        **BEFORE,
        "rel_eps": 0.01,
        "eps": 1e-6,
        "include_classifier": False,
        "weighting": "class",
        "label_source": "folders",
        "stream_scale": "last",
    }
    (tmp_path / "n.report.json").write_text(json.dumps({"checkpoint": "n.pth", "inputs": {"policy": recorded}}))
    policy = resolve_policy(tmp_path / "n.pth", None, "vgg11")
    assert policy.weighting is Weighting.CLASS and policy.stream_scale is StreamScale.LAST
    assert policy.measurement == Measurement.from_attrs(BEFORE)
    assert policy.measurement.forward == ForwardPolicy(Pooling.AVG, Padding.REFLECT)
    # options override the record, each by its own field
    over = resolve_policy(tmp_path / "n.pth", None, "vgg11", Overrides(crop=24, padding=Padding.ZEROS))
    assert over.measurement.transform.crop == 24 and over.measurement.transform.resize == 40
    assert over.measurement.forward == ForwardPolicy(Pooling.AVG, Padding.ZEROS)
    assert over.measurement.convention is InputConvention.CAFFE


def test_importing_the_options_imports_no_torch():
    code = "import sys, vggnorm.options; assert 'torch' not in sys.modules and 'click' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cli_hands_verify_every_policy_override_and_only_those():
    """verify's command gathers its policy options into one ``Overrides`` (cli.OVERRIDES names them without
    importing torch): the names must be exactly its fields, or an option would be lost or fail at run time."""
    import dataclasses

    from vggnorm.cli import OVERRIDES, cli
    from vggnorm.io.policy import Overrides

    assert set(OVERRIDES) == {f.name for f in dataclasses.fields(Overrides)}
    params = {p.name for p in cli.commands["verify"].params}
    assert set(OVERRIDES) <= params
