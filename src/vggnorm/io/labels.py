"""Class labels for per-class statistics: from class subfolders, or from a labels file.

* Class subfolders (torchvision's ``ImageFolder``): a file's class is the first folder under the root;
  classes are the sorted folder names.
* ``--labels FILE`` for a flat folder: either one label per line, for the files in vggnorm's sorted
  order (the ILSVRC2012 validation ground truth), or a CSV of ``filename,label`` lines. Every file
  must have a label, and every labelled name must be a file: anything else is an error naming it.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from vggnorm.errors import DataError
from vggnorm.io.data import printable


@dataclass(frozen=True)
class Labels:
    classes: list[str]  # sorted class names; a class index is a position here
    of_file: list[int]  # the class index of each file, in the files' order
    source: str  # "folders", or the labels file as given
    sha256: str  # of the labels file ("" for folders)


def from_folders(root: Path, files: list[Path]) -> Labels:
    names = []
    for f in files:
        parts = f.relative_to(root).parts
        if len(parts) < 2:
            raise DataError(
                f"--per-class: {printable(f)} is not in a class subfolder of {root}; put every image in a folder "
                "named for its class, or pass --labels FILE"
            )
        names.append(parts[0])
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return Labels(classes, [index[n] for n in names], "folders", "")


def from_file(path: Path, root: Path, files: list[Path]) -> Labels:
    """Labels from ``path``: ``filename,label`` CSV lines, or one label per line in the files' order."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"--labels {path}: cannot read it ({e.strerror or e})") from e
    # utf-8-sig: a byte order mark (as Windows editors write) is not part of the first label
    lines = [line for line in data.decode("utf-8-sig", "replace").splitlines() if line.strip()]
    rel = [f.relative_to(root).as_posix() for f in files]
    if lines and all("," in line for line in lines):
        by_name: dict[str, str] = {}
        for row in csv.reader(lines):
            name, label = row[0].strip(), row[-1].strip()
            by_name[name] = label
        known = set(rel) | {Path(r).name for r in rel}
        stray = sorted(n for n in by_name if n not in known)
        if stray:
            raise DataError(f"--labels {path}: {len(stray)} labelled name(s) are not files under {root}: {stray[:3]}")
        labels = [by_name.get(r, by_name.get(Path(r).name)) for r in rel]
        missing = [printable(r) for r, lab in zip(rel, labels, strict=True) if lab is None]
        if missing:
            raise DataError(f"--labels {path}: {len(missing)} file(s) have no label: {missing[:3]}")
        names = [str(lab) for lab in labels]
    else:
        if len(lines) != len(files):
            raise DataError(
                f"--labels {path} has {len(lines)} labels for {len(files)} files: one label per line is read in the "
                "files' sorted order, so the counts must match (or give filename,label lines)"
            )
        names = [line.strip() for line in lines]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return Labels(classes, [index[n] for n in names], str(path), hashlib.sha256(data).hexdigest())
