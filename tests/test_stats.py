"""Statistics: the hook accumulator against a plain float64 computation, and the HDF5 file."""

import h5py
import pytest
import torch

from conftest import TINY
from vggnorm.analysis.topology import find_topology
from vggnorm.core.measure import Batch, ReluSums, measure
from vggnorm.core.provenance import MeasurementRecord
from vggnorm.core.stats import LayerStats, Stats
from vggnorm.errors import OutputExistsError, StatsFileError
from vggnorm.io.statsfile import FORMAT, read_stats, write_stats


def plain_means(model, x):
    """Independent float64 computation: run the layers one by one, average every ReLU output."""
    model = model.double()
    out, h = {}, x.double()
    conv = None
    for name, m in model.features.named_children():
        h = m(h)
        if isinstance(m, torch.nn.Conv2d):
            conv = f"features.{name}"
        if isinstance(m, torch.nn.ReLU):
            out[conv] = h.mean(dim=(0, 2, 3))
    return out


def run(model, x, batch_size):
    topo = find_topology(model)
    sums = ReluSums(topo.sites, torch.device("cpu"))
    batches = [
        Batch(x[i : i + batch_size], list(range(i, i + len(x[i : i + batch_size]))), [])
        for i in range(0, len(x), batch_size)
    ]
    measure(model, batches, sums, device=torch.device("cpu"))
    return Stats(sums.layers(), len(x))


@pytest.mark.parametrize("bn", [False, True])
def test_means_equal_plain_float64_computation(tiny_vgg, bn):
    x = torch.randn(10, 3, 24, 24)
    stats = run(tiny_vgg(bn=bn), x, batch_size=4)
    expected = plain_means(tiny_vgg(bn=bn), x)
    assert list(stats.layers) == list(expected)
    for name, mean in expected.items():
        torch.testing.assert_close(stats.layers[name].mean, mean, rtol=1e-5, atol=1e-7)
        assert stats.layers[name].sum.dtype == torch.float64


def test_batch_size_does_not_change_statistics(tiny_vgg):
    x = torch.randn(9, 3, 16, 16)
    a, b = run(tiny_vgg(), x, 1), run(tiny_vgg(), x, 9)
    assert [a.layers[n].count for n in a.layers] == [9 * 16 * 16, 9 * 8 * 8, 9 * 8 * 8, 9 * 4 * 4]
    for name in a.layers:
        assert a.layers[name].count == b.layers[name].count
        torch.testing.assert_close(a.layers[name].mean, b.layers[name].mean, rtol=1e-6, atol=1e-9)


def test_merge_is_exact(tiny_vgg):
    x = torch.randn(8, 3, 16, 16)
    whole, first, second = run(tiny_vgg(), x, 8), run(tiny_vgg(), x[:3], 3), run(tiny_vgg(), x[3:], 5)
    merged = first.merge(second)
    assert merged.num_images == 8
    for name in whole.layers:
        assert merged.layers[name].count == whole.layers[name].count
        torch.testing.assert_close(merged.layers[name].sum, whole.layers[name].sum, rtol=1e-6, atol=1e-6)


def sample_stats():
    layers = {
        "features.0": LayerStats(
            "features.0", "features.1", None, torch.tensor([1.5, 0.0, 3.25], dtype=torch.float64), 12
        ),
        "features.3": LayerStats("features.3", "features.5", "features.4", torch.tensor([7.0], dtype=torch.float64), 3),
    }
    return Stats(
        layers,
        2,
        MeasurementRecord(arch="vgg11", preprocess={"mean": (0.1, 0.2, 0.3), "crop": 224}),
        [("a/b.jpg", "cannot decode")],
    )


def test_hdf5_round_trip_and_schema(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(sample_stats(), path, force=False)
    with h5py.File(path) as f:  # readable with plain h5py: the documented schema
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == 1
        assert f["layers/features.0/sum"].dtype == "float64" and f["layers/features.0/count"][()] == 12
        assert f["layers/features.0/mean"][()].tolist() == [0.125, 0.0, 3.25 / 12]
        assert f["layers/features.3"].attrs["bn"] == "features.4"
        assert f["skipped/path"][0].decode() == "a/b.jpg"
    back = read_stats(path)
    assert back.layer_order == ["features.0", "features.3"] and back.num_images == 2
    assert back.skipped == [("a/b.jpg", "cannot decode")]
    assert back.provenance.preprocess["mean"] == (0.1, 0.2, 0.3) and back.provenance.arch == "vgg11"
    torch.testing.assert_close(back.layers["features.0"].sum, sample_stats().layers["features.0"].sum)


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(sample_stats(), path, force=False)
    with pytest.raises(OutputExistsError, match="--force"):
        write_stats(sample_stats(), path, force=False)
    write_stats(sample_stats(), path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temp file left behind


def test_read_refuses_foreign_incomplete_and_missing(tmp_path):
    with pytest.raises(StatsFileError, match="does not exist"):
        read_stats(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StatsFileError, match="not an HDF5"):
        read_stats(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["x"] = 1
    with pytest.raises(StatsFileError, match="not a vggnorm"):
        read_stats(tmp_path / "other.h5")
    s = sample_stats()
    s.complete, s.position = False, 1
    write_stats(s, tmp_path / "part.h5", force=False)
    with pytest.raises(StatsFileError, match="--resume"):
        read_stats(tmp_path / "part.h5")
    assert read_stats(tmp_path / "part.h5", allow_incomplete=True).position == 1


def test_reduced_precision_activations_are_summed_in_float64(tiny_vgg):
    """bf16 autocast (a CUDA option; autocast runs on CPU too) gives bf16 ReLU outputs: the hook
    still accumulates float32 per image and float64 overall, close to the fp32 statistics."""
    x = torch.randn(6, 3, 16, 16)
    exact = run(tiny_vgg(), x, 3)
    topo = find_topology(tiny_vgg())
    sums = ReluSums(topo.sites, torch.device("cpu"))
    batches = [Batch(x[i : i + 3], list(range(i, i + 3)), []) for i in (0, 3)]
    measure(tiny_vgg(), batches, sums, device=torch.device("cpu"), precision="bf16")
    for name, layer in Stats(sums.layers(), 6).layers.items():
        assert layer.sum.dtype == torch.float64
        torch.testing.assert_close(
            layer.mean, exact.layers[name].mean, rtol=5e-2, atol=5e-2 * float(exact.layers[name].mean.max())
        )


def test_reduced_precision_is_refused_on_cpu(tmp_path, photos):
    from click.testing import CliRunner

    from vggnorm.cli import cli

    r = CliRunner().invoke(
        cli,
        [
            "compute-stats",
            str(photos),
            "--model",
            TINY["tiny"],
            "--weights",
            "random:0",
            "--device",
            "cpu",
            "--precision",
            "fp16",
            "-o",
            str(tmp_path / "s.h5"),
        ],
    )
    assert r.exit_code == 1 and "--precision fp16 is for CUDA" in r.stderr
    assert not (tmp_path / "s.h5").exists()


def test_damaged_file_is_a_clear_error(tmp_path):
    write_stats(sample_stats(), tmp_path / "s.h5", force=False)
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        del f.attrs["num_images"]
        del f["layers/features.3/count"]
    with pytest.raises(StatsFileError, match="damaged"):
        read_stats(tmp_path / "s.h5")
