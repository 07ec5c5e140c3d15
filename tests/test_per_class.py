"""Per-class statistics: exact per-class sums in one pass, class-balanced normalization, class centers."""

import h5py
import pytest
import torch

from conftest import TINY, invoke
from lookalikes import TinyVGG
from vggnorm.io.data import ImageTransform, find_images, load_rgb
from vggnorm.io.statsfile import read_stats

MODEL = ["--model", TINY["tiny"]]
SIZE = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]


@pytest.fixture(scope="module")
def folders(photos, tmp_path_factory):
    """The 8 photos as an ImageFolder of unequal classes (cat: 5, dog: 3), and the same files flat."""
    d = tmp_path_factory.mktemp("classes")
    flat = d / "flat"
    flat.mkdir()
    lines = []
    for i, p in enumerate(sorted(photos.iterdir())):
        cls = "cat" if i < 5 else "dog"
        (d / "tree" / cls).mkdir(parents=True, exist_ok=True)
        (d / "tree" / cls / p.name).write_bytes(p.read_bytes())
        (flat / p.name).write_bytes(p.read_bytes())
        lines.append((p.name, cls))
    (d / "labels.csv").write_text("".join(f"{n},{c}\n" for n, c in lines))
    (d / "labels.txt").write_text("".join(f"{c}\n" for _, c in sorted(lines)))
    return d


def test_per_class_means_equal_a_float64_computation_per_class(folders, checkpoints, tmp_path):
    out = tmp_path / "s.h5"
    r = invoke(
        "compute-stats",
        folders / "tree",
        *MODEL,
        "--weights",
        checkpoints["tiny"],
        "-o",
        out,
        *SIZE,
        "--per-class",
        "--precision",
        "fp64",
    )
    assert r.exit_code == 0, r.output
    assert "classes: 2 (images per class: cat: 5, dog: 3)" in r.stdout
    stats = read_stats(out)
    assert stats.classes == ["cat", "dog"] and stats.provenance.label_source == "folders"
    model = TinyVGG()
    model.load_state_dict(torch.load(checkpoints["tiny"], weights_only=True))
    model = model.double().eval()
    transform = ImageTransform(resize=40, crop=32).module()
    for k, cls in enumerate(stats.classes):
        x = torch.stack([transform(load_rgb(f)) for f in find_images(folders / "tree" / cls)]).double()
        with torch.no_grad():
            for i, m in enumerate(model.features):
                x = m(x)
                if isinstance(m, torch.nn.ReLU):
                    expected = x.mean(dim=(0, 2, 3))
                    got = stats.layers[f"features.{i - 1}"].class_means[k]
                    live = expected > 0
                    torch.testing.assert_close(got[live], expected[live], rtol=1e-6, atol=0)
    with h5py.File(out) as f:  # readable with h5py alone
        assert f["layers/features.0/class_sum"].shape == (2, 4) and list(f["layers/features.0/class_count"][()]) == [
            5 * 32 * 32,
            3 * 32 * 32,
        ]
    layer = stats.layers["features.3"]
    torch.testing.assert_close(layer.balanced_mean, layer.class_means.mean(dim=0))
    torch.testing.assert_close(layer.class_sum.sum(0), layer.sum)  # the classes add up to the whole


def test_a_labels_file_on_a_flat_folder_equals_the_class_folders(folders, checkpoints, tmp_path):
    base = [*MODEL, "--weights", checkpoints["tiny"], *SIZE, "--per-class"]
    assert invoke("compute-stats", folders / "tree", *base, "-o", tmp_path / "tree.h5").exit_code == 0
    for name in ("labels.csv", "labels.txt"):
        r = invoke("compute-stats", folders / "flat", *base, "--labels", folders / name, "-o", tmp_path / f"{name}.h5")
        assert r.exit_code == 0, r.output
        a, b = read_stats(tmp_path / "tree.h5"), read_stats(tmp_path / f"{name}.h5")
        assert a.classes == b.classes and b.provenance.label_source == str(folders / name)
        for n in a.layers:
            torch.testing.assert_close(b.layers[n].class_sum, a.layers[n].class_sum, rtol=1e-9, atol=0)
            assert torch.equal(b.layers[n].class_count, a.layers[n].class_count)


