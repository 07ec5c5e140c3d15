"""The ``vggnorm`` command line: parse, call one library function, echo its result.

Results go to stdout; progress and diagnostics to stderr. Library errors (``VggnormError``) and
refusals of the file system become one-line messages with no traceback, exiting with the status the
error's class carries (``exit_status``), the same in every command. Nothing heavy is imported
until a command runs, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import enum
import functools
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from vggnorm.defaults import (
    DEFAULT_ARCH,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPS,
    DEFAULT_MEANS_TOL,
    DEFAULT_REL_EPS,
    DEFAULT_RTOL,
    DEFAULT_WEIGHTS,
    MAX_RESIZE,
    NAMED_ARCHS,
    torchvision_classifiers,
)
from vggnorm.errors import VggnormError
from vggnorm.options import Decoder, InputConvention, Layout, Padding, Pooling, Precision, StreamScale, Weighting
from vggnorm.version import __version__

if TYPE_CHECKING:
    from vggnorm.core.stats import Stats
    from vggnorm.io.policy import Overrides

SHOWN_SKIPPED = 20
F = TypeVar("F", bound=Callable[..., Any])
E = TypeVar("E", bound=enum.StrEnum)


class EnumChoice(click.Choice[E]):
    """A choice among an option enum's members, written on the command line and in ``--help`` as their
    values (``max``, not ``MAX``); the command receives the member."""

    def __init__(self, members: Iterable[E]) -> None:
        super().__init__(list(members))

    def normalize_choice(self, choice: object, ctx: click.Context | None) -> str:
        return choice.value if isinstance(choice, enum.StrEnum) else str(choice)


@contextmanager
def user_errors() -> Iterator[None]:
    """A library error as one line (``Error: ...``), exiting with the ``exit_status`` its class carries; a
    refusal of the file system (permissions, disk full, ...: not a vggnorm bug) exits 1."""
    try:
        yield
    except VggnormError as e:
        click.ClickException(str(e)).show()
        raise click.exceptions.Exit(e.exit_status) from e
    except OSError as e:
        click.ClickException(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)).show()
        raise click.exceptions.Exit(VggnormError.exit_status) from e


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger("vggnorm").setLevel(logging.INFO)


def options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Apply several option decorators, in the order they are listed in ``--help``."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


# Options that several commands share, each defined once.
verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_verbose,
    help="Log diagnostics (each skipped file, resume details) to stderr.",
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N."
)
loader_options = options(
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="Images per forward pass. Changes the float32 means only by rounding (docs: Dead filters, precision and "
        "tolerances).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="DataLoader processes decoding images (0: decode in the main process). [default: CPUs - 1]",
    ),
)


def _check_arch_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An arch name torchvision does not know is a usage error (exit 2), said at once (no torch import)."""
    if value in NAMED_ARCHS:
        return value
    if value not in torchvision_classifiers():
        raise click.BadParameter(
            f"{value!r} is not a torchvision classification model; use one of {', '.join(NAMED_ARCHS)}, another "
            "torchvision name, or --model for your own",
            param_hint="--arch",
        )
    return value


