"""Keras VGG16/VGG19 weight files (HDF5), read and written with h5py alone: Keras is not needed.

Two layouts, both loaded by Keras by the *order* of the layers that have weights (not by name):

* **legacy** (``keras.applications``' downloads, Keras 2's ``save_weights("x.h5")``): root attribute
  ``layer_names`` (long lists chunked as ``layer_names0``, ``layer_names1``, ...); a group per layer
  whose attribute ``weight_names`` names its datasets (relative paths: ``block1_conv1_W_1:0``, or
  ``block1_conv1/kernel``). A whole model saved with ``model.save("x.h5")`` holds the same under
  ``model_weights``.
* **keras3** (``model.save_weights("x.weights.h5")``): ``layers/<class>[_N]/vars/0`` (kernel) and
  ``/1`` (bias), ``<class>`` being the layer class in snake case (``conv2d``, ``dense``), ``N`` its
  rank among the model's layers of that class.

Kernels are ``[kh, kw, in, out]`` (convs) and ``[in, out]`` (dense): torchvision's are
``[out, in, kh, kw]`` and ``[out, in]``. ``fc1`` reads Keras' ``Flatten`` of a channels-last
``7x7x512`` map, rows in ``(h, w, c)`` order; torchvision's ``classifier.0`` reads ``(c, h, w)``:
its rows are reordered both ways. (Keras' VGG files are channels-last, ``tf_dim_ordering``; a model
built channels-first would have written ``fc1`` in the other order, which the weights cannot tell.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vggnorm.core.state import StateDict
from vggnorm.errors import CheckpointError
from vggnorm.io.data import CAFFE_MEAN_BGR
from vggnorm.io.formats import ARCH_BY_CONVS, CLASSIFIER, FC_SHAPES, KERAS, Foreign, conv_channels, conv_paths
from vggnorm.options import InputConvention

# a layer with weights: its name in the file, and its kernel's and bias' dataset paths
Layer = tuple[str, str, str]


def _attr_list(group: Any, name: str) -> list[str]:
    """A list attribute as Keras writes it: whole, or chunked as NAME0, NAME1, ... when long."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, i = [], 0
        while f"{name}{i}" in group.attrs:
            raw += list(group.attrs[f"{name}{i}"])
            i += 1
    return [x.decode("utf8") if isinstance(x, bytes) else str(x) for x in raw]


def _kernel_and_bias(path: Path, layer: str, datasets: list[Any]) -> tuple[str, str] | None:
    """The kernel's and the bias' paths of a layer with weights; None for a layer with none; a
    layer with other weights (BatchNorm's four, a bias-less conv) is no layer of VGG's."""
    import h5py

    if not datasets:
        return None
    shapes = [tuple(d.shape) if isinstance(d, h5py.Dataset) else "a group" for d in datasets]
    kernels = [d for d in datasets if isinstance(d, h5py.Dataset) and d.ndim in (2, 4)]
    biases = [d for d in datasets if isinstance(d, h5py.Dataset) and d.ndim == 1]
    if len(datasets) != 2 or len(kernels) != 1 or len(biases) != 1:
        raise CheckpointError(
            f"{path}: Keras layer {layer} holds {len(datasets)} weights of shapes {shapes}; a VGG16/VGG19 has only "
            "convs and dense layers, each a kernel and a bias: this is not a Keras VGG16/VGG19"
        )
    return kernels[0].name, biases[0].name


def _legacy_layers(path: Path, root: Any) -> list[Layer]:
    import h5py

    out = []
    for name in _attr_list(root, "layer_names"):
        group = root.get(name)
        if not isinstance(group, h5py.Group):
            raise CheckpointError(f"{path}: layer_names lists {name}, which has no group in the file")
        names = _attr_list(group, "weight_names")
        missing = [w for w in names if w not in group]
        if missing:
            raise CheckpointError(f"{path}: layer {name} names weights {missing} that are not in the file")
        found = _kernel_and_bias(path, name, [group[w] for w in names])
        if found:
            out.append((name, *found))
    return out


_KERAS3_NAME = re.compile(r"^(?P<cls>[a-z0-9_]+?)(?:_(?P<n>\d+))?$")


