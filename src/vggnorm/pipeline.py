"""The three commands as Python functions: ``compute_stats``, ``apply_stats``, ``verify_checkpoint``.

Each one resolves files and options, calls the stage modules (data, collect, stats, normalize,
verify), and writes its outputs atomically. The CLI is a thin shell over these.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from tqdm import tqdm

import vggnorm
from vggnorm import data as data_mod
from vggnorm import distributed
from vggnorm.checkpoint import (
    LAYOUTS,
    StateDict,
    check_writable,
    is_gatys_layout,
    load_state_dict,
    save_state_dict,
    to_gatys_layout,
)
from vggnorm.collect import ReluSums, check_precision, measure, measure_means, memory_format, resolve_device
from vggnorm.distributed import world_from_env
from vggnorm.errors import (
    CheckpointError,
    DataError,
    ResumeMismatchError,
    StatsFileError,
    StatsMismatchError,
    VggnormError,
)
from vggnorm.figures import have_matplotlib, plot_means
from vggnorm.models import (
    Weights,
    bn_eps,
    build_model,
    conv_names,
    infer_arch,
    is_features_only,
    load_model,
    resolve_weights,
    to_torchvision_layout,
    topology,
)
from vggnorm.normalize import DEFAULT_EPS, fold_state_dict, scales_from_stats
from vggnorm.stats import Stats, read_stats, write_stats
from vggnorm.verify import (
    DEFAULT_MEANS_TOL,
    DEFAULT_RTOL,
    Check,
    Report,
    check_fold,
    check_function,
    check_means,
    layer_summary,
    measured_summary,
    not_run,
    report_paths,
    write_report,
)

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_SECONDS = 60.0

# Attributes that must be equal for --resume to continue a run.
_RESUME_KEYS = (
    "arch", "weights", "weights_sha256", "resize", "crop", "interpolation", "mean", "std",
    "preprocess", "pooling", "include_classifier", "dataset_fingerprint", "shard", "world_size", "num_files", "limit", "precision",
    "decode",
)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything ``compute_stats`` needs besides the folder and the output path."""

    arch: str = "vgg19"
    weights: str = "IMAGENET1K_V1"
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    limit: int | None = None
    resize: int | None = None
    crop: int | None = None
    preprocess: str = "torchvision"  # or "caffe": BGR, 0-255, mean-subtracted
    pooling: str = "max"  # or "avg": measure with average pooling, as Gatys synthesized
    include_classifier: bool = False  # also measure the ReLUs after fc6 and fc7
    strict: bool = False
    checkpoint_every: int | None = None  # batches; None: about every DEFAULT_CHECKPOINT_SECONDS
    shard: tuple[int, int] | None = None  # (I, N): every N-th file from the I-th (0-based), for merge-stats
    precision: str = "fp32"  # CUDA only: "tf32", "bf16", "fp16" trade exactness for speed
    decode: str = "cpu"  # "gpu": nvJPEG on the CUDA device (see data.DECODERS)


