"""Per-filter ReLU statistics: float64 sums and integer counts per layer, merge, HDF5 read/write.

Sums and counts are kept (not only means) so that partial results merge exactly. The HDF5 schema
(``format = "vggnorm.stats"``, ``format_version = 1``) is documented in the README and readable
with plain ``h5py`` or ``h5dump``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vggnorm.checkpoint import atomic_write, check_writable
from vggnorm.data import Preprocess, printable
from vggnorm.errors import InvalidValuesError, StatsFileError, VggnormError

FORMAT = "vggnorm.stats"
FORMAT_VERSION = 1


@dataclass
class LayerStats:
    """Sums of one conv's ReLU output per filter, over ``count`` = images x positions."""

    conv: str
    relu: str
    bn: str | None
    sum: torch.Tensor  # (C,) float64
    count: int
    class_sum: torch.Tensor | None = None  # (K, C) float64, with --per-class: the sum per class
    class_count: torch.Tensor | None = None  # (K,) int64: images x positions per class
    activation: str = "ReLU"  # the site's activation (LeakyReLU and PReLU means may be negative)
    norm: str = ""  # the class of ``bn``, the site's normalization (BatchNorm2d, GroupNorm, ...)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count if self.count else torch.full_like(self.sum, float("nan"))

    @property
    def class_means(self) -> torch.Tensor:
        """``(K, C)``: each class's mean feature (NaN for a class with no images)."""
        if self.class_sum is None or self.class_count is None:
            raise VggnormError(f"{self.conv}: no per-class sums; measure with `vggnorm compute-stats ... --per-class`")
        return self.class_sum / self.class_count.to(self.class_sum).view(-1, 1)

    @property
    def balanced_mean(self) -> torch.Tensor:
        """``(C,)``: the class-balanced mean, the mean over the classes (with images) of their means."""
        present = self.class_count > 0  # type: ignore[operator]
        return self.class_means[present].mean(dim=0)


@dataclass
class Stats:
    """The statistics of one run plus its provenance (``attrs``) and the files it skipped."""

    layers: dict[str, LayerStats]  # keyed by conv module path, in forward order
    num_images: int
    attrs: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    complete: bool = True
    position: int = 0  # files consumed so far (for --resume)
    dataset: list[tuple[str, int]] = field(default_factory=list)  # the folder's files (relative path, size)
    classes: list[str] = field(default_factory=list)  # with --per-class: the class names, sorted

    @property
    def layer_order(self) -> list[str]:
        return list(self.layers)

    def means(self) -> dict[str, torch.Tensor]:
        return {name: layer.mean for name, layer in self.layers.items()}

    def merge(self, other: Stats) -> Stats:
        """Exact sum of two disjoint measurements of the same layers (per-class sums matched by class name)."""
        if self.layer_order != other.layer_order:
            raise StatsFileError("cannot merge statistics of different layers")
        if bool(self.classes) != bool(other.classes):
            raise VggnormError("cannot merge statistics with per-class sums and statistics without (--per-class)")
        classes = sorted(set(self.classes) | set(other.classes))
        layers = {}
        for n, a in self.layers.items():
            b = other.layers[n]
            layer = dataclasses.replace(a, sum=a.sum + b.sum, count=a.count + b.count, class_sum=None, class_count=None)
            if classes:
                layer.class_sum = _by_class(a, self.classes, classes, "sum") + _by_class(
                    b, other.classes, classes, "sum"
                )
                layer.class_count = _by_class(a, self.classes, classes, "count") + _by_class(
                    b, other.classes, classes, "count"
                )
            layers[n] = layer
        return Stats(
            layers,
            self.num_images + other.num_images,
            dict(self.attrs),
            self.skipped + other.skipped,
            dataset=self.dataset,
            classes=classes,
        )


