"""MatConvNet VGGs (``imagenet-vgg-verydeep-16.mat``, ``-19.mat``), read and written with scipy.io.

What the style-transfer loaders (anishathalye/neural-style's and lengstrom/fast-style-transfer's
``vgg.py``) rely on, after ``scipy.io.loadmat``:

* ``layers``: a 1xN cell array of structs, one per layer, in the network's order (conv, relu, ...,
  pool: a VGG's ``features`` order, then fc6, relu6, fc7, relu7, fc8 as convs and a softmax). The
  loaders take the i-th layer of their own list of names as the i-th cell.
* a conv's ``weights``: a 1x2 cell ``{kernel, bias}``, the kernel ``[w, h, in, out]`` (the loaders
  transpose it to TensorFlow's ``[h, w, in, out]``; torchvision's is ``[out, in, h, w]``), single
  precision. In the older layout ``weights`` is each conv struct's first field; in the newer one its
  third (after ``name`` and ``type``).
* the input: RGB on 0-255 minus the mean pixel: ``normalization.averageImage`` averaged over the
  image (older layout) or ``meta.normalization.averageImage`` (newer layout, one pixel).

fc6 is a 7x7 conv on the 7x7x512 map, its kernel ``[w, h, c, out]``: flattened in torchvision's
(c, h, w) order it is ``classifier.0``. Writing loads the input file again and replaces the weights
in place, so the output has the same structs, fields, field order and values (``savemat`` writes
MATLAB logicals back as uint8, which the loaders do not look at).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from vggnorm.core.state import StateDict
from vggnorm.errors import CheckpointError, SetupError, VggnormError
from vggnorm.io.formats import ARCH_BY_CONVS, CLASSIFIER, FC_SHAPES, MATCONVNET, Foreign, conv_channels
from vggnorm.options import InputConvention

TOP = ("conv", "relu", "conv", "relu", "conv")  # fc6, relu6, fc7, relu7, fc8; then an optional softmax


def _scipy_io() -> ModuleType:
    try:
        import scipy.io
    except ImportError as e:
        raise SetupError(
            "reading and writing MatConvNet .mat files needs scipy, which is not installed: pip install scipy"
        ) from e
    module: ModuleType = scipy.io
    return module


def _load(path: Path, names: list[str] | None = None) -> dict[str, Any]:
    try:
        return dict(_scipy_io().loadmat(str(path), variable_names=names))  # as the loaders call it: records
    except VggnormError:
        raise
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ... on damaged files
        raise CheckpointError(f"{path} is a MATLAB file that scipy.io.loadmat cannot read: {e}") from e


def _text(value: Any) -> str:
    """A MATLAB char array as loadmat gives it (``array(['conv1_1'])``), as a str; '' for anything else."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size == 1:
        return str(value.flat[0])
    return ""


def _struct(value: Any) -> Any:
    """The record of a 1x1 MATLAB struct, or None."""
    if isinstance(value, np.ndarray) and value.dtype.names and value.size == 1:
        return value.flat[0]
    return None


def _field(record: Any, name: str) -> Any:
    return record[name] if record is not None and name in record.dtype.names else None


def _layers(path: Path, data: dict[str, Any]) -> list[Any]:
    cells = data.get("layers")
    if not (isinstance(cells, np.ndarray) and cells.dtype == object and cells.ndim == 2 and cells.shape[0] == 1):
        raise CheckpointError(
            f"{path} is a MATLAB file without a 1xN cell array `layers`: not a MatConvNet SimpleNN network (the "
            "imagenet-vgg-verydeep-16/19.mat layout; DagNN files, whose layers are a struct array, are not read)"
        )
    records = [_struct(c) for c in cells[0]]
    bad = [i for i, r in enumerate(records) if r is None or "type" not in r.dtype.names]
    if bad:
        raise CheckpointError(f"{path}: layers{{{bad[0] + 1}}} is not a MatConvNet layer struct (with a type field)")
    return records


