"""Names and defaults shared by the command line and the library.

This module imports nothing heavy (no torch), so ``vggnorm --help`` and usage errors answer at
once: the CLI builds its options from these constants and imports the library only to run.
"""

from __future__ import annotations

VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
DEFAULT_ARCH = "vgg19"
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
RANDOM_PREFIX = "random:"

# Measurement policies, recorded in the statistics file and honoured by verify.
POOLINGS = ("max", "avg")
PREPROCESSINGS = ("torchvision", "caffe")
# cpu: DataLoader workers decode and resize with PIL, as torchvision's own pipeline does.
# gpu: workers only read the files; plain JPEGs are decoded in batches by nvJPEG and resized as
# tensors on the device. Tensor resizing rounds differently from PIL's (up to 1 level of 255 in a
# pixel), which moved VGG11's means by up to 8.5e-3 relative on 16 photos: the decoder is part of
# the measurement policy, recorded in the stats file, and verify re-measures with the same one.
DECODERS = ("cpu", "gpu")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

# On-disk layouts of a normalized checkpoint (see layouts.py).
LAYOUTS = ("torchvision", "gatys")

# The dead-filter rule (normalize.DeadRule): a filter whose mean is <= eps is dead.
DEFAULT_EPS = 1e-6

# verify's tolerances (checks.py).
DEFAULT_RTOL = 1e-4  # activations and logits (run in float64), fold: float32 weight rounding is ~1e-7
DEFAULT_MEANS_TOL = 1e-3  # |mean - 1| for every live filter on the calibration images

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHECKPOINT_SECONDS = 60.0
