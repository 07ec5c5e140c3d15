"""The ``vggnorm`` command line: parse, call one function of ``vggnorm.pipeline``, echo the result.

Results go to stdout; progress and diagnostics to stderr. Library errors (``VggnormError``) become
one-line messages with no traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import click

from vggnorm import __version__
from vggnorm.checkpoint import LAYOUTS
from vggnorm.collect import PRECISIONS
from vggnorm.data import DECODERS, PREPROCESSINGS
from vggnorm.distributed import world_from_env
from vggnorm.errors import VggnormError
from vggnorm.models import DEFAULT_ARCH, DEFAULT_WEIGHTS, POOLINGS, VGG_ARCHS
from vggnorm.normalize import DEFAULT_EPS
from vggnorm.verify import DEFAULT_MEANS_TOL, DEFAULT_RTOL, NOT_RUN, PASS

SHOWN_SKIPPED = 20


class UsageFailure(click.ClickException):
    """A bad input to ``verify``: exit status 2, as for Click's own usage errors."""

    exit_code = 2


@contextmanager
def user_errors(exc: type[click.ClickException] = click.ClickException) -> Iterator[None]:
    try:
        yield
    except VggnormError as e:
        raise exc(str(e)) from e
    except OSError as e:  # the file system said no (permissions, disk full, ...): not a vggnorm bug
        raise exc(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from e


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vggnorm")
@click.option("-v", "--verbose", is_flag=True, help="Log diagnostics (each skipped file, resume details) to stderr.")
def cli(verbose: bool) -> None:
    """Normalize a VGG so every conv filter's mean ReLU activation over a dataset is 1.

    The network computes the same function afterwards (logits unchanged). Three steps:
    compute-stats (measure), apply (fold the scales into the weights), verify (prove it).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(message)s")


@cli.command("compute-stats")
@click.argument("directory", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--arch",
    type=click.Choice(VGG_ARCHS),
    default=DEFAULT_ARCH,
    show_default=True,
    help="torchvision VGG architecture.",
)
@click.option("--weights", "weights", metavar="SPEC", default=DEFAULT_WEIGHTS, show_default=True,
              help="A state_dict file (.pth/.pt/.safetensors), a torchvision weights name (loaded through "
                   "torchvision's cache), or random:SEED (seeded random init, for demos and tests).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("stats.h5"),
              show_default=True, help="Statistics file (HDF5) to write.")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward pass."
)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes decoding images (0: decode in the main process). [default: CPUs - 1]")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N files (in sorted order).")
@click.option(
    "--resize",
    type=click.IntRange(min=1),
    default=None,
    help="Resize the shorter side to this. [default: the weights' transform, 256]",
)
@click.option(
    "--crop", type=click.IntRange(min=1), default=None, help="Center crop size. [default: the weights' transform, 224]"
)
@click.option("--preprocess", type=click.Choice(PREPROCESSINGS), default="torchvision", show_default=True,
              help="torchvision: RGB, 0-1, ImageNet mean/std. caffe: BGR, 0-255, mean-subtracted, as the original "
                   "Caffe VGG (and Gatys' code) expects.")  # fmt: skip
@click.option("--pooling", type=click.Choice(POOLINGS), default="max", show_default=True,
              help="Measure with max pooling, or with average pooling as Gatys et al. synthesized.")  # fmt: skip
@click.option("--include-classifier", is_flag=True,
              help="Also measure the ReLUs after fc6 and fc7 (for apply --include-classifier).")  # fmt: skip
@click.option(
    "--strict", is_flag=True, help="Stop at the first file that cannot be decoded (naming it), writing nothing."
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run from its output file (same arguments and data)."
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, metavar="BATCHES",
              help="Save resumable progress every BATCHES batches. [default: about once a minute]")  # fmt: skip
@click.option("--shard", default=None, metavar="I/N", callback=lambda ctx, param, value: _parse_shard(value),
              help="Measure only every N-th file from the I-th (0-based); combine the N outputs with merge-stats.")  # fmt: skip
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="CUDA arithmetic: fp32 (TF32 off: exact statistics), tf32, bf16 or fp16 autocast (faster, "
                   "less exact; see the README). CPU runs fp32 only.")  # fmt: skip
@click.option("--decode", type=click.Choice(DECODERS), default="cpu", show_default=True,
              help="cpu: DataLoader workers decode and resize with PIL (torchvision's own pipeline). gpu "
                   "(experimental, CUDA only): nvJPEG decodes the JPEGs and they are resized on the GPU; pixels "
                   "differ slightly, so the means do too (see the README). Recorded in the output.")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def compute_stats_cmd(directory: Path, arch: str, weights: str, output: Path, device: str, batch_size: int,
                      workers: int | None, limit: int | None, resize: int | None, crop: int | None,
                      preprocess: str, pooling: str, include_classifier: bool, strict: bool,
                      resume: bool, checkpoint_every: int | None, shard: tuple[int, int] | None, precision: str, decode: str,
                      force: bool, progress: bool) -> None:  # fmt: skip
    """Measure every conv filter's mean ReLU activation over the images in DIR.

    DIR is read recursively (flat ILSVRC2012 val layout or class subfolders); files that cannot be
    decoded are skipped, listed, and recorded in the output. One pass over the original network.

    Example: vggnorm compute-stats ILSVRC2012_val/ --arch vgg19 -o vgg19-stats.h5
    """
    from vggnorm.pipeline import RunConfig, compute_stats

    config = RunConfig(arch=arch, weights=weights, device=device, batch_size=batch_size, workers=workers,
                       limit=limit, resize=resize, crop=crop, preprocess=preprocess, pooling=pooling,
                       include_classifier=include_classifier, strict=strict,
                       checkpoint_every=checkpoint_every, shard=shard, precision=precision,
                       decode=decode)  # fmt: skip
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
    for path, reason in stats.skipped[:SHOWN_SKIPPED]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(stats.skipped) > SHOWN_SKIPPED:
        click.echo(
            f"... and {len(stats.skipped) - SHOWN_SKIPPED} more (all listed in {output}, group skipped/)", err=True
        )
    dead = {n: int((layer.mean <= DEFAULT_EPS).sum()) for n, layer in stats.layers.items()}
    click.echo(f"images: {stats.num_images} used, {len(stats.skipped)} skipped")
    click.echo(f"layers: {len(stats.layers)} ({', '.join(stats.layers)})")
    click.echo(f"dead filters (mean <= {DEFAULT_EPS:g}): {sum(dead.values())}"
               + "".join(f"; {n}: {d}" for n, d in dead.items() if d))  # fmt: skip
    click.echo(f"wrote {output}")


@cli.command("apply")
@click.argument("checkpoint", metavar="CKPT")
@click.option("--stats", "stats_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Statistics file from compute-stats, measured on CKPT.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Normalized state_dict to write (.pth/.pt, or .safetensors). [default: CKPT.normalized.pth]")  # fmt: skip
@click.option("--features-only", is_flag=True, help="Write only the conv layers (features.*), no classifier.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="torchvision", show_default=True,
              help="torchvision: loads into torchvision's VGG. gatys: conv layers only, keyed conv1_1 ... conv5_4 "
                   "(BatchNorm folded into the convs for _bn models).")  # fmt: skip
@click.option("--include-classifier", is_flag=True,
              help="Also normalize the ReLUs after fc6 and fc7 (compensating fc7 and fc8; logits unchanged). "
                   "Needs statistics measured with --include-classifier.")  # fmt: skip
@click.option("--eps", type=click.FloatRange(min=0), default=DEFAULT_EPS, show_default=True,
              help="Filters with mean <= eps are dead: left unscaled and listed.")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing output or report.")
def apply_cmd(
    checkpoint: str,
    stats_path: Path,
    output: Path | None,
    features_only: bool,
    layout: str,
    include_classifier: bool,
    eps: float,
    force: bool,
) -> None:
    """Fold the statistics into CKPT so every filter's mean ReLU activation becomes 1.

    CKPT is a weight SPEC as for compute-stats (a file, a torchvision weights name, random:SEED) and
    must be the weights the statistics were measured on. Writes the checkpoint and a report
    (OUT.report.json, OUT.report.md) after self-checking that the logits are unchanged.

    Example: vggnorm apply vgg19.pth --stats vgg19-stats.h5 -o vgg19-normalized.pth
    """
    from vggnorm.pipeline import apply_stats

    with user_errors():
        result = apply_stats(checkpoint, stats_path, output, features_only=features_only, layout=layout,
                             include_classifier=include_classifier, eps=eps,
                             force=force)  # fmt: skip
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
@click.option("--original", metavar="SPEC", default=None, help="The checkpoint before normalization (a weight SPEC).")
@click.option("--stats", "stats_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The statistics file apply used.")  # fmt: skip
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Image folder: re-measure the means (the calibration images: expect exactly 1).")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images of --data.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as PATH.json and PATH.md.")  # fmt: skip
@click.option("--rtol", type=click.FloatRange(min=0), default=DEFAULT_RTOL, show_default=True,
              help="Tolerance (relative) for activations, logits and the fold.")  # fmt: skip
@click.option("--means-tol", type=click.FloatRange(min=0), default=DEFAULT_MEANS_TOL, show_default=True,
              help="Tolerance for |mean - 1| of every live filter.")  # fmt: skip
@click.option(
    "--eps", type=click.FloatRange(min=0), default=DEFAULT_EPS, show_default=True, help="Dead-filter threshold."
)
@click.option("--resize", type=click.IntRange(min=1), default=None,
              help="With --data and no --stats: resize as compute-stats did. [default: 256]")  # fmt: skip
@click.option("--crop", type=click.IntRange(min=1), default=None,
              help="With --data and no --stats: center crop as compute-stats did. [default: 224]")  # fmt: skip
@click.option("--preprocess", type=click.Choice(PREPROCESSINGS), default=None,
              help="With --data and no --stats: the preprocessing compute-stats used. [default: torchvision]")  # fmt: skip
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="With --data and no --stats: the pooling compute-stats used. [default: max]")  # fmt: skip
@click.option("--include-classifier", is_flag=True,
              help="NORMALIZED was made with apply --include-classifier: check the fc ReLUs too.")  # fmt: skip
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward pass."
)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader processes. [default: CPUs - 1]")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def verify_cmd(normalized: Path, original: str | None, stats_path: Path | None, data: Path | None, limit: int | None,
               report: Path | None, rtol: float, means_tol: float, eps: float, resize: int | None,
               crop: int | None, preprocess: str | None, pooling: str | None,
               include_classifier: bool, device: str, batch_size: int,
               workers: int | None, force: bool, progress: bool) -> None:  # fmt: skip
    """Check that NORMALIZED is the correct normalization. Exit 0: all checks run passed; 1: a check
    failed (or none could run); 2: bad usage.

    \b
    With --original and --stats: (a) every ReLU output equals the original's divided by the scales,
    (b) logits unchanged, (d) NORMALIZED equals the fold recomputed. With --data: (c) the means
    re-measured on the images are 1. With --data alone it audits any checkpoint.

    Example: vggnorm verify vgg19-normalized.pth --original vgg19.pth --stats vgg19-stats.h5 --data val/
    """
    from vggnorm.pipeline import verify_checkpoint
    from vggnorm.verify import report_paths, write_report

    if report is not None:
        with user_errors(UsageFailure):
            from vggnorm.checkpoint import check_writable

            for p in report_paths(report):
                check_writable(p, force=force)
    with user_errors(UsageFailure):
        result = verify_checkpoint(normalized, original=original, stats_path=stats_path, data=data, limit=limit,
                                   rtol=rtol, means_tol=means_tol, eps=eps, resize=resize, crop=crop, preprocess=preprocess,
                                   pooling=pooling, include_classifier=include_classifier, device=device,
                                   batch_size=batch_size,
                                   workers=workers, progress=progress)  # fmt: skip
        if report is not None:
            paths = write_report(result, report, force=force)
            click.echo(f"report: {paths[1]} ({paths[0].name})")
    if result.measured:
        click.echo("measured means of live filters, per layer:")
        for m in result.measured:
            click.echo(
                f"  {m['layer']:14} {m['live']:4}/{m['filters']:<4} min {m['min']:<10.4g} median {m['median']:<10.4g} max {m['max']:.4g}"
            )
    _echo_checks(result.checks)
    ran = [c for c in result.checks if c.status != NOT_RUN]
    failed = [c for c in ran if c.status != PASS]
    verdict = "PASS" if result.passed else "FAIL"
    click.echo(
        f"verify: {verdict} ({len(ran) - len(failed)} passed, {len(failed)} failed, {len(result.checks) - len(ran)} not run)"
    )
    sys.exit(0 if result.passed else 1)


@cli.command("merge-stats")
@click.argument("inputs", metavar="SHARD.h5...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The merged statistics file to write.")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def merge_stats_cmd(inputs: tuple[Path, ...], output: Path, force: bool) -> None:
    """Merge the files of compute-stats --shard 0/N ... N-1/N into one, exactly (sums and counts).

    Refuses files from other models, weights, preprocessing or folders, overlapping or missing
    shards, a file given twice, and unfinished (resumable) files.

    Example: vggnorm merge-stats s0.h5 s1.h5 s2.h5 -o vgg19-stats.h5
    """
    from vggnorm.pipeline import merge_stats

    with user_errors():
        stats = merge_stats(list(inputs), output, force=force)
    click.echo(f"images: {stats.num_images} used, {len(stats.skipped)} skipped, from {len(inputs)} shards")
    click.echo(f"wrote {output}")


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise click.BadParameter(f"{value!r}: expected I/N with 0 <= I < N, e.g. 0/4", param_hint="--shard")
    return int(index), int(count)


def _echo_checks(checks: list) -> None:  # type: ignore[type-arg]
    for c in checks:
        figure = "" if c.figure is None else f"{c.figure:.3g} (tolerance {c.tolerance:.3g})"
        click.echo(f"{c.status.upper():8} {c.name:12} {figure:28} {c.detail}".rstrip())


def main() -> None:
    cli(prog_name="vggnorm")