def _by_class(layer: LayerStats, have: list[str], want: list[str], what: str) -> torch.Tensor:
    """``layer``'s per-class sums (or counts) laid out for the classes ``want`` (zeros where absent)."""
    src = layer.class_sum if what == "sum" else layer.class_count
    assert src is not None
    out = torch.zeros((len(want), *src.shape[1:]), dtype=src.dtype)
    index = {c: i for i, c in enumerate(want)}
    for i, c in enumerate(have):
        out[index[c]] = src[i]
    return out


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
    """Write the schema of the README ("The statistics file") into an open HDF5 file."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    for key, value in stats.attrs.items():
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


def check_values(layers: dict[str, LayerStats], source: str | Path) -> None:
    """Refuse what no measurement of ReLU outputs gives: an empty count, a NaN, inf or negative mean."""
    for name, layer in layers.items():
        if layer.count <= 0:
            raise InvalidValuesError(
                f"{source}: layer {name} has count {layer.count}: it measured nothing; measure again"
            )
        mean = layer.mean
        bad = ~torch.isfinite(mean) | (
            (mean < 0) if layer.activation == "ReLU" else torch.zeros_like(mean, dtype=torch.bool)
        )
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise InvalidValuesError(
                f"{source}: layer {name}, filter {i}: mean {float(mean[i])} ({int(bad.sum())} such filter(s)); a mean "
                f"{layer.activation} activation is finite{' and >= 0' if layer.activation == 'ReLU' else ''}: the file is damaged or was edited; measure again with "
                "`vggnorm compute-stats`"
            )


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [float(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_stats(path: str | Path, *, allow_incomplete: bool = False) -> Stats:
    """Read a stats file, checking its format; an unfinished run is refused unless ``allow_incomplete``."""
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"statistics file {path} does not exist; create it with `vggnorm compute-stats`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise StatsFileError(f"{path} is not an HDF5 file ({e}); give a file written by `vggnorm compute-stats`") from e
    try:
        with f:
            if _decode(f.attrs.get("format")) != FORMAT:
                raise StatsFileError(f"{path} is an HDF5 file but not a vggnorm statistics file (no format={FORMAT!r})")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise StatsFileError(
                    f"{path} has format_version {version}; this vggnorm reads version {FORMAT_VERSION}"
                )
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            complete = bool(attrs.pop("complete", True))
            position = int(attrs.pop("position", 0))
            num_images = int(attrs.pop("num_images"))
            attrs.pop("num_skipped", None)
            order = json.loads(attrs.pop("layer_order"))
            layers = {}
            for name in order:
                g = f["layers"][name]
                layers[name] = LayerStats(
                    conv=name,
                    relu=_decode(g.attrs["relu"]),
                    bn=_decode(g.attrs["bn"]) if "bn" in g.attrs else None,
                    activation=_decode(g.attrs.get("activation", "ReLU")),
                    norm=_decode(g.attrs.get("norm", "BatchNorm2d" if "bn" in g.attrs else "")),
                    sum=torch.from_numpy(np.asarray(g["sum"][()], dtype=np.float64)),
                    count=int(g["count"][()]),
                    class_sum=torch.from_numpy(np.asarray(g["class_sum"][()], dtype=np.float64))
                    if "class_sum" in g
                    else None,
                    class_count=torch.from_numpy(np.asarray(g["class_count"][()], dtype=np.int64))
                    if "class_count" in g
                    else None,
                )
            paths = [_decode(p) for p in f["skipped/path"][()]] if "skipped" in f else []
            if "skipped/path_bytes" in f:  # lossless, whatever the names' encoding
                paths = [os.fsdecode(bytes(b)) for b in f["skipped/path_bytes"][()]]
            dataset = []
            if "dataset" in f:
                names = [os.fsdecode(bytes(b)) for b in f["dataset/path_bytes"][()]]
                dataset = list(zip(names, (int(s) for s in f["dataset/size"][()]), strict=True))
            reasons = [_decode(r) for r in f["skipped/reason"][()]] if "skipped" in f else []
    except (KeyError, ValueError, TypeError) as e:
        raise StatsFileError(
            f"{path} is a damaged vggnorm statistics file ({type(e).__name__}: {e}); measure it again"
        ) from e
    if complete:
        check_values(layers, path)
    if not complete and not allow_incomplete:
        raise StatsFileError(
            f"{path} is an unfinished run ({position} of {attrs.get('num_files', '?')} files done); "
            "finish it with `vggnorm compute-stats ... --resume` using the same arguments"
        )
    classes = json.loads(attrs.pop("classes")) if "classes" in attrs else []
    return Stats(
        layers, num_images, attrs, list(zip(paths, reasons, strict=True)), complete, position, dataset, classes
    )


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
MEASUREMENT_KEYS = ("arch", "weights_sha256", *Preprocess.__dataclass_fields__, "include_classifier", "precision")
# Attributes every shard of one measurement shares; a difference names a foreign shard.
MERGE_KEYS = (*MEASUREMENT_KEYS, "dataset_fingerprint", "dataset_num_files", "limit", "per_class", "labels_sha256")


def merge_stats(inputs: list[Path], output: Path, *, force: bool = False) -> Stats:
    """Merge the statistics files of ``--shard 0/N`` ... ``--shard N-1/N`` into one, exactly.

    Refuses, naming the conflict: a file given twice, an unfinished file, a file that is not a
    shard, shards of other models, weights, preprocessing or folders, overlapping or missing shards.
    """
    check_writable(output, force=force, inputs=inputs)
    seen: set[Path] = set()
    for p in inputs:
        if p.resolve() in seen:
            raise VggnormError(f"{p} is given twice")
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
        shard = str(st.attrs.get("shard", ""))
        if not shard:
            raise VggnormError(f"{p} is not a shard (measured without --shard): there is nothing to merge it with")
        index, count = (int(v) for v in shard.split("/"))
        counts.add(count)
        if index in shards:
            raise VggnormError(f"{shards[index]} and {p} are both shard {shard}: they overlap")
        shards[index] = p
        diffs = attr_differences(parts[0].attrs, st.attrs, MERGE_KEYS, (f"in {inputs[0]}", f"in {p}"))
        if diffs:
            raise VggnormError(f"{p} is not a shard of the same measurement as {inputs[0]}: " + "; ".join(diffs))
    if len(counts) != 1:
        raise VggnormError(
            f"the shards split the data in different ways ({', '.join(f'N={c}' for c in sorted(counts))})"
        )
    (count,) = counts
    missing = [f"{i}/{count}" for i in range(count) if i not in shards]
    if missing:
        raise VggnormError(f"shard(s) {', '.join(missing)} missing: merge-stats needs all {count} shards")
    merged = parts[0]
    for st in parts[1:]:
        merged = merged.merge(st)
    attrs = {
        **parts[0].attrs,
        "shard": "",
        "num_files": sum(int(st.attrs["num_files"]) for st in parts),
        "merged_from": [str(p) for p in inputs],
        "created": now(),
    }
    result = Stats(
        merged.layers,
        merged.num_images,
        attrs,
        sorted(merged.skipped),
        True,
        attrs["num_files"],
        merged.dataset,
        merged.classes,
    )
    write_stats(result, output, force=force)
    return result
