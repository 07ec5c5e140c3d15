"""Find images, decode them to RGB, preprocess, and batch them with a DataLoader.

Every decodable image is used. A file that cannot be decoded does not stop the run: the loader
returns it as a failure (path index, reason) beside the batch, and the caller records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vggnorm.compat import image_classification_transform
from vggnorm.core.measure import Batch
from vggnorm.defaults import MAX_RESIZE, MAX_RESIZED_PIXELS
from vggnorm.errors import DataError, OutputExistsError, SetupError
from vggnorm.io.models import ForwardPolicy, is_user_model
from vggnorm.options import Decoder, InputConvention, Interpolation, Padding, Pooling

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass(frozen=True)
class ImageTransform:
    """How a decoded image becomes the network's input: resized (the shorter side), center-cropped, then
    the input convention's mean and std (``module``)."""

    resize: int = 256
    crop: int = 224
    interpolation: Interpolation = Interpolation.BILINEAR
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        """Refuse a transform no image can be measured under (from options, a statistics file, or metadata)."""
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RESIZE:
                raise DataError(
                    f"{name} {value!r}: expected a whole number of pixels from 1 to {MAX_RESIZE} (a {MAX_RESIZE}x"
                    f"{MAX_RESIZE} image is the largest vggnorm resizes to)"
                )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise DataError(f"{name} {values!r}: expected 3 finite numbers, one per color channel")
        if not all(v > 0 for v in self.std):
            raise DataError(f"std {self.std!r}: expected 3 positive numbers (the input is divided by them)")

    def module(
        self, convention: InputConvention = InputConvention.TORCHVISION, dtype: torch.dtype = torch.float32
    ) -> torch.nn.Module:
        """torchvision's own ImageNet preset (resize, center crop, to float, normalize), or Caffe's (for the
        caffe and matconvnet conventions); with ``dtype=torch.float64`` the same pixels with every step after
        them in float64 (``--precision fp64``: the mean and std are then applied exactly, not in float32)."""
        if dtype == torch.float64:
            return Float64Preset(self, convention)
        if convention in PIXEL_CONVENTIONS:
            return CaffePreset(
                resize=self.resize,
                crop=self.crop,
                mean=self.mean,
                interpolation=self.interpolation,
                bgr=convention == InputConvention.CAFFE,
            )
        return image_classification_transform(
            crop=self.crop, resize=self.resize, mean=self.mean, std=self.std, interpolation=self.interpolation
        )


# The attributes a measurement policy is recorded as (statistics files, apply's record), in this order.
MEASUREMENT_ATTRS = ("resize", "crop", "interpolation", "mean", "std", "preprocess", "pooling", "decode", "padding")


