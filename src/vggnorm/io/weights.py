"""Resolve the weights a command is given to a checked state_dict and its content hash.

Weights (``--weights``, ``apply CKPT``, ``verify --original``, ``compare A B``) are given as one of:

* a path to a state_dict (``.pth``/``.pt`` or ``.safetensors``, torchvision or Gatys layout), or to
  a Keras VGG16/VGG19 ``.h5`` or a MatConvNet ``.mat`` (``formats.py``, read into torchvision's layout);
* a torchvision weights name such as ``IMAGENET1K_V1`` (loaded through torchvision's own cache);
* ``random:SEED`` -- torchvision's own seeded random initialization, for demos and tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import urllib.error
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vggnorm.core.state import StateDict
from vggnorm.defaults import DEFAULT_ARCH, RANDOM_PREFIX, VGG_ARCHS
from vggnorm.errors import CheckpointError, UsageError, WeightsUnavailableError
from vggnorm.io.checkpoint import check_finite, load_state_dict, state_dict_sha256
from vggnorm.io.formats import Foreign, read_foreign
from vggnorm.io.layouts import to_torchvision_layout
from vggnorm.io.models import (
    VGG,
    build_model,
    check_arch,
    check_state_dict,
    infer_arch,
    is_features_only,
    is_user_model,
)
from vggnorm.options import InputConvention


@dataclass(frozen=True)
class Weights:
    """Resolved weights: where they came from and their content hash (perhaps still being computed
    in a background thread: ``sha256`` waits for it)."""

    spec: str
    arch: str
    state_dict: StateDict
    digest: str | Future[str]
    foreign: Foreign | None = None  # a Keras or MatConvNet file: its format and its users' preprocessing

    @property
    def sha256(self) -> str:
        return self.digest if isinstance(self.digest, str) else self.digest.result()

    @property
    def features_only(self) -> bool:
        return is_features_only(self.state_dict)

    @property
    def preprocess(self) -> InputConvention:
        """How the weights' own users feed them: caffe for Keras files, matconvnet for .mat files."""
        return self.foreign.preprocess if self.foreign is not None else InputConvention.TORCHVISION

    @property
    def mean_pixel(self) -> tuple[float, ...] | None:
        """The mean a Keras or MatConvNet file's input is centred on (0-255, the network's channel order)."""
        return self.foreign.mean if self.foreign is not None else None


@dataclass(frozen=True)
class Given:
    """Where the command took the weights from, for hints that name only options it has."""

    as_file: str = "--weights PATH.pth"  # how to give the weights as a file instead
    other_arch: str = "pass --arch {arch}"  # how to name another arch ({arch}), "" where the command cannot


# compute-stats (the default), inspect, apply, verify
COMPUTE = Given()
INSPECT = Given(other_arch="run `vggnorm inspect {arch} --weights {spec}`")
APPLY = Given(as_file="`vggnorm apply PATH.pth --stats ...` (CKPT as a file)", other_arch="")
VERIFY = Given(as_file="--original PATH.pth", other_arch="")


def _torchvision_weights(arch: str, name: str, given: Given = COMPUTE) -> StateDict:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    try:
        entry = enum[name]
    except KeyError:
        raise UsageError(
            f"{name!r} is neither an existing file nor a torchvision weights name for {arch} "
            f"(known: {', '.join(w.name for w in enum)}); pass a path to a state_dict, a weights name, or random:SEED"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torchvision prints "Downloading ..." to stdout
            state_dict: dict[str, torch.Tensor] = entry.get_state_dict(progress=False, check_hash=True)
            return state_dict
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise WeightsUnavailableError(
            f"could not load the {arch} {name} weights: they are not in torchvision's cache ({cached}) "
            f"and downloading {entry.url} failed ({e}). Either download that file on a machine with "
            f"internet and copy it to {cached}, or pass the weights as a file: {given.as_file}"
        ) from e


def random_state_dict(arch: str, seed: int) -> StateDict:
    """torchvision's own initialization of ``arch`` under ``torch.manual_seed(seed)``: for its VGGs the
    same values drawn without torchvision (``_vgg_init``, on a generator of their own; or taken from
    ``prefetch_random``'s thread), else by building the model."""
    if arch in VGG_ARCHS:
        future = _PREFETCHED.pop((arch, seed), None)
        return future.result() if future is not None else _vgg_init(arch, torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch).state_dict()


# random:SEED of a VGG being drawn in a thread: (arch, seed) -> its state_dict, taken once
_PREFETCHED: dict[tuple[str, int], Future[StateDict]] = {}


def prefetch_random(spec: str, arch: str) -> bool:
    """For ``random:SEED`` of a VGG, start drawing it in a thread (torch's kernels release the GIL), for a
    command with other work to do meanwhile; ``random_state_dict`` then takes it. Says whether it did."""
    seed_text = spec.removeprefix(RANDOM_PREFIX)
    if not (spec.startswith(RANDOM_PREFIX) and seed_text.isdigit() and arch in VGG_ARCHS):
        return False
    key = (arch, int(seed_text))
    if key not in _PREFETCHED:
        future: Future[StateDict] = Future()

        def run() -> None:
            try:
                future.set_result(_vgg_init(arch, torch.Generator().manual_seed(key[1])))
            except BaseException as e:  # handed to whoever takes the weights
                future.set_exception(e)

        _PREFETCHED[key] = future
        threading.Thread(target=run, name="vggnorm-random", daemon=True).start()
    return True


_SCRATCH = 1 << 20  # floats: the default initialization's draws go here, a chunk at a time


def _vgg_init(arch: str, generator: torch.Generator) -> StateDict:
    """torchvision's ``vgg*(weights=None)`` state_dict, value for value, without importing torchvision
    (1.7 s) or writing the default initialization that its ``__init__`` overwrites (``models.VGG`` has
    the same modules in the same order). Each Conv2d and Linear first draws its ``reset_parameters``
    (``kaiming_uniform_`` weight, ``uniform_`` bias: one 32-bit draw per float32 element, in order, so
    drawing them into a scratch buffer leaves the generator where they leave it); then VGG's own loop
    draws the values kept: ``kaiming_normal_`` (fan_out, relu) conv weights, ``normal_(0, 0.01)``
    Linear weights, zero biases, BatchNorm as the identity. ``tests/test_bad_input.py`` holds
    them equal to torchvision's."""
    with torch.device("meta"):
        model = VGG(arch)
    scratch = torch.empty(_SCRATCH)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            for n in (m.weight.numel(), m.weight.shape[0]):  # weight, bias (every VGG conv and Linear has one)
                for start in range(0, n, _SCRATCH):
                    scratch[: min(_SCRATCH, n - start)].uniform_(generator=generator)
    sd: StateDict = {}
    for name, m in model.named_modules():  # VGG.__init__'s loop, in the same order
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = torch.empty(m.weight.shape)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=generator)
            else:
                nn.init.normal_(w, 0, 0.01, generator=generator)
            sd[f"{name}.weight"], sd[f"{name}.bias"] = w, torch.zeros(w.shape[0])
        elif isinstance(m, nn.BatchNorm2d):  # the identity: no draws
            c = m.num_features
            sd |= {f"{name}.weight": torch.ones(c), f"{name}.bias": torch.zeros(c)}
            sd |= {f"{name}.running_mean": torch.zeros(c), f"{name}.running_var": torch.ones(c)}
            sd[f"{name}.num_batches_tracked"] = torch.tensor(0)
    return {k: sd[k] for k in model.state_dict()}  # in the model's order


