"""``--decode gpu``: workers read the files' bytes; plain JPEGs are decoded in batches by nvJPEG on
the CUDA device and preprocessed there; everything else is decoded by PIL in the workers, so the
same files are used or skipped, for the same reasons, as with the CPU decoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from vggnorm.core.measure import Batch
from vggnorm.io.data import FileRange, ImageTransform, check_regular, check_resized_size, failure, load_rgb
from vggnorm.options import InputConvention

# SOF markers nvJPEG decodes: baseline, extended sequential and progressive Huffman JPEG.
_NVJPEG_SOF = frozenset({0xC0, 0xC1, 0xC2})


def plain_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a complete 8-bit Huffman JPEG with 1 or 3 components and no Adobe marker.

    Only such files go to the device's decoder. Anything else (a PNG named .JPEG, CMYK or YCCK,
    12-bit, lossless or arithmetic-coded, an Adobe RGB-transform JPEG, a file cut off before its
    end marker) is decoded by PIL instead, so it is used, or skipped, as with ``--decode cpu``.
    """
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xEE and data[i + 4 : i + 9] == b"Adobe":  # its colour transform flag is PIL's to read
            return False
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (not DHT/JPG/DAC)
            # FF Cn, length (2), precision (1), height (2), width (2), components (1)
            return marker in _NVJPEG_SOF and i + 10 <= len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker == 0xDA:  # a scan before any frame header
            return False
        i += 2 + length
    return False


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's (width, height) from its frame header, without decoding it (None if there is none)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


class Raw(NamedTuple):
    """A file as the workers hand it over for ``--decode gpu``: one of jpeg, pixels and error is set."""

    file_index: int
    path: str
    jpeg: torch.Tensor | None  # (bytes,) uint8: a plain JPEG, for the device's decoder
    pixels: torch.Tensor | None  # (3, H, W) uint8: anything else, decoded to RGB by PIL
    error: str | None


class RawFiles(FileRange):
    """The files' bytes (plain JPEGs) or PIL-decoded pixels (the rest), neither resized. With ``resize``, an
    image the resize would make larger than ``MAX_RESIZED_PIXELS`` is refused before it is decoded."""

    def __init__(self, files: list[Path], *, start: int = 0, resize: int | None = None) -> None:
        super().__init__(files, start=start)
        self.resize = resize

    def __getitem__(self, i: int) -> Raw:
        from torchvision.transforms.functional import pil_to_tensor

        index = self.start + i
        path = self.files[index]
        try:
            check_regular(path)
            data = path.read_bytes()
            if plain_jpeg(data):
                size = jpeg_size(data)
                if size is not None and self.resize is not None:
                    check_resized_size(*size, self.resize)
                return Raw(index, str(path), torch.frombuffer(bytearray(data), dtype=torch.uint8), None, None)
            return Raw(index, str(path), None, pil_to_tensor(load_rgb(path, resize=self.resize)), None)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            return Raw(index, str(path), None, None, failure(e))


def decode_jpegs(jpegs: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor | str]:
    """Each JPEG (the bytes of the file at the same place in ``paths``) decoded to (3, H, W) uint8
    RGB on ``device``, or the reason it could not be.

    One batched nvJPEG call; a batch fails as a whole when one stream is bad, and then each is
    decoded alone, with PIL on the CPU (from its path) for any the device's decoder refuses.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.functional import pil_to_tensor

    if not jpegs:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec's; this is the one call to swap.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | str] = []
        for jpeg, path in zip(jpegs, paths, strict=True):
            try:
                out.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
                continue
            except RuntimeError:
                pass
            try:
                out.append(pil_to_tensor(load_rgb(path)).to(device))
            except Exception as e:
                out.append(failure(e))
        return out


def decode_on_device(
    batches: Iterable[list[Raw]], image: ImageTransform, convention: InputConvention, device: torch.device
) -> Iterator[Batch]:
    """``Batch``es with images on ``device``: JPEGs decoded there, every image preprocessed there."""
    transform = image.module(convention).to(device)
    for raws in batches:
        images: dict[int, torch.Tensor] = {}
        failures = [(r.file_index, r.error) for r in raws if r.error is not None]
        for r in raws:
            if r.pixels is not None:
                images[r.file_index] = transform(r.pixels.to(device))
        jpegs = [r for r in raws if r.jpeg is not None]
        decoded_jpegs = decode_jpegs([r.jpeg for r in jpegs if r.jpeg is not None], [r.path for r in jpegs], device)
        for r, decoded in zip(jpegs, decoded_jpegs, strict=True):
            if isinstance(decoded, str):
                failures.append((r.file_index, decoded))
            else:
                images[r.file_index] = transform(decoded)  # (3, H, W) uint8 -> (3, crop, crop) float
        order = sorted(images)
        yield Batch(torch.stack([images[i] for i in order]) if order else None, order, sorted(failures))