model_option = click.option(
    "--model",
    metavar="FILE.py:NAME|MODULE:NAME",
    default=None,
    help="A model of your own instead of a torchvision one: a class or zero-argument function returning an "
    "nn.Module with Conv2d -> (norm) -> ReLU/LeakyReLU/PReLU sites (check it with `vggnorm inspect`). Importing "
    "it RUNS ITS CODE; vggnorm never imports code unless you pass this option. apply and verify need the same "
    "--model as compute-stats.",
)
add_affine_option = click.option(
    "--add-affine",
    is_flag=True,
    help="Accept a site's norm built without affine parameters (InstanceNorm2d's default) by giving it weight 1 "
    "and bias 0 (the same function), which then carry the scales. The normalized file holds them, so your code "
    "must build that norm with affine=True to load it. Recorded in the statistics; apply and verify follow it.",
)
progress_option = click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr."
)
RESIZE_HELP = "Resize the shorter side to this. [default: the weights' transform, 256]"
CROP_HELP = "Center crop size. [default: the weights' transform, 224]"
PREPROCESS_HELP = (
    "torchvision: RGB, 0-1, ImageNet mean/std. caffe: BGR, 0-255, mean-subtracted, as the original "
    "Caffe VGG (and Gatys' code) and Keras' VGG16/VGG19 (preprocess_input) expect. matconvnet: RGB, 0-255, "
    "minus the mean pixel, as MatConvNet's imagenet-vgg-verydeep .mat files (neural-style's vgg.py) expect."
)
WEIGHTS_PREPROCESS = (
    " [default: the weights' own: caffe for a Keras .h5, matconvnet (the file's mean) for a .mat, else torchvision]"
)
POOLING_HELP = "Measure with max pooling, or with average pooling as Gatys et al. synthesized."
PADDING_HELP = (
    "model: every conv pads as the model is written (torchvision's VGGs: zeros). zeros / reflect: every padded "
    "conv is made to pad by zeros / by reflection, as AdaIN's VGG encoder does; measure under the padding you "
    "will run (apply --layout adain needs reflect)."
)


def _dead_rule_options(verify: bool) -> Callable[[F], F]:
    """--rel-eps and --eps: the dead-filter rule (normalize.DeadRule); verify defaults to what apply recorded."""
    default = " [default: as apply recorded, else {}]" if verify else ""
    return options(
        click.option(
            "--rel-eps",
            type=click.FloatRange(min=0),
            default=None if verify else DEFAULT_REL_EPS,
            show_default=not verify,
            help="A filter whose mean is at most REL_EPS x its layer's median is dead: left unscaled (its "
            "float32 activations could not be normalized to verify's precision) and listed."
            + default.format(DEFAULT_REL_EPS),
        ),
        click.option(
            "--eps",
            type=click.FloatRange(min=0),
            default=None if verify else DEFAULT_EPS,
            show_default=not verify,
            help="An absolute floor: a mean at most EPS is dead too." + default.format(DEFAULT_EPS),
        ),
    )


def _policy_options(verify: bool) -> Callable[[F], F]:
    """--resize, --crop, --preprocess, --pooling: how compute-stats measures; for verify, how an audit
    without --stats re-measures (with --stats, the recorded policy is used)."""
    prefix = "With --data and no --stats: " if verify else ""

    def choice(
        flag: str, name: str, kind: type[enum.StrEnum], help_text: str, by_weights: bool = False
    ) -> Callable[[F], F]:
        # compute-stats defaults to the first choice (--preprocess: the weights' own); verify to what
        # the statistics or report recorded
        return click.option(
            flag,
            name,
            type=EnumChoice(kind),
            default=None if verify or by_weights else list(kind)[0].value,
            show_default=not (verify or by_weights),
            help=prefix + help_text + (WEIGHTS_PREPROCESS if by_weights and not verify else ""),
        )

    return options(
        click.option("--resize", type=click.IntRange(1, MAX_RESIZE), default=None, help=prefix + RESIZE_HELP),
        click.option("--crop", type=click.IntRange(1, MAX_RESIZE), default=None, help=prefix + CROP_HELP),
        choice("--preprocess", "convention", InputConvention, PREPROCESS_HELP, by_weights=True),
        choice("--pooling", "pooling", Pooling, POOLING_HELP),
        choice("--padding", "padding", Padding, PADDING_HELP),
    )


# verify's options that override the recorded measurement policy: handed to the command as one typed value
OVERRIDES = (
    "rel_eps",
    "eps",
    "resize",
    "crop",
    "convention",
    "pooling",
    "padding",
    "include_classifier",
    "weighting",
    "labels",
    "stream_scale",
)


