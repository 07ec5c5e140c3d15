"""Beyond torchvision's VGG: every accepted model keeps its logits and gets means of 1,
checked in float64 with hooks of the test's own; every refused one is named with its reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
from torch import nn

import lookalikes as L
import vggnorm
from conftest import invoke
from vggnorm.core.provenance import MeasurementRecord
from vggnorm.core.stats import LayerStats, Stats
from vggnorm.errors import CheckpointError, StatsMismatchError
from vggnorm.io.statsfile import write_stats

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def _alexnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.alexnet()


def _images(size: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    # smooth, positive-mean images: more filters alive than white noise keeps
    low = torch.rand(n, 3, size // 8, size // 8, generator=g, dtype=torch.float64)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 2 - 0.6


def _activation_means(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each activation module's output, averaged per channel over images and positions: plain forward hooks."""
    means: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, name=name: means.__setitem__(name, out.transpose(0, 1).flatten(1).mean(1))
        )
        for name, m in model.named_modules()
        if isinstance(m, ACTIVATIONS)
    ]
    with torch.no_grad():
        y = model(x)
    for h in handles:
        h.remove()
    means["<output>"] = y
    return means


# (factory, input size, sites expected, include_classifier)
ACCEPTED = {
    "alexnet": (_alexnet, 96, 7, True),
    "group_norm": (L.group_norm_net, 16, 2, False),
    "instance_norm_leaky": (L.instance_norm_net, 16, 3, False),
    "cat_grouped_depthwise": (L.cat_net, 16, 4, False),
    "functional_ops_view_and_mean": (L.functional_net, 20, 3, False),
    "residual_with_projection": (L.projected_residual_net, 16, 3, False),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_models_keep_their_logits_and_get_means_of_one(name):
    factory, size, n_sites, fc = ACCEPTED[name]
    torch.manual_seed(0)  # the model's initialization, whatever ran before in this worker
    model = factory().eval().double()
    x = _images(size)
    topo = vggnorm.analyze(model)
    assert not topo.refusals and len(topo.all_sites) == n_sites
    stats = vggnorm.measure_means(model, [x], include_classifier=fc)
    normalized = vggnorm.normalize_model(model, stats, include_classifier=fc)

    before, after = _activation_means(model, x), _activation_means(normalized, x)
    y, y2 = before.pop("<output>"), after.pop("<output>")
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5  # logits unchanged
    sites = {s.relu: s for s in topo.all_sites}
    assert set(sites) <= set(before)
    checked = 0
    for relu, mean in before.items():
        if relu not in sites:
            continue
        # live: the test's own rule, the same definition as the package's dead rule (relative to the layer's median)
        positive = mean[mean > 0]
        live = mean > max(1e-6, 1e-3 * float(positive.median())) if positive.numel() else mean > 1e300
        assert live.any(), relu
        torch.testing.assert_close(after[relu][live], torch.ones_like(after[relu][live]), rtol=0, atol=1e-6)
        # dead filters keep their activations
        torch.testing.assert_close(after[relu][~live], mean[~live], rtol=1e-6, atol=1e-12)
        checked += 1
    assert checked == n_sites


def test_alexnet_has_its_own_positions_per_channel():
    with torch.device("meta"):
        topo = vggnorm.analyze(torchvision.models.alexnet())
    assert topo.classifier == "classifier.1" and topo.positions_per_channel == 36  # 256 x 6 x 6 = 9216
    assert [s.conv for s in topo.fc_sites] == ["classifier.1", "classifier.4"]


def test_cat_and_groups_compensate_the_right_columns():
    topo = vggnorm.analyze(L.cat_net())
    mix = next(c for c in topo.compensations if c.module == "mix")
    assert mix.pieces == (("a.0", 4), ("b.0", 5), (None, 3)) and mix.groups == 4  # the image's channels: unscaled
    assert next(c for c in topo.compensations if c.module == "depthwise").groups == 8


# (factory, the node named, words of the reason)
REFUSED = {
    "instance_norm_without_affine": (L.instance_norm_no_affine_net, "body.2 (InstanceNorm2d)", "no affine parameters"),
    "relu6": (L.relu6_net, "3 (ReLU6)", "not positively homogeneous"),
    "gelu": (L.gelu_net, "3 (GELU)", "not positively homogeneous"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_are_named_with_the_reason(name):
    factory, node, reason = REFUSED[name]
    model = factory().eval()
    refusals = vggnorm.analyze(model).refusals
    assert any(r.node.startswith(node) and reason in r.reason for r in refusals), refusals
    with pytest.raises(CheckpointError, match=reason):
        vggnorm.measure_means(model, [torch.rand(1, 3, 16, 16)])
    with pytest.raises(CheckpointError, match=reason):
        vggnorm.normalize_model(model, Stats({}, 0))
    result = invoke("inspect", L.spec(factory.__name__))
    assert result.exit_code == 1
    assert f"REFUSED {node}" in result.output and reason in result.output


@pytest.mark.parametrize("name", REFUSED)
def test_apply_refuses_a_model_it_cannot_normalize(name, tmp_path):
    """Statistics that name a refused model (written by hand: compute-stats refuses first, as tested above)."""
    factory, node, reason = REFUSED[name]
    spec = L.spec(factory.__name__)
    stats = Stats({"x": LayerStats("x", "y", None, torch.ones(4), 10)}, 1, MeasurementRecord(arch=spec))
    write_stats(stats, tmp_path / "s.h5", force=False)
    ckpt = tmp_path / "m.pth"
    torch.save(factory().state_dict(), ckpt)
    result = invoke("apply", ckpt, "--stats", tmp_path / "s.h5", "--model", spec, "-o", tmp_path / "out.pth")
    assert result.exit_code == 1 and node in result.output and reason in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.pth").exists()


def test_add_affine_normalizes_an_instance_norm_without_affine():
    model = L.instance_norm_no_affine_net().eval().double()
    x = _images(16)
    stats = vggnorm.measure_means(model, [x], add_affine=True)
    normalized = vggnorm.normalize_model(model, stats, add_affine=True)
    assert normalized.body[2].affine and not model.body[2].affine  # the copy only
    with torch.no_grad():
        y, y2 = model(x), normalized(x)
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-5
    after = _activation_means(normalized, x)
    for relu in ("body.3", "body.6"):
        mean = _activation_means(model, x)[relu]
        live = mean > 1e-3 * float(mean[mean > 0].median())
        torch.testing.assert_close(after[relu][live], torch.ones_like(after[relu][live]), rtol=0, atol=1e-6)
    report = vggnorm.verify_models(model, normalized, stats, batches=[x.float()], include_classifier=False)
    assert report.passed, [(c.name, c.status, c.detail) for c in report.checks]


def test_the_cli_runs_add_affine_end_to_end(photos, tmp_path):
    spec = L.spec("instance_norm_no_affine_net")
    torch.manual_seed(0)
    ckpt = tmp_path / "in.pth"
    torch.save(L.instance_norm_no_affine_net().state_dict(), ckpt)
    common = ("--model", spec)
    measure = ("compute-stats", photos, *common, "--weights", ckpt, "--crop", 32, "--resize", 32, "--no-progress")
    refused = invoke(*measure, "-o", tmp_path / "x.h5")
    assert refused.exit_code == 1 and "--add-affine" in refused.output and not (tmp_path / "x.h5").exists()
    stats = tmp_path / "s.h5"
    r = invoke(*measure, "-o", stats, "--add-affine")
    assert r.exit_code == 0, r.output
    out = tmp_path / "n.pth"
    r = invoke("apply", ckpt, "--stats", stats, *common, "-o", out)
    assert r.exit_code == 0, r.output
    assert {"body.2.weight", "body.2.bias"} <= set(torch.load(out))
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, *common, "--no-progress")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_alexnet_by_name_end_to_end(photos, tmp_path):
    """The CLI with --arch alexnet, features only: the 58M-parameter classifier's fold (P = 36, the fc
    sites) is checked in float64 above, at a third of this test's memory."""
    stats, out = tmp_path / "alexnet.h5", tmp_path / "alexnet-normalized.pth"
    sizes = ("--resize", 72, "--crop", 64)
    r = invoke(
        "compute-stats", photos, "--arch", "alexnet", "--weights", "random:0", *sizes, "-o", stats, "--no-progress"
    )
    assert r.exit_code == 0, r.output
    r = invoke("apply", "random:0", "--stats", stats, "-o", out, "--features-only")
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--original", "random:0", "--stats", stats, "--data", photos, "--no-progress")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("factory", ["group_norm_net", "cat_net", "instance_norm_net"])
def test_the_cli_runs_models_of_every_site_kind(factory, photos, tmp_path):
    spec = L.spec(factory)
    torch.manual_seed(0)
    ckpt = tmp_path / "m.pth"
    torch.save(getattr(L, factory)().state_dict(), ckpt)
    stats, out = tmp_path / "s.h5", tmp_path / "n.pth"
    common = ("--model", spec)
    r = invoke(
        "compute-stats", photos, *common, "--weights", ckpt, "--crop", 32, "--resize", 32, "-o", stats, "--no-progress"
    )
    assert r.exit_code == 0, r.output
    r = invoke("apply", ckpt, "--stats", stats, *common, "-o", out)
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, *common, "--format", "json")
    assert r.exit_code == 0, r.output
    assert [c["status"] for c in json.loads(r.stdout)["checks"]] == ["pass"] * 4
    if factory != "cat_net":  # a GroupNorm or InstanceNorm cannot be folded into its conv
        r = invoke("apply", ckpt, "--stats", stats, *common, "-o", tmp_path / "g.pth", "--layout", "gatys")
        assert r.exit_code == 1 and "use the torchvision layout" in r.output


def test_inspect_lists_sites_flows_and_the_verdict():
    r = invoke("inspect", "alexnet")
    assert r.exit_code == 0 and "alexnet: 5 conv site(s), 2 fc site(s): normalizable" in r.output
    assert "classifier.1 via features.12, avgpool, flatten, classifier.0 (36 columns per channel)" in r.output
    r = invoke("inspect", L.spec("cat_net"), "--json")
    assert r.exit_code == 0
    sites = {s["conv"]: s for s in json.loads(r.output)["sites"]}
    assert sites["b.0"]["compensated_by"] == "mix via cat (4 groups, channels 4..8 of its 12 inputs)"
    r = invoke("inspect", L.spec("projected_residual_net"))
    assert r.exit_code == 0 and "3 conv site(s)" in r.output
    assert "after_add" in r.output and "not normalized" not in r.output
    r = invoke("inspect", L.spec("instance_norm_no_affine_net"), "--add-affine")
    assert r.exit_code == 0 and "body.2 (InstanceNorm2d, --add-affine)" in r.output


def test_a_stream_that_reaches_the_output_is_left_unscaled_and_the_rest_normalized():
    """ResNet's basic block as the model's last layer: its ReLU after the add *is* the output, so the stream
    (the stem's ReLU and that one) keeps scale 1; the block's first ReLU (a module called twice) is normalized."""
    model = L.ResidualNet().eval().double()
    topo = vggnorm.analyze(model)
    assert [(s.conv, s.relu, s.call) for s in topo.all_sites] == [("block.conv1", "block.relu:1", 1)]
    assert topo.left_unscaled == ("stem.1", "block.relu:2") and not topo.refusals and not topo.streams
    x = _images(16)
    normalized = vggnorm.normalize_model(model, vggnorm.measure_means(model, [x]))
    with torch.no_grad():
        y, y2 = model(x), normalized(x)
    assert float((y2 - y).abs().max() / y.abs().max()) < 1e-12


def test_verify_holds_each_stream_site_to_the_mean_its_policy_promised():
    """A stream's sites are not normalized to 1: verify checks each against the mean the recorded policy
    promised, so a checkpoint made with one policy fails when checked against the other."""
    model = L.stream_net().eval().double()
    x = _images(16)
    topo = vggnorm.analyze(model)
    assert [len(s.sites) for s in topo.streams] == [3] and not topo.refusals
    stats = vggnorm.measure_means(model, [x])
    normalized = vggnorm.normalize_model(model, stats, stream_scale="last")
    scales = vggnorm.scales(model, stats, stream_scale="last")
    last = topo.streams[0].sites[-1]
    live = torch.ones_like(scales[last].scale, dtype=torch.bool)
    live[scales[last].dead] = False
    torch.testing.assert_close(scales[last].expected[live], torch.ones(int(live.sum()), dtype=torch.float64))
    assert vggnorm.verify_models(model, normalized, stats, batches=[x], stream_scale="last").passed
    wrong = vggnorm.verify_models(model, normalized, stats, batches=[x])  # checked as if geometric
    assert {c.name for c in wrong.checks if c.status == "fail"} >= {"activations", "means"}


def test_a_residual_stream_end_to_end_through_the_cli(photos, tmp_path):
    """compute-stats -> apply --stream-scale last -> verify --data on a look-alike with a stream: the
    policy is recorded with the checkpoint, the report lists the stream, verify passes without being told."""
    spec, stats, out = L.spec("stream_net"), tmp_path / "s.h5", tmp_path / "n.pth"
    size = ["--resize", "24", "--crop", "16", "--workers", "0", "--no-progress"]
    r = invoke("compute-stats", photos, "--model", spec, "--weights", "random:0", "-o", stats, *size)
    assert r.exit_code == 0, r.output
    r = invoke("apply", "random:0", "--model", spec, "--stats", stats, "-o", out, "--stream-scale", "last")
    assert r.exit_code == 0 and "1 residual stream(s)" in r.stderr, r.output
    report = json.loads((tmp_path / "n.report.json").read_text())
    assert report["inputs"]["policy"]["stream_scale"] == "last" and len(report["streams"][0]["sites"]) == 3
    assert "## Residual streams" in (tmp_path / "n.report.md").read_text()
    r = invoke("verify", out, "--model", spec, "--stats", stats, "--original", "random:0", "--data", photos)
    assert r.exit_code == 0 and "verify: PASS (4 passed" in r.output, r.output
    # an audit (--data alone) holds only the ReLUs outside the stream to 1: the stream's were promised others
    r = invoke("verify", out, "--model", spec, "--data", photos, "--resize", "24", "--crop", "16")
    assert r.exit_code == 0 and "3 ReLUs on residual streams not audited" in r.output, r.output
    # a .pth away from its report: the policy is not known, unless --stream-scale says it
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / "n.pth")
    checked = ("verify", alone / "n.pth", "--model", spec, "--stats", stats, "--original", "random:0")
    assert invoke(*checked).exit_code == 1
    r = invoke(*checked, "--stream-scale", "last")
    assert r.exit_code == 0 and "verify: PASS (3 passed" in r.output, r.output