def _conv_weights(path: Path, index: int, record: Any) -> tuple[np.ndarray, np.ndarray]:
    w = _field(record, "weights")
    if not (isinstance(w, np.ndarray) and w.dtype == object and w.size == 2):
        raise CheckpointError(
            f"{path}: conv layer {index + 1} ({_text(_field(record, 'name'))}) has no 1x2 cell `weights` "
            "{kernel, bias}: not the MatConvNet layout the style-transfer loaders read"
        )
    kernel, bias = (np.asarray(x) for x in w.flat)
    return kernel, bias


def _flavor(path: Path, names: set[str]) -> str:
    """``old`` (top-level normalization) or ``new`` (meta), from the file's variable names."""
    if "layers" not in names:
        raise CheckpointError(
            f"{path} is a MATLAB file without a 1xN cell array `layers`: not a MatConvNet network (the "
            "imagenet-vgg-verydeep-16/19.mat layout)"
        )
    if "normalization" in names:
        return "old"
    if "meta" in names:
        return "new"
    raise CheckpointError(
        f"{path} has MatConvNet layers but neither `normalization` nor `meta.normalization`: the input's mean is unknown"
    )


def mat_flavor(path: Path) -> str:
    """The layout of the MatConvNet file ``path``, from its variables' names (nothing is loaded)."""
    try:
        names = {entry[0] for entry in _scipy_io().whosmat(str(path))}
    except VggnormError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is a MATLAB file that scipy.io cannot read: {e}") from e
    return _flavor(path, names)


def mean_pixel(path: Path) -> tuple[float, ...]:
    """The mean pixel (RGB, 0-255) the file's input is centred on; only the normalization is loaded."""
    flavor = mat_flavor(path)
    return _mean_pixel(path, _load(path, ["normalization" if flavor == "old" else "meta"]))[1]


