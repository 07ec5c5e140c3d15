"""compute-stats --shard I/N and merge-stats: shards merge to exactly one run's statistics."""

import h5py
import numpy as np
import pytest

from conftest import TINY, invoke
from test_data import bad_files  # noqa: I001
from vggnorm.io.statsfile import read_stats

# batch size 1: each image's float32 partial sums are then the same whichever shard it lands in
OPTIONS = "--weights random:0 --resize 40 --crop 32 --workers 0 --batch-size 1 --no-progress"
BASE = ["--model", TINY["tiny"], *OPTIONS.split()]


@pytest.fixture(scope="module")
def runs(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    data = d / "data"
    data.mkdir()
    for p in photos.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    bad_files(data)
    assert invoke("compute-stats", data, *BASE, "-o", d / "full.h5").exit_code == 0
    for i in range(3):
        r = invoke("compute-stats", data, *BASE, "--shard", f"{i}/3", "-o", d / f"s{i}.h5")
        assert r.exit_code == 0, r.output
    return d, data


def test_three_shards_merge_to_the_single_run(runs):
    d, _ = runs
    shards = [read_stats(d / f"s{i}.h5") for i in range(3)]
    assert sum(s.provenance.num_files for s in shards) == 12 and {s.provenance.shard for s in shards} == {
        "0/3",
        "1/3",
        "2/3",
    }
    r = invoke("merge-stats", d / "s2.h5", d / "s0.h5", d / "s1.h5", "-o", d / "all.h5")
    assert r.exit_code == 0, r.output
    full, merged = read_stats(d / "full.h5"), read_stats(d / "all.h5")
    assert merged.num_images == full.num_images == 8
    assert merged.skipped == sorted(full.skipped)
    for name in full.layers:
        assert merged.layers[name].count == full.layers[name].count
        np.testing.assert_allclose(merged.layers[name].mean.numpy(), full.layers[name].mean.numpy(), rtol=1e-9, atol=0)
    with h5py.File(d / "all.h5") as f:
        assert f.attrs["shard"] == "" and f.attrs["num_files"] == 12


def test_merge_refusals(runs, tmp_path):
    d, data = runs
    s = [d / f"s{i}.h5" for i in range(3)]

    def refused(*args):
        r = invoke("merge-stats", *args, "-o", tmp_path / "out.h5")
        assert r.exit_code == 1 and not (tmp_path / "out.h5").exists()
        return r.stderr

    assert "given twice" in refused(s[0], s[0], s[1], s[2])
    assert "missing" in refused(s[0], s[1])
    assert "not a shard" in refused(s[0], s[1], s[2], d / "full.h5")
    assert invoke("compute-stats", data, *BASE, "--shard", "1/3", "-o", tmp_path / "dup.h5").exit_code == 0
    assert "overlap" in refused(s[0], s[1], s[2], tmp_path / "dup.h5")
    other = tmp_path / "other.h5"
    assert invoke("compute-stats", data, *BASE[:3], "random:1", *BASE[4:], "--shard", "2/3", "-o", other).exit_code == 0
    assert "weights_sha256" in refused(s[0], s[1], other)
    decoded = tmp_path / "gpu.h5"  # stands in for a shard measured with --decode gpu on a GPU machine
    decoded.write_bytes(s[2].read_bytes())
    with h5py.File(decoded, "r+") as f:
        assert f.attrs["decode"] == "cpu"
        f.attrs["decode"] = "gpu"
    assert "decode: 'cpu'" in refused(s[0], s[1], decoded)
    part = tmp_path / "unfinished.h5"
    part.write_bytes(s[2].read_bytes())
    with h5py.File(part, "r+") as f:
        f.attrs["complete"] = False
    assert "unfinished" in refused(s[0], s[1], part)


def test_bad_shard_values_are_usage_errors(runs):
    _, data = runs
    for bad in ("3/3", "a/b", "1"):
        r = invoke("compute-stats", data, *BASE, "--shard", bad)
        assert r.exit_code == 2 and "I/N" in r.stderr


def test_the_file_functions_take_paths_and_named_values_as_text(runs, tmp_path):
    """The file-level functions the how-to names, called from Python with text where a command line gives
    text: merge_stats's paths (it failed: 'str' object has no attribute 'resolve'), RunConfig's convention,
    decoder and precision (it failed after measuring: 'str' object has no attribute 'value')."""
    from vggnorm.commands.compute import RunConfig, compute_stats
    from vggnorm.errors import UsageError
    from vggnorm.io.statsfile import merge_stats

    d, data = runs
    merged = merge_stats([str(d / f"s{i}.h5") for i in range(3)], str(tmp_path / "all.h5"))  # type: ignore[list-item]
    assert merged.num_images == 8 and (tmp_path / "all.h5").is_file()
    config = RunConfig(
        arch=TINY["tiny"], weights="random:0", resize=40, crop=32, workers=0,
        convention="caffe", decoder="cpu", precision="fp64",  # type: ignore[arg-type]
    )  # fmt: skip
    stats = compute_stats(str(data), str(tmp_path / "s.h5"), config)  # type: ignore[arg-type]
    assert stats.num_images == 8 and read_stats(tmp_path / "s.h5").provenance.preprocess["preprocess"] == "caffe"
    with pytest.raises(UsageError, match="convention 'bogus'"):
        RunConfig(convention="bogus")  # type: ignore[arg-type]