def test_the_vgg_only_layouts_refuse_a_residual_network_in_a_line(photos, tmp_path):
    """Before: apply --layout gatys or --features-only on resnet18 ended in a traceback (a meta tensor copied)."""
    spec, stats = L.spec("stream_net"), tmp_path / "s.h5"
    size = ["--resize", "24", "--crop", "16", "--workers", "0", "--no-progress"]
    assert invoke("compute-stats", photos, "--model", spec, "--weights", "random:0", "-o", stats, *size).exit_code == 0
    # --model names another model than the statistics': said, not ignored (it wrote the statistics' model)
    r = invoke("apply", "random:0", "--model", L.spec("stream_net_wide"), "--stats", stats, "-o", tmp_path / "w.pth")
    assert r.exit_code == 1 and "and --model names" in r.stderr and not (tmp_path / "w.pth").exists(), r.output
    for option in (("--layout", "gatys"), ("--features-only",)):
        r = invoke("apply", "random:0", "--model", spec, "--stats", stats, "-o", tmp_path / "g.pth", *option)
        assert r.exit_code == 1 and "a chain of convs (a VGG or AlexNet); " in r.stderr, r.output
        assert not (tmp_path / "g.pth").exists()


def test_statistics_of_an_older_analysis_are_named_as_such():
    model = L.stream_net().eval()
    stats = vggnorm.measure_means(model, [_images(16).float()])
    del stats.layers["blocks.1.relu:2"]  # a site the analysis before residual streams did not have
    with pytest.raises(StatsMismatchError, match="lack 1 of its sites \\(blocks.1.relu:2\\): measured by an older"):
        vggnorm.scales(model, stats)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_residual_and_dense_torchvision_models_end_to_end(arch, photos, tmp_path):
    """compute-stats -> apply -> verify --data on torchvision's own ResNet and DenseNet, by name."""
    stats, out = tmp_path / "s.h5", tmp_path / "n.pth"
    size = ["--resize", "40", "--crop", "32", "--workers", "0", "--no-progress"]
    r = invoke("compute-stats", photos, "--arch", arch, "--weights", "random:0", "-o", stats, *size)
    assert r.exit_code == 0, r.output
    r = invoke("apply", "random:0", "--stats", stats, "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "n.report.json").read_text())
    assert len(report["streams"]) == (4 if arch == "resnet18" else 0)
    r = invoke("verify", out, "--stats", stats, "--original", "random:0", "--data", photos)
    assert r.exit_code == 0 and "verify: PASS (4 passed" in r.output, r.output
    # without the statistics, the arch apply recorded beside the checkpoint (keys name only VGGs and AlexNet)
    r = invoke("verify", out, "--data", photos, "--resize", "40", "--crop", "32")
    assert r.exit_code == 0 and "verify: PASS (1 passed" in r.output, r.output