def _mean_pixel(path: Path, data: dict[str, Any]) -> tuple[str, tuple[float, ...]]:
    """The layout (``old``: top-level normalization; ``new``: meta) and the mean pixel (RGB)."""
    flavor = _flavor(path, {*data, "layers"})
    if flavor == "old":
        norm = _struct(data["normalization"])
    else:
        norm = _struct(_field(_struct(data["meta"]), "normalization"))
    average = _field(norm, "averageImage")
    if not (isinstance(average, np.ndarray) and average.dtype.kind == "f" and average.shape[-1:] == (3,)):
        found = "missing" if average is None else f"of shape {getattr(average, 'shape', '?')}"
        raise CheckpointError(
            f"{path}: the normalization's averageImage is {found}, not an RGB image or pixel: the input's mean is "
            "unknown"
        )
    mean = np.asarray(average, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return flavor, tuple(float(x) for x in mean)


def read_matconvnet(path: Path) -> Foreign:
    """The MatConvNet VGG16/VGG19 in ``path`` in torchvision's layout."""
    from vggnorm.io.models import feature_kinds

    data = _load(path)
    records = _layers(path, data)
    types = [_text(_field(r, "type")) for r in records]
    convs3 = sum(1 for t, r in zip(types, records, strict=True) if t == "conv" and _is_3x3(r))
    arch = ARCH_BY_CONVS.get(convs3)
    if arch is None:
        raise CheckpointError(
            f"{path} is a MatConvNet network with {convs3} 3x3 convs; VGG16 has 13 and VGG19 16: not a VGG16/VGG19"
        )
    kinds = feature_kinds(arch)
    last = types[-1] if types and types[-1] in ("softmax", "softmaxloss") else "softmax"
    valid = [kinds, [*kinds, *TOP], [*kinds, *TOP, last]]  # features only; with the top (and its softmax)
    if types not in valid:
        ref = max(valid, key=lambda v: _agree(types, v))
        first = _agree(types, ref)
        found = types[first] if first < len(types) else "missing"
        raise CheckpointError(
            f"{path}: layer {first + 1} is {found!r} where {arch} has {ref[first] if first < len(ref) else 'none'!r} "
            f"(layers: {' '.join(types)}): not a MatConvNet VGG16/VGG19"
        )
    top = len(types) > len(kinds)
    flavor, mean = _mean_pixel(path, data)
    sd: StateDict = {}
    places: dict[str, str] = {}
    conv_indices = [i for i, kind in enumerate(kinds) if kind == "conv"]
    for index, (c_in, c_out) in zip(conv_indices, conv_channels(arch), strict=True):
        kernel, bias = _checked(path, index, records[index], (3, 3, c_in, c_out))
        key = f"features.{index}"
        sd[f"{key}.weight"] = _tensor(kernel.transpose(3, 2, 1, 0))  # [w, h, in, out] -> [out, in, h, w]
        sd[f"{key}.bias"] = _tensor(bias.reshape(-1))
        places[key] = str(index)
    if top:
        fc_indices = [len(kinds), len(kinds) + 2, len(kinds) + 4]
        sizes = ((7, 7, 512), (1, 1, 4096), (1, 1, 4096))
        for index, linear, (c_out, _), size in zip(fc_indices, CLASSIFIER, FC_SHAPES, sizes, strict=True):
            kernel, bias = _checked(path, index, records[index], (*size, c_out))
            sd[f"{linear}.weight"] = _tensor(linear_from_matconvnet(kernel))
            sd[f"{linear}.bias"] = _tensor(bias.reshape(-1))
            places[linear] = str(index)
    return Foreign(
        path, MATCONVNET, flavor, arch, sd, top=top, preprocess=InputConvention.MATCONVNET, mean=mean, places=places
    )


def _agree(a: list[str], b: list[str]) -> int:
    """How many leading entries ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _is_3x3(record: Any) -> bool:
    w = _field(record, "weights")
    if isinstance(w, np.ndarray) and w.dtype == object and w.size == 2:
        kernel = np.asarray(w.flat[0])
        return kernel.ndim == 4 and kernel.shape[:2] == (3, 3)
    return False


def _checked(path: Path, index: int, record: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    kernel, bias = _conv_weights(path, index, record)
    if tuple(kernel.shape) != shape or bias.size != shape[-1]:
        raise CheckpointError(
            f"{path}: layer {index + 1} ({_text(_field(record, 'name'))}) has kernel {tuple(kernel.shape)} and "
            f"{bias.size} biases, where a VGG's has {shape} and {shape[-1]}: not a MatConvNet VGG16/VGG19"
        )
    return kernel, bias


def linear_from_matconvnet(kernel: np.ndarray) -> np.ndarray:
    """fc6-fc8, convs ``[w, h, in, out]`` over the whole map (7x7, then 1x1), as torchvision's Linear
    ``[out, in * h * w]`` reading the map flattened in (c, h, w) order."""
    return kernel.transpose(3, 2, 1, 0).reshape(kernel.shape[3], -1)


def linear_to_matconvnet(weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``linear_from_matconvnet`` into a kernel of ``shape`` (``[w, h, in, out]``)."""
    return weight.reshape(shape[::-1]).transpose(3, 2, 1, 0)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def write_matconvnet(template: Foreign, state_dict: StateDict, out: Path, *, features_only: bool) -> None:
    """``state_dict`` into the structure of ``template``'s file, written with ``scipy.io.savemat``."""
    from vggnorm.io.models import feature_kinds

    data = _load(template.path)
    records = _layers(template.path, data)
    for key, place in template.places.items():
        if key.startswith("classifier.") and features_only:
            continue
        w = _field(records[int(place)], "weights")
        kernel, bias = np.asarray(w.flat[0]), np.asarray(w.flat[1])
        weight = state_dict[f"{key}.weight"].detach().cpu().numpy()
        if weight.ndim == 2:  # a classifier Linear: back to the conv kernel it was
            w.flat[0] = linear_to_matconvnet(weight, kernel.shape).astype(kernel.dtype)
        else:
            w.flat[0] = weight.transpose(3, 2, 1, 0).astype(kernel.dtype)
        w.flat[1] = state_dict[f"{key}.bias"].detach().cpu().numpy().astype(bias.dtype).reshape(bias.shape)
    if features_only and template.top:
        data["layers"] = data["layers"][:, : len(feature_kinds(template.arch))]
    variables = {k: v for k, v in data.items() if not k.startswith("__")}  # loadmat's header entries
    _scipy_io().savemat(str(out), variables, format="5", do_compression=False, oned_as="row")