@dataclass(frozen=True)
class Measurement:
    """The measurement policy, stored in the statistics file: the image transform, the input convention, the
    forward policy (pooling, padding) and the decoder, each a value of its own."""

    transform: ImageTransform = ImageTransform()
    convention: InputConvention = InputConvention.TORCHVISION
    forward: ForwardPolicy = ForwardPolicy()
    decoder: Decoder = Decoder.CPU

    def describe(self) -> str:
        t = self.transform
        return (
            f"resize {t.resize}, crop {t.crop}, {self.convention} preprocessing, {self.forward.describe()}, "
            f"decode {self.decoder}"
        )

    def as_attrs(self) -> dict[str, object]:
        """The policy as recorded (``MEASUREMENT_ATTRS``): plain strings and numbers, read back by ``from_attrs``."""
        t = self.transform
        return {
            "resize": t.resize,
            "crop": t.crop,
            "interpolation": t.interpolation.value,
            "mean": t.mean,
            "std": t.std,
            "preprocess": self.convention.value,
            "pooling": self.forward.pooling.value,
            "decode": self.decoder.value,
            "padding": self.forward.padding.value,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Measurement:
        """The policy recorded in ``attrs`` (statistics or apply's record); ``DataError`` when incomplete or
        damaged. A file written before a field existed reads as it was measured then."""
        missing = [k for k in ("resize", "crop", "interpolation", "mean", "std") if k not in attrs]
        if missing:
            raise DataError(f"the recorded measurement policy has no {', '.join(missing)}: it cannot be measured again")
        try:
            transform = ImageTransform(
                resize=int(attrs["resize"]),
                crop=int(attrs["crop"]),
                interpolation=Interpolation(str(attrs["interpolation"])),
                mean=tuple(float(x) for x in attrs["mean"]),
                std=tuple(float(x) for x in attrs["std"]),
            )
            forward = ForwardPolicy(
                Pooling(str(attrs.get("pooling", "max"))), Padding(str(attrs.get("padding", "zeros")))
            )
            return cls(
                transform,
                InputConvention(str(attrs.get("preprocess", "torchvision"))),
                forward,
                Decoder(str(attrs.get("decode", "cpu"))),
            )
        except (TypeError, ValueError) as e:
            raise DataError(f"the recorded measurement policy is damaged ({e})") from e


# The original Caffe VGG's input: BGR, 0-255, minus the per-channel ImageNet mean (in BGR order).
# Keras' VGG16/VGG19 (keras.applications' preprocess_input, mode "caffe") take the same.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# MatConvNet's VGGs (imagenet-vgg-verydeep-*.mat): RGB, 0-255, minus the file's mean pixel; this one
# (the ImageNet mean in RGB order) when the weights do not say, as fast-style-transfer hard-codes it.
MATCONVNET_MEAN_RGB = (123.68, 116.779, 103.939)
# the conventions that feed 0-255 pixels minus a mean pixel (no std), and that mean by default
PIXEL_MEANS = {InputConvention.CAFFE: CAFFE_MEAN_BGR, InputConvention.MATCONVNET: MATCONVNET_MEAN_RGB}
PIXEL_CONVENTIONS = frozenset(PIXEL_MEANS)


class CaffePreset(torch.nn.Module):
    """Resize and center crop as torchvision's preset, then 0-255, mean-subtracted (no std), in BGR
    order (Caffe, Keras) or RGB (``bgr=False``: MatConvNet)."""

    def __init__(
        self, *, resize: int, crop: int, mean: tuple[float, ...], interpolation: Interpolation, bgr: bool = True
    ) -> None:
        super().__init__()
        from torchvision.transforms import InterpolationMode

        self.bgr = bgr
        self.resize, self.crop, self.interpolation = resize, crop, InterpolationMode(interpolation)
        self.mean: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))

    def forward(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F

        img = F.center_crop(F.resize(img, [self.resize], interpolation=self.interpolation, antialias=True), [self.crop])
        x = (img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)).float()  # (3, H, W), RGB, 0..255
        return (x.flip(0) if self.bgr else x) - self.mean  # BGR (or RGB), mean-subtracted


class Float64Preset(torch.nn.Module):
    """``ImageTransform.module`` in float64: resize and center crop the 8-bit image as the float32
    presets do, then convert, normalize (torchvision) or flip to BGR and subtract the mean (caffe; matconvnet
    without the flip) in float64."""

    def __init__(self, t: ImageTransform, convention: InputConvention) -> None:
        super().__init__()
        from torchvision.transforms import InterpolationMode

        self.resize, self.crop, self.interpolation = t.resize, t.crop, InterpolationMode(t.interpolation)
        self.pixels, self.bgr = convention in PIXEL_CONVENTIONS, convention == InputConvention.CAFFE
        self.mean = torch.tensor(t.mean, dtype=torch.float64).view(3, 1, 1)
        self.std = torch.tensor(t.std, dtype=torch.float64).view(3, 1, 1)

    def forward(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F

        img = F.center_crop(F.resize(img, [self.resize], interpolation=self.interpolation, antialias=True), [self.crop])
        x = (img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)).double()  # (3, H, W), RGB, 0..255
        if self.pixels:
            return (x.flip(0) if self.bgr else x) - self.mean
        return (x / 255 - self.mean) / self.std


def default_transform(
    arch: str,
    *,
    resize: int | None = None,
    crop: int | None = None,
    convention: InputConvention = InputConvention.TORCHVISION,
    mean_pixel: tuple[float, ...] | None = None,
) -> ImageTransform:
    """The image transform of the arch's torchvision weights, read from ``Weights.transforms()``.

    Under the caffe convention it keeps their resize, crop and interpolation but feeds the network as the
    original Caffe VGG was fed (``CaffePreset``); under matconvnet likewise, in RGB order. ``mean_pixel``
    (on 0-255, in the network's channel order) replaces their default mean: a MatConvNet file's own.
    """
    if is_user_model(arch):  # --model: ImageNet's preset, as torchvision's classifiers use
        preset = ImageTransform()
        size, crop_size, interpolation = preset.resize, preset.crop, preset.interpolation
        mean, std = preset.mean, preset.std
    else:
        import torchvision

        tv = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        size, crop_size = int(tv.resize_size[0]), int(tv.crop_size[0])
        interpolation = Interpolation(tv.interpolation.value)
        mean, std = tuple(float(x) for x in tv.mean), tuple(float(x) for x in tv.std)
    pixels = PIXEL_MEANS.get(convention)
    return ImageTransform(
        resize=resize if resize is not None else size,
        crop=crop if crop is not None else crop_size,
        interpolation=interpolation,
        mean=(mean_pixel or pixels) if pixels else mean,
        std=(1.0, 1.0, 1.0) if pixels else std,
    )


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root``, recursively, in a deterministic (sorted relative path) order.

    Extensions are matched case-insensitively; hidden files and folders are skipped; symlinked
    folders are followed once each, so a symlink loop cannot recurse forever.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give the folder that holds the images")
    found: list[Path] = []
    for dirpath, filenames in _walk(root):
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath, name))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise DataError(f"no images in {root} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)")
    return found


