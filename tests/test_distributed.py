"""torchrun with 2 CPU processes (gloo) reproduces a single process, and resumes after a kill."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from vggnorm.io.statsfile import read_stats

OPTIONS = "--weights random:0 --resize 128 --crop 112 --workers 0 --batch-size 1 --no-progress"
ARGS = ["--model", TINY["tiny"], *OPTIONS.split(), "--per-class"]


def vggnorm(*args, nproc=None, **kwargs):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*launcher, "-m", "vggnorm", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def children(pid):
    """All descendants of ``pid`` (from /proc), deepest last."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [
                int(c)
                for t in os.listdir(f"/proc/{p}/task")
                for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()
            ]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def assert_same(a, b):
    assert a.num_images == b.num_images and a.skipped == b.skipped and a.classes == b.classes == ["k0", "k1", "k2"]
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        assert la.count == lb.count and np.array_equal(la.class_count.numpy(), lb.class_count.numpy())
        np.testing.assert_allclose(lb.mean.numpy(), la.mean.numpy(), rtol=1e-9, atol=0)
        np.testing.assert_allclose(lb.class_sum.numpy(), la.class_sum.numpy(), rtol=1e-9, atol=0)


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    for k in range(3):  # three classes (per-class sums are all-reduced too)
        (d / f"k{k}").mkdir()
        for p in list(photos.iterdir())[: 8 - 2 * k]:
            (d / f"k{k}" / p.name).write_bytes(p.read_bytes())
    (d / "k0" / "broken.jpg").write_bytes(b"not an image")
    return d


@pytest.mark.slow
@pytest.mark.heavy
def test_torchrun_two_processes_equal_one(folder, tmp_path):
    single = vggnorm("compute-stats", folder, *ARGS, "-o", tmp_path / "one.h5")  # alongside: mostly start-up
    proc = vggnorm("compute-stats", folder, *ARGS, "-o", tmp_path / "two.h5", nproc=2)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert single.wait(timeout=300) == 0, single.stderr.read()
    assert stdout.count("wrote") == 1  # rank 0 alone reports
    two = read_stats(tmp_path / "two.h5")
    assert two.provenance.world_size == 2 and two.num_images == 18
    assert_same(read_stats(tmp_path / "one.h5"), two)


@pytest.mark.slow
@pytest.mark.heavy
def test_torchrun_resumes_after_kill(folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    pipe = data / "k2" / "zz_pipe.jpg"
    os.mkfifo(pipe)  # sorted last: blocks its rank's loader, so the kill always lands mid-run
    out = tmp_path / "part.h5"
    proc = vggnorm("compute-stats", data, *ARGS, "-o", out, "--checkpoint-every", 2, nproc=2)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # kill -9 the launcher and both workers (torchrun starts its workers in sessions of their own)
    for pid in [proc.pid, *children(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    partial = read_stats(out, allow_incomplete=True)
    assert not partial.complete and partial.position > 0
    pipe.unlink()
    pipe.write_bytes(b"")  # the same name and size: the folder's fingerprint is unchanged
    # the uninterrupted reference runs alongside the resumed run (most of each is starting Python and torch)
    reference = vggnorm("compute-stats", data, *ARGS, "-o", tmp_path / "one.h5")
    proc = vggnorm("compute-stats", data, *ARGS, "-o", out, "--resume", nproc=2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    assert_same(read_stats(tmp_path / "one.h5"), read_stats(out))
