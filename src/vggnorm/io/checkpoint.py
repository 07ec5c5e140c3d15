"""Safe loading and atomic saving of state_dicts, and their content hash.

Loading never unpickles code (``weights_only=True``) and accepts the prefixes that
``nn.DataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``) add. Saving goes to a
temporary file in the destination folder and is renamed into place, so a crash never leaves a
half-written file under the final name; the file gets the mode ``open()`` would give it under the
user's umask. An output is checked before any work: never one of the command's inputs (even with
``--force``), in a writable folder with room for it. A full disk is an ``OSError`` naming the file
(never a crash), and the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from vggnorm.core.state import StateDict  # noqa: E402
from vggnorm.errors import (
    CheckpointError,
    InvalidValuesError,
    NoSpaceError,
    OutputExistsError,
    OutputFolderMissingError,
    OutputNotWritableError,
    WriteError,
)

_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model")

log = logging.getLogger(__name__)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (the same resolved path, or hard/sym links to it)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# Files this process ran code from (``--model FILE.py:NAME``, ``package.module:NAME``): inputs of every command,
# which no output may name (``io.models.import_user_model`` adds them)
_CODE_INPUTS: set[Path] = set()


def protect_input(path: str | os.PathLike[str]) -> None:
    """Count ``path`` among the inputs of every command this process runs: ``check_writable`` refuses it."""
    _CODE_INPUTS.add(Path(path))


def check_writable(
    path: Path,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    size: int | None = None,
    option: str = "-o",
) -> None:
    """Refuse early (before any long work) an output that cannot or must not be written.

    It may not be one of ``inputs`` (even with ``force``), overwrite an existing file without
    ``force``, be a folder, or lie in a missing or read-only folder; with ``size`` (bytes, where
    known) the disk must have room. Temporary files left by a killed earlier run are removed.
    ``option``: the option that gave the path, which the messages name (verify's ``--report``, say).
    """
    path = Path(path)
    for source in [*inputs, *sorted(_CODE_INPUTS)]:
        if same_file(path, source):
            raise OutputExistsError(
                f"{path} is also an input of this command ({source}); vggnorm never writes over its inputs, even "
                "with --force: choose another output path"
            )
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give a file name with {option}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists already; pass --force to overwrite it, or choose another {option} path")
    folder = path.parent
    if not folder.is_dir():
        raise OutputFolderMissingError(
            f"the folder {folder} does not exist; create it first, or choose another {option} path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputNotWritableError(
            f"cannot write in the folder {folder} (permission denied); fix its permissions, or choose another {option} path"
        )
    if size is not None:
        free = shutil.disk_usage(folder).free
        if free < size:
            raise NoSpaceError(
                f"{path} needs about {size / 2**20:.0f} MB and {folder} has {free / 2**20:.0f} MB free; "
                f"free some space or choose another {option} path"
            )
    remove_stale_temporaries(path)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` that killed runs left (``.NAME.PID.*.tmp`` of a PID
    that is gone); report other ``.NAME.*.tmp`` files, which older versions left."""
    prefix = _temporary_prefix(path)
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid_text = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid_text.isdigit() and not _running(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                log.warning("removed %s, left by an interrupted earlier run", tmp)
        elif not pid_text.isdigit():
            log.warning("%s looks like the temporary file of an interrupted earlier run; delete it", tmp)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writes(
    paths: Iterable[Path], *, force: bool, inputs: Iterable[str | os.PathLike[str]] = (), option: str = "-o"
) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``paths``; rename them into place if the block succeeds.

    Until the renames, any failure (an exception, an interrupt, a full disk) removes the temporary files and
    leaves ``paths`` as they were; a refused write becomes a ``WriteError`` that says so. Each file gets the
    mode a plain ``open()`` would give under the umask. Before any rename each temporary file is flushed to
    the disk (``fsync``; a failure is a ``WriteError``, nothing renamed), and after the renames each folder
    (where its file system allows), so a power loss after the command returns loses nothing.

    Several files are not renamed at once: there is one rename per file, in the order of ``paths`` (apply:
    the checkpoint, then its report). An interrupt, a failed rename or a power loss between two of them
    leaves the files renamed before it new and the others as they were; each file is whole, old or new.
    """
    paths = [Path(p) for p in paths]
    inputs = list(inputs)
    for path in paths:
        check_writable(path, force=force, inputs=inputs, option=option)
    temps: list[Path] = []
    try:
        for path in paths:
            fd, name = tempfile.mkstemp(
                prefix=f"{_temporary_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent
            )
            os.close(fd)
            temps.append(Path(name))
        try:
            yield temps
        except OSError as e:
            names = ", ".join(str(p) for p in paths)
            raise WriteError(
                f"could not write {names}: {e.strerror or e}; nothing was written, and any file of that name is "
                "unchanged"
            ) from e
        mode = 0o666 & ~_umask()
        for tmp, path in zip(temps, paths, strict=True):
            os.chmod(tmp, mode)
            if not force and path.exists():
                raise OutputExistsError(f"{path} appeared while vggnorm was writing it; pass --force to overwrite it")
        for tmp, path in zip(temps, paths, strict=True):
            _fsync_file(tmp, path)
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for path in paths):
            _fsync_folder(folder)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _fsync_file(tmp: Path, path: Path) -> None:
    """Flush the temporary file of ``path`` to the disk; a failure (an I/O error, a full disk found late) is
    a ``WriteError``."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise WriteError(
            f"could not write {path}: {e.strerror or e}; nothing was written, and any file of that name is unchanged"
        ) from e


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames) to the disk; a file system that cannot (some network ones
    refuse it on folders) is let be: the files themselves are on the disk already."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: Path, *, force: bool, inputs: Iterable[str | os.PathLike[str]] = (), option: str = "-o"
) -> Iterator[Path]:
    """``atomic_writes`` for one file."""
    with atomic_writes([path], force=force, inputs=inputs, option=option) as (tmp,):
        yield tmp


