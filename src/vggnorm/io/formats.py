"""Weight files of other frameworks: Keras VGG16/VGG19 (HDF5) and MatConvNet VGGs (``.mat``).

A file is recognized by its content (its first bytes, then its structure), never by its name:

* **Keras** (``keras_h5.py``): an HDF5 file in the legacy layout that ``keras.applications`` downloads
  (root attribute ``layer_names``) or Keras 3's ``model.save_weights("x.weights.h5")`` (``layers/``).
* **MatConvNet** (``matconvnet.py``): a MATLAB 5 file with a ``layers`` cell array, as
  ``imagenet-vgg-verydeep-19.mat`` (and -16) that neural-style code reads with ``scipy.io.loadmat``.

Each is read exactly into torchvision's module tree (``features.N``, ``classifier.N``) as a
``Foreign``, which also keeps what it takes to write the same file back with other values
(``write_foreign``): apply's ``--layout keras`` / ``--layout matconvnet`` use the input file as the
template, so the output has the input's structure, names and attributes, and the user's loading code
does not change. Anything that is not a VGG16/VGG19 in these layouts is refused with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vggnorm.core.state import StateDict
from vggnorm.errors import CheckpointError, InputError, OutputError
from vggnorm.options import InputConvention, Layout

KERAS = "keras"
MATCONVNET = "matconvnet"
FOREIGN_LAYOUTS = (KERAS, MATCONVNET)

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAT5 = b"MATLAB 5.0 MAT-file"
_MAT73 = b"MATLAB 7.3 MAT-file"


@dataclass(frozen=True)
class Foreign:
    """A Keras or MatConvNet VGG read into torchvision's layout, and what writing it back needs."""

    path: Path
    format: str  # KERAS or MATCONVNET
    flavor: str  # keras: "legacy" or "keras3"; matconvnet: "old" (top-level normalization) or "new" (meta)
    arch: str  # vgg16 or vgg19
    state_dict: StateDict  # torchvision's keys, its order of dimensions
    top: bool  # whether the classifier is in the file
    preprocess: InputConvention  # how the file's own users feed it: caffe (Keras) or matconvnet
    mean: tuple[float, ...]  # subtracted from the 0-255 pixels, in the channel order the network reads
    # torchvision key -> where its tensor is in the file (an HDF5 dataset path; for .mat a layer index)
    places: dict[str, str] = field(default_factory=dict)
    top_layers: tuple[str, ...] = ()  # the file's names of the classifier's layers

    def describe(self) -> str:
        kind = {
            "legacy": "Keras legacy HDF5 (the layout keras.applications downloads)",
            "keras3": "Keras 3 .weights.h5 (model.save_weights)",
            "old": "MatConvNet .mat (older layout: top-level normalization)",
            "new": "MatConvNet .mat (newer layout: meta)",
        }[self.flavor]
        return f"{self.arch} weights in {kind}, {'with' if self.top else 'without'} the top"


def sniff(path: str | os.PathLike[str]) -> str | None:
    """``keras`` for an HDF5 file, ``matconvnet`` for a MATLAB 5 file, None for anything else (a
    PyTorch checkpoint, say); a MATLAB 7.3 file (HDF5 inside) is refused, as scipy cannot read it."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return None
    if head.startswith(_MAT73):
        raise CheckpointError(
            f"{path} is a MATLAB 7.3 file, which scipy.io.loadmat (and the style-transfer loaders) cannot read; "
            "save it from MATLAB with save(..., '-v7')"
        )
    if head.startswith(_MAT5):
        return MATCONVNET
    if head.startswith(_HDF5_SIGNATURE) or head[512:520] == _HDF5_SIGNATURE:
        return KERAS
    return None


def read_foreign(path: str | os.PathLike[str]) -> Foreign | None:
    """The Keras or MatConvNet VGG in ``path``, or None when the file is neither HDF5 nor MATLAB."""
    kind = sniff(path)
    if kind == KERAS:
        from vggnorm.io.keras_h5 import read_keras

        return read_keras(Path(path))
    if kind == MATCONVNET:
        from vggnorm.io.matconvnet import read_matconvnet

        return read_matconvnet(Path(path))
    return None


def peek(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(format, flavor) of a Keras or MatConvNet file, from its structure alone (no weights read);
    None for other files. A file in neither layout is refused as ``read_foreign`` refuses it."""
    kind = sniff(path)
    if kind == KERAS:
        from vggnorm.io.keras_h5 import keras_flavor

        return KERAS, keras_flavor(Path(path))
    if kind == MATCONVNET:
        from vggnorm.io.matconvnet import mat_flavor

        return MATCONVNET, mat_flavor(Path(path))
    return None


