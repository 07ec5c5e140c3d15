"""``compute-stats``: a folder of images -> a statistics file, resumable and shardable.

``compute_stats`` reads as the command's steps: find the files (this shard's, this rank's), resolve
the weights and the measurement policy, pick up an unfinished run, stream the batches, save. The
state of a run (what is done, what was skipped, when to save) is a ``StatsRun`` object.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torchvision

from vggnorm.analysis.topology import Site
from vggnorm.commands import distributed
from vggnorm.commands.distributed import World, world_from_env
from vggnorm.commands.measuring import measuring_model
from vggnorm.core.device import check_precision, describe, resolve_device
from vggnorm.core.measure import Batch, ReluSums, measure
from vggnorm.core.provenance import MeasurementRecord, Versions
from vggnorm.core.stats import Stats
from vggnorm.defaults import DEFAULT_ARCH, DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_SECONDS, DEFAULT_WEIGHTS
from vggnorm.errors import (
    DataError,
    InputError,
    OutputExistsError,
    ResumeMismatchError,
    StatsFileError,
    UsageError,
    VggnormError,
)
from vggnorm.io import data as data_mod
from vggnorm.io.checkpoint import check_writable, half_dtypes, same_file
from vggnorm.io.labels import Labels, from_file, from_folders
from vggnorm.io.models import ForwardPolicy, check_arch, check_input_size, checked_topology
from vggnorm.io.statsfile import (
    MEASUREMENT_KEYS,
    attr_differences,
    measurement_attrs,
    now,
    read_stats,
    write_stats,
)
from vggnorm.io.weights import Weights, resolve_weights
from vggnorm.options import Decoder, InputConvention, Precision, parse
from vggnorm.progress import Progress
from vggnorm.version import __version__

log = logging.getLogger(__name__)

# Attributes that must be equal for --resume to continue a run.
RESUME_KEYS = (
    *MEASUREMENT_KEYS,
    "weights",
    "dataset_fingerprint",
    "shard",
    "world_size",
    "num_files",
    "limit",
    "per_class",
    "labels_sha256",
)


@dataclass(frozen=True)
class RunConfig:
    """Everything ``compute_stats`` needs besides the folder and the output path."""

    arch: str = DEFAULT_ARCH
    weights: str = DEFAULT_WEIGHTS
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    limit: int | None = None
    resize: int | None = None  # None: the weights' transform's
    crop: int | None = None  # None: the weights' transform's
    # None: the weights' own (caffe for a Keras file, matconvnet with its mean for a .mat, else torchvision)
    convention: InputConvention | None = None
    forward: ForwardPolicy = ForwardPolicy()
    decoder: Decoder = Decoder.CPU
    include_classifier: bool = False  # also measure the ReLUs after fc6 and fc7
    strict: bool = False
    checkpoint_every: int | None = None  # batches; None: about every DEFAULT_CHECKPOINT_SECONDS
    shard: tuple[int, int] | None = None  # (I, N): every N-th file from the I-th (0-based), for merge-stats
    precision: Precision = Precision.FP32  # CUDA only: tf32, bf16, fp16 trade exactness for speed
    per_class: bool = False  # also sum per class (labels from class subfolders, or from ``labels``)
    labels: str | None = None  # a labels file for a flat folder (see labels.py)
    add_affine: bool = False  # give affine-less norms of sites weight 1, bias 0 (layers.with_affine)

    def __post_init__(self) -> None:  # a named value as its enum's member or its string, as the API takes them
        if self.convention is not None:
            object.__setattr__(self, "convention", parse(InputConvention, self.convention, "convention"))
        object.__setattr__(self, "decoder", parse(Decoder, self.decoder, "decoder"))
        object.__setattr__(self, "precision", parse(Precision, self.precision, "precision"))


@dataclass(frozen=True)
class FilePlan:
    """The files this process measures, and what identifies the data set they come from."""

    files: list[Path]  # this process's files: its shard, then its torchrun rank's share
    total: int  # files of the shard (all ranks together)
    listing: list[tuple[str, int]]  # the folder's files (after --limit): relative path, size
    labels: Labels | None = None  # with --per-class: the classes, and each of ``files``' class

    @property
    def dataset_files(self) -> int:
        return len(self.listing)

    @property
    def fingerprint(self) -> str:
        return data_mod.fingerprint(self.listing)


def plan_files(root: Path, config: RunConfig, world: World) -> FilePlan:
    files = data_mod.find_images(root)
    if config.limit is not None:
        files = files[: config.limit]
    contents, dataset_files = data_mod.listing(root, files), len(files)
    labels = None
    if config.labels is not None and not config.per_class:
        raise UsageError("--labels gives the classes of --per-class; add --per-class")
    if config.per_class:  # over the whole folder: every shard and rank has the same classes
        labels = from_file(Path(config.labels), root, files) if config.labels else from_folders(root, files)
    position = list(range(len(files)))
    if config.shard is not None:
        index, count = config.shard
        if not 0 <= index < count:
            raise UsageError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
        files, position = files[index::count], position[index::count]
        if not files:
            raise DataError(f"--shard {index}/{count} has no files: the folder has only {dataset_files}")
    total = len(files)
    files, position = files[world.rank :: world.size], position[world.rank :: world.size]
    if labels is not None:  # each measured file's class, in the order of ``files``
        labels = replace(labels, of_file=[labels.of_file[i] for i in position])
    return FilePlan(files, total, contents, labels)


class StatsRun:
    """A compute-stats run in progress: sums, files done, files skipped, and its resumable saves.

    Progress is saved (as an unfinished file that ``--resume`` continues) every ``every`` batches,
    or about every ``DEFAULT_CHECKPOINT_SECONDS`` when ``every`` is None. Under torchrun all ranks
    save after the same batches (a collective): every K batches, K from ``every`` or from the
    slowest rank's speed over its first batches.
    """

    def __init__(
        self,
        output: Path,
        sites: list[Site],
        provenance: MeasurementRecord,
        plan: FilePlan,
        *,
        world: World,
        device: torch.device,
        config: RunConfig,
        initial: Stats | None,
        force: bool,
    ) -> None:
        self.output, self.provenance, self.plan, self.world, self.device = output, provenance, plan, world, device
        self.config, self.force = config, force
        labels = plan.labels
        self.sums = ReluSums(
            sites,
            device,
            initial,
            file_labels=labels.of_file if labels else None,
            num_classes=len(labels.classes) if labels else 0,
        )
        self.num_images = initial.num_images if initial else 0
        self.position = initial.position if initial else 0  # files of this rank done
        self.start = self.position
        self.skipped: list[tuple[str, str]] = list(initial.skipped) if initial else []
        self.resumed = initial is not None
        self.own_file = self.resumed  # True once the output file is ours to overwrite
        self.stream_seconds = 0.0  # time spent streaming batches (scripts/bench.py reads it)
        self.every = config.checkpoint_every
        self.batches_done = self.batches_since = 0
        self.last_save = time.monotonic()
        # the smallest rank's batches left: a checkpoint after more would wait for it forever
        left = plan.total // world.size - self.start
        self.min_batches = -(-left // config.batch_size) if world.distributed else None

    def snapshot(self, complete: bool) -> Stats:
        """The statistics so far, summed over ranks (a collective under torchrun)."""
        mine = Stats(
            self.sums.layers(),
            self.num_images,
            self.provenance,
            list(self.skipped),
            complete,
            self.position,
            self.plan.listing if self.world.is_main else [],
            self.plan.labels.classes if self.plan.labels else [],
        )
        return distributed.reduce_stats(mine, self.world, self.device)

    def save(self, stats: Stats) -> None:
        if self.world.is_main:
            try:
                write_stats(stats, self.output, force=self.force or self.own_file)
            except KeyboardInterrupt:  # after its rename the file is this run's: the save on interrupt replaces it
                self.own_file = self.own_file or self.output.exists()
                raise
        self.own_file = True

    def record(self, batch: Batch) -> None:
        """Account for one measured batch: its skipped files, the progress, a save when due."""
        for i, reason in batch.failures:
            if self.config.strict:
                raise DataError(f"--strict: cannot use {data_mod.printable(self.plan.files[i])}: {reason}")
            self.skipped.append((str(self.plan.files[i]), reason))
            log.info("skipped %s: %s", data_mod.printable(self.plan.files[i]), reason)
        self.num_images += len(batch.indices)
        self.position += batch.num_files
        self.batches_since += 1
        self.batches_done += 1
        if self._due():
            self.save(self.snapshot(complete=False))
            self.batches_since, self.last_save = 0, time.monotonic()

    def _due(self) -> bool:
        if self.min_batches is not None:  # torchrun: all ranks decide alike
            if self.every is None and self.batches_done == min(5, self.min_batches - 1):
                elapsed = (time.monotonic() - self.last_save) / self.batches_done
                per_batch = distributed.agree_max(elapsed, self.world, self.device)
                self.every = max(1, int(DEFAULT_CHECKPOINT_SECONDS / per_batch))
            return self.every is not None and self.batches_since >= self.every and self.batches_done < self.min_batches
        if self.position >= len(self.plan.files):
            return False
        if self.every:
            return self.batches_since >= self.every
        return time.monotonic() - self.last_save >= DEFAULT_CHECKPOINT_SECONDS

    def discard(self) -> None:
        """Remove an output this run created (never a resumed one)."""
        if self.own_file and not self.resumed and self.world.is_main:
            self.output.unlink(missing_ok=True)


def _measurement(
    root: Path,
    config: RunConfig,
    plan: FilePlan,
    weights: Weights,
    measurement: data_mod.Measurement,
    world: World,
    device: torch.device,
) -> MeasurementRecord:
    """The provenance and measurement policy recorded with the statistics."""
    return MeasurementRecord(
        arch=weights.arch,
        weights=weights.spec,  # as given; a file's absolute path too, for a command run from elsewhere
        weights_path=str(Path(weights.spec).resolve()) if os.path.isfile(weights.spec) else "",
        weights_sha256=weights.sha256,
        weights_format=weights.foreign.describe() if weights.foreign is not None else "",
        preprocess=measurement.as_attrs(),
        dataset=str(root),
        dataset_fingerprint=plan.fingerprint,
        dataset_num_files=plan.dataset_files,
        shard=f"{config.shard[0]}/{config.shard[1]}" if config.shard else "",
        num_files=plan.total,
        world_size=world.size,
        limit=config.limit if config.limit is not None else -1,
        created=now(),
        versions=Versions(__version__, torch.__version__, torchvision.__version__),
        device=describe(device),
        precision=config.precision.value,
        include_classifier=config.include_classifier,
        add_affine=config.add_affine,
        batch_size=config.batch_size,
        per_class=config.per_class,
        label_source=plan.labels.source if plan.labels else "",
        labels_sha256=plan.labels.sha256 if plan.labels else "",
    )


def _resume_state(output: Path, provenance: MeasurementRecord, world: World, plan: FilePlan) -> Stats:
    """The unfinished run in ``output``, checked to be this one (``provenance``: this run's, but for when it
    was created); under torchrun, rank 0 carries its sums."""
    initial = read_stats(output, allow_incomplete=True)
    if initial.complete:
        raise StatsFileError(f"--resume: {output} is already complete ({initial.num_images} images); nothing to do")
    diffs = attr_differences(measurement_attrs(initial.provenance), measurement_attrs(provenance), RESUME_KEYS)
    if diffs:
        explained = [_explain(d, initial, provenance, plan) for d in diffs]
        raise ResumeMismatchError(
            f"--resume: {output} was started with other arguments or data: " + "; ".join(explained) + ". Resume with "
            "the arguments and folder of the first run, or start over without --resume (with --force)"
        )
    if world.is_main:
        return initial
    # the other ranks start from zero sums at the same position (``position`` counts each rank's files)
    layers = {
        n: dataclasses.replace(layer, sum=torch.zeros_like(layer.sum), count=0, class_sum=None, class_count=None)
        for n, layer in initial.layers.items()
    }
    return Stats(layers, 0, initial.provenance, [], False, initial.position, classes=initial.classes)


def _explain(diff: str, initial: Stats, new: MeasurementRecord, plan: FilePlan) -> str:
    """A difference as a user reads it: for the folder, which files changed."""
    if diff.startswith("dataset_fingerprint"):
        before, now = initial.provenance.dataset_num_files, new.dataset_num_files
        what = data_mod.listing_changes(initial.dataset, plan.listing) if initial.dataset else "files changed"
        return (
            f"the folder's contents changed since the run started (dataset_fingerprint: {before} image files then, "
            f"{now} now: {what})"
        )
    return diff


def compute_stats(
    root: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: RunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> Stats:
    """Measure per-filter mean ReLU activations of a VGG over the images under ``root``.

    Writes ``output`` atomically: every ``config.checkpoint_every`` batches (and on Ctrl-C) as an
    unfinished, resumable file; at the end as the complete statistics. Returns the final stats.
    Under torchrun each rank measures every WORLD_SIZE-th file and rank 0 writes the sums of all.
    ``timings``, if given, receives ``stream``: the seconds spent streaming batches (for benchmarks).
    """
    world, root, output = world_from_env(), Path(root), Path(output)
    if world.distributed and config.shard is not None:
        raise UsageError("--shard and torchrun both split the files: use one or the other")
    if resume and not output.is_file():
        raise StatsFileError(f"--resume: {output} does not exist; run without --resume to start")
    input_files = [config.weights] if os.path.exists(config.weights) else []
    input_files += [config.labels] if config.labels is not None and os.path.exists(config.labels) else []
    if not resume:
        refuse_unfinished(output, force=force)
        check_writable(output, force=force, inputs=input_files)
    plan = plan_files(root, config, world)
    if any(same_file(output, f) for f in plan.files if f.name == output.name):
        raise OutputExistsError(f"{output} is one of the images under {root}; choose an output path outside the data")
    device = _device(config, world)
    check_precision(config.precision, device)
    data_mod.check_decode(config.decoder, device)
    check_arch(config.arch)
    checked_topology(config.arch, config.add_affine)  # before loading (or downloading) any weights
    weights = resolve_weights(config.weights, arch=config.arch)
    if half := half_dtypes(weights.state_dict):
        log.warning(
            "%s holds %s tensors: the network runs with them as float32 (their exact values), under --precision %s",
            config.weights,
            " and ".join(half),
            config.precision,
        )
    kind = config.convention or weights.preprocess  # a Keras or MatConvNet file is fed as its users feed it
    transform = data_mod.default_transform(
        weights.arch,
        resize=config.resize,
        crop=config.crop,
        convention=kind,
        mean_pixel=weights.mean_pixel if kind == weights.preprocess else None,
    )
    if transform.crop > transform.resize:
        raise UsageError(f"--crop {transform.crop} is larger than --resize {transform.resize}")
    check_input_size(weights.arch, transform.crop)
    measurement = data_mod.Measurement(transform, kind, config.forward, config.decoder)
    if config.include_classifier and weights.features_only:
        raise InputError(f"--include-classifier: {weights.spec} has no classifier (features-only weights)")
    topo = checked_topology(weights.arch, config.add_affine)
    sites = [*topo.sites, *(topo.fc_sites if config.include_classifier else ())]
    provenance = _measurement(root, config, plan, weights, measurement, world, device)
    initial = _resume_state(output, provenance, world, plan) if resume else None
    if initial is not None:  # a resumed run keeps the time it was started
        provenance = replace(provenance, created=initial.provenance.created or provenance.created)
    if initial is not None:
        log.info("resuming %s at file %d of %d", output, initial.position, len(plan.files))
    model = measuring_model(
        weights.arch,
        weights.state_dict,
        config.forward,
        device,
        precision=config.precision,
        add_affine=config.add_affine,
    )
    del weights
    run = StatsRun(
        output, sites, provenance, plan, world=world, device=device, config=config, initial=initial, force=force
    )
    _stream(run, model, measurement, progress=progress)
    final = run.snapshot(complete=True)
    distributed.shutdown(world)
    if final.num_images == 0:
        run.discard()
        first = final.skipped[0] if final.skipped else ("?", "?")
        raise DataError(f"none of the {plan.total} files under {root} could be decoded (first: {first[0]}: {first[1]})")
    final.position = plan.total
    run.save(final)
    if timings is not None:
        timings["stream"] = run.stream_seconds
    return final


def refuse_unfinished(output: Path, *, force: bool) -> None:
    """An unfinished run in ``output`` is continued with ``--resume``; say so rather than suggest ``--force``."""
    if force or not output.is_file():
        return
    try:
        previous = read_stats(output, allow_incomplete=True)
    except VggnormError:
        return  # not a statistics file: check_writable says it exists
    if not previous.complete:
        total = previous.provenance.num_files
        raise OutputExistsError(
            f"{output} is an unfinished run ({previous.position} of {'?' if total is None else total} files "
            "done): continue it with the same command plus --resume, or start over with --force (its progress "
            "is then lost)"
        )


def _device(config: RunConfig, world: World) -> torch.device:
    device = resolve_device(config.device)
    if world.distributed:
        if device.type == "cuda" and config.device in ("auto", "cuda"):
            device = torch.device("cuda", world.local_rank)
        distributed.init(world, device)
    return device


def _stream(run: StatsRun, model: torch.nn.Module, measurement: data_mod.Measurement, *, progress: bool) -> None:
    """Measure the files from ``run.position`` on, saving progress on Ctrl-C (SIGTERM too, via the CLI)."""
    config, world = run.config, run.world
    workers = data_mod.default_workers() if config.workers is None else config.workers
    loader = data_mod.make_loader(
        run.plan.files,
        measurement.transform,
        measurement.convention,
        decoder=measurement.decoder,
        batch_size=config.batch_size,
        workers=workers,
        start=run.position,
        device=run.device,
        dtype=torch.float64 if config.precision == Precision.FP64 else torch.float32,
    )
    bar = Progress(
        total=run.plan.total,
        initial=run.position * world.size,
        unit="img",
        file=sys.stderr,
        disable=not (progress and world.is_main),
        dynamic_ncols=True,
    )

    def on_batch(batch: Batch) -> None:
        run.record(batch)
        bar.update(batch.num_files * world.size)
        if run.skipped:
            bar.set_postfix(skipped=len(run.skipped), refresh=False)

    try:
        with bar:
            started = time.perf_counter()
            measure(model, loader, run.sums, device=run.device, on_batch=on_batch, precision=config.precision)
            run.stream_seconds = time.perf_counter() - started
    except KeyboardInterrupt:
        if not world.distributed:  # under torchrun the last common checkpoint stands
            run.save(run.snapshot(complete=False))
        raise
    except DataError:
        run.discard()
        raise