class _RecordingFile:
    """A file whose first write error is kept: torch.save reports a full disk as "unexpected pos"."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f: IO[bytes] = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove the ``module.`` / ``_orig_mod.`` prefixes DataParallel and torch.compile add."""
    out: StateDict = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _torch_load(path: Path, *, mmap: bool = True) -> object:
    """``torch.load`` memory-mapped (pages are read as tensors are used, copy-on-write: 0.4 s less
    for verify's two VGG16 files), or plainly for a file in torch's legacy (non-zip) format or when
    ``mmap`` is False (tensors to be overwritten: a copy-on-write fault per page costs apply's fold 1 s)."""
    if not mmap:
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path: str | os.PathLike[str], *, mmap: bool = True) -> StateDict:
    """Load a state_dict from ``.pth``/``.pt`` (never unpickling code) or ``.safetensors``; a Keras
    (HDF5) or MatConvNet (``.mat``) VGG, recognized by its content, in torchvision's layout. ``mmap``:
    a ``.pth`` is memory-mapped (``_torch_load``)."""
    from vggnorm.io.formats import read_foreign

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    foreign = read_foreign(path)
    if foreign is not None:
        return dict(foreign.state_dict)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            raw = _torch_load(path, mmap=mmap)
        except pickle.UnpicklingError as e:
            with open(path, "rb") as f:
                head = f.read(2)
            if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle
                raise CheckpointError(
                    f"{path} is not a PyTorch checkpoint (torch.save writes a zip file); pass a .pth/.pt state_dict "
                    "or a .safetensors file"
                ) from e
            raise CheckpointError(
                f"{path} holds pickled Python objects, not a plain state_dict (a whole saved model?). "
                "vggnorm never unpickles code; save `model.state_dict()` instead and pass that file"
            ) from e
        except Exception as e:  # torch.load raises RuntimeError, EOFError, struct.error, ... on junk
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(raw, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        nested = (
            [
                k
                for k, v in raw.items()
                if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
            ]
            if isinstance(raw, Mapping)
            else []
        )
        if nested and isinstance(raw, Mapping):  # a training checkpoint: {"model_state_dict": ..., "epoch": ...}
            others = [str(k) for k in raw if k not in nested][:4]
            raise CheckpointError(
                f"{path} is a dict holding state_dict(s) under {', '.join(repr(k) for k in nested)}"
                + (f" beside {', '.join(others)}" if others else "")
                + f", not a state_dict itself; extract the model's: `python -c \"import torch; torch.save(torch.load("
                f"'{path}', weights_only=True)[{nested[0]!r}], 'weights.pth')\"` and pass weights.pth"
            )
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping from names to tensors)")
    return strip_prefixes(raw)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or inf in any floating-point tensor, naming the first such tensor."""
    for key, t in state_dict.items():
        # a finite sum (one pass, no temporary) proves every value finite; else look closer
        if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            first = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise InvalidValuesError(
                f"{source}: tensor {key} has {int(bad.sum())} non-finite value(s) (first at {first}: "
                f"{float(t[first]) if first else float(t)}); no normalization can be computed from it: "
                "check how the file was made"
            )


def check_representable(
    new: Mapping[str, torch.Tensor],
    old: Mapping[str, torch.Tensor],
    source: str,
    why: str = "",
    *,
    lost: Mapping[str, int] | None = None,
) -> None:
    """Refuse a rescaled state_dict whose tensors left their dtype's range: NaN or inf (``check_finite``),
    or values that were normal numbers in ``old`` and underflowed to zero or subnormals in ``new``.

    ``lost``: for the tensors rescaled in place (``core.fold.fold_in_place``: ``old`` holds the rescaled
    tensor itself), how many values underflowed, counted as they were overwritten."""
    check_finite(new, source)
    lost = lost or {}
    for key, t in new.items():
        before = old.get(key)
        if not t.is_floating_point() or before is None or before.shape != t.shape:
            continue
        if key in lost:
            count = lost[key]
        elif before is t:  # unchanged: nothing can have underflowed
            continue
        else:
            tiny = torch.finfo(t.dtype).tiny
            count = int(((before.abs() >= tiny) & (t.abs() < tiny)).sum())
        if count:
            raise InvalidValuesError(
                f"{source}: tensor {key} underflows {t.dtype}: {count} of its {t.numel()} value(s) "
                f"became 0 or subnormal{why}; nothing was written"
            )


def not_floating(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors that should hold real numbers and do not (BatchNorm's integer counter aside), in order."""
    return [k for k, t in state_dict.items() if not t.is_floating_point() and not k.endswith("num_batches_tracked")]


