"""Names and defaults shared by the command line and the library.

This module imports nothing heavy (no torch), so ``vggnorm --help`` and usage errors answer at
once: the CLI builds its options from these constants and imports the library only to run.
"""

from __future__ import annotations

VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
# archs known by name: inferred from a state_dict's keys and shapes (other torchvision
# classification models are accepted with --arch where the structural analysis succeeds)
NAMED_ARCHS = (*VGG_ARCHS, "alexnet")
# torchvision's classification models (``torchvision.models.list_models(module=torchvision.models)``) for
# the torchvision version below: an unknown ``--arch`` is a usage error at once, without importing torch
# (a test holds the list equal to torchvision's). Another installed version is asked instead.
TORCHVISION_VERSION = "0.29.1"
TORCHVISION_CLASSIFIERS = (
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_16gf",
    "regnet_x_1_6gf",
    "regnet_x_32gf",
    "regnet_x_3_2gf",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_8gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_1_6gf",
    "regnet_y_32gf",
    "regnet_y_3_2gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_8gf",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet101_2",
    "wide_resnet50_2",
)


def torchvision_classifiers() -> tuple[str, ...]:
    """torchvision's classification model names: the list above when that version is installed (no import
    of torch), else torchvision's own answer."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("torchvision").split("+")[0]
    except PackageNotFoundError:
        installed = ""
    if installed == TORCHVISION_VERSION:
        return TORCHVISION_CLASSIFIERS
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


DEFAULT_ARCH = "vgg19"
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
RANDOM_PREFIX = "random:"

# The dead-filter rule (normalize.DeadRule): a filter is dead, and left unscaled, when its mean is
# <= max(eps, rel_eps * the median of its layer's positive means). rel_eps = 1e-3 is measured, not
# guessed: on random-weight VGGs (many near-dead filters) with 16 photos, filters kept live at
# rel_eps = 1e-3 re-measure in float32 within 2.5e-5 of 1 (conv) and 3.6e-4 (fc); at 1e-4, fc
# units came back 1.9e-3 off, beyond verify's 1e-3 (docs/explanation/precision.md, "Dead filters").
DEFAULT_EPS = 1e-6
DEFAULT_REL_EPS = 1e-3

# verify's tolerances (core/checks.py).
DEFAULT_RTOL = 1e-4  # activations and logits (run in float64), fold: float32 weight rounding is ~1e-7
DEFAULT_MEANS_TOL = 1e-3  # |mean - 1| for every live filter on the calibration images

# The largest image the resize may make (pixels; 48 MB as 8-bit RGB): a 143-byte 20000x1 PNG resized
# to a shorter side of 256 would be 5,120,000 x 256 (3.9 GB), and --resize 100000 would resize every
# image to at least 100000x100000. An image that would exceed it is skipped; a larger --resize refused.
MAX_RESIZED_PIXELS = 2**24
MAX_RESIZE = 4096  # the square root

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHECKPOINT_SECONDS = 60.0
