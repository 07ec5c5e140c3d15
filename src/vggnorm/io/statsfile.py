"""Statistics files: HDF5 read (through a schema) and write, and the merge of shard files.

The HDF5 schema
(``format = "vggnorm.stats"``, ``format_version = 1``) is published as a JSON Schema,
docs/reference/stats-schema-v1.json, and readable with plain ``h5py`` or ``h5dump``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vggnorm.core.provenance import MeasurementRecord, Versions
from vggnorm.core.stats import LayerStats, Stats, check_values
from vggnorm.defaults import MAX_RESIZE
from vggnorm.errors import InputError, StatsFileError
from vggnorm.io.checkpoint import atomic_write, check_writable
from vggnorm.io.data import MEASUREMENT_ATTRS, printable
from vggnorm.options import Decoder, InputConvention, Interpolation, Padding, Pooling, Precision, StreamScale, Weighting

# a field's reader: the value as read (any type), checked and converted, or _Bad
Reader = Callable[[object], Any]
Schema = dict[str, Reader]

FORMAT = "vggnorm.stats"
FORMAT_VERSION = 1


def _attr(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) for v in value) and value:
            return np.asarray(value, dtype=np.float64)
        return json.dumps(list(value))
    if value is None:
        return ""
    if isinstance(value, str):
        return printable(value)  # plain UTF-8 str: version strings are str subclasses h5py cannot store
    return value


def write_stats(stats: Stats, path: Path, *, force: bool) -> None:
    """Write ``stats`` to ``path`` atomically (temp file + rename).

    The HDF5 file is built in memory and its bytes written by Python: a full disk is then an
    ``OSError`` like any other (h5py writing to disk itself crashed on one), and ``path`` stays intact.
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _fill(f, stats)
    with atomic_write(Path(path), force=force) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def _fill(f: h5py.File, stats: Stats) -> None:
    """Write the schema (docs/reference/stats-schema-v1.json) into an open HDF5 file."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    for key, value in measurement_attrs(stats.provenance).items():
        f.attrs[key] = _attr(value)
    f.attrs["num_images"] = stats.num_images
    f.attrs["num_skipped"] = len(stats.skipped)
    f.attrs["complete"] = stats.complete
    f.attrs["position"] = stats.position
    f.attrs["layer_order"] = json.dumps(stats.layer_order)
    layers = f.create_group("layers")
    for name, layer in stats.layers.items():
        g = layers.create_group(name)
        g.create_dataset("sum", data=layer.sum.double().cpu().numpy())
        g.create_dataset("count", data=np.int64(layer.count))
        g.create_dataset("mean", data=layer.mean.double().cpu().numpy())
        g.attrs["relu"] = layer.relu
        if layer.bn is not None:
            g.attrs["bn"] = layer.bn
            g.attrs["norm"] = layer.norm
        if layer.activation != "ReLU":
            g.attrs["activation"] = layer.activation
        if layer.class_sum is not None and layer.class_count is not None:
            g.create_dataset("class_sum", data=layer.class_sum.double().cpu().numpy())
            g.create_dataset("class_count", data=layer.class_count.long().cpu().numpy())
    if stats.classes:
        f.attrs["classes"] = json.dumps(stats.classes)
    skipped = f.create_group("skipped")
    str_dt, bytes_dt = h5py.string_dtype(), h5py.vlen_dtype(np.uint8)
    paths = [p for p, _ in stats.skipped]
    skipped.create_dataset("path", data=np.array([printable(p) for p in paths], dtype=object), dtype=str_dt)
    skipped.create_dataset(
        "reason", data=np.array([printable(r) for _, r in stats.skipped], dtype=object), dtype=str_dt
    )
    # the names' own bytes, for names that are not UTF-8 (``path`` shows those bytes as \\xNN)
    raw = np.empty(len(paths), dtype=object)
    raw[:] = [np.frombuffer(os.fsencode(p), dtype=np.uint8) for p in paths]
    skipped.create_dataset("path_bytes", data=raw, dtype=bytes_dt)
    if stats.dataset:  # the folder's contents, so --resume can say what changed
        files = f.create_group("dataset")
        names = np.empty(len(stats.dataset), dtype=object)
        names[:] = [np.frombuffer(os.fsencode(n), dtype=np.uint8) for n, _ in stats.dataset]
        files.create_dataset("path_bytes", data=names, dtype=bytes_dt)
        files.create_dataset("size", data=np.array([s for _, s in stats.dataset], dtype=np.int64))


def measurement_attrs(m: MeasurementRecord) -> dict[str, object]:
    """``m`` as the statistics file's root attributes (names and values as the schema says); a count the
    record does not hold (``None``) and an empty ``merged_from`` are left out. Also the ``measurement``
    that ``apply`` records with a normalized checkpoint (``vggnorm.io.provenance``)."""
    out: dict[str, object] = {
        "arch": m.arch,
        "weights": m.weights,
        "weights_path": m.weights_path,
        "weights_sha256": m.weights_sha256,
        "weights_format": m.weights_format,
        **m.preprocess,
        "dataset": m.dataset,
        "dataset_fingerprint": m.dataset_fingerprint,
        "dataset_num_files": m.dataset_num_files,
        "shard": m.shard,
        "num_files": m.num_files,
        "world_size": m.world_size,
        "limit": m.limit,
        "merged_from": json.dumps(list(m.merged_from)) if m.merged_from else None,  # as stored: JSON text
        "created": m.created,
        "vggnorm_version": m.versions.vggnorm,
        "torch_version": m.versions.torch,
        "torchvision_version": m.versions.torchvision,
        "device": m.device,
        "precision": m.precision,
        "include_classifier": m.include_classifier,
        "add_affine": m.add_affine,
        "batch_size": m.batch_size,
        "per_class": m.per_class,
        "label_source": m.label_source,
        "labels_sha256": m.labels_sha256,
    }
    return {k: v for k, v in out.items() if v is not None}


def policy_values(values: Mapping[str, object], keep: Collection[str] | None = None) -> dict[str, object]:
    """The measurement policy's fields among ``values`` (those of ``keep``, by default those
    ``Measurement.as_attrs`` writes: ``MEASUREMENT_ATTRS``), with lists as the tuples it writes: the same
    policy compares equal however it was stored."""
    keep = MEASUREMENT_ATTRS if keep is None else keep
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in keep}


def measurement_from_attrs(attrs: dict[str, Any]) -> MeasurementRecord:
    """The record in root attributes ``attrs`` already read through the schema (``check_fields``); a field
    they leave out (a file written before it existed) reads as ``MeasurementRecord``'s default."""
    named = set(MeasurementRecord.__dataclass_fields__) - {"preprocess", "merged_from", "versions"}
    versions = {
        part: attrs[f"{part}_version"] for part in ("vggnorm", "torch", "torchvision") if f"{part}_version" in attrs
    }
    return MeasurementRecord(
        **{k: v for k, v in attrs.items() if k in named},
        preprocess=policy_values(attrs),
        merged_from=tuple(attrs.get("merged_from", ())),
        versions=Versions(**versions),
    )


