"""Finding and decoding images: every awkward but valid file is used, every bad one is named."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vggnorm.errors import DataError, SetupError
from vggnorm.io.data import (
    ImageTransform,
    check_decode,
    collate,
    default_transform,
    find_images,
    load_rgb,
    make_loader,
)
from vggnorm.io.gpu_decode import decode_jpegs, plain_jpeg
from vggnorm.options import Decoder, InputConvention


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
    batches = list(make_loader(files, ImageTransform(resize=32, crop=32), batch_size=4, workers=0))
    failures = {files[i].name: reason for b in batches for i, reason in b.failures}
    assert set(failures) == bad
    assert all(reason.startswith("cannot decode") for reason in failures.values())
    images = torch.cat([b.images for b in batches if b.images is not None])
    assert images.shape == (10, 3, 32, 32) and torch.isfinite(images).all()
    assert sorted(i for b in batches for i in b.indices) == [i for i, f in enumerate(files) if f.name not in bad]


def test_decompression_bomb_is_skipped_not_a_crash(tmp_path):
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 Mpx, a few KB on disk
    Image.fromarray(rgb_array()).save(tmp_path / "ok.png")
    batches = list(make_loader(find_images(tmp_path), ImageTransform(resize=32, crop=32), batch_size=2, workers=0))
    assert len(batches[0].indices) == 1
    ((index, reason),) = batches[0].failures
    assert "decompression bomb" in reason


def test_collate_of_only_failures():
    batch = collate([])
    assert batch.images is None and batch.num_files == 0


# --decode gpu: the same code runs on the CPU with torchvision's CPU JPEG decoder standing in for nvJPEG.


def jpeg_bytes(mode="RGB", **save):
    buf = io.BytesIO()
    img = Image.fromarray(rgb_array(60, 80))
    (img if mode == "RGB" else img.convert(mode)).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_plain_jpeg_sends_only_what_the_device_decodes_as_pil_does():
    assert plain_jpeg(jpeg_bytes())
    assert plain_jpeg(jpeg_bytes("L"))
    assert plain_jpeg(jpeg_bytes(progressive=True))
    assert plain_jpeg(jpeg_bytes() + b"\x00" * 16)  # zero padding after the end marker
    assert not plain_jpeg(jpeg_bytes("CMYK"))  # 4 components (and an Adobe marker): PIL converts those
    assert not plain_jpeg(jpeg_bytes()[:-200])  # cut off: PIL decides (it refuses), as with --decode cpu
    buf = io.BytesIO()
    Image.fromarray(rgb_array()).save(buf, format="PNG")
    assert not plain_jpeg(buf.getvalue())
    assert not plain_jpeg(b"")
    assert not plain_jpeg(b"\xff\xd8\xff\xd9")


@pytest.mark.parametrize("preprocess", ["torchvision", "caffe"])
def test_device_decoding_uses_and_skips_the_same_files_within_one_level(tmp_path, preprocess):
    awkward_images(tmp_path)
    bad = bad_files(tmp_path)
    files = find_images(tmp_path)
    convention = InputConvention(preprocess)
    pil = default_transform("vgg11", resize=32, crop=32, convention=convention)
    for workers in (0, 1):
        a = list(make_loader(files, pil, convention, batch_size=4, workers=workers))
        gpu = Decoder.GPU
        b = list(
            make_loader(files, pil, convention, decoder=gpu, batch_size=4, workers=workers, device=torch.device("cpu"))
        )
        assert [x.indices for x in a] == [y.indices for y in b]
        assert [x.failures for x in a] == [y.failures for y in b]  # same reasons, naming the same paths
        assert {files[i].name for y in b for i, _ in y.failures} == bad
    x, y = torch.cat([t.images for t in a if t.images is not None]), torch.cat([t.images for t in b])
    levels = (x - y).abs() * (1.0 if preprocess == "caffe" else torch.tensor(pil.std).view(3, 1, 1) * 255)
    # tensor resizing rounds differently from PIL's: at most one level of 255, in few pixels
    assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29's decoders (see decode_jpegs)
def test_a_jpeg_the_device_refuses_falls_back_to_pil(tmp_path, monkeypatch):
    import torchvision.io

    good, odd = tmp_path / "good.jpg", tmp_path / "odd.jpg"
    good.write_bytes(jpeg_bytes())
    odd.write_bytes(jpeg_bytes(quality=50))
    real = torchvision.io.decode_jpeg
    odd_len = odd.stat().st_size

    def device_decoder(data, **kw):  # refuses the odd file, alone or in a batch, as nvJPEG may
        if any(d.numel() == odd_len for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)
    jpegs = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in (good, odd)]
    out = decode_jpegs([*jpegs, jpegs[0][:100]], [str(good), str(odd), str(good)], torch.device("cpu"))
    assert torch.equal(out[0], real(jpegs[0], mode=torchvision.io.ImageReadMode.RGB))
    assert torch.equal(out[1], torch.from_numpy(np.array(load_rgb(odd))).permute(2, 0, 1))
    assert torch.equal(out[2], out[0])  # the third "file" is good.jpg's path: PIL reads it from there


def test_gpu_decoding_needs_cuda():
    """A device this machine does not have is a set-up error (as --device cuda, --precision fp16 on a CPU)."""
    with pytest.raises(SetupError, match="--decode gpu .* CUDA"):
        check_decode("gpu", torch.device("cpu"))
    check_decode("cpu", torch.device("cpu"))
