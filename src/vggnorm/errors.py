"""The package's exceptions.

Every message says what was found, what was expected, and what to do. The CLI turns a
``VggnormError`` into a one-line error without a traceback; anything else is a bug.
"""

from __future__ import annotations


class VggnormError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class WeightsError(VggnormError):
    """A weight SPEC that cannot be resolved (bad path, unknown name, offline, bad file)."""


class UsageError(VggnormError):
    """An option's value that names nothing there is (an unknown ``--layer``): exit status 2 in every command,
    as for Click's own usage errors."""


class WeightsUnavailableError(WeightsError):
    """Weights that cannot be had here (offline, not in torchvision's cache): the environment, not the
    command line, so exit status 1 in every command (verify too)."""


class CheckpointError(VggnormError):
    """A checkpoint file that cannot be read, or a state_dict that does not fit the architecture."""


class DataError(VggnormError):
    """An image folder that is missing or empty, or a bad file under ``--strict``."""


class StatsFileError(VggnormError):
    """A statistics file that is missing, not a vggnorm stats file, incomplete, or of another version."""


class StatsMismatchError(VggnormError):
    """Statistics that do not belong to the checkpoint (other arch, channels or weights)."""


class ResumeMismatchError(VggnormError):
    """``--resume`` with arguments or data that differ from the run being resumed."""


class InvalidValuesError(VggnormError):
    """Numbers no normalization can come from: NaN/inf weights, NaN/inf/negative means, empty counts.

    A bad file, not bad usage: ``verify`` exits 1 on it, as on a failed check."""


class WriteError(VggnormError):
    """The file system refused a write (full disk, quota, I/O error, read-only): nothing was written."""


class OutputExistsError(VggnormError):
    """An output file that exists already; vggnorm overwrites only with ``--force``."""