def describe_not_floating(state_dict: Mapping[str, torch.Tensor], keys: list[str]) -> str:
    return (
        "not floating-point: "
        + ", ".join(f"{k} ({str(state_dict[k].dtype).removeprefix('torch.')})" for k in keys[:5])
        + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        + " (weights are float32, float64, float16 or bfloat16; a quantized or integer checkpoint is not a network "
        "vggnorm can measure)"
    )


def check_floating(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse integer (or other non-floating) weights, naming them."""
    keys = not_floating(state_dict)
    if keys:
        raise CheckpointError(f"{source}: {describe_not_floating(state_dict, keys)}")


HALF_DTYPES = (torch.float16, torch.bfloat16)


def half_dtypes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The half-precision dtypes (float16, bfloat16) among ``state_dict``'s tensors, by name."""
    return sorted({str(t.dtype).removeprefix("torch.") for t in state_dict.values() if t.dtype in HALF_DTYPES})


def upcast_half(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """``state_dict`` with its float16/bfloat16 tensors as float32 (exactly their values): vggnorm
    measures, folds and checks in float32 or float64, never in half precision."""
    return {k: v.float() if v.dtype in HALF_DTYPES else v for k, v in state_dict.items()}


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: Path, *, force: bool, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` atomically; ``.safetensors`` by extension (with ``metadata``), else torch.save."""
    with atomic_write(path, force=force) as tmp:
        write_state_dict(state_dict, tmp, safetensors=path.suffix == ".safetensors", metadata=metadata)


def write_state_dict(
    state_dict: Mapping[str, torch.Tensor], tmp: Path, *, safetensors: bool, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``tmp`` (a temporary file of ``atomic_writes``); a full disk is an ``OSError``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with open(tmp, "wb") as f:
        if safetensors:
            from safetensors.torch import save

            f.write(save(tensors, metadata=dict(metadata or {})))  # bytes: a full disk is a plain OSError
        else:
            writer = _RecordingFile(f)
            try:
                torch.save(tensors, writer)  # type: ignore[arg-type]
            except RuntimeError as e:
                if writer.error is not None:
                    raise writer.error from e
                raise


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content hash of the tensors (names, dtypes, shapes, values), independent of file format.

    The same weights saved as ``.pth`` or ``.safetensors``, or with a ``module.`` prefix, hash alike,
    so statistics can be matched to the weights they were measured with.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
