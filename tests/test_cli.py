"""The three commands end to end on real photos, with random-weight look-alikes (``--model``) and,
marked slow, torchvision's own vgg11 and vgg11_bn.

These are the acceptance checks: means equal an independent float64 computation, the weights
equal the fold (written out below), logits are unchanged, the output loads strictly into the
model's class, verify passes it and fails a tampered copy.
"""

from pathlib import Path

import h5py
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import TINY, invoke, vgg_features
from lookalikes import GATYS_BLOCKS, POOL, TinyVGG

SIZE = ["--resize", "64", "--crop", "64"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module", params=["tiny", "tiny_bn"])
def pipeline(request, photos, checkpoints, tmp_path_factory):
    key = request.param
    d = tmp_path_factory.mktemp(key)
    ckpt, stats, out = checkpoints[key], d / "stats.h5", d / "normalized.pth"
    model = ["--model", TINY[key]]
    r = invoke("compute-stats", photos, *model, "--weights", ckpt, "-o", stats, "--workers", 0, *SIZE)
    assert r.exit_code == 0, r.output
    r2 = invoke("apply", ckpt, "--stats", stats, "-o", out, *model, "--plot")
    assert r2.exit_code == 0, r2.output
    return {
        "arch": TINY[key],
        "bn": key.endswith("_bn"),
        "model": model,
        "ckpt": ckpt,
        "stats": stats,
        "out": out,
        "dir": d,
        "compute": r,
        "apply": r2,
    }


def float64_model(p, sd):
    model = TinyVGG(bn=p["bn"])
    model.load_state_dict(sd, strict=True)
    return model.double().eval()


def independent_batch(photos):
    """The images preprocessed with torchvision's classic transforms, not vggnorm's code."""
    t = transforms.Compose(
        [
            transforms.Resize(64),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return torch.stack([t(Image.open(p).convert("RGB")) for p in sorted(photos.iterdir())]).double()


def test_stdout_has_the_summary_and_stderr_the_progress(pipeline):
    r = pipeline["compute"]
    assert "images: 8 used, 0 skipped" in r.stdout and f"wrote {pipeline['stats']}" in r.stdout
    assert "img/s" in r.stderr and "img/s" not in r.stdout


def test_means_equal_independent_float64_computation(pipeline, photos):
    sd = torch.load(pipeline["ckpt"], weights_only=True)
    model = float64_model(pipeline, sd)
    x = independent_batch(photos)
    with h5py.File(pipeline["stats"]) as f:
        assert f.attrs["num_images"] == 8 and f.attrs["arch"] == pipeline["arch"]
        order = f.attrs["layer_order"]
        measured = {name: torch.from_numpy(f[f"layers/{name}/mean"][()]) for name in f["layers"]}
    expected, conv = {}, None
    with torch.no_grad():
        h = x
        for i, m in enumerate(model.features):
            h = m(h)
            conv = f"features.{i}" if isinstance(m, torch.nn.Conv2d) else conv
            if isinstance(m, torch.nn.ReLU):
                expected[conv] = h.mean(dim=(0, 2, 3))
    assert list(expected) == __import__("json").loads(order)
    for name, mean in expected.items():
        torch.testing.assert_close(measured[name], mean, rtol=1e-4, atol=1e-4 * float(mean.max()))


def test_weights_equal_spec_fold_and_logits_unchanged(pipeline, photos):
    sd = torch.load(pipeline["ckpt"], weights_only=True)
    out = torch.load(pipeline["out"], weights_only=True)
    TinyVGG(bn=pipeline["bn"]).load_state_dict(out, strict=True)
    with h5py.File(pipeline["stats"]) as f:
        means = {n: torch.from_numpy(f[f"layers/{n}/mean"][()]) for n in f["layers"]}
        order = __import__("json").loads(f.attrs["layer_order"])
    bn = pipeline["bn"]
    prev = torch.ones(3, dtype=torch.float64)
    for name in order:  # the fold, layer by layer, written out
        s = torch.where(means[name] > 1e-6, means[name], torch.ones_like(means[name]))
        w = sd[f"{name}.weight"].double() * prev.view(1, -1, 1, 1)
        if bn:
            i = int(name.split(".")[1]) + 1
            torch.testing.assert_close(out[f"{name}.weight"].double(), w, rtol=1e-4, atol=0)
            torch.testing.assert_close(
                out[f"features.{i}.weight"].double(), sd[f"features.{i}.weight"].double() / s, rtol=1e-4, atol=0
            )
            torch.testing.assert_close(
                out[f"features.{i}.bias"].double(), sd[f"features.{i}.bias"].double() / s, rtol=1e-4, atol=0
            )
        else:
            torch.testing.assert_close(out[f"{name}.weight"].double(), w / s.view(-1, 1, 1, 1), rtol=1e-4, atol=0)
            torch.testing.assert_close(out[f"{name}.bias"].double(), sd[f"{name}.bias"].double() / s, rtol=1e-4, atol=0)
        prev = s
    fc = sd["classifier.0.weight"].double() * prev.repeat_interleave(POOL * POOL).view(1, -1)
    torch.testing.assert_close(out["classifier.0.weight"].double(), fc, rtol=1e-4, atol=0)
    x = independent_batch(photos)
    with torch.no_grad():
        y, y2 = float64_model(pipeline, sd)(x), float64_model(pipeline, out)(x)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_apply_draws_its_figure_only_when_asked(pipeline, tmp_path, monkeypatch):
    out = tmp_path / "plain.pth"
    r = invoke("apply", pipeline["ckpt"], "--stats", pipeline["stats"], "-o", out, *pipeline["model"])
    assert r.exit_code == 0, r.output
    assert not out.with_name("plain.report.png").exists() and "plain.report.png" not in r.output
    assert "![" not in out.with_name("plain.report.md").read_text()
    monkeypatch.setattr("vggnorm.commands.apply.have_matplotlib", lambda: False)
    r = invoke("apply", pipeline["ckpt"], "--stats", pipeline["stats"], "-o", tmp_path / "p.pth", "--plot")
    assert r.exit_code == 1 and "--plot" in r.output and "pip install 'vggnorm[plot]'" in r.output, r.output
    assert not list(tmp_path.glob("p.*"))


def test_a_failed_self_check_leaves_nothing_written(pipeline, tmp_path, monkeypatch):
    """The checkpoint is written while it is self-checked; a failed check must still leave no file behind."""
    from vggnorm.core.checks import FAIL, Check

    monkeypatch.setattr(
        "vggnorm.commands.apply.check_function",
        lambda *args, **kwargs: [Check("logits", "logits equal the original's", FAIL, 1.0, 1e-4, "forced")],
    )
    out = tmp_path / "n.pth"
    r = invoke("apply", pipeline["ckpt"], "--stats", pipeline["stats"], "-o", out, *pipeline["model"])
    assert r.exit_code == 1 and "failed its self-check, nothing was written" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_apply_writes_a_report(pipeline):
    out = pipeline["out"]
    assert "PASS" in pipeline["apply"].stdout and f"wrote {out}" in pipeline["apply"].stdout
    md = out.with_name("normalized.report.md").read_text()
    assert "| logits: logits equal the original's | pass |" in md and "## Scales per layer" in md
    assert '"passed": true' in out.with_name("normalized.report.json").read_text()
    png = out.with_name("normalized.report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](normalized.report.png)" in md


def test_verify_passes_the_output(pipeline, photos):
    p = pipeline
    r = invoke(
        "verify",
        p["out"],
        "--original",
        p["ckpt"],
        "--stats",
        p["stats"],
        "--data",
        photos,
        "--workers",
        0,
        "--report",
        p["dir"] / "verify",
        *p["model"],
    )
    assert r.exit_code == 0, r.output
    for check in ("activations", "logits", "fold", "means"):
        assert any(line.startswith("PASS") and check in line for line in r.stdout.splitlines()), r.stdout
    assert "4 passed, 0 failed, 0 not run" in r.stdout
    assert (p["dir"] / "verify.json").is_file() and (p["dir"] / "verify.md").is_file()


def test_verify_fails_a_checkpoint_with_one_filter_changed_by_two_percent(pipeline, photos, tmp_path):
    sd = torch.load(pipeline["out"], weights_only=True)
    second_conv = "features.4" if pipeline["bn"] else "features.3"
    sd[f"{second_conv}.weight"][5] *= 1.02
    torch.save(sd, tmp_path / "tampered.pth")
    p = pipeline
    r = invoke(
        "verify",
        tmp_path / "tampered.pth",
        "--original",
        p["ckpt"],
        "--stats",
        p["stats"],
        "--data",
        photos,
        "--workers",
        0,
        *p["model"],
    )
    assert r.exit_code == 1, r.output
    fails = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert "fold" in fails and "means" in fails and "activations" in fails
    assert "verify: FAIL" in r.stdout


def test_verify_checkpoint_from_python_takes_paths_and_names_as_text(pipeline, photos):
    """The Python entry the how-to shows, ``verify_checkpoint(Claim(CKPT, ...), audit=Audit(DIR))``, with paths
    as text and named values as strings (it failed with "'str' object has no attribute 'with_name'")."""
    from vggnorm.commands.verify import Audit, Claim, Method, verify_checkpoint
    from vggnorm.errors import UsageError
    from vggnorm.io.policy import Overrides

    p = pipeline
    claim = Claim(str(p["out"]), original=str(p["ckpt"]), stats=str(p["stats"]))
    report = verify_checkpoint(claim, Method(precision="fp64"), audit=Audit(str(photos), workers=0, progress=False))
    assert report.passed and [c.status for c in report.checks] == ["pass"] * 4
    with pytest.raises(UsageError, match="pooling 'bogus': expected one of max, avg"):
        Overrides(pooling="bogus")  # type: ignore[arg-type]


def test_apply_stats_from_python_takes_names_as_text_and_refuses_an_unknown_one(pipeline, tmp_path):
    """``apply_stats(..., ApplyOptions(layout="bogus"))`` was taken for adain ("--layout adain is VGG19's encoder"), and
    ``ForwardPolicy(pooling="bogus")`` was accepted: a name that is none of the choices is a UsageError."""
    from vggnorm.commands.apply import ApplyOptions, apply_stats
    from vggnorm.errors import UsageError
    from vggnorm.io.models import ForwardPolicy

    p = pipeline
    with pytest.raises(UsageError, match="layout 'bogus': expected one of torchvision, gatys"):
        apply_stats(str(p["ckpt"]), p["stats"], tmp_path / "x.pth", ApplyOptions(layout="bogus"))  # type: ignore[arg-type]
    assert not (tmp_path / "x.pth").exists()
    apply_stats(str(p["ckpt"]), str(p["stats"]), str(tmp_path / "g.pth"), ApplyOptions(layout="gatys"))  # type: ignore[arg-type]
    assert (tmp_path / "g.pth").is_file()
    with pytest.raises(UsageError, match="pooling 'bogus'"):
        ForwardPolicy(pooling="bogus")  # type: ignore[arg-type]


def test_audit_with_data_only(pipeline, photos):
    r = invoke("verify", pipeline["out"], "--data", photos, "--workers", 0, *SIZE, *pipeline["model"])
    assert r.exit_code == 0, r.output
    assert "1 passed, 0 failed, 3 not run" in r.stdout
    assert "measured means of live filters, per layer:" in r.stdout and "  features.0 " in r.stdout
    r = invoke("verify", pipeline["ckpt"], "--data", photos, "--workers", 0, *SIZE, *pipeline["model"])
    assert r.exit_code == 1 and "NOT normalized" in r.stdout


def test_apply_refuses_to_overwrite(pipeline):
    r = invoke("apply", pipeline["ckpt"], "--stats", pipeline["stats"], "-o", pipeline["out"])
    assert r.exit_code == 1 and "exists already" in r.stderr and "--force" in r.stderr


def test_apply_refuses_statistics_of_other_weights(pipeline, tmp_path):
    from vggnorm.io.weights import random_state_dict

    torch.save(random_state_dict(pipeline["arch"], 1), tmp_path / "other.pth")
    r = invoke("apply", tmp_path / "other.pth", "--stats", pipeline["stats"], "-o", tmp_path / "x.pth")
    assert r.exit_code == 1 and "other weights" in r.stderr
    assert not (tmp_path / "x.pth").exists()


def test_verify_fails_statistics_that_do_not_record_their_weights(pipeline, tmp_path):
    """Statistics without ``weights_sha256`` (removed, or never written) cannot show they were measured on the
    original: apply refuses them, and verify fails the fold rather than taking them on trust."""
    import shutil

    stats = tmp_path / "nohash.h5"
    shutil.copy(pipeline["stats"], stats)
    with h5py.File(stats, "a") as f:
        del f.attrs["weights_sha256"]
    p = pipeline
    r = invoke("verify", p["out"], "--original", p["ckpt"], "--stats", stats, *p["model"])
    assert r.exit_code == 1, r.output
    fails = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["activations", "fold"], r.stdout
    assert "do not record which weights" in r.stdout


def test_apply_refuses_statistics_of_another_arch(checkpoints, tmp_path, pipeline):
    other = "tiny" if pipeline["bn"] else "tiny_bn"
    r = invoke("apply", checkpoints[other], "--stats", pipeline["stats"], "-o", tmp_path / "x.pth")
    assert r.exit_code == 1 and f"the statistics are for {pipeline['arch']}, but" in r.stderr
    assert "Traceback" not in r.output


def test_features_only(pipeline, tmp_path):
    r = invoke("apply", pipeline["ckpt"], "--stats", pipeline["stats"], "-o", tmp_path / "f.pth", "--features-only")
    assert r.exit_code == 0, r.output
    sd = torch.load(tmp_path / "f.pth", weights_only=True)
    assert all(k.startswith("features.") for k in sd)
    TinyVGG(bn=pipeline["bn"]).features.load_state_dict(
        {k.removeprefix("features."): v for k, v in sd.items()}, strict=True
    )


class GatysVGG(torch.nn.Module):
    """Gatys-style code: convs named conv{block}_{i}, ReLU after each, pooling between blocks."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks, c = blocks, 3
        for b, widths in enumerate(blocks, 1):
            for i, width in enumerate(widths, 1):
                setattr(self, f"conv{b}_{i}", torch.nn.Conv2d(c, width, 3, padding=1))
                c = width

    def forward(self, x):
        out = []
        for b, widths in enumerate(self.blocks, 1):
            for i in range(1, len(widths) + 1):
                x = torch.relu(getattr(self, f"conv{b}_{i}")(x))
                out.append(x)
            x = torch.nn.functional.max_pool2d(x, 2)
        return out


VGG11_BLOCKS = [[64], [128], [256, 256], [512, 512], [512, 512]]


def test_gatys_layout_loads_strictly_and_matches_the_torchvision_layout(pipeline, photos, tmp_path):
    p = pipeline
    r = invoke("apply", p["ckpt"], "--stats", p["stats"], "-o", tmp_path / "g.pth", "--layout", "gatys")
    assert r.exit_code == 0, r.output
    if p["bn"]:
        assert "BatchNorm folded" in r.stderr
    sd = torch.load(tmp_path / "g.pth", weights_only=True)
    assert sorted(sd)[:2] == ["conv1_1.bias", "conv1_1.weight"] and "conv2_2.weight" in sd
    gatys = GatysVGG(GATYS_BLOCKS).double().eval()
    gatys.load_state_dict(sd, strict=True)
    reference = float64_model(p, torch.load(p["out"], weights_only=True))
    x = independent_batch(photos)[:3]
    expected = []
    h = x
    with torch.no_grad():
        for m in reference.features:
            h = m(h)
            if isinstance(m, torch.nn.ReLU):
                expected.append(h.clone())
        got = gatys(x)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    # verify reads the Gatys layout too: fold check against the original, means on the photos
    r = invoke(
        "verify",
        tmp_path / "g.pth",
        "--original",
        p["ckpt"],
        "--stats",
        p["stats"],
        "--data",
        photos,
        "--workers",
        0,
        *p["model"],
    )
    assert r.exit_code == 0, r.output
    assert "3 passed, 0 failed, 1 not run" in r.stdout  # logits: a features-only file has none


def test_safetensors_output_equals_pth_and_carries_provenance(pipeline, tmp_path):
    from safetensors import safe_open

    p = pipeline
    r = invoke("apply", p["ckpt"], "--stats", p["stats"], "-o", tmp_path / "n.safetensors")
    assert r.exit_code == 0, r.output
    pth = torch.load(p["out"], weights_only=True)
    with safe_open(tmp_path / "n.safetensors", "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(pth)
        for k in pth:
            assert torch.equal(f.get_tensor(k), pth[k])
    assert meta["arch"] == p["arch"] and meta["stats"] == str(p["stats"]) and meta["layout"] == "torchvision"
    r = invoke("verify", tmp_path / "n.safetensors", "--original", p["ckpt"], "--stats", p["stats"], *p["model"])
    assert r.exit_code == 0, r.output


def test_prefixed_and_safetensors_inputs_are_the_same_weights(pipeline, tmp_path):
    from safetensors.torch import save_file

    p = pipeline
    sd = torch.load(p["ckpt"], weights_only=True)
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / "c.safetensors")
    for name in ("dp.pth", "c.safetensors"):
        r = invoke("apply", tmp_path / name, "--stats", p["stats"], "-o", tmp_path / f"{name}.out.pth")
        assert r.exit_code == 0, r.output
        out = torch.load(tmp_path / f"{name}.out.pth", weights_only=True)
        assert all(torch.equal(out[k], v) for k, v in torch.load(p["out"], weights_only=True).items())


def test_a_pickled_model_is_refused_with_an_explanation(pipeline, tmp_path):
    torch.save(TinyVGG(), tmp_path / "model.pth")
    r = invoke("apply", tmp_path / "model.pth", "--stats", pipeline["stats"], "-o", tmp_path / "x.pth")
    assert r.exit_code == 1 and "never unpickles code" in r.stderr and "state_dict()" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_torchvision_vgg_features_end_to_end(arch, photos, checkpoints, tmp_path):
    """torchvision's own architecture (features: the classifier's fold is the look-alikes' code path)."""
    ckpt, stats, out = checkpoints[arch], tmp_path / "s.h5", tmp_path / "n.pth"
    r = invoke("compute-stats", photos, "--arch", arch, "--weights", ckpt, "-o", stats, "--workers", 0, *SIZE)
    assert r.exit_code == 0, r.output
    assert invoke("apply", ckpt, "--stats", stats, "-o", out).exit_code == 0
    sd = torch.load(out, weights_only=True)
    vgg_features(arch).load_state_dict({k.removeprefix("features."): v for k, v in sd.items()}, strict=True)
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", photos, "--workers", 0)
    assert r.exit_code == 0 and "3 passed, 0 failed, 1 not run" in r.stdout, r.output
    r = invoke("apply", ckpt, "--stats", stats, "-o", tmp_path / "g.pth", "--layout", "gatys")
    assert r.exit_code == 0, r.output
    gatys = GatysVGG(VGG11_BLOCKS).double().eval()
    gatys.load_state_dict(torch.load(tmp_path / "g.pth", weights_only=True), strict=True)
    reference = vgg_features(arch)  # torchvision's make_layers: the features alone, not 133M weights to init
    reference.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()})
    x = independent_batch(photos)[:2]
    with torch.no_grad():
        expected = [h for h in _relu_outputs(reference.double().eval(), x)]
        got = gatys(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def _relu_outputs(features, x):
    out = []
    for m in features:
        x = m(x)
        if isinstance(m, torch.nn.ReLU):
            out.append(x.clone())
    return out