def _keras3_layers(path: Path, layers: Any) -> list[Layer]:
    """Layers with weights, in the order Keras 3 loads them: convs by their rank, then denses."""
    import h5py

    ranked: dict[str, list[tuple[int, Layer]]] = {"conv2d": [], "dense": []}
    for key, group in layers.items():
        variables = group.get("vars") if isinstance(group, h5py.Group) else None
        if not isinstance(variables, h5py.Group) or not len(variables):
            continue
        label = str(variables.attrs.get("name", key))
        found = _kernel_and_bias(path, label, [variables[k] for k in sorted(variables, key=_int_or_text)])
        match = _KERAS3_NAME.match(key)
        if found is None:
            continue
        if match is None or match["cls"] not in ranked:
            raise CheckpointError(
                f"{path}: Keras 3 layer {key} ({label}) has weights, and a Keras VGG16/VGG19 has weights only in "
                "Conv2D and Dense layers: this is not a Keras VGG16/VGG19"
            )
        ranked[match["cls"]].append((int(match["n"] or 0), (label, *found)))
    return [layer for cls in ("conv2d", "dense") for _, layer in sorted(ranked[cls])]


def _int_or_text(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 30, key)


def _open(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path} is not a readable HDF5 file: {e}") from e


def _flavor(path: Path, f: Any) -> tuple[str, Any]:
    """``legacy`` or ``keras3``, and the group that holds the layers; other HDF5 files are refused."""
    import h5py

    if f.attrs.get("format") == "vggnorm.stats":
        raise CheckpointError(f"{path} is a vggnorm statistics file, not weights; pass it as --stats")
    root: Any = f
    if not ({"layer_names", "layer_names0"} & set(f.attrs)) and isinstance(f.get("model_weights"), h5py.Group):
        root = f["model_weights"]  # a whole model saved by model.save("x.h5")
    if {"layer_names", "layer_names0"} & set(root.attrs):
        return "legacy", root
    if isinstance(f.get("layers"), h5py.Group):
        return "keras3", f["layers"]
    raise CheckpointError(
        f"{path} is an HDF5 file but not Keras weights: it has neither the root attribute layer_names (the "
        "legacy .h5 layout keras.applications downloads) nor a layers/ group (Keras 3's .weights.h5)"
    )


def keras_flavor(path: Path) -> str:
    """The layout of the Keras file ``path`` (its weights are not read)."""
    with _open(path) as f:
        return _flavor(path, f)[0]


def read_keras(path: Path) -> Foreign:
    """The Keras VGG16/VGG19 in ``path`` in torchvision's layout (exactly: transposes and fc1's row order)."""
    with _open(path) as f:
        flavor, root = _flavor(path, f)
        layers = _legacy_layers(path, root) if flavor == "legacy" else _keras3_layers(path, root)
        return _to_torchvision(path, f, flavor, layers)


def _to_torchvision(path: Path, f: Any, flavor: str, layers: list[Layer]) -> Foreign:
    convs = [layer for layer in layers if f[layer[1]].ndim == 4]
    dense = [layer for layer in layers if f[layer[1]].ndim == 2]
    if layers != convs + dense:
        raise CheckpointError(f"{path}: a dense layer comes before a conv: this is not a Keras VGG16/VGG19")
    arch = ARCH_BY_CONVS.get(len(convs))
    if arch is None or len(dense) not in (0, 3):
        raise CheckpointError(
            f"{path} holds a Keras model with {len(convs)} conv and {len(dense)} dense layers; Keras' VGG16 has 13 "
            "convs and VGG19 16, and 3 dense layers with the top or none without it: this is not a Keras VGG16/VGG19"
        )
    sd: StateDict = {}
    places: dict[str, str] = {}
    for (name, kernel, bias), conv, (c_in, c_out) in zip(convs, conv_paths(arch), conv_channels(arch), strict=True):
        _expect(path, name, f[kernel].shape, (3, 3, c_in, c_out), f[bias].shape, c_out)
        sd[f"{conv}.weight"] = _tensor(np.asarray(f[kernel]).transpose(3, 2, 0, 1))
        sd[f"{conv}.bias"] = _tensor(np.asarray(f[bias]))
        places[f"{conv}.weight"], places[f"{conv}.bias"] = kernel, bias
    for (name, kernel, bias), linear, (c_out, c_in) in zip(dense, CLASSIFIER, FC_SHAPES, strict=False):
        _expect(path, name, f[kernel].shape, (c_in, c_out), f[bias].shape, c_out)
        k = np.asarray(f[kernel])
        sd[f"{linear}.weight"] = _tensor(fc1_from_keras(k) if linear == CLASSIFIER[0] else k.T)
        sd[f"{linear}.bias"] = _tensor(np.asarray(f[bias]))
        places[f"{linear}.weight"], places[f"{linear}.bias"] = kernel, bias
    return Foreign(
        path,
        KERAS,
        flavor,
        arch,
        sd,
        top=bool(dense),
        preprocess=InputConvention.CAFFE,
        mean=CAFFE_MEAN_BGR,
        places=places,
        top_layers=tuple(layer[0] for layer in dense),
    )