def _arch_of(state_dict: StateDict) -> str | None:
    try:
        return infer_arch(state_dict)
    except CheckpointError:
        return None


def is_file_spec(spec: str) -> bool:
    return (
        os.path.exists(spec) or os.sep in spec or spec.endswith((".pth", ".pt", ".safetensors", ".h5", ".hdf5", ".mat"))
    )


def _hash_in_background(state_dict: StateDict) -> Future[str]:
    """SHA-256 of the tensors in a thread: hashlib releases the GIL, so a 500 MB checkpoint's 0.3 s
    overlap with the work that does not need the hash yet (verify loading the other checkpoint)."""
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(state_dict_sha256(state_dict))
        except BaseException as e:  # handed to whoever asks for the hash
            future.set_exception(e)

    threading.Thread(target=run, name="vggnorm-sha256", daemon=True).start()
    return future


def resolve_weights(
    spec: str,
    *,
    arch: str | None,
    prefer: str | None = None,
    background_hash: bool = False,
    given: Given = COMPUTE,
    mmap: bool = True,
) -> Weights:
    """Resolve weights (a path, a torchvision weights name or ``random:SEED``) to a checked state_dict.

    ``arch`` may be ``None`` for a file, whose arch is then inferred from its keys and shapes
    (``prefer``: the arch to take when it fits, as another may too). ``background_hash``: the
    content hash is computed in a thread (``Weights.sha256`` waits for it). ``mmap=False``: a ``.pth``
    file is read into memory of its own, not memory-mapped (apply overwrites the tensors).
    """
    foreign = None
    if spec.startswith(RANDOM_PREFIX):
        seed_text = spec[len(RANDOM_PREFIX) :]
        if not seed_text.isdigit():
            raise UsageError(f"bad weights {spec!r}: expected random:SEED with an integer SEED, e.g. random:0")
        if arch is None:
            raise UsageError(f"{spec} needs an architecture; pass --arch")
        check_arch(arch)
        sd = random_state_dict(arch, int(seed_text))
    elif is_file_spec(spec):
        try:
            foreign = read_foreign(spec) if os.path.isfile(spec) else None
            sd = dict(foreign.state_dict) if foreign else to_torchvision_layout(load_state_dict(spec, mmap=mmap))
            arch = arch or infer_arch(sd, prefer=prefer)
            check_arch(arch)
            try:
                check_state_dict(sd, arch, features_only=is_features_only(sd))
            except CheckpointError:
                actual = _arch_of(sd)
                if actual is None or actual == arch:  # it fits, but something else is wrong: say what
                    raise
                hint = given.other_arch.format(arch=actual, spec=spec)
                if hint.startswith("pass --arch") and is_user_model(actual):
                    hint = f"pass --model {actual}"
                raise CheckpointError(
                    f"{spec} holds {actual} weights (its keys and shapes fit {actual}), not {arch}"
                    + (f"; {hint}" if hint else "")
                ) from None
        except CheckpointError as e:
            raise CheckpointError(str(e) if str(e).startswith(spec) else f"{spec}: {e}") from e
    else:
        arch = arch or DEFAULT_ARCH
        check_arch(arch)
        if is_user_model(arch):
            raise UsageError(f"{spec!r} is not a file: a --model needs its weights as a file or random:SEED")
        sd = _torchvision_weights(arch, spec, given)
    check_finite(sd, spec)
    digest = _hash_in_background(sd) if background_hash else state_dict_sha256(sd)
    return Weights(spec, arch, sd, digest, foreign)