# ---------------------------------------------------------------------------------------------------------
# The schema: every statistics file is read through it. Types, ranges and shapes are checked before any
# array is read (a declared shape is not trusted to allocate), links other than plain (hard) ones and
# data stored in other files are refused, and every problem is one StatsFileError naming the field.
# ---------------------------------------------------------------------------------------------------------

MAX_CHANNELS = 1 << 20  # filters of one layer (VGG's fc: 4096)
MAX_LAYERS = 10_000
MAX_CLASSES = 1 << 20
MAX_FILES = 1 << 31  # entries of the skipped and dataset lists


class _Bad(Exception):
    """One field of a statistics file that is not as the schema says (becomes a ``StatsFileError``)."""


def _str(v: object) -> str:
    if isinstance(v, bytes | np.bytes_):
        try:
            return bytes(v).decode()
        except UnicodeDecodeError as e:
            raise _Bad(f"is not UTF-8 text ({e})") from e
    if isinstance(v, str):
        return str(v)
    raise _Bad(f"is {_shown(v)}; expected text")


def _int(v: object) -> int:
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
        raise _Bad(f"is {_shown(v)}; expected an integer")
    return int(v)


def _bool(v: object) -> bool:
    if not isinstance(v, bool | np.bool_):
        raise _Bad(f"is {_shown(v)}; expected a boolean (a string such as 'False' is not one)")
    return bool(v)


def _floats(v: object, n: int = 3) -> list[float]:
    a = np.asarray(v) if isinstance(v, list | tuple | np.ndarray) else None
    if a is None or a.shape != (n,) or a.dtype.kind not in "iuf":
        raise _Bad(f"is {_shown(v)}; expected {n} numbers")
    out = [float(x) for x in a]
    if not all(np.isfinite(out)):
        raise _Bad(f"is {out}; expected {n} finite numbers")
    return out


