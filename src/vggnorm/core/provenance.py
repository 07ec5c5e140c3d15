"""The provenance of a measurement: which model, weights, images and policy gave a set of statistics.

``Stats`` carries it; ``vggnorm.io.statsfile`` reads and writes it as the statistics file's root attributes,
and ``vggnorm.io.provenance`` writes it again with a normalized checkpoint, inside the record of what
``apply`` did. A field a file leaves out reads as its default here, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Versions:
    """The versions of vggnorm, torch and torchvision that measured."""

    vggnorm: str = ""
    torch: str = ""
    torchvision: str = ""


@dataclass(frozen=True)
class MeasurementRecord:
    """How a set of statistics was measured, and on what (each input with its hash).

    ``preprocess`` is the measurement policy as ``vggnorm.io.data.Measurement.as_attrs`` writes it (resize,
    crop, mean/std or caffe, pooling, padding, decoder), read back by ``Measurement.from_attrs``; the core
    only carries it. ``None`` marks a count a file does not record.
    """

    arch: str = ""  # a torchvision name, or a user model's FILE:NAME
    weights: str = ""  # the weights as given (WEIGHTS)
    weights_path: str = ""  # a weights file's resolved path, else ""
    weights_sha256: str = ""  # of the tensors, whatever the file format
    weights_format: str = ""  # a Keras or MatConvNet file: what it is
    preprocess: Mapping[str, object] = field(default_factory=dict)
    dataset: str = ""  # the image folder as given
    dataset_fingerprint: str = ""  # sha256 of the folder's relative paths and sizes
    dataset_num_files: int | None = None  # the folder's image files, after --limit
    num_files: int | None = None  # the files this measurement covers (a shard's)
    limit: int = -1  # --limit; -1: none
    shard: str = ""  # "I/N" for --shard, else ""
    world_size: int = 1  # torchrun's processes
    merged_from: tuple[str, ...] = ()  # the shard files merge-stats summed
    include_classifier: bool = False  # the classifier's ReLUs were measured too
    add_affine: bool = False  # affine-less norms were measured with weight 1, bias 0
    per_class: bool = False
    label_source: str = ""  # with per-class sums: "folders" or the labels file
    labels_sha256: str = ""
    precision: str = "fp32"
    batch_size: int | None = None
    device: str = ""
    created: str = ""  # UTC, ISO 8601
    versions: Versions = Versions()