def test_shards_merge_to_one_run_by_class_name(folders, checkpoints, tmp_path):
    base = [*MODEL, "--weights", checkpoints["tiny"], *SIZE, "--per-class", "--batch-size", 1]
    assert invoke("compute-stats", folders / "tree", *base, "-o", tmp_path / "all.h5").exit_code == 0
    for i in range(3):
        r = invoke("compute-stats", folders / "tree", *base, "--shard", f"{i}/3", "-o", tmp_path / f"s{i}.h5")
        assert r.exit_code == 0, r.output
    r = invoke("merge-stats", *(tmp_path / f"s{i}.h5" for i in range(3)), "-o", tmp_path / "m.h5")
    assert r.exit_code == 0, r.output
    a, m = read_stats(tmp_path / "all.h5"), read_stats(tmp_path / "m.h5")
    assert m.classes == a.classes
    for n in a.layers:
        torch.testing.assert_close(m.layers[n].class_sum, a.layers[n].class_sum, rtol=1e-9, atol=0)
        assert torch.equal(m.layers[n].class_count, a.layers[n].class_count)
    # a shard without per-class sums is not merged with these
    plain = [*MODEL, "--weights", checkpoints["tiny"], *SIZE, "--batch-size", 1, "--shard", "2/3"]
    assert invoke("compute-stats", folders / "tree", *plain, "-o", tmp_path / "p2.h5").exit_code == 0
    r = invoke("merge-stats", tmp_path / "s0.h5", tmp_path / "s1.h5", tmp_path / "p2.h5", "-o", tmp_path / "x.h5")
    assert r.exit_code == 1 and "per_class" in r.stderr


def test_class_weighting_is_applied_verified_and_centers_are_written(folders, checkpoints, tmp_path):
    ckpt, stats, out = checkpoints["tiny"], tmp_path / "s.h5", tmp_path / "n.pth"
    base = [*MODEL, "--weights", ckpt, *SIZE]
    assert invoke("compute-stats", folders / "tree", *base, "-o", stats, "--per-class").exit_code == 0
    r = invoke("apply", ckpt, "--stats", stats, "-o", out, "--weighting", "class", *MODEL)
    assert r.exit_code == 0, r.output
    r = invoke("verify", out, "--original", ckpt, "--stats", stats, "--data", folders / "tree", "--workers", 0, *MODEL)
    assert r.exit_code == 0 and "4 passed" in r.stdout and "class-balanced" in r.stdout, r.output
    # the same file checked by its means over all images is not normalized: the classes differ in size
    r = invoke("verify", out, "--data", folders / "tree", "--workers", 0, "--weighting", "image", *MODEL)
    assert r.exit_code == 1
    # an audit takes the weighting and the labels from what apply recorded
    r = invoke("verify", out, "--data", folders / "tree", "--workers", 0, *MODEL)
    assert r.exit_code == 0, r.output
    for suffix in (".pt", ".safetensors"):
        r = invoke("centers", stats, "--layer", "features.8", "-o", tmp_path / f"c{suffix}")
        assert r.exit_code == 0, r.output
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    expected = read_stats(stats).layers["features.8"].class_means.float()
    assert saved["classes"] == ["cat", "dog"] and saved["layer"] == "features.8"
    torch.testing.assert_close(saved["centers"], expected)
    from safetensors import safe_open

    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        torch.testing.assert_close(f.get_tensor("centers"), expected)
        assert f.metadata()["classes"] == '["cat", "dog"]'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("astronaut.JPEG,cat\nnot_there.jpg,dog\n", "not files under"),
        ("astronaut.JPEG,cat\n", "have no label"),
        ("cat\ndog\n", "2 labels for 8 files"),
    ],
    ids=["unknown-name", "unlabelled-file", "wrong-count"],
)
def test_bad_labels_are_clear_errors(content, message, folders, tmp_path):
    (tmp_path / "bad.csv").write_text(content)
    command = ["compute-stats", folders / "flat", *MODEL, "--weights", "random:0", *SIZE, "--per-class"]
    r = invoke(*command, "--labels", tmp_path / "bad.csv", "-o", tmp_path / "s.h5")
    assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s.h5").exists()
    r = invoke(*command, "-o", tmp_path / "s.h5")
    assert r.exit_code == 1 and "not in a class subfolder" in r.stderr
    r = invoke(*command, "--labels", tmp_path / "missing.csv", "-o", tmp_path / "s.h5")
    assert r.exit_code == 2 and "does not exist" in r.stderr
