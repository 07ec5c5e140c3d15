"""compare: recover the per-filter scales between two checkpoints, or name where B is no rescaling of A."""

import pytest
import torch

from conftest import TINY, invoke
from vggnorm.commands.compare import compare_checkpoints
from vggnorm.core.fold import DeadRule
from vggnorm.io.statsfile import read_stats
from vggnorm.io.weights import random_state_dict


@pytest.fixture(scope="module", params=["tiny", "tiny_bn"])
def pair(request, photos, checkpoints, tmp_path_factory):
    key = request.param
    d = tmp_path_factory.mktemp(f"compare_{key}")
    model = ["--model", TINY[key]]
    ckpt, stats = checkpoints[key], d / "s.h5"
    size = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]
    assert invoke("compute-stats", photos, *model, "--weights", ckpt, "-o", stats, *size).exit_code == 0
    assert invoke("apply", ckpt, "--stats", stats, "-o", d / "n.pth", *model).exit_code == 0
    assert invoke("apply", ckpt, "--stats", stats, "-o", d / "g.pth", "--layout", "gatys", *model).exit_code == 0
    return {"key": key, "ckpt": ckpt, "stats": stats, "out": d / "n.pth", "gatys": d / "g.pth", "model": model}


def test_the_recovered_scales_are_the_measured_means(pair):
    result = compare_checkpoints(pair["ckpt"], pair["out"], stats_path=pair["stats"])
    assert result.rescaling and not result.broken
    stats = read_stats(pair["stats"])
    for name, s in result.scales.items():
        mean = stats.layers[name].mean
        live = DeadRule().live(mean)
        torch.testing.assert_close(s[live], mean[live], rtol=1e-6, atol=0)
        assert torch.all((s[~live] - 1).abs() < 1e-6)  # dead filters kept their weights
    r = invoke("compare", pair["ckpt"], pair["out"], "--stats", pair["stats"], *pair["model"])
    assert r.exit_code == 0 and "is a positive per-filter rescaling" in r.stdout, r.output
    assert "features.0 (conv1_1)" in r.stdout and "vs measured means" in r.stdout


def test_a_gatys_export_compares_with_its_original(pair):
    r = invoke("compare", pair["ckpt"], pair["gatys"], *pair["model"])
    assert r.exit_code == 0, r.output  # BatchNorm folded in on both sides


def test_one_changed_filter_is_named(pair, tmp_path):
    sd = torch.load(pair["out"], weights_only=True)
    second = "features.4" if pair["key"].endswith("_bn") else "features.3"
    sd[f"{second}.weight"][2, 0, 0, 0] += 0.05 * float(sd[f"{second}.weight"][2].abs().max())
    torch.save(sd, tmp_path / "t.pth")
    r = invoke("compare", pair["ckpt"], tmp_path / "t.pth", *pair["model"])
    assert r.exit_code == 1 and f"NOT a rescaling: {second} (conv2_1) filter 2" in r.stdout, r.output


def test_an_unrelated_checkpoint_is_not_a_rescaling(pair, tmp_path):
    torch.save(random_state_dict(TINY[pair["key"]], 1), tmp_path / "other.pth")
    r = invoke("compare", pair["ckpt"], tmp_path / "other.pth", *pair["model"])
    assert r.exit_code == 1 and "NOT a rescaling: features.0 (conv1_1)" in r.stdout, r.output


def test_checkpoints_of_other_architectures_are_not_a_rescaling(checkpoints):
    r = invoke("compare", checkpoints["tiny"], checkpoints["vgg11"])
    assert r.exit_code == 1 and "one architecture" in r.stderr