def _json_strs(v: object) -> list[str]:
    text = _str(v)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise _Bad(f"is not JSON ({e})") from e
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _Bad(f"is {text[:60]!r}; expected a JSON list of names")
    return value


def _shown(v: object) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} ({v.dtype})"
    text = repr(v.item() if isinstance(v, np.generic) else v)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_of(choices: Sequence[str]) -> Reader:
    def check(v: object) -> str:
        text = _str(v)
        if text not in choices:
            raise _Bad(f"is {text!r}; expected one of {', '.join(choices)}")
        return text

    return check


def _at_least(low: int, high: int | None = None) -> Reader:
    def check(v: object) -> int:
        n = _int(v)
        if n < low or (high is not None and n > high):
            raise _Bad(f"is {n}; expected an integer from {low}" + (f" to {high}" if high is not None else " up"))
        return n

    return check


def _shard(v: object) -> str:
    text = _str(v)
    index, sep, count = text.partition("/")
    if text and not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise _Bad(f"is {text!r}; expected '' or I/N with 0 <= I < N")
    return text


def _std(v: object) -> list[float]:
    out = _floats(v)
    if not all(x > 0 for x in out):
        raise _Bad(f"is {out}; expected 3 positive numbers (the input is divided by them)")
    return out


def _nonnegative(v: object) -> float:
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        raise _Bad(f"is {_shown(v)}; expected a number")
    if not (np.isfinite(v) and v >= 0):
        raise _Bad(f"is {v}; expected a finite number >= 0")
    return float(v)


def _preprocess_fields() -> Schema:
    return {
        "resize": _at_least(1, MAX_RESIZE),
        "crop": _at_least(1, MAX_RESIZE),
        "interpolation": _one_of(tuple(Interpolation)),
        "mean": _floats,
        "std": _std,
        "preprocess": _one_of(tuple(InputConvention)),
        "pooling": _one_of(tuple(Pooling)),
        "decode": _one_of(tuple(Decoder)),
        "padding": _one_of(tuple(Padding)),
    }


# The root attributes vggnorm reads, each with its reader (type and range); others are kept as they are.
ROOT_SCHEMA: Schema = {
    "format": _str,
    "format_version": _int,
    "arch": _str,
    "weights": _str,
    "weights_path": _str,
    "weights_sha256": _str,
    "weights_format": _str,
    "num_images": _at_least(0),
    "num_skipped": _at_least(0),
    "num_files": _at_least(0),
    "limit": _at_least(-1),
    "dataset": _str,
    "dataset_fingerprint": _str,
    "dataset_num_files": _at_least(0),
    "shard": _shard,
    "merged_from": _json_strs,
    "include_classifier": _bool,
    "add_affine": _bool,
    "per_class": _bool,
    "label_source": _str,
    "labels_sha256": _str,
    "precision": _one_of(tuple(Precision)),
    "batch_size": _at_least(1),
    "world_size": _at_least(1),
    "complete": _bool,
    "position": _at_least(0),
    "layer_order": _json_strs,
    "classes": _json_strs,
    "created": _str,
    "device": _str,
    "vggnorm_version": _str,
    "torch_version": _str,
    "torchvision_version": _str,
}
REQUIRED = ("format", "format_version", "num_images", "layer_order")
# What apply records with a normalized checkpoint (safetensors metadata ``policy``, or its report).
RECORDED_POLICY_SCHEMA: Schema = {
    **_preprocess_fields(),
    "rel_eps": _nonnegative,
    "eps": _nonnegative,
    "include_classifier": _bool,
    "weighting": _one_of(tuple(Weighting)),
    "label_source": _str,
    "stream_scale": _one_of(tuple(StreamScale)),
}
# The rest of that record: its text fields (``io.provenance``); its ``measurement`` is the statistics' root attributes.
RECORD_SCHEMA: Schema = dict.fromkeys(
    ("arch", "layout", "original", "original_sha256", "stats", "created", "vggnorm_version"), _str
)
LAYER_SCHEMA: Schema = {"relu": _str, "bn": _str, "norm": _str, "activation": _str}


DAMAGED = "the file is damaged or was edited; measure it again"