def native_preprocess(path: str | os.PathLike[str]) -> tuple[InputConvention, tuple[float, ...]] | None:
    """How a Keras or MatConvNet file's users feed it (preprocessing, mean pixel), read without its weights."""
    found = peek(path)
    if found is None:
        return None
    if found[0] == KERAS:
        from vggnorm.io.data import CAFFE_MEAN_BGR

        return InputConvention.CAFFE, CAFFE_MEAN_BGR
    from vggnorm.io.matconvnet import mean_pixel

    return InputConvention.MATCONVNET, mean_pixel(Path(path))


def template_flavor(checkpoint: str, layout: Layout) -> str:
    """Refuse, before any work, a CKPT that ``--layout keras`` / ``--layout matconvnet`` cannot write
    the output like; its flavor (``legacy``/``keras3``, ``old``/``new``)."""
    what = {KERAS: "a Keras VGG16/VGG19 .h5 file", MATCONVNET: "a MatConvNet imagenet-vgg-verydeep-16/19 .mat file"}
    found = peek(checkpoint) if os.path.isfile(checkpoint) else None
    if found is None or found[0] != layout:
        raise InputError(
            f"--layout {layout} writes the output in the structure of its input, so CKPT must be {what[layout]}; "
            f"{checkpoint} is {f'a {found[0]} file' if found else 'not'}. Use --layout torchvision (or gatys) for it"
        )
    return found[1]


def check_output_name(output: Path, layout: str, flavor: str | None) -> None:
    """An output whose name tells its loader another format is refused: Keras picks its loader by the
    name (``.weights.h5``: Keras 3; ``.h5``: legacy), torch.save and savemat files are not HDF5."""
    name = output.name.lower()
    h5 = name.endswith((".h5", ".hdf5"))
    if layout == KERAS:
        if flavor == "keras3" and not name.endswith(".weights.h5"):
            raise OutputError(
                f"-o {output}: the input is a Keras 3 .weights.h5 file, and Keras reads that layout only from a "
                "name ending in .weights.h5; name the output so"
            )
        if flavor == "legacy" and (not h5 or name.endswith(".weights.h5")):
            raise OutputError(
                f"-o {output}: the input is a legacy Keras .h5 file, and Keras reads that layout from a name ending "
                "in .h5 (not .weights.h5, which it reads as Keras 3's layout); name the output so"
            )
    elif layout == MATCONVNET:
        if not name.endswith(".mat"):
            raise OutputError(f"-o {output}: --layout matconvnet writes a MATLAB file; name it NAME.mat")
    elif h5 or name.endswith(".mat"):
        raise OutputError(
            f"-o {output}: --layout {layout} writes a PyTorch state_dict, not "
            f"{'HDF5' if h5 else 'a MATLAB file'}; pass --layout {KERAS if h5 else MATCONVNET} to write the input's "
            "own format, or name the output .pth or .safetensors"
        )


def write_foreign(template: Foreign, state_dict: StateDict, out: Path, *, features_only: bool) -> None:
    """Write ``state_dict`` (torchvision's layout) into a copy of ``template``'s file at ``out``:
    the same structure, names and attributes, other weights; ``features_only`` drops the top."""
    if template.format == KERAS:
        from vggnorm.io.keras_h5 import write_keras

        write_keras(template, state_dict, out, features_only=features_only)
    else:
        from vggnorm.io.matconvnet import write_matconvnet

        write_matconvnet(template, state_dict, out, features_only=features_only)


def conv_paths(arch: str) -> list[str]:
    """The module paths of a plain VGG's convs, in forward order (``features.0``, ``features.2``, ...)."""
    from vggnorm.io.models import feature_kinds

    return [f"features.{i}" for i, kind in enumerate(feature_kinds(arch)) if kind == "conv"]


def conv_channels(arch: str) -> list[tuple[int, int]]:
    """(in, out) channels of each of a plain VGG's convs, in forward order."""
    from vggnorm.io.models import _VGG_CFGS

    out, c = [], 3
    for v in _VGG_CFGS[arch]:
        if isinstance(v, int):
            out.append((c, v))
            c = v
    return out


ARCH_BY_CONVS = {13: "vgg16", 16: "vgg19"}
# torchvision's classifier Linear layers, in order: fc6 (fc1 in Keras), fc7 (fc2), fc8 (predictions)
CLASSIFIER = ("classifier.0", "classifier.3", "classifier.6")
FC_SHAPES = ((4096, 25088), (4096, 4096), (1000, 4096))  # torchvision's (out, in)