def _resume_differences(
    old: dict[str, Any],
    new: dict[str, Any],
    keys: tuple[str, ...] = _RESUME_KEYS,
    labels: tuple[str, str] = ("in the file", "now"),
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


def compute_stats(
    root: str | os.PathLike[str],
    output: Path,
    config: RunConfig,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Stats:
    """Measure per-filter mean ReLU activations of a VGG over the images under ``root``.

    Writes ``output`` atomically: every ``config.checkpoint_every`` batches (and on Ctrl-C) as an
    unfinished, resumable file; at the end as the complete statistics. Returns the final stats.
    Under torchrun each rank measures every WORLD_SIZE-th file and rank 0 writes the sums of all.
    """
    world = world_from_env()
    if world.distributed and config.shard is not None:
        raise VggnormError("--shard and torchrun both split the files: use one or the other")
    output = Path(output)
    if resume:
        if not output.is_file():
            raise StatsFileError(f"--resume: {output} does not exist; run without --resume to start")
    else:
        check_writable(output, force=force)
    root = Path(root)
    files = data_mod.find_images(root)
    if config.limit is not None:
        files = files[: config.limit]
    fingerprint, dataset_files = data_mod.dataset_fingerprint(root, files), len(files)
    if config.shard is not None:
        index, count = config.shard
        if not 0 <= index < count:
            raise VggnormError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
        files = files[index::count]
        if not files:
            raise DataError(f"--shard {index}/{count} has no files: the folder has only {dataset_files}")
    total_files = len(files)
    device = resolve_device(config.device)
    if world.distributed:
        if device.type == "cuda" and config.device in ("auto", "cuda"):
            device = torch.device("cuda", world.local_rank)
        distributed.init(world, device)
        files = files[world.rank :: world.size]
    check_precision(config.precision, device)
    data_mod.check_decode(config.decode, device)
    weights = resolve_weights(config.weights, arch=config.arch)
    preprocess = data_mod.default_preprocess(weights.arch, resize=config.resize, crop=config.crop,
                                             preprocess=config.preprocess, pooling=config.pooling,
                                             decode=config.decode)  # fmt: skip
    if preprocess.crop > preprocess.resize:
        raise VggnormError(f"--crop {preprocess.crop} is larger than --resize {preprocess.resize}")
    topo = topology(weights.arch)
    sites = [*topo.sites, *(topo.fc_sites if config.include_classifier else ())]
    if config.include_classifier and is_features_only(weights.state_dict):
        raise VggnormError(f"--include-classifier: {weights.spec} has no classifier (features-only weights)")
    attrs: dict[str, Any] = {
        "arch": weights.arch,
        "weights": weights.spec,
        "weights_sha256": weights.sha256,
        **preprocess.as_attrs(),
        "dataset": str(root),
        "dataset_fingerprint": fingerprint,
        "dataset_num_files": dataset_files,
        "shard": f"{config.shard[0]}/{config.shard[1]}" if config.shard else "",
        "num_files": total_files,
        "world_size": world.size,
        "limit": config.limit if config.limit is not None else -1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "vggnorm_version": vggnorm.__version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "precision": config.precision,
        "include_classifier": config.include_classifier,
        "batch_size": config.batch_size,
    }
    start, initial, skipped = 0, None, []
    if resume:
        initial = read_stats(output, allow_incomplete=True)
        if initial.complete:
            raise StatsFileError(f"--resume: {output} is already complete ({initial.num_images} images); nothing to do")
        diffs = _resume_differences(initial.attrs, attrs)
        if diffs:
            raise ResumeMismatchError(
                f"--resume: {output} was started with other arguments or data: " + "; ".join(diffs)
            )
        # under torchrun ``position`` counts the files each rank has done (the same for all ranks)
        start, skipped = initial.position, list(initial.skipped) if world.is_main else []
        if not world.is_main:
            initial = Stats(initial.layers, 0, initial.attrs, [], False, initial.position)
            for layer in initial.layers.values():
                layer.sum, layer.count = torch.zeros_like(layer.sum), 0
        attrs["created"] = initial.attrs.get("created", attrs["created"])
        log.info("resuming %s at file %d of %d", output, start, len(files))

    model = load_model(weights, device=device, memory_format=memory_format(device), pooling=preprocess.pooling)
    del weights
    sums = ReluSums(sites, device, initial)
    num_images = initial.num_images if initial else 0
    position = start

    def snapshot(complete: bool) -> Stats:
        """The statistics so far, summed over ranks (a collective under torchrun)."""
        mine = Stats(sums.layers(), num_images, attrs, list(skipped), complete=complete, position=position)
        return distributed.reduce_stats(mine, world, device)

    def save(stats: Stats) -> None:
        nonlocal own_file
        if world.is_main:
            write_stats(stats, output, force=force or own_file)
        own_file = True

    # Under torchrun the ranks checkpoint together, after the same number of batches: every K
    # batches, K from --checkpoint-every or from the slowest rank's speed over its first batches.
    bs = config.batch_size
    # the smallest rank's batches left from ``start``: a checkpoint after more would wait for it forever
    min_batches = -(-(total_files // world.size - start) // bs) if world.distributed else None
    every = config.checkpoint_every
    batches_done = 0

    workers = data_mod.default_workers() if config.workers is None else config.workers
    loader = data_mod.make_loader(
        files, preprocess, batch_size=config.batch_size, workers=workers, start=start, device=device
    )
    batches_since, last_save = 0, time.monotonic()
    own_file = resume  # True once the output file is ours to overwrite
    bar = tqdm(total=total_files, initial=start * world.size, unit="img", file=sys.stderr,
               disable=not (progress and world.is_main), dynamic_ncols=True)  # fmt: skip

    def on_batch(batch: data_mod.Batch) -> None:
        nonlocal num_images, position, batches_since, last_save, own_file, batches_done, every
        for i, reason in batch.failures:
            if config.strict:
                raise DataError(f"--strict: cannot use {files[i]}: {reason}")
            skipped.append((str(files[i]), reason))
            log.info("skipped %s: %s", files[i], reason)
        num_images += len(batch.indices)
        position += batch.num_files
        bar.update(batch.num_files * world.size)
        if skipped:
            bar.set_postfix(skipped=len(skipped), refresh=False)
        batches_since += 1
        batches_done += 1
        if world.distributed:
            assert min_batches is not None
            if every is None and batches_done == min(5, min_batches - 1):
                per_batch = distributed.agree_max((time.monotonic() - last_save) / batches_done, world, device)
                every = max(1, int(DEFAULT_CHECKPOINT_SECONDS / per_batch))
            due = every is not None and batches_since >= every and batches_done < min_batches
        elif every:
            due = batches_since >= every and position < len(files)
        else:
            due = time.monotonic() - last_save >= DEFAULT_CHECKPOINT_SECONDS and position < len(files)
        if due:
            save(snapshot(complete=False))
            batches_since, last_save = 0, time.monotonic()

    try:
        with bar:
            measure(model, loader, sums, device=device, on_batch=on_batch, precision=config.precision)
    except KeyboardInterrupt:
        if not world.distributed:  # under torchrun the last common checkpoint stands
            save(snapshot(complete=False))
        raise
    except DataError:
        if own_file and not resume:
            output.unlink(missing_ok=True)
        raise
    final = snapshot(complete=True)
    distributed.shutdown(world)
    if final.num_images == 0:
        if own_file and not resume and world.is_main:
            output.unlink(missing_ok=True)
        first = final.skipped[0] if final.skipped else ("?", "?")
        raise DataError(
            f"none of the {total_files} files under {root} could be decoded (first: {first[0]}: {first[1]})"
        )
    final.position = total_files
    save(final)
    return final


# --------------------------------------------------------------------------- apply


@dataclass(frozen=True)
class ApplyResult:
    output: Path
    report_json: Path
    report_md: Path
    figure: Path | None
    report: Report
    notes: list[str]


def default_output(spec: str, arch: str) -> Path:
    """``X.normalized.pth`` beside a checkpoint file, else ``ARCH-SPEC.normalized.pth`` here."""
    if os.path.isfile(spec):
        p = Path(spec)
        return p.with_name(f"{p.stem}.normalized{p.suffix if p.suffix == '.safetensors' else '.pth'}")
    return Path(f"{arch}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}.normalized.pth")


def _apply_report_base(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(output.suffix) + ".report")


def _weights_for(spec: str, stats: Stats) -> Weights:
    """Resolve the checkpoint that ``stats`` belongs to; refuse one with another arch or other weights."""
    arch = str(stats.attrs["arch"])
    weights = resolve_weights(spec, arch=None if os.path.isfile(spec) else arch)
    if weights.arch != arch:
        raise StatsMismatchError(f"the statistics are for {arch}, but {spec} is a {weights.arch} checkpoint")
    if weights.sha256 != stats.attrs.get("weights_sha256"):
        raise StatsMismatchError(
            f"the statistics were measured with other weights ({stats.attrs.get('weights')}, sha256 "
            f"{str(stats.attrs.get('weights_sha256'))[:12]}...) than {spec} (sha256 {weights.sha256[:12]}...); "
            f"measure this checkpoint with `vggnorm compute-stats DIR --weights {spec}`"
        )
    return weights


def _probe_input(crop: int, n: int = 2) -> torch.Tensor:
    """A fixed, seeded batch standing in for images: the invariants hold for every input."""
    return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(0))


def export_layout(state_dict: StateDict, arch: str, layout: str) -> StateDict:
    """``state_dict`` (torchvision layout) in the requested ``layout`` (see ``checkpoint.LAYOUTS``)."""
    if layout == "torchvision":
        return state_dict
    if layout == "gatys":
        return to_gatys_layout(state_dict, conv_names(arch), bn_eps(arch))
    raise VggnormError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def apply_stats(
    checkpoint: str,
    stats_path: Path,
    output: Path | None = None,
    *,
    features_only: bool = False,
    layout: str = "torchvision",
    include_classifier: bool = False,
    eps: float = DEFAULT_EPS,
    force: bool = False,
) -> ApplyResult:
    """Fold ``stats`` into ``checkpoint`` (a weight SPEC), self-check it, write it and its report.

    ``layout="gatys"`` writes the conv layers only, keyed ``conv1_1`` ... (BatchNorm folded into
    the convs for ``_bn`` models). The output is written only if the self-checks pass on a seeded
    probe batch: the written tensors, loaded back, give ReLU outputs equal to the original's
    divided by the scales (and the same logits), under the statistics' pooling.
    ``include_classifier`` also normalizes the ReLUs after fc6 and fc7 (measured with
    ``RunConfig.include_classifier``), compensating fc7 and fc8.
    """
    stats = read_stats(stats_path)
    arch = str(stats.attrs["arch"])
    output = Path(output) if output is not None else default_output(checkpoint, arch)
    json_path, md_path = report_paths(_apply_report_base(output))
    png_path = md_path.with_suffix(".png") if have_matplotlib() else None
    for p in (output, json_path, md_path, *([png_path] if png_path else [])):
        check_writable(p, force=force)
    weights = _weights_for(checkpoint, stats)
    features_only = features_only or layout == "gatys" or is_features_only(weights.state_dict)
    if include_classifier and features_only:
        raise VggnormError("--include-classifier needs the classifier: it cannot go with --features-only, "
                           "--layout gatys, or features-only weights")  # fmt: skip
    topo = topology(arch)
    scales = scales_from_stats(stats, topo, eps=eps, include_classifier=include_classifier)
    scale_tensors = {n: s.scale for n, s in scales.items()}
    folded = fold_state_dict(weights.state_dict, scale_tensors, topo, features_only=features_only)
    exported = export_layout(folded, arch, layout)

    pooling = str(stats.attrs.get("pooling", "max"))
    original = load_model(weights, pooling=pooling)
    reloaded = to_torchvision_layout(exported)
    normalized = load_model(Weights(weights.spec, infer_arch(reloaded), reloaded, ""), pooling=pooling)
    crop = int(stats.attrs.get("crop", 224))
    checks = check_function(original, normalized, scale_tensors, _probe_input(crop), logits=not features_only,
                            inputs=f"2 seeded random inputs at {crop}x{crop}, {pooling} pooling")  # fmt: skip
    checks.append(_check_loads(exported, arch, features_only=features_only))
    notes = []
    if png_path is None:
        notes.append("no figure: install matplotlib (pip install 'vggnorm[plot]') for OUT.report.png")
    if layout == "gatys" and arch.endswith("_bn"):
        notes.append("BatchNorm folded into the convs (eval-mode statistics): the Gatys layout has no BatchNorm")
    report = Report(
        checkpoint=str(output),
        arch=arch,
        checks=checks,
        inputs={"original": checkpoint, "original_sha256": weights.sha256, "stats": str(stats_path),
                "stats_images": stats.num_images, "eps": eps, "features_only": features_only, "layout": layout,
                "include_classifier": include_classifier,
                "preprocess": stats.attrs.get("preprocess", "torchvision"), "pooling": pooling,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "vggnorm_version": vggnorm.__version__,
                **({"note": "; ".join(notes)} if notes else {})},
        layers=layer_summary(scales),
        figure=png_path.name if png_path else None,
    )  # fmt: skip
    if not report.passed:
        failed = "; ".join(f"{c.name}: {c.figure} > {c.tolerance} ({c.detail})" for c in checks if c.status != "pass")
        raise VggnormError(f"the folded checkpoint failed its self-check, nothing was written: {failed}")
    meta = {"vggnorm_version": vggnorm.__version__, "arch": arch, "layout": layout, "original": checkpoint,
            "include_classifier": str(include_classifier),
            "original_sha256": weights.sha256, "stats": str(stats_path), "eps": str(eps),
            "preprocess": str(stats.attrs.get("preprocess", "torchvision")), "pooling": pooling}  # fmt: skip
    save_state_dict(exported, output, force=force, metadata=meta)
    write_report(report, _apply_report_base(output), force=force)
    if png_path is not None:
        before = {n: stats.layers[n].mean for n in scales}
        plot_means(before, {n: before[n] / sc.scale for n, sc in scales.items()}, {n: sc.dead for n, sc in scales.items()},
                   png_path, title=f"{arch}: {output.name}, {stats.num_images} images", force=force,
                   after_label="after (by construction: mean / scale)")  # fmt: skip
    return ApplyResult(output, json_path, md_path, png_path, report, notes)


def _check_loads(state_dict: dict[str, torch.Tensor], arch: str, *, features_only: bool) -> Check:
    desc = f"loads into torchvision's {arch} with strict=True"
    if features_only:
        return not_run("loads", desc, "features-only checkpoint: it loads into model.features (or, in the gatys "
                       "layout, Gatys-named code) with strict=True")  # fmt: skip
    try:
        build_model(arch, device="meta").load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        return Check("loads", desc, "fail", detail=str(e).splitlines()[0])
    return Check("loads", desc, "pass")


# --------------------------------------------------------------------------- verify


def verify_checkpoint(
    normalized_path: Path,
    *,
    original: str | None = None,
    stats_path: Path | None = None,
    data: Path | None = None,
    limit: int | None = None,
    rtol: float = DEFAULT_RTOL,
    means_tol: float = DEFAULT_MEANS_TOL,
    eps: float = DEFAULT_EPS,
    resize: int | None = None,
    crop: int | None = None,
    preprocess: str | None = None,
    pooling: str | None = None,
    include_classifier: bool = False,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
) -> Report:
    """Check the invariants of SPEC section 4 that the given inputs allow.

    (a) activations and (d) fold need ``original`` and ``stats_path``; (b) logits needs
    ``original``; (c) means needs ``data``, measured under the statistics' policy (preprocessing,
    pooling) when ``stats_path`` is given, else the weights' default, overridden by ``resize``,
    ``crop``, ``preprocess``, ``pooling``. With ``data`` alone this audits any checkpoint.
    NORMALIZED may be in torchvision's or Gatys' layout. ``include_classifier`` says that apply
    normalized the fc ReLUs too: they are then checked like the convs' (the stats must have them).
    """
    if original is None and data is None:
        raise VggnormError(
            "nothing to verify: pass --original (with --stats) to check the fold, and/or --data to measure the means"
        )
    raw = load_state_dict(normalized_path)
    layout = "gatys" if is_gatys_layout(raw) else "torchvision"
    sd = to_torchvision_layout(raw)
    model_arch = infer_arch(sd)  # for a Gatys layout: the plain VGG it loads into
    features_only = is_features_only(sd)
    dev = resolve_device(device)
    stats = read_stats(stats_path) if stats_path is not None else None
    weights = None
    if original is not None:
        weights = resolve_weights(original, arch=None if os.path.isfile(original) else model_arch)
    arch = str(stats.attrs["arch"]) if stats is not None else weights.arch if weights is not None else model_arch
    inputs: dict[str, Any] = {"normalized": str(normalized_path), "layout": layout, "original": original,
                              "stats": str(stats_path) if stats_path else None, "data": str(data) if data else None,
                              "device": str(dev)}  # fmt: skip
    if arch != model_arch and not (layout == "gatys" and arch.removesuffix("_bn") == model_arch):
        raise CheckpointError(f"{normalized_path} is a {model_arch}, but the statistics or --original are for {arch}")

    policy = _verify_policy(stats, arch, resize=resize, crop=crop, preprocess=preprocess, pooling=pooling)
    topo = topology(arch)
    mismatch = None
    if include_classifier and features_only:
        raise VggnormError("--include-classifier: the checkpoint has no classifier")
    scales = (
        scales_from_stats(stats, topo, eps=eps, include_classifier=include_classifier) if stats is not None else None
    )
    normalized = load_model(Weights(str(normalized_path), model_arch, sd, ""), device=dev,
                            memory_format=memory_format(dev), pooling=policy.pooling)  # fmt: skip
    files = data_mod.find_images(data)[:limit] if data is not None else []
    checks: list[Check] = []
    fold_desc = "the checkpoint equals fold(original, stats) recomputed"
    if weights is not None:
        if weights.arch != arch:
            raise CheckpointError(f"--original {original} is a {weights.arch}, the statistics are for {arch}")
        inputs["original_sha256"] = weights.sha256
        if stats is not None and stats.attrs.get("weights_sha256") != weights.sha256:
            mismatch = f"the statistics were measured on other weights than {original} (sha256 differs)"
        orig_model = load_model(weights, device=dev, pooling=policy.pooling)
        x, source = _function_inputs(files, policy)
        scale_t = {n: sc.scale for n, sc in scales.items()} if scales is not None and mismatch is None else None
        fn_checks = check_function(orig_model, normalized, scale_t, x.to(dev), rtol=rtol, logits=not features_only,
                                   inputs=source)  # fmt: skip
        if scales is None:
            checks += [*fn_checks, not_run("fold", fold_desc, "needs --stats")]
        elif mismatch is not None:
            checks += [c if c.name != "activations" else Check(c.name, c.description, "fail", detail=mismatch)
                       for c in fn_checks]  # fmt: skip
            checks.append(Check("fold", fold_desc, "fail", detail=mismatch))
        else:
            folded = fold_state_dict(weights.state_dict, {n: sc.scale for n, sc in scales.items()}, topo,
                                     features_only=features_only)  # fmt: skip
            checks += [*fn_checks, check_fold(raw, export_layout(folded, arch, layout), rtol=rtol)]
        del orig_model, weights
    else:
        for name, desc in (("activations", "every conv's ReLU output equals the original's divided by its scales"),
                           ("logits", "logits equal the original's"), ("fold", fold_desc)):  # fmt: skip
            checks.append(not_run(name, desc, "needs --original"))

    means_desc = "re-measured mean ReLU activation of every live filter is 1"
    if data is not None and policy.decode == "gpu" and dev.type != "cuda":
        per_layer = []
        # asked for (--data) but cannot be measured as the statistics were: a failure, never a pass
        checks.append(Check("means", means_desc, "fail", detail="cannot re-measure here: the statistics were "
                            "measured with --decode gpu (nvJPEG, resized on the GPU), whose pixels differ slightly "
                            "from the CPU decoder's; run verify on a CUDA device, which decodes the same way"))  # fmt: skip
    elif data is not None:
        measured, skipped = measure_means(normalized, files, policy, device=dev, batch_size=batch_size,
                                          workers=workers, progress=progress,
                                          include_classifier=include_classifier)  # fmt: skip
        dead = None
        note = f"{measured.num_images} images from {data}" + (f", {len(skipped)} skipped" if skipped else "")
        if scales is not None and mismatch is None:
            # the normalized model's conv paths differ from the stats' for a BN-folded Gatys export
            fc = topo.fc_sites if include_classifier else ()
            pairs = zip([*topo.sites, *fc], [*topology(model_arch).sites, *fc], strict=True)
            dead = {b.conv: scales[a.conv].dead for a, b in pairs}
            if data_mod.dataset_fingerprint(Path(data), files) != stats.attrs.get("dataset_fingerprint"):  # type: ignore[union-attr]
                note += "; these are not the calibration images of the statistics, so means near (not exactly) 1 are expected"
        checks.append(check_means(measured.means(), dead, tol=means_tol, eps=eps, detail=note))
        inputs["preprocess"] = policy.as_attrs()
        per_layer = measured_summary(measured.means(), dead, eps=eps)
    else:
        per_layer = []
        checks.append(not_run("means", means_desc, "needs --data"))
    return Report(
        str(normalized_path), arch, checks, inputs, layer_summary(scales) if scales else [], measured=per_layer
    )


def _verify_policy(stats: Stats | None, arch: str, **given: Any) -> data_mod.Preprocess:
    """The statistics' measurement policy; options may only repeat it. Without stats: the options."""
    if stats is None:
        return data_mod.default_preprocess(arch, **{k: v for k, v in given.items() if v is not None})
    policy = data_mod.Preprocess.from_attrs(stats.attrs)
    for name, value in given.items():
        if value is not None and value != getattr(policy, name):
            raise VggnormError(f"--{name} {value} differs from the statistics' {name} {getattr(policy, name)}; "
                               "leave it out: with --stats, verify measures as compute-stats did")  # fmt: skip
    return policy


def _function_inputs(files: list[Path], preprocess: data_mod.Preprocess, n: int = 2) -> tuple[torch.Tensor, str]:
    """Up to ``n`` decodable images from ``files``, else a seeded random batch."""
    ds = data_mod.ImageFiles(files, preprocess)
    images = []
    for i in range(len(ds)):
        sample = ds[i]
        if sample.image is not None:
            images.append(sample.image)
        if len(images) == n:
            break
    if images:
        return torch.stack(images), f"{len(images)} images from --data"
    return _probe_input(preprocess.crop), f"2 seeded random inputs at {preprocess.crop}x{preprocess.crop}"


# --------------------------------------------------------------------------- merge-stats

# Attributes every shard of one measurement shares; a difference names a foreign shard.
_MERGE_KEYS = (
    "arch", "weights_sha256", "resize", "crop", "interpolation", "mean", "std", "preprocess", "pooling",
    "include_classifier", "dataset_fingerprint", "dataset_num_files", "limit", "precision", "decode",
)  # fmt: skip


def merge_stats(inputs: list[Path], output: Path, *, force: bool = False) -> Stats:
    """Merge the statistics files of ``--shard 0/N`` ... ``--shard N-1/N`` into one, exactly.

    Refuses, naming the conflict: a file given twice, an unfinished file, a file that is not a
    shard, shards of other models, weights, preprocessing or folders, overlapping or missing shards.
    """
    check_writable(output, force=force)
    seen: dict[Path, Path] = {}
    for p in inputs:
        if p.resolve() in seen:
            raise VggnormError(f"{p} is given twice")
        seen[p.resolve()] = p
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
        diffs = _resume_differences(parts[0].attrs, st.attrs, _MERGE_KEYS, (f"in {inputs[0]}", f"in {p}"))
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
    attrs = {**parts[0].attrs, "shard": "", "num_files": sum(int(st.attrs["num_files"]) for st in parts),
             "merged_from": [str(p) for p in inputs],
             "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}  # fmt: skip
    result = Stats(merged.layers, merged.num_images, attrs, sorted(merged.skipped), True, attrs["num_files"])
    write_stats(result, output, force=force)
    return result