def _gathered(name: str, fields: tuple[str, ...], make: Callable[[], Callable[..., object]]) -> Callable[[F], F]:
    """Hand the options ``fields`` to the command as one typed value ``name``, built by the class ``make()``
    returns (imported only when the command runs, so ``--help`` imports no torch)."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in fields}
            return f(*args, **kwargs, **{name: make()(**values)})

        return cast(F, command)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vggnorm")
@verbose_option
def cli() -> None:
    """Normalize a VGG so every conv filter's mean ReLU activation over a dataset is 1.

    The network computes the same function afterwards (logits unchanged). Three steps:
    compute-stats (measure), apply (fold the scales into the weights), verify (prove it).
    Beyond VGG: AlexNet, and any ReLU CNN that `vggnorm inspect` accepts.
    """
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")


@cli.command("compute-stats")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--arch",
    metavar="NAME",
    callback=_check_arch_name,
    default=DEFAULT_ARCH,
    show_default=True,
    help=f"torchvision architecture: {', '.join(NAMED_ARCHS)}, or another torchvision classification model "
    "that `vggnorm inspect NAME` accepts (ignored with --model).",
)
@model_option
@click.option(
    "--weights",
    "weights",
    metavar="WEIGHTS",
    default=DEFAULT_WEIGHTS,
    show_default=True,
    help="A state_dict file (.pth/.pt/.safetensors), a torchvision weights name (loaded through "
    "torchvision's cache), or random:SEED (seeded random init, for demos and tests).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("stats.h5"),
    show_default=True,
    help="Statistics file (HDF5) to write.",
)
@device_option
@loader_options
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N files (in sorted order).")
@_policy_options(verify=False)
@click.option(
    "--include-classifier",
    is_flag=True,
    help="Also measure the ReLUs after fc6 and fc7 (for apply --include-classifier).",
)
@click.option(
    "--strict", is_flag=True, help="Stop at the first file that cannot be decoded (naming it), writing nothing."
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run from its output file (same arguments and data)."
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    metavar="BATCHES",
    help="Save resumable progress every BATCHES batches. [default: about once a minute]",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    callback=lambda ctx, param, value: _parse_shard(value),
    help="Measure only every N-th file from the I-th (0-based); combine the N outputs with merge-stats.",
)
@click.option(
    "--precision",
    type=EnumChoice(Precision),
    default=Precision.FP32.value,
    show_default=True,
    help="Arithmetic of the forward pass. fp32 (TF32 off): means within ~4e-5 relative of a float64 "
    "computation on random-weight VGGs (docs: Dead filters, precision and tolerances). fp64: a float64 forward pass, means equal "
    "to float64 arithmetic (CPU: about 5x slower, 2x memory). CUDA only: tf32, bf16 or fp16 autocast (faster, less exact).",
)
@click.option(
    "--per-class",
    is_flag=True,
    help="Also sum per class: labels from class subfolders (sorted folder names, as torchvision's ImageFolder) "
    "or from --labels. For apply --weighting class and vggnorm centers.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="With --per-class on a flat folder: one label per line for the files in sorted order (the ILSVRC2012 "
    "val ground truth), or CSV lines filename,label.",
)
@click.option(
    "--decode",
    type=EnumChoice(Decoder),
    default=Decoder.CPU.value,
    show_default=True,
    help="cpu: DataLoader workers decode and resize with PIL (torchvision's own pipeline). gpu "
    "(experimental, CUDA only): nvJPEG decodes the JPEGs and they are resized on the GPU; pixels "
    "differ slightly, so the means do too (docs: ImageNet on a GPU box). Recorded in the output.",
)
@add_affine_option
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@progress_option
@verbose_option
def compute_stats_cmd(
    directory: Path,
    arch: str,
    model: str | None,
    weights: str,
    output: Path,
    device: str,
    batch_size: int,
    workers: int | None,
    limit: int | None,
    resize: int | None,
    crop: int | None,
    convention: InputConvention | None,
    pooling: Pooling,
    padding: Padding,
    include_classifier: bool,
    strict: bool,
    resume: bool,
    checkpoint_every: int | None,
    shard: tuple[int, int] | None,
    precision: Precision,
    per_class: bool,
    labels: str | None,
    decode: Decoder,
    add_affine: bool,
    force: bool,
    progress: bool,
) -> None:
    """Measure every conv filter's mean ReLU activation over the images in DIR.

    DIR is read recursively (flat ILSVRC2012 val layout or class subfolders); files that cannot be
    decoded are skipped, listed, and recorded in the output. One pass over the original network.

    Example: vggnorm compute-stats ILSVRC2012_val/ --arch vgg19 -o vgg19-stats.h5
    """
    from vggnorm.commands.compute import RunConfig, compute_stats
    from vggnorm.commands.distributed import world_from_env
    from vggnorm.io.models import ForwardPolicy

    if model is not None:
        with user_errors():
            arch = _import_model(model)
    config = RunConfig(
        arch=arch,
        weights=weights,
        device=device,
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        resize=resize,
        crop=crop,
        convention=convention,
        forward=ForwardPolicy(pooling, padding),
        decoder=decode,
        include_classifier=include_classifier,
        strict=strict,
        checkpoint_every=checkpoint_every,
        shard=shard,
        precision=precision,
        per_class=per_class,
        labels=labels,
        add_affine=add_affine,
    )
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        with user_errors():
            stats = compute_stats(directory, output, config, resume=resume, force=force, progress=progress)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: progress saved in {output}; continue with the same command plus --resume", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not world_from_env().is_main:
        return  # under torchrun, rank 0 reports
    _echo_stats(stats, output, convention_given=convention is not None)


def _echo_stats(stats: Stats, output: Path, *, convention_given: bool) -> None:
    """compute-stats' summary: the files skipped, the images used, a foreign file's preprocessing, the layers,
    the classes, and the dead filters under the default rule."""
    from vggnorm.core.fold import DeadRule
    from vggnorm.io.data import Measurement, printable

    shown = 0 if logging.getLogger("vggnorm").isEnabledFor(logging.INFO) else SHOWN_SKIPPED  # -v logged each
    for path, reason in stats.skipped[:shown]:
        click.echo(f"skipped {printable(path)}: {reason}", err=True)
    if shown and len(stats.skipped) > shown:
        click.echo(
            f"... and {len(stats.skipped) - SHOWN_SKIPPED} more (all listed in {output}, group skipped/)", err=True
        )
    rule = DeadRule()
    dead = {n: int((~rule.live(layer.mean)).sum()) for n, layer in stats.layers.items()}
    click.echo(f"images: {stats.num_images} used, {len(stats.skipped)} skipped")
    if stats.provenance.weights_format:
        p = Measurement.from_attrs(stats.provenance.preprocess)
        how = "as given by --preprocess" if convention_given else "the file's own, recorded; --preprocess overrides"
        mean = ", ".join(f"{float(x):g}" for x in p.transform.mean)
        click.echo(f"weights: {stats.provenance.weights_format}; preprocessing: {p.convention}, mean ({mean}) ({how})")
    click.echo(f"layers: {len(stats.layers)} ({', '.join(stats.layers)})")
    first = next(iter(stats.layers.values()))
    if stats.classes and first.class_count is not None and stats.num_images:
        positions = first.count // stats.num_images
        counts = ", ".join(f"{c}: {int(n) // positions}" for c, n in zip(stats.classes, first.class_count, strict=True))
        click.echo(f"classes: {len(stats.classes)} (images per class: {counts})")
    click.echo(
        f"dead filters ({rule.describe()}; apply --rel-eps/--eps): {sum(dead.values())}"
        + "".join(f"; {n}: {d}" for n, d in dead.items() if d)
    )
    click.echo(f"wrote {output}")


@cli.command("apply")
@click.argument("checkpoint", metavar="WEIGHTS")
@click.option(
    "--stats",
    "stats_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Statistics file from compute-stats, measured on WEIGHTS.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Normalized state_dict to write (.pth/.pt, or .safetensors). [default: X.normalized.pth beside a weights file X.pth, else ARCH-WEIGHTS.normalized.pth here]",
)
@click.option("--features-only", is_flag=True, help="Write only the conv layers (features.*), no classifier.")
@click.option(
    "--layout",
    type=EnumChoice(Layout),
    default=Layout.TORCHVISION.value,
    show_default=True,
    help="torchvision: loads into torchvision's VGG. gatys: conv layers only, keyed conv1_1 ... conv5_4 "
    "(BatchNorm folded into the convs for _bn models). adain: vgg19 only, AdaIN's encoder (an nn.Sequential "
    "of a 1x1 preprocessing conv, ReflectionPad2d + 3x3 conv + ReLU, ceil-mode max pooling; RGB in [0, 1]); "
    "needs statistics measured with --padding reflect.",
)
@click.option(
    "--include-classifier",
    is_flag=True,
    help="Also normalize the ReLUs after fc6 and fc7 (compensating fc7 and fc8; logits unchanged). "
    "Needs statistics measured with --include-classifier.",
)
@_dead_rule_options(verify=False)
@click.option(
    "--weighting",
    type=EnumChoice(Weighting),
    default=Weighting.IMAGE.value,
    show_default=True,
    help="image: normalize the means over all images and positions. class: the class-balanced means (the mean "
    "of the per-class means), for calibration sets whose classes differ in size; needs compute-stats --per-class.",
)
@click.option(
    "--stream-scale",
    type=EnumChoice(StreamScale),
    default=StreamScale.GEOMETRIC.value,
    show_default=True,
    help="Residual streams (a ResNet stage: the ReLUs joined by its adds) share one scale per channel, so their "
    "means cannot all be 1. geometric: the geometric mean of the stream's means (the smallest log-deviation "
    "from 1); last: the stream's last ReLU's means become 1. Every ReLU outside a stream is normalized to 1 "
    "either way; the report gives each stream's spread.",
)
@click.option(
    "--plot",
    is_flag=True,
    help="Also draw OUT.report.png, every filter's mean before and after (needs matplotlib: "
    "pip install 'vggnorm[plot]'; about a second more).",
)
@model_option
@click.option("--force", is_flag=True, help="Overwrite an existing output or report.")
@verbose_option
def apply_cmd(
    checkpoint: str,
    stats_path: Path,
    output: Path | None,
    features_only: bool,
    layout: Layout,
    include_classifier: bool,
    rel_eps: float,
    eps: float,
    weighting: Weighting,
    stream_scale: StreamScale,
    plot: bool,
    model: str | None,
    force: bool,
) -> None:
    """Fold the statistics into WEIGHTS so every filter's mean ReLU activation becomes 1.

    WEIGHTS are the weights, as compute-stats --weights takes them (a file, a torchvision weights name, or
    random:SEED), and must be those the statistics were measured on. Writes the checkpoint and a report
    (OUT.report.json, OUT.report.md; with --plot OUT.report.png too) after self-checking that the logits
    are unchanged.

    Example: vggnorm apply vgg19.pth --stats vgg19-stats.h5 -o vgg19-normalized.pth
    """
    from vggnorm.commands.apply import ApplyOptions, apply_stats
    from vggnorm.core.fold import DeadRule

    with user_errors():
        named = _import_model(model) if model is not None else None
        options = ApplyOptions(
            features_only=features_only,
            layout=layout,
            include_classifier=include_classifier,
            rule=DeadRule(rel_eps=rel_eps, eps=eps),
            weighting=weighting,
            stream_scale=stream_scale,
            model=named,
            force=force,
            plot=plot,
        )
        result = apply_stats(checkpoint, stats_path, output, options)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    _echo_checks(result.report.checks)
    dead = sum(len(layer["dead"]) for layer in result.report.layers)
    click.echo(f"dead filters left unscaled: {dead}")
    click.echo(f"wrote {result.output}")
    click.echo(
        f"report: {result.report_md} ({result.report_json.name}"
        + (f", {result.figure.name})" if result.figure else ")")
    )


@cli.command("verify")
@click.argument("normalized", metavar="NORMALIZED", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--original",
    metavar="WEIGHTS",
    default=None,
    help="The weights before normalization: a file, a torchvision weights name, or random:SEED.",
)
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The statistics file apply used.",
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Image folder: re-measure the means (the calibration images: expect exactly 1).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images of --data.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as PATH.json and PATH.md.",
)
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=DEFAULT_RTOL,
    show_default=True,
    help="Relative tolerance of activations and logits (both networks run in float64 on the same input) "
    "and of the fold (elementwise): what remains is the float32 rounding of the stored weights, ~1e-7.",
)
@click.option(
    "--means-tol",
    type=click.FloatRange(min=0),
    default=DEFAULT_MEANS_TOL,
    show_default=True,
    help="Tolerance of |mean - 1| for every live filter, re-measured in float32: filters kept live by the "
    "dead rule re-measure within ~4e-4 of 1 on random weights (docs: Dead filters, precision and tolerances).",
)
@_dead_rule_options(verify=True)
@_policy_options(verify=True)
@click.option(
    "--weighting",
    type=EnumChoice(Weighting),
    default=None,
    help="Check the means over all images (image) or the class-balanced means (class). [default: as apply recorded]",
)
@click.option(
    "--stream-scale",
    type=EnumChoice(StreamScale),
    default=None,
    help="How apply chose the scale a residual stream's ReLUs share (apply --stream-scale), for a .pth whose "
    "report is not beside it. [default: as apply recorded; geometric when nothing was]",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="With class weighting on a flat --data folder: the labels file. [default: as compute-stats read them]",
)
@click.option(
    "--include-classifier/--no-include-classifier",
    default=None,
    help="Check the fc ReLUs too (NORMALIZED was made with apply --include-classifier). [default: as apply recorded]",
)
@click.option(
    "--precision",
    type=EnumChoice((Precision.FP32, Precision.FP64)),
    default=Precision.FP32.value,
    show_default=True,
    help="Arithmetic of the re-measurement (--data): fp64 re-measures in float64.",
)
@model_option
@device_option
@loader_options
@click.option(
    "--junit-xml",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the checks as JUnit XML (a test case per check and per layer), for CI systems.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="stdout: text for people, or json (the report, as --report writes it) for scripts.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing report or JUnit file.")
@progress_option
@verbose_option
@_gathered("overrides", OVERRIDES, lambda: importlib.import_module("vggnorm.io.policy").Overrides)
def verify_cmd(
    normalized: Path,
    original: str | None,
    stats_path: Path | None,
    data: Path | None,
    limit: int | None,
    report: Path | None,
    rtol: float,
    means_tol: float,
    overrides: Overrides,
    precision: Precision,
    model: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    junit_xml: Path | None,
    output_format: str,
    force: bool,
    progress: bool,
) -> None:
    """Check that NORMALIZED is the correct normalization. Exit 0: all checks run passed; 1: a check
    failed (or none could run), or an input, an output or the set-up failed it; 2: a wrong command line.

    \b
    With --original and --stats: (a) every ReLU output equals the original's divided by the scales,
    (b) logits unchanged, (d) NORMALIZED equals the fold recomputed. With --data: (c) the means
    re-measured on the images are 1. With --data alone it audits any checkpoint (on a residual network, the ReLUs outside its streams, whose means are the stream policy's).

    Example: vggnorm verify vgg19-normalized.pth --original vgg19.pth --stats vgg19-stats.h5 --data val/
    """
    from vggnorm.commands.verify import Audit, Claim, Method, Outputs, verify_checkpoint
    from vggnorm.core.checks import NOT_RUN, PASS
    from vggnorm.io.report import report_paths

    with user_errors():
        if model is not None:
            _import_model(model)
        claim = Claim(normalized, original=original, stats=stats_path)
        method = Method(rtol=rtol, means_tol=means_tol, device=device, precision=precision, policy=overrides)
        audit = None
        if data is not None:
            audit = Audit(data, limit=limit, batch_size=batch_size, workers=workers, progress=progress)
        outputs = Outputs(report=report, junit_xml=junit_xml, force=force)
        result = verify_checkpoint(claim, method, audit, outputs)
    if output_format == "json":
        click.echo(result.to_json())
        sys.exit(0 if result.passed else 1)
    if report is not None:
        json_path, md_path = report_paths(report)
        figure = f", {result.figure}" if result.figure else ""  # the re-measured means' picture
        click.echo(f"report: {md_path} ({json_path.name}{figure})")
    if result.measured:
        click.echo("measured means of live filters, per layer:")
        for m in result.measured:
            click.echo(
                f"  {result.label(m['layer'], relu=True):24} {m['live']:4}/{m['filters']:<4} min {m['min']:<10.4g} "
                f"median {m['median']:<10.4g} max {m['max']:.4g}"
            )
    if "policy" in result.inputs and data is not None:
        click.echo(f"measured with: {result.inputs['policy']}")
    _echo_checks(result.checks)
    ran = [c for c in result.checks if c.status != NOT_RUN]
    failed = [c for c in ran if c.status != PASS]
    verdict = "PASS" if result.passed else "FAIL"
    not_run = len(result.checks) - len(ran)
    click.echo(f"verify: {verdict} ({len(ran) - len(failed)} passed, {len(failed)} failed, {not_run} not run)")
    sys.exit(0 if result.passed else 1)


@cli.command("compare")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option(
    "--stats",
    "stats_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Statistics measured on A: compare the recovered scales with the measured means.",
)
@click.option(
    "--tol",
    type=click.FloatRange(min=0),
    default=1e-4,
    show_default=True,
    help="Largest relative residual of a filter's weights and bias for it to count as rescaled.",
)
@_dead_rule_options(verify=False)
@model_option
@verbose_option
def compare_cmd(
    a: str, b: str, stats_path: Path | None, tol: float, model: str | None, rel_eps: float, eps: float
) -> None:
    """Is B a positive per-filter rescaling of A (the function-preserving kind vggnorm makes)?

    A and B are weights, each a file, a torchvision weights name, or random:SEED (a name or random:SEED
    takes the arch of --model, --stats or the other, a file). Recovers, layer by layer, the scale of every
    filter from the weights alone and prints, per layer, their median and range (with --stats: over the
    live filters, as apply's report, and how far they are from the measured means). Any layout
    (torchvision, gatys, adain); BatchNorm is folded in first, so a _bn model compares with its Gatys
    or AdaIN export. Exit 0: B is such a rescaling of A; 1: it is not (the first layer and filter that
    break it are named), or an input, an output or the set-up failed it; 2: a wrong command line.

    Example: vggnorm compare vgg19.pth vgg19-normalized.pth --stats vgg19-stats.h5
    """
    from vggnorm.commands.compare import compare_checkpoints
    from vggnorm.core.fold import DeadRule

    with user_errors():
        arch = _import_model(model) if model is not None else None
        rule = DeadRule(rel_eps=rel_eps, eps=eps)
        result = compare_checkpoints(a, b, stats_path=stats_path, tol=tol, rule=rule, arch=arch)
    over = "live filters, as apply's report" if stats_path is not None else "all filters (--stats tells the dead)"
    click.echo(f"{result.arch}: scales recovered from the weights, per layer (B = A rescaled; median, range: {over})")
    for layer in result.layers:
        dead = f" ({layer.dead} dead)" if layer.dead else ""
        line = (
            f"  {layer.conv} ({layer.name})".ljust(26)
            + f"{layer.filters:4} filters{dead}  median {layer.median:<10.4g} range {layer.low:.4g} .. {layer.high:.4g}"
            + f"  residual {layer.residual:.2g}"
        )
        if layer.vs_means is not None:
            line += f"  vs measured means {layer.vs_means:.2g}"
        click.echo(line)
    if result.rescaling:
        click.echo(f"{b} is a positive per-filter rescaling of {a}")
    else:
        click.echo(f"NOT a rescaling: {result.broken}")
    sys.exit(0 if result.rescaling else 1)


@cli.command("inspect")
@click.argument("model_name", metavar="MODEL")
@click.option(
    "--weights",
    metavar="WEIGHTS",
    default=None,
    help="Also check that these weights (a file, a torchvision weights name, or random:SEED) fit MODEL: keys, "
    "shapes and finite values.",
)
@add_affine_option
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of a table.")
@verbose_option
def inspect_cmd(model_name: str, weights: str | None, add_affine: bool, as_json: bool) -> None:
    """Can MODEL be normalized? Lists every site, where its scale flows, and every refusal with its reason.

    MODEL is a torchvision name (vgg19, alexnet, resnet18, ...) or your own model as FILE.py:NAME or
    package.module:NAME (this imports it, which RUNS ITS CODE: inspect only what you trust). The same
    structural analysis (torch.fx) that compute-stats, apply and verify run; no data is read. Exit 0:
    normalizable; 1: refused (the reasons are printed), or an input or the set-up failed it; 2: a wrong
    command line.

    Example: vggnorm inspect alexnet
    """
    if ":" not in model_name and model_name not in torchvision_classifiers():  # at once, before importing torch
        raise click.BadParameter(
            f"{model_name!r} is not a torchvision classification model; give a torchvision name (vgg19, "
            "alexnet, ...) or your own model as FILE.py:NAME or package.module:NAME",
            param_hint="MODEL",
        )
    from vggnorm.commands.inspection import inspect_model
    from vggnorm.io.models import is_user_model

    with user_errors():
        if is_user_model(model_name):
            _import_model(model_name)
        result = inspect_model(model_name, weights=weights, add_affine=add_affine)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        for line in result.lines():
            click.echo(line)
    sys.exit(0 if result.normalizable else 1)


@cli.command("centers")
@click.argument("stats_path", metavar="STATS", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--layer", required=True, help="The site: a module path (features.34, classifier.3) or a Gatys name (conv5_4)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="centers.pt (a dict: centers, classes, layer) or centers.safetensors (classes in the metadata).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@verbose_option
def centers_cmd(stats_path: Path, layer: str, output: Path, force: bool) -> None:
    """Write a layer's per-class mean features from statistics measured with --per-class.

    The [classes, C] matrix of each class's mean ReLU activation per filter (over its images and the
    layer's positions), with the class names: the centers a center-loss layer or a nearest-class-mean
    classifier starts from.

    Example: vggnorm centers stats.h5 --layer classifier.3 -o centers.pt
    """
    from vggnorm.commands.centers import write_centers

    with user_errors():
        centers, classes = write_centers(stats_path, layer, output, force=force)
    click.echo(f"centers: {tuple(centers.shape)} ({len(classes)} classes x {centers.shape[1]} filters) of {layer}")
    click.echo(f"wrote {output}")


@cli.command("merge-stats")
@click.argument(
    "inputs",
    metavar="SHARD.h5...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The merged statistics file to write.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@verbose_option
def merge_stats_cmd(inputs: tuple[Path, ...], output: Path, force: bool) -> None:
    """Merge the files of compute-stats --shard 0/N ... N-1/N into one, exactly (sums and counts).

    Refuses files from other models, weights, preprocessing or folders, overlapping or missing
    shards, a file given twice, and unfinished (resumable) files.

    Example: vggnorm merge-stats s0.h5 s1.h5 s2.h5 -o vgg19-stats.h5
    """
    from vggnorm.io.statsfile import merge_stats

    with user_errors():
        stats = merge_stats(list(inputs), output, force=force)
    click.echo(f"images: {stats.num_images} used, {len(stats.skipped)} skipped, from {len(inputs)} shards")
    click.echo(f"wrote {output}")


def _import_model(spec: str) -> str:
    from vggnorm.io.models import import_user_model

    return import_user_model(spec)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N, e.g. 0/4", param_hint="--shard")
    return int(index), int(count)


def _echo_checks(checks: list[Any]) -> None:
    for c in checks:
        figure = "" if c.figure is None else f"{c.figure:.3g} (tolerance {c.tolerance:.3g})"
        click.echo(f"{c.status.upper():8} {c.name:12} {figure:28} {c.detail}".rstrip())


def main() -> None:
    cli(prog_name="vggnorm")