def check_fields(values: object, fields: Schema, where: str, what_to_do: str = DAMAGED) -> dict[str, Any]:
    """``values`` (a mapping) with each key of ``fields`` that it holds read by its reader; a value that
    is not as the schema says is a ``StatsFileError`` naming ``where`` and the field, then ``what_to_do``."""
    if not isinstance(values, dict):
        raise StatsFileError(f"{where} is {_shown(values)}; expected a mapping of named fields: {what_to_do}")
    out = dict(values)
    for key, read in fields.items():
        if key in values:
            try:
                out[key] = read(values[key])
            except _Bad as e:
                raise StatsFileError(f"{where}: {key} {e}: {what_to_do}") from e
    return out


def read_measurement(values: object, where: str, what_to_do: str = DAMAGED) -> MeasurementRecord:
    """The ``MeasurementRecord`` in ``values``, root attributes of a statistics file (or their copy in a record apply
    wrote), each read through the schema: one ``StatsFileError`` naming the field that is not as it says."""
    checked = check_fields(values, ROOT_SCHEMA, where, what_to_do)
    return measurement_from_attrs(check_fields(checked, _preprocess_fields(), where, what_to_do))


def _link(group: h5py.Group, name: str) -> Any:
    """``group[name]``, refused unless it is a plain (hard) link: a soft link can loop, an external link
    reads another file."""
    link = group.get(name, getlink=True)
    if link is None:
        raise _Bad(f"has no {name!r}")
    if not isinstance(link, h5py.HardLink):
        raise _Bad(f"{name!r} is a {type(link).__name__}, not data stored in this file")
    obj = group[name]
    if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
        raise _Bad(f"{name!r} keeps its data in other files")
    return obj


def _dataset(group: h5py.Group, name: str, kinds: str, ndim: int, limit: int) -> h5py.Dataset:
    ds = _link(group, name)
    if not isinstance(ds, h5py.Dataset):
        raise _Bad(f"{name!r} is not a dataset")
    if ds.shape is None or len(ds.shape) != ndim:
        raise _Bad(f"{name!r} has shape {ds.shape}; expected {ndim} dimension(s)")
    if any(n > limit for n in ds.shape):
        raise _Bad(f"{name!r} declares shape {ds.shape}, more than {limit} entries per dimension")
    declared, size = ds.size * ds.dtype.itemsize, ds.file.id.get_filesize()
    if declared > max(64 * size, 1 << 20):  # unwritten chunks read as fill values: allocated, never stored
        raise _Bad(f"{name!r} declares shape {ds.shape} ({declared / 2**20:.0f} MB) in a file of {size / 2**20:.1f} MB")
    kind = ds.dtype.kind if h5py.check_vlen_dtype(ds.dtype) is None else "vlen"
    if h5py.check_string_dtype(ds.dtype) is not None:
        kind = "str"
    if kind not in kinds.split(","):
        raise _Bad(f"{name!r} holds {ds.dtype}; expected {_KIND_NAMES[kinds]}")
    return ds


_KIND_NAMES = {"f": "floats", "i,u": "integers", "i": "integers", "str,O,S": "text", "vlen": "byte strings"}


def _group(group: h5py.Group, name: str) -> h5py.Group:
    g = _link(group, name)
    if not isinstance(g, h5py.Group):
        raise _Bad(f"{name!r} is not a group")
    return g


def _read_layer(layers: h5py.Group, name: str, classes: list[str]) -> LayerStats:
    try:
        return _layer(layers, name, classes)
    except _Bad as e:
        raise _Bad(f"layers/{name}: {e}") from e


def _layer(layers: h5py.Group, name: str, classes: list[str]) -> LayerStats:
    g = _group(layers, name)
    attrs = check_fields({k: g.attrs[k] for k in g.attrs}, LAYER_SCHEMA, f"layers/{name}")
    if "relu" not in attrs:
        raise _Bad("has no 'relu' attribute")
    sum_ = _dataset(g, "sum", "f", 1, MAX_CHANNELS)
    channels = sum_.shape[0]
    if channels == 0:
        raise _Bad("'sum' has no filters")
    count_ds = _dataset(g, "count", "i,u", 0, 1)
    count = int(count_ds[()])
    if count < 0:
        raise _Bad(f"count is {count}; expected >= 0")
    class_sum = class_count = None
    if "class_sum" in g or "class_count" in g:
        k = len(classes)
        cs = _dataset(g, "class_sum", "f", 2, MAX_CLASSES)
        cc = _dataset(g, "class_count", "i,u", 1, MAX_CLASSES)
        if cs.shape != (k, channels) or cc.shape != (k,):
            raise _Bad(
                f"class_sum {cs.shape} and class_count {cc.shape} do not match the {k} classes and {channels} filters"
            )
        class_sum = torch.from_numpy(np.asarray(cs[()], dtype=np.float64))
        class_count = torch.from_numpy(np.asarray(cc[()], dtype=np.int64))
        if bool((class_count < 0).any()):
            raise _Bad("a class_count is negative")
    elif classes:
        raise _Bad(f"has no class_sum, and the file names {len(classes)} classes")
    bn = attrs.get("bn")
    return LayerStats(
        conv=name,
        relu=attrs["relu"],
        bn=bn,
        activation=attrs.get("activation", "ReLU"),
        norm=attrs.get("norm", "BatchNorm2d" if bn is not None else ""),
        sum=torch.from_numpy(np.asarray(sum_[()], dtype=np.float64)),
        count=count,
        class_sum=class_sum,
        class_count=class_count,
    )


