"""Names and defaults shared by the command line and the library.

This module imports nothing heavy (no torch), so ``vggnorm --help`` and usage errors answer at
once: the CLI builds its options from these constants and imports the library only to run.
"""

from __future__ import annotations

VGG_ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
# archs known by name: inferred from a state_dict's keys and shapes (other torchvision
# classification models are accepted with --arch where the structural analysis succeeds)
NAMED_ARCHS = (*VGG_ARCHS, "alexnet")
DEFAULT_ARCH = "vgg19"
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
RANDOM_PREFIX = "random:"

# Measurement policies, recorded in the statistics file and honoured by verify.
POOLINGS = ("max", "avg")
# model: every conv pads as the model is written (torchvision's VGGs: zeros); zeros / reflect: every padded
# conv is made to pad by zeros / by reflection (AdaIN's VGG encoder), a measurement policy asked for by name
PADDINGS = ("model", "zeros", "reflect")
PREPROCESSINGS = ("torchvision", "caffe")
# cpu: DataLoader workers decode and resize with PIL, as torchvision's own pipeline does.
# gpu: workers only read the files; plain JPEGs are decoded in batches by nvJPEG and resized as
# tensors on the device. Tensor resizing rounds differently from PIL's (up to 1 level of 255 in a
# pixel), which moved VGG11's means by up to 8.5e-3 relative on 16 photos: the decoder is part of
# the measurement policy, recorded in the stats file, and verify re-measures with the same one.
DECODERS = ("cpu", "gpu")
# image: every image and position counts alike; class: the mean of the per-class means (--per-class)
WEIGHTINGS = ("image", "class")
PRECISIONS = ("fp32", "fp64", "tf32", "bf16", "fp16")  # fp32 and fp64 run on CPU too

# On-disk layouts of a normalized checkpoint (see layouts.py).
LAYOUTS = ("torchvision", "gatys", "adain")

# The dead-filter rule (normalize.DeadRule): a filter is dead, and left unscaled, when its mean is
# <= max(eps, rel_eps * the median of its layer's positive means). rel_eps = 1e-3 is measured, not
# guessed: on random-weight VGGs (many near-dead filters) with 16 photos, filters kept live at
# rel_eps = 1e-3 re-measure in float32 within 2.5e-5 of 1 (conv) and 3.6e-4 (fc); at 1e-4, fc
# units came back 1.9e-3 off, beyond verify's 1e-3 (README, "Dead filters").
DEFAULT_EPS = 1e-6
DEFAULT_REL_EPS = 1e-3

# verify's tolerances (checks.py).
DEFAULT_RTOL = 1e-4  # activations and logits (run in float64), fold: float32 weight rounding is ~1e-7
DEFAULT_MEANS_TOL = 1e-3  # |mean - 1| for every live filter on the calibration images

DEFAULT_BATCH_SIZE = 32
DEFAULT_CHECKPOINT_SECONDS = 60.0
