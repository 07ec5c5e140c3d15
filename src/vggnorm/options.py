"""The options that take one of a few named values, one ``StrEnum`` each.

The command line's choices are these enums' values (``click.Choice`` is built from them), the Python API
accepts a member or its value, and both convert once, at their boundary (``parse``); everything below takes
the members. A member is a ``str`` equal to its value, which is what the statistics files, the
checkpoints' metadata and the reports record. This module imports nothing heavy (no torch), so ``vggnorm
--help`` answers at once.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from vggnorm.errors import UsageError


class Layout(StrEnum):
    """On-disk layout of a normalized checkpoint (``io.layouts``, ``io.formats``)."""

    TORCHVISION = "torchvision"  # loads into torchvision's model
    GATYS = "gatys"  # conv layers only, keyed conv1_1 ... conv5_4
    ADAIN = "adain"  # AdaIN's VGG19 encoder
    KERAS = "keras"  # the input Keras file's own format, written like it
    MATCONVNET = "matconvnet"  # the input MatConvNet file's own format, written like it


class Weighting(StrEnum):
    """Which means are normalized to 1."""

    IMAGE = "image"  # every image and position counts alike
    CLASS = "class"  # the mean of the per-class means (--per-class)


class StreamScale(StrEnum):
    """The scale the sites of a residual stream (joined by adds) share, per channel, from their means."""

    GEOMETRIC = "geometric"  # the geometric mean of the members' means (the smallest log-deviation from 1)
    LAST = "last"  # the stream's last site's (its means become 1, the earlier members' do not)


class Precision(StrEnum):
    """Arithmetic of the forward pass; fp32 and fp64 run on CPU too, the others on CUDA only."""

    FP32 = "fp32"
    FP64 = "fp64"
    TF32 = "tf32"
    BF16 = "bf16"
    FP16 = "fp16"


class Pooling(StrEnum):
    """The forward policy's pooling: the model's max pooling, or average pooling as Gatys et al. synthesized."""

    MAX = "max"
    AVG = "avg"


class Padding(StrEnum):
    """The forward policy's padding."""

    MODEL = "model"  # every conv pads as the model is written (torchvision's VGGs: zeros)
    ZEROS = "zeros"  # every padded conv is made to pad by zeros
    REFLECT = "reflect"  # ... by reflection (AdaIN's VGG encoder)


class InputConvention(StrEnum):
    """What the network's input is (``--preprocess``)."""

    TORCHVISION = "torchvision"  # RGB, 0-1, mean/std
    CAFFE = "caffe"  # BGR, 0-255, mean pixel subtracted (Caffe's and Keras' VGGs)
    MATCONVNET = "matconvnet"  # RGB, 0-255, mean pixel subtracted (MatConvNet's imagenet-vgg-verydeep-*.mat)


class Decoder(StrEnum):
    """Who decodes and resizes the images.

    cpu: DataLoader workers decode and resize with PIL, as torchvision's own pipeline does. gpu: workers only
    read the files; plain JPEGs are decoded in batches by nvJPEG and resized as tensors on the device. Tensor
    resizing rounds differently from PIL's (up to 1 level of 255 in a pixel), which moved VGG11's means by up
    to 8.5e-3 relative on 16 photos: the decoder is part of the measurement policy, recorded in the statistics
    file, and verify re-measures with the same one.
    """

    CPU = "cpu"
    GPU = "gpu"


class Interpolation(StrEnum):
    """The resize's interpolation: torchvision's ``InterpolationMode`` values (PIL images take them all)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: E | str, name: str) -> E:
    """``value`` as a member of ``kind``: a member, or the string of one; else a ``UsageError`` naming
    ``name`` (the option) and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{name} {value!r}: expected one of {', '.join(kind)}") from None