def _strings(group: h5py.Group, name: str, limit: int) -> list[str]:
    ds = _dataset(group, name, "str,O,S", 1, limit)
    return [_str(v) for v in ds[()]]


def _byte_names(group: h5py.Group, name: str, limit: int) -> list[str]:
    ds = _dataset(group, name, "vlen", 1, limit)
    return [os.fsdecode(bytes(np.asarray(b, dtype=np.uint8))) for b in ds[()]]


def _read(f: h5py.File, path: Path) -> Stats:
    """The schema, applied to an open file (``read_stats``)."""
    attrs = check_fields({k: f.attrs[k] for k in f.attrs}, ROOT_SCHEMA, str(path))
    if attrs.get("format") != FORMAT:
        raise StatsFileError(f"{path} is an HDF5 file but not a vggnorm statistics file (no format={FORMAT!r})")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StatsFileError(
            f"{path} has format_version {attrs.get('format_version', -1)}; this vggnorm reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED if k not in attrs]
    if missing:
        raise _Bad(f"has no {', '.join(missing)} attribute")
    attrs = check_fields(attrs, _preprocess_fields(), str(path))  # attributes the schema does not name: ignored
    complete = attrs.pop("complete", True)
    position = attrs.pop("position", 0)
    num_files = attrs.get("num_files")
    if num_files is not None and position > num_files:
        raise _Bad(f"position is {position}, beyond its {num_files} files")
    if "crop" in attrs and "resize" in attrs and attrs["crop"] > attrs["resize"]:
        raise _Bad(f"crop {attrs['crop']} is larger than resize {attrs['resize']}")
    num_images = attrs.pop("num_images")
    attrs.pop("num_skipped", None)
    order = attrs.pop("layer_order")
    if len(order) > MAX_LAYERS or len(set(order)) != len(order):
        raise _Bad(f"layer_order names {len(order)} layers ({len(set(order))} distinct)")
    classes = attrs.pop("classes", [])
    if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
        raise _Bad(f"classes names {len(classes)} classes ({len(set(classes))} distinct)")
    layers_group = _group(f, "layers")
    layers = {name: _read_layer(layers_group, name, classes) for name in order}
    files_limit = num_files if num_files is not None else MAX_FILES
    paths: list[str] = []
    reasons: list[str] = []
    if "skipped" in f:
        skipped = _group(f, "skipped")
        paths, reasons = _strings(skipped, "path", files_limit), _strings(skipped, "reason", files_limit)
        if "path_bytes" in skipped:  # lossless, whatever the names' encoding
            paths = _byte_names(skipped, "path_bytes", files_limit)
        if len(paths) != len(reasons):
            raise _Bad(f"skipped/ lists {len(paths)} paths and {len(reasons)} reasons")
    dataset = []
    if "dataset" in f:
        files = _group(f, "dataset")
        limit = attrs.get("dataset_num_files", MAX_FILES)
        names = _byte_names(files, "path_bytes", limit)
        sizes = _dataset(files, "size", "i", 1, limit)[()]
        if len(names) != len(sizes):
            raise _Bad(f"dataset/ lists {len(names)} paths and {len(sizes)} sizes")
        dataset = list(zip(names, (int(s) for s in sizes), strict=True))
    return Stats(
        layers,
        num_images,
        measurement_from_attrs(attrs),
        list(zip(paths, reasons, strict=True)),
        complete,
        position,
        dataset,
        classes,
    )


def read_stats(path: str | Path, *, allow_incomplete: bool = False) -> Stats:
    """Read a stats file through the schema; an unfinished run is refused unless ``allow_incomplete``."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist; create it with `vggnorm compute-stats`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StatsFileError(f"{path} is not an HDF5 file ({e}); give a file written by `vggnorm compute-stats`") from e
    try:
        with f:
            stats = _read(f, path)
    except _Bad as e:
        raise StatsFileError(f"{path} {e}: {DAMAGED}") from e
    except (KeyError, ValueError, TypeError, OSError, RuntimeError) as e:  # h5py's own refusals of a bad file
        raise StatsFileError(
            f"{path} is a damaged vggnorm statistics file ({type(e).__name__}: {e}); measure it again"
        ) from e
    if stats.complete:
        check_values(stats.layers, path)
    if not stats.complete and not allow_incomplete:
        raise StatsFileError(
            f"{path} is an unfinished run ({stats.position} of {_or_unknown(stats.provenance.num_files)} files done); "
            "finish it with `vggnorm compute-stats ... --resume` using the same arguments"
        )
    return stats


def _or_unknown(count: int | None) -> str:
    return "?" if count is None else str(count)


def now() -> str:
    """The ``created`` timestamp: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def attr_differences(
    old: dict[str, Any], new: dict[str, Any], keys: Sequence[str], labels: tuple[str, str] = ("in the file", "now")
) -> list[str]:
    """The attributes among ``keys`` that differ, as ``key: OLD in the file, NEW now``."""
    diffs = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = [float(x) for x in a or []], [float(x) for x in b or []]
        elif a in ("", None) and b in ("", None):
            continue
        if a != b:
            diffs.append(f"{key}: {a!r} {labels[0]}, {b!r} {labels[1]}")
    return diffs


# What makes two measurements the same measurement: the model, the weights, the policy.
MEASUREMENT_KEYS = ("arch", "weights_sha256", *MEASUREMENT_ATTRS, "include_classifier", "precision")
# Attributes every shard of one measurement shares; a difference names a foreign shard.
MERGE_KEYS = (*MEASUREMENT_KEYS, "dataset_fingerprint", "dataset_num_files", "limit", "per_class", "labels_sha256")


def merge_stats(inputs: list[Path], output: Path, *, force: bool = False) -> Stats:
    """Merge the statistics files of ``--shard 0/N`` ... ``--shard N-1/N`` into one, exactly.

    Refuses, naming the conflict: a file given twice, an unfinished file, a file that is not a
    shard, shards of other models, weights, preprocessing or folders, overlapping or missing shards.
    """
    inputs, output = [Path(p) for p in inputs], Path(output)
    check_writable(output, force=force, inputs=inputs)
    seen: set[Path] = set()
    for p in inputs:
        if p.resolve() in seen:
            raise InputError(f"{p} is given twice")
        seen.add(p.resolve())
    parts = []
    for p in inputs:
        try:
            parts.append(read_stats(p))
        except StatsFileError as e:
            raise StatsFileError(f"cannot merge {p}: {e}") from e
    shards: dict[int, Path] = {}
    counts = set()
    for p, st in zip(inputs, parts, strict=True):
        shard = st.provenance.shard
        if not shard:
            raise InputError(f"{p} is not a shard (measured without --shard): there is nothing to merge it with")
        index, count = (int(v) for v in shard.split("/"))
        counts.add(count)
        if index in shards:
            raise InputError(f"{shards[index]} and {p} are both shard {shard}: they overlap")
        shards[index] = p
        diffs = attr_differences(
            measurement_attrs(parts[0].provenance),
            measurement_attrs(st.provenance),
            MERGE_KEYS,
            (f"in {inputs[0]}", f"in {p}"),
        )
        if diffs:
            raise InputError(f"{p} is not a shard of the same measurement as {inputs[0]}: " + "; ".join(diffs))
    if len(counts) != 1:
        raise InputError(f"the shards split the data in different ways ({', '.join(f'N={c}' for c in sorted(counts))})")
    (count,) = counts
    missing = [f"{i}/{count}" for i in range(count) if i not in shards]
    if missing:
        raise InputError(f"shard(s) {', '.join(missing)} missing: merge-stats needs all {count} shards")
    merged = parts[0]
    for st in parts[1:]:
        merged = merged.merge(st)
    num_files = sum(st.provenance.num_files or 0 for st in parts)
    provenance = replace(
        parts[0].provenance, shard="", num_files=num_files, merged_from=tuple(str(p) for p in inputs), created=now()
    )
    result = Stats(
        merged.layers,
        merged.num_images,
        provenance,
        sorted(merged.skipped),
        True,
        num_files,
        merged.dataset,
        merged.classes,
    )
    write_stats(result, output, force=force)
    return result
