"""Finding and decoding images: every awkward but valid file is used, every bad one is named."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vggnorm.data import Preprocess, collate, find_images, load_rgb, make_loader
from vggnorm.errors import DataError


def rgb_array(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def awkward_images(d):
    """Valid images in every mode torchvision's pipeline must turn into RGB."""
    base = Image.fromarray(rgb_array())
    base.convert("L").save(d / "gray.jpg")
    base.convert("CMYK").save(d / "cmyk.jpeg")
    base.convert("P").save(d / "palette.png")
    p = base.convert("P")
    p.info["transparency"] = 0
    p.save(d / "palette_transparent.png", transparency=0)
    base.convert("RGBA").save(d / "rgba.png")
    base.convert("LA").save(d / "la.png")
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 32).save(d / "sixteen.png")
    base.save(d / "png_named.JPEG", format="PNG")
    Image.fromarray(rgb_array(7, 10)).save(d / "tiny.jpg")
    base.save(d / "upper.JPG")
    return 10


def bad_files(d):
    buf = io.BytesIO()
    Image.fromarray(rgb_array(200, 200)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "empty.jpg").write_bytes(b"")
    (d / "random.jpeg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (d / "text.jpg").write_text("this is not an image\n")
    return {"truncated.jpg", "empty.jpg", "random.jpeg", "text.jpg"}


def test_find_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/x.JPEG", "a/z.png", "a/y.JpG", "top.bmp", "a/notes.txt", ".hidden.jpg", ".cache/h.jpg", "a/.h.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/y.JpG", "a/z.png", "b/x.JPEG", "top.bmp"]


def test_symlink_loops_terminate(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "img.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert [p.name for p in find_images(tmp_path)] == ["img.png"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no images"):
        find_images(tmp_path)
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        find_images(tmp_path / "f.jpg")


def test_every_mode_decodes_to_rgb(tmp_path):
    n = awkward_images(tmp_path)
    files = find_images(tmp_path)
    assert len(files) == n
    for f in files:
        img = load_rgb(f)
        assert img.mode == "RGB", f.name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 128 * 257, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "s.png"))[0, :, 0]
    assert out.tolist() == [0, 1, 128, 255]  # a plain convert("RGB") gives [0, 255, 255, 255]


def test_grayscale_matches_torchvision_conversion(tmp_path):
    Image.fromarray(rgb_array()).convert("L").save(tmp_path / "g.png")
    expected = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g.png")), expected)


def test_loader_returns_bad_files_as_failures(tmp_path):
    awkward_images(tmp_path)
    bad = bad_files(tmp_path)
    files = find_images(tmp_path)
    batches = list(make_loader(files, Preprocess(resize=32, crop=32), batch_size=4, workers=0))
    failures = {files[i].name: reason for b in batches for i, reason in b.failures}
    assert set(failures) == bad
    assert all(reason.startswith("cannot decode") for reason in failures.values())
    images = torch.cat([b.images for b in batches if b.images is not None])
    assert images.shape == (10, 3, 32, 32) and torch.isfinite(images).all()
    assert sorted(i for b in batches for i in b.indices) == [i for i, f in enumerate(files) if f.name not in bad]


def test_decompression_bomb_is_skipped_not_a_crash(tmp_path):
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 Mpx, a few KB on disk
    Image.fromarray(rgb_array()).save(tmp_path / "ok.png")
    batches = list(make_loader(find_images(tmp_path), Preprocess(resize=32, crop=32), batch_size=2, workers=0))
    assert len(batches[0].indices) == 1
    ((index, reason),) = batches[0].failures
    assert "decompression bomb" in reason


def test_collate_of_only_failures():
    batch = collate([])
    assert batch.images is None and batch.num_files == 0
