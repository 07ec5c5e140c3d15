"""Safe loading and atomic saving of state_dicts, and their content hash.

Loading never unpickles code (``weights_only=True``) and accepts the prefixes that
``nn.DataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``) add. Saving goes to a
temporary file in the destination folder and is renamed into place, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from vggnorm.errors import CheckpointError, OutputExistsError

StateDict = dict[str, torch.Tensor]

_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model")


def check_writable(path: Path, *, force: bool) -> None:
    """Refuse early (before any long work) to overwrite ``path`` unless ``force``."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists already; pass --force to overwrite it, or choose another -o path")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give a file name with -o")
    if not path.parent.is_dir():
        raise OutputExistsError(f"the folder {path.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_write(path: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not force and path.exists():
            raise OutputExistsError(f"{path} appeared while vggnorm was writing it; pass --force to overwrite it")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def load_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Load a state_dict from ``.pth``/``.pt`` (never unpickling code) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
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
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping from names to tensors)")
    return strip_prefixes(raw)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: Path, *, force: bool, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` atomically; ``.safetensors`` by extension (with ``metadata``), else torch.save."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_write(path, force=force) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        else:
            torch.save(tensors, tmp)


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