def refuse_outputs_in(outputs: Iterable[Path], root: Path, option: str) -> None:
    """Refuse, even with ``--force``, an output inside the image folder ``root`` (however spelled, through
    symlinks too) or that is one of its images (a hard link, a symlinked subfolder): it would overwrite
    an image, or become one at the next run."""
    top = Path(root).resolve()
    folders = _folders(root)
    for out in outputs:
        where = Path(out).parent.resolve() / Path(out).name
        if where == top or where.is_relative_to(top) or where.parent in folders or _is_one_of(out, root):
            raise OutputExistsError(
                f"{out} is inside the image folder {option} {root}: vggnorm never writes into its data, even with "
                "--force; choose a path outside it"
            )


def _folders(root: Path) -> set[Path]:
    """Every folder ``find_images`` reads under ``root``, resolved (symlinked subfolders lead elsewhere)."""
    return {Path(dirpath).resolve() for dirpath, _ in _walk(root)}


def _walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """The folders under ``root`` that hold images, with their file names: symlinks followed, each folder
    once (a link back up is no loop), hidden folders skipped."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield dirpath, filenames


def _is_one_of(path: Path, root: Path) -> bool:
    """Whether the existing file ``path`` is one of the images under ``root`` (same device and inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for f in find_images(root):
        with contextlib.suppress(OSError):
            other = os.stat(f)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def listing(root: Path, files: list[Path]) -> list[tuple[str, int]]:
    """Each file's path relative to ``root`` and its size (-1 for a broken symlink, which the loader
    then skips, naming it): what identifies a folder's contents."""
    out = []
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        out.append((f.relative_to(root).as_posix(), size))
    return out


def fingerprint(files: list[tuple[str, int]]) -> str:
    """sha256 over a ``listing``'s paths (their bytes: any name) and sizes."""
    h = hashlib.sha256()
    for name, size in files:
        h.update(os.fsencode(name) + f"\0{size}\n".encode())
    return h.hexdigest()


def dataset_fingerprint(root: Path, files: list[Path]) -> str:
    """Tells whether a folder's contents changed: ``fingerprint(listing(root, files))``."""
    return fingerprint(listing(root, files))


def listing_changes(old: list[tuple[str, int]], new: list[tuple[str, int]], shown: int = 3) -> str:
    """What differs between two listings, with the first names: ``1 added (extra.jpg); ...``."""
    before, after = dict(old), dict(new)
    parts = []
    for label, names in (
        ("added", sorted(set(after) - set(before))),
        ("removed", sorted(set(before) - set(after))),
        ("changed size", sorted(n for n in set(before) & set(after) if before[n] != after[n])),
    ):
        if names:
            more = f", ... {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {label} ({', '.join(printable(n) for n in names[:shown])}{more})")
    return "; ".join(parts) or "the same files in another order"


def printable(path: str | os.PathLike[str]) -> str:
    """A file name as text that any terminal, log or HDF5 string takes: bytes that are not UTF-8
    (``os.fsdecode``'s surrogates) are shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class NotARegularFile(OSError):
    """A FIFO, socket or device named like an image: reading it could block forever or never end."""


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def check_regular(path: str | os.PathLike[str]) -> None:
    """Raise ``NotARegularFile`` unless ``path`` is a regular file (following symlinks). Opened
    non-blocking to look, so a FIFO with no writer cannot hang the run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a plain file")
        raise NotARegularFile(f"not a regular file: {printable(path)} is {kind}")