def _expect(
    path: Path, name: str, kernel: tuple[int, ...], expected: tuple[int, ...], bias: tuple[int, ...], out: int
) -> None:
    if tuple(kernel) != expected or tuple(bias) != (out,):
        why = " (VGG's top reads a 7x7x512 map: a 224x224 input)" if len(expected) == 2 and expected[0] == 25088 else ""
        raise CheckpointError(
            f"{path}: Keras layer {name} has kernel {tuple(kernel)} and bias {tuple(bias)}, where a VGG's has "
            f"{expected} and ({out},){why}: this is not a Keras VGG16/VGG19"
        )


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def fc1_from_keras(kernel: np.ndarray) -> np.ndarray:
    """Keras' fc1 kernel ``[7*7*512, 4096]``, rows in (h, w, c) order -> torchvision's ``[4096, 512*7*7]``,
    columns in (c, h, w) order."""
    return kernel.reshape(7, 7, 512, -1).transpose(3, 2, 0, 1).reshape(-1, 7 * 7 * 512)


def fc1_to_keras(weight: np.ndarray) -> np.ndarray:
    """The inverse of ``fc1_from_keras``."""
    return weight.reshape(-1, 512, 7, 7).transpose(2, 3, 1, 0).reshape(7 * 7 * 512, -1)


def _keras_value(key: str, tensor: torch.Tensor) -> np.ndarray:
    a = tensor.detach().cpu().numpy()
    if key == f"{CLASSIFIER[0]}.weight":
        return fc1_to_keras(a)
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    return a.T if a.ndim == 2 else a


def _copy_attrs(src: Any, dst: Any, skip: frozenset[str] = frozenset()) -> None:
    for key in src.attrs:
        if key not in skip:
            dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)


def _copy(src: Any, dst: Any, drop: set[str]) -> None:
    """Copy ``src``'s members into ``dst`` (attributes, chunking, compression included), except the
    objects whose HDF5 paths are in ``drop``."""
    import h5py

    for key, item in src.items():
        if item.name in drop:
            continue
        if isinstance(item, h5py.Group) and any(d.startswith(item.name + "/") for d in drop):
            sub = dst.create_group(key)
            _copy_attrs(item, sub)
            _copy(item, sub, drop)
        else:
            src.copy(item, dst, name=key)


def write_keras(template: Foreign, state_dict: StateDict, out: Path, *, features_only: bool) -> None:
    """``state_dict`` into a copy of ``template``'s file (without the top if ``features_only``)."""
    import h5py

    with h5py.File(template.path, "r") as fin, h5py.File(out, "w") as fout:
        drop: set[str] = set()
        root = fin if template.flavor == "keras3" or "model_weights" not in fin else fin["model_weights"]
        if features_only and template.top:
            if template.flavor == "keras3":
                drop = {fin[template.places[f"{c}.weight"]].parent.parent.name for c in CLASSIFIER}
            else:
                drop = {root[name].name for name in template.top_layers}
        _copy_attrs(fin, fout)
        _copy(fin, fout, drop)
        if drop and template.flavor == "legacy":  # the top's layers leave layer_names too
            names = [n for n in _attr_list(root, "layer_names") if n not in template.top_layers]
            attrs = fout[root.name].attrs
            dtype = root.attrs.get_id("layer_names" if "layer_names" in root.attrs else "layer_names0").dtype
            for key in [k for k in attrs if re.fullmatch(r"layer_names\d*", k)]:
                del attrs[key]
            values = np.array([n.encode() for n in names]) if dtype.kind == "S" else np.array(names, dtype=object)
            attrs.create("layer_names", values, dtype=dtype)
        for key, place in template.places.items():
            if key.startswith("classifier.") and features_only:
                continue
            dataset = fout[place]
            dataset[...] = _keras_value(key, state_dict[key]).astype(dataset.dtype)
