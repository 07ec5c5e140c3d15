"""The package's exceptions, by what the user must do; each carries the exit status the command line gives it.

Every message says what was found, what was expected, and what to do. The CLI turns a
``VggnormError`` into a one-line error without a traceback and exits with its ``exit_status``, the
same in every command; anything else is a bug. Raise one of the five kinds below (or a subclass),
never ``VggnormError`` itself.
"""

from __future__ import annotations

from typing import ClassVar


class VggnormError(Exception):
    """Base class: a problem with the user's command line, files or environment."""

    exit_status: ClassVar[int] = 1


class UsageError(VggnormError):
    """Fix the command line: a malformed option or argument, one that names nothing there is (an unknown
    architecture, weights name, ``--layer`` or ``--model``), or options that exclude each other.

    Exit status 2, as for Click's own usage errors (an unknown option, a value out of its range)."""

    exit_status = 2


class InputError(VggnormError):
    """Fix, replace or re-create an input: a file that is missing, unreadable or damaged, of another kind,
    model, weights or measurement than the command needs, or holding values no normalization comes from;
    an image folder without usable images; a model the analysis refuses."""


class OutputError(VggnormError):
    """Choose another output, free space or fix permissions: an output that cannot or must not be written."""


class SetupError(VggnormError):
    """Install something or go online: a missing optional package, weights that cannot be downloaded
    here, a device this machine does not have."""


class CheckFailedError(VggnormError):
    """A check failed: what vggnorm computed does not hold what it must (apply's self-check, the witness)."""


# Fix, replace or re-create an input.


class CheckpointError(InputError):
    """A checkpoint file that cannot be read, or a state_dict or model that does not fit what is asked."""


class DataError(InputError):
    """An image folder that is missing or empty, a labels file that does not fit it, or a bad image under
    ``--strict``."""


class StatsFileError(InputError):
    """A statistics file that is missing, not a vggnorm stats file, damaged, unfinished, or of another version."""


class StatsMismatchError(InputError):
    """Statistics that do not belong to the checkpoint or the options (other arch, channels, weights, policy)."""


class ResumeMismatchError(InputError):
    """``--resume`` with arguments or data that differ from the run being resumed."""


class InvalidValuesError(InputError):
    """Numbers no normalization can come from: NaN/inf weights, NaN/inf/negative means, empty counts."""


# Choose another output, free space or fix permissions.


class OutputExistsError(OutputError):
    """An output path where something is already: a file (vggnorm overwrites only with ``--force``), a
    folder, one of the command's inputs or its image folder (never written, even with ``--force``)."""


class OutputFolderMissingError(OutputError):
    """An output whose folder does not exist: create it, or choose another path."""


class OutputNotWritableError(OutputError):
    """An output whose folder refuses writing (permission denied): fix the permissions, or choose another path."""


class NoSpaceError(OutputError):
    """An output larger than the free space of its disk, found before any work: free space, or choose another path."""


class WriteError(OutputError):
    """The file system refused a write while it happened (full disk, quota, I/O error, read-only): nothing
    was written."""


# Install something or go online.


class WeightsUnavailableError(SetupError):
    """Torchvision weights that cannot be had here (offline, not in torchvision's cache)."""


# The five kinds, in the order the exit-status table of the command-line reference lists them.
KINDS: tuple[type[VggnormError], ...] = (UsageError, InputError, OutputError, SetupError, CheckFailedError)