class ImageTooLarge(ValueError):
    """An image whose resized size (the shorter side to ``--resize``) exceeds ``MAX_RESIZED_PIXELS``."""


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """The size torchvision's resize of the shorter side to ``resize`` gives (the longer side truncated)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def check_resized_size(width: int, height: int, resize: int) -> None:
    w, h = resized_size(max(width, 1), max(height, 1), resize)
    if w * h > MAX_RESIZED_PIXELS:
        raise ImageTooLarge(
            f"too large once resized: {width}x{height} resized to a shorter side of {resize} would be {w}x{h} "
            f"({w * h / 1e6:.0f} Mpx, more than the {MAX_RESIZED_PIXELS / 1e6:.0f} Mpx vggnorm allows)"
        )


def load_rgb(path: str | os.PathLike[str], *, resize: int | None = None) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB PIL image, as torchvision's ``pil_loader`` would.

    Unlike a bare ``convert("RGB")``, 16-bit and 32-bit grayscale are scaled to 8 bits rather than
    clipped, and transparency is dropped the way ``convert`` drops it (composited on black). With
    ``resize``, an image that resizing would make larger than ``MAX_RESIZED_PIXELS`` is refused
    (``ImageTooLarge``) before it is decoded.
    """
    with warnings.catch_warnings():
        # PIL warns above ~89 Mpx (decoded, as large photos are) and raises above ~179 Mpx (the
        # file is then skipped as a decompression bomb, with PIL's message as the reason).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        check_regular(path)
        with Image.open(path) as img:
            if resize is not None:
                check_resized_size(*img.size, resize)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
                return Image.fromarray(arr, mode="L").convert("RGB")
            if img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                arr = np.clip(np.rint(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
                return Image.fromarray(arr, mode="L").convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                return img.convert("RGBA").convert("RGB")
            return img.convert("RGB")


class Sample(NamedTuple):
    file_index: int
    image: torch.Tensor | None
    error: str | None


def failure(e: Exception) -> str:
    """The reason stored for a file that could not be decoded."""
    if isinstance(e, (NotARegularFile, ImageTooLarge)):
        return str(e)
    return f"cannot decode: {type(e).__name__}: {e}"


class FileRange(Dataset[Any]):
    """Files ``start..`` of ``files``; item ``i`` is file ``start + i``."""

    def __init__(self, files: list[Path], *, start: int = 0) -> None:
        self.files = files
        self.start = start

    def __len__(self) -> int:
        return len(self.files) - self.start


class ImageFiles(FileRange):
    """Decoded, preprocessed images; a file that fails gives ``Sample(index, None, reason)``."""

    def __init__(
        self,
        files: list[Path],
        transform: ImageTransform,
        convention: InputConvention = InputConvention.TORCHVISION,
        *,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(files, start=start)
        self.transform = transform.module(convention, dtype)
        self.resize = transform.resize

    def __getitem__(self, i: int) -> Sample:
        index = self.start + i
        try:
            image = self.transform(load_rgb(self.files[index], resize=self.resize))
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return Sample(index, None, failure(e))
        return Sample(index, image, None)


def collate(samples: list[Sample]) -> Batch:
    good = [s for s in samples if s.image is not None]
    images = torch.stack([s.image for s in good if s.image is not None]) if good else None
    return Batch(
        images, [s.file_index for s in good], [(s.file_index, s.error or "") for s in samples if s.image is None]
    )


def default_workers() -> int:
    """All CPUs but one for decoding (at least one, at most 16)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus - 1))


def make_loader(
    files: list[Path],
    transform: ImageTransform,
    convention: InputConvention = InputConvention.TORCHVISION,
    *,
    decoder: Decoder = Decoder.CPU,
    batch_size: int,
    workers: int,
    start: int = 0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterable[Batch]:
    """Batches of files ``start..`` in order; workers decode the next batches while one runs.

    ``dtype=torch.float64`` (``--precision fp64``) preprocesses in float64 (``ImageTransform.module``).
    With ``decoder=Decoder.GPU`` the workers read bytes and the JPEGs are decoded on
    ``device`` (``decode_on_device``); the batches' images are then already there.
    """
    from vggnorm.io.gpu_decode import RawFiles, decode_on_device

    device = device if device is not None else torch.device("cpu")
    gpu = decoder == Decoder.GPU
    loader: DataLoader[Any] = DataLoader(
        RawFiles(files, start=start, resize=transform.resize)
        if gpu
        else ImageFiles(files, transform, convention, start=start, dtype=dtype),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=list if gpu else collate,
        pin_memory=device.type == "cuda" and not gpu,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    return decode_on_device(loader, transform, convention, device) if gpu else loader


def check_decode(decoder: Decoder, device: torch.device) -> None:
    """``--decode gpu`` needs the measurement to run on CUDA."""
    if decoder == Decoder.GPU and device.type != "cuda":
        raise SetupError(
            f"--decode gpu decodes JPEGs with nvJPEG on a CUDA device, and this run is on {device.type}; "
            "leave it out (--decode cpu, the default, decodes in DataLoader workers)"
        )
