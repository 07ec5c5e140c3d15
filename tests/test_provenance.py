"""The provenance record: one typed, versioned record, the same through each of its three carriers (the
statistics file's attributes, the .safetensors metadata, the report), refused by field when damaged, and
what the previous release wrote still reads."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vggnorm.core.fold import DeadRule
from vggnorm.core.provenance import MeasurementRecord, Versions
from vggnorm.core.stats import LayerStats, Stats
from vggnorm.errors import StatsFileError
from vggnorm.io.data import ImageTransform, Measurement
from vggnorm.io.models import ForwardPolicy
from vggnorm.io.policy import recorded_provenance, report_base
from vggnorm.io.provenance import (
    PROVENANCE_VERSION,
    Normalization,
    Provenance,
    from_metadata,
    from_report,
    record_fields,
    to_metadata,
)
from vggnorm.io.report import Report
from vggnorm.io.statsfile import read_stats, write_stats
from vggnorm.options import Padding, Pooling, Weighting

SHA = "48977a87e2002b5d1b252040957ba1795b7ba293b60ae059d49695a966a118d3"
POLICY = Measurement(ImageTransform(resize=40, crop=32), forward=ForwardPolicy(Pooling.AVG, Padding.REFLECT)).as_attrs()


def measurement(**changes: object) -> MeasurementRecord:
    fields: dict[str, object] = {
        "arch": "vgg11",
        "weights": "w.pth",
        "weights_path": "/data/w.pth",
        "weights_sha256": SHA,
        "preprocess": POLICY,
        "dataset": "photos",
        "dataset_fingerprint": "f" * 64,
        "dataset_num_files": 12,
        "num_files": 4,
        "shard": "1/3",
        "merged_from": ("a.h5", "b.h5"),
        "include_classifier": True,
        "per_class": True,
        "label_source": "labels.txt",
        "labels_sha256": "e" * 64,
        "precision": "fp64",
        "batch_size": 3,
        "device": "cpu",
        "created": "2026-01-01T00:00:00+00:00",
        "versions": Versions("0.1.0", "2.14.1", "0.29.1"),
        **changes,
    }
    return MeasurementRecord(**fields)  # type: ignore[arg-type]


def record() -> Provenance:
    return Provenance(
        arch="vgg11",
        normalization=Normalization(
            preprocess=measurement().preprocess,
            rule=DeadRule(rel_eps=0.01, eps=1e-5),
            include_classifier=True,
            weighting=Weighting.CLASS,
            label_source="labels.txt",
            stream_scale="last",
        ),
        measurement=measurement(),
        layout="gatys",
        original="w.pth",
        original_sha256=SHA,
        stats="s.h5",
        created="2026-01-02T00:00:00+00:00",
        vggnorm_version="0.1.0",
    )


def stats_with(provenance: MeasurementRecord) -> Stats:
    layer = LayerStats("features.0", "features.1", None, torch.tensor([1.0, 2.0], dtype=torch.float64), 4)
    return Stats({"features.0": layer}, 2, provenance)


# --- the same record through each carrier ------------------------------------------------------------------


def test_the_statistics_file_carries_the_measurement(tmp_path):
    write_stats(stats_with(measurement()), tmp_path / "s.h5", force=False)
    assert read_stats(tmp_path / "s.h5").provenance == measurement()


def test_the_safetensors_metadata_and_the_report_carry_the_same_record(tmp_path):
    assert all(isinstance(v, str) for v in to_metadata(record()).values())
    assert from_metadata(to_metadata(record()), "m") == record()
    report = Report("n.pth", "vgg11", [], inputs={**record_fields(record()), "stats_images": 2})
    (tmp_path / "n.report.json").write_text(report.to_json())
    assert from_report(json.loads((tmp_path / "n.report.json").read_text()), "r") == record()


def test_verify_finds_the_record_beside_either_kind_of_checkpoint(tmp_path):
    st = tmp_path / "n.safetensors"
    save_file({"w": torch.ones(1)}, st, metadata=to_metadata(record()))
    assert recorded_provenance(st) == (record(), f"{st} (safetensors metadata)")
    pth = tmp_path / "n.pth"
    report = report_base(pth).with_suffix(".report.json")
    report.write_text(json.dumps({"arch": "vgg11", "inputs": record_fields(record())}))
    assert recorded_provenance(pth) == (record(), str(report))


def test_a_model_without_residual_streams_records_no_stream_policy():
    plain = Provenance("vgg11", Normalization(preprocess=POLICY))
    assert "stream_scale" not in record_fields(plain)["policy"]  # type: ignore[operator]
    assert from_metadata(to_metadata(plain), "m") == plain


# --- a damaged or edited record: one error naming the field -----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("provenance_version", "2", "provenance_version is 2; this vggnorm reads version 1"),
        ("provenance_version", '"1"', "provenance_version is '1'"),
        ("measurement", "{not json", "measurement is not JSON"),
        ("measurement", "[1]", "measurement is [1]; expected a mapping"),
        ("measurement", '{"num_files": -4}', "measurement: num_files is -4"),
        ("measurement", '{"labels_sha256": 7}', "measurement: labels_sha256 is 7; expected text"),
        ("measurement", '{"crop": "abc"}', "measurement: crop is 'abc'"),
        ("policy", '{"weighting": "pixel"}', "policy: weighting is 'pixel'; expected one of"),
        ("original_sha256", None, "original_sha256 is 5; expected text"),
    ],
)
def test_a_damaged_field_of_the_safetensors_metadata_is_named(field, value, words):
    meta = to_metadata(record())
    if value is None:  # a field that is text in the metadata, damaged in the report (below)
        with pytest.raises(StatsFileError, match="r: original_sha256 is 5; expected text"):
            from_report({"arch": "vgg11", "inputs": {**record_fields(record()), field: 5}}, "r")
        return
    meta[field] = value
    with pytest.raises(StatsFileError, match=re.escape(f"m: {words}")) as e:
        from_metadata(meta, "m")
    assert "vggnorm apply" in str(e.value)  # and what to do


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("provenance_version", 2, "provenance_version is 2"),
        ("measurement", {"weights_sha256": None}, "measurement: weights_sha256 is None; expected text"),
        ("measurement", {"add_affine": "False"}, "measurement: add_affine is 'False'; expected a boolean"),
        ("policy", {"rel_eps": -1}, "policy: rel_eps is -1; expected a finite number >= 0"),
    ],
)
def test_a_damaged_field_of_the_report_is_named(field, value, words):
    inputs = {**record_fields(record()), field: value}
    with pytest.raises(StatsFileError, match=re.escape(f"r: {words}")):
        from_report({"arch": "vgg11", "inputs": inputs}, "r")


def test_a_report_that_does_not_parse_or_lost_its_policy_is_an_error_not_the_defaults(tmp_path):
    """A damaged report beside a .pth is one error, as damaged metadata is: it was taken for no record, and
    verify then measured under the default policy (resize 256, crop 224) without a word."""
    pth = tmp_path / "n.pth"
    report = report_base(pth).with_suffix(".report.json")
    report.write_text(json.dumps({"arch": "vgg11", "inputs": record_fields(record())})[:-20])
    with pytest.raises(StatsFileError, match=re.escape(f"{report}: not JSON")) as e:
        recorded_provenance(pth)
    assert "vggnorm apply" in str(e.value)
    report.write_text(json.dumps({"arch": "vgg11", "inputs": {**record_fields(record()), "policy": None}}))
    with pytest.raises(StatsFileError, match=re.escape(f"{report}: policy")):
        recorded_provenance(pth)
    # a report that is not apply's (verify's own, whose policy is words) is still no record
    report.write_text(json.dumps({"arch": "vgg11", "inputs": {"policy": "resize 256, crop 224"}}))
    assert recorded_provenance(pth) is None


def test_a_damaged_record_with_statistics_given_does_not_say_to_give_the_statistics(tmp_path):
    """With --stats, a damaged record is still an error (it holds apply's dead rule), whose advice cannot be to
    give --stats, which was given."""
    from vggnorm.io.policy import resolve_policy

    write_stats(stats_with(measurement(arch="vgg11")), tmp_path / "s.h5", force=False)
    pth = tmp_path / "n.pth"
    report_base(pth).with_suffix(".report.json").write_text("{not json")
    with pytest.raises(StatsFileError) as e:
        resolve_policy(pth, None, "vgg11")
    assert "give verify the statistics (--stats)" in str(e.value)
    with pytest.raises(StatsFileError) as e:
        resolve_policy(pth, read_stats(tmp_path / "s.h5"), "vgg11")
    assert "--stats)" not in str(e.value) and "move it away and give those as options" in str(e.value)


def test_a_damaged_attribute_of_the_statistics_file_is_named(tmp_path):
    write_stats(stats_with(measurement()), tmp_path / "s.h5", force=False)
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        f.attrs["labels_sha256"] = np.int64(3)
    with pytest.raises(StatsFileError, match="labels_sha256 is 3; expected text"):
        read_stats(tmp_path / "s.h5")


# --- what the previous release wrote still reads ----------------------------------------------------------

# apply's .safetensors metadata and report inputs as vggnorm 0.1.0 wrote them before the record had a
# version (copied from files it wrote, but for the paths)
OLD_POLICY = {
    "resize": 40,
    "crop": 32,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "preprocess": "torchvision",
    "pooling": "max",
    "decode": "cpu",
    "padding": "model",
    "rel_eps": 0.001,
    "eps": 1e-06,
    "include_classifier": False,
    "weighting": "image",
    "label_source": "",
}
OLD_METADATA = {
    "vggnorm_version": "0.1.0",
    "arch": "vgg11",
    "policy": json.dumps(OLD_POLICY),
    "original_sha256": SHA,
    "layout": "torchvision",
    "pooling": "max",
    "original": "random:0",
    "stats": "s.h5",
    "include_classifier": "False",
    "preprocess": "torchvision",
}
OLD_INPUTS = {
    "original": "random:0",
    "original_sha256": SHA,
    "stats": "s.h5",
    "stats_images": 8,
    "dead_rule": "mean <= max(1e-06, 0.001 x the layer's median positive mean)",
    "float32_bound_filters": {},
    "features_only": False,
    "layout": "torchvision",
    "include_classifier": False,
    "policy": OLD_POLICY,
    "created": "2026-11-30T05:14:59+00:00",
    "vggnorm_version": "0.1.0",
}


def test_a_record_of_the_previous_release_reads_as_version_1():
    preprocess = Measurement(
        ImageTransform(resize=40, crop=32), forward=ForwardPolicy(padding=Padding.MODEL)
    ).as_attrs()
    expected = Provenance(
        arch="vgg11",
        normalization=Normalization(preprocess=preprocess),
        original="random:0",
        original_sha256=SHA,
        stats="s.h5",
        vggnorm_version="0.1.0",
    )
    assert from_metadata(OLD_METADATA, "m") == expected
    assert from_report({"arch": "vgg11", "inputs": OLD_INPUTS}, "r") == Provenance(
        **{**expected.__dict__, "created": "2026-11-30T05:14:59+00:00"}
    )
    assert expected.version == PROVENANCE_VERSION and expected.normalization.rule == DeadRule()
    assert from_metadata(OLD_METADATA, "m").measurement is None  # type: ignore[union-attr]


def test_a_statistics_file_of_the_previous_release_reads_and_writes_back_the_same(tmp_path):
    """Root attributes as vggnorm 0.1.0's compute-stats wrote them (copied from a file it wrote)."""
    old = {
        "add_affine": np.False_,
        "arch": "vgg11",
        "batch_size": np.int64(32),
        "complete": np.True_,
        "created": "2026-11-30T05:14:29+00:00",
        "crop": np.int64(32),
        "dataset": "/tmp/photos",
        "dataset_fingerprint": "9b29bd533b85c38d02d9af20fa5304a3ddb6b44ebc666bf15d566b2481ba4fd0",
        "dataset_num_files": np.int64(8),
        "decode": "cpu",
        "device": "cpu",
        "format": "vggnorm.stats",
        "format_version": np.int64(1),
        "include_classifier": np.False_,
        "interpolation": "bilinear",
        "label_source": "",
        "labels_sha256": "",
        "layer_order": '["features.0"]',
        "limit": np.int64(-1),
        "mean": np.array([0.485, 0.456, 0.406]),
        "num_files": np.int64(8),
        "num_images": np.int64(8),
        "num_skipped": np.int64(0),
        "padding": "model",
        "per_class": np.False_,
        "pooling": "max",
        "position": np.int64(8),
        "precision": "fp32",
        "preprocess": "torchvision",
        "resize": np.int64(40),
        "shard": "",
        "std": np.array([0.229, 0.224, 0.225]),
        "torch_version": "2.14.1+cu130",
        "torchvision_version": "0.29.1+cu130",
        "vggnorm_version": "0.1.0",
        "weights": "random:0",
        "weights_format": "",
        "weights_path": "",
        "weights_sha256": SHA,
        "world_size": np.int64(1),
    }
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs.update(old)
        g = f.create_group("layers/features.0")
        g.create_dataset("sum", data=np.array([1.0, 2.0]))
        g.create_dataset("count", data=np.int64(4))
        g.create_dataset("mean", data=np.array([0.25, 0.5]))
        g.attrs["relu"] = "features.1"
    m = read_stats(tmp_path / "old.h5").provenance
    assert (m.arch, m.weights_sha256, m.dataset_num_files, m.batch_size) == ("vgg11", SHA, 8, 32)
    assert m.versions == Versions("0.1.0", "2.14.1+cu130", "0.29.1+cu130")
    assert Measurement.from_attrs(m.preprocess) == Measurement(
        ImageTransform(resize=40, crop=32), forward=ForwardPolicy(padding=Padding.MODEL)
    )
    write_stats(read_stats(tmp_path / "old.h5"), tmp_path / "new.h5", force=False)
    with h5py.File(tmp_path / "new.h5") as f:
        new = {k: f.attrs[k] for k in f.attrs}
    assert set(new) == set(old)
    for key, value in old.items():
        assert type(new[key]) is type(value) and np.array_equal(new[key], value), key


def test_a_statistics_file_from_before_the_optional_fields_reads_with_their_defaults(tmp_path):
    """The first files had no weights_format, padding or add_affine (all optional when reading)."""
    with h5py.File(tmp_path / "first.h5", "w") as f:
        f.attrs.update({"format": "vggnorm.stats", "format_version": 1, "num_images": 2, "arch": "vgg11"})
        f.attrs["layer_order"] = '["features.0"]'
        g = f.create_group("layers/features.0")
        g.create_dataset("sum", data=np.array([1.0]))
        g.create_dataset("count", data=np.int64(2))
        g.attrs["relu"] = "features.1"
    assert read_stats(tmp_path / "first.h5").provenance == MeasurementRecord(arch="vgg11")
