"""compute-stats on messy folders, interrupted runs and resume (through the CLI and subprocesses)."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import TINY, invoke
from test_data import awkward_images, bad_files  # noqa: I001
from vggnorm.io.statsfile import read_stats

BASE = ["--model", TINY["tiny"], "--weights", "random:0", "--resize", "48", "--crop", "40", "--no-progress"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, photos):
    """Real photos in class folders, awkward-but-valid images, and bad files."""
    d = tmp_path_factory.mktemp("messy")
    for i, p in enumerate(sorted(photos.iterdir())):
        (d / f"class{i % 2}").mkdir(exist_ok=True)
        (d / f"class{i % 2}" / p.name).write_bytes(p.read_bytes())
    (d / "awkward").mkdir()
    n_awkward = awkward_images(d / "awkward")
    (d / "bad").mkdir()
    bad = bad_files(d / "bad")
    return d, 8 + n_awkward, bad


def test_bad_files_are_skipped_named_and_recorded(messy, tmp_path):
    d, n_good, bad = messy
    r = invoke("compute-stats", d, *BASE, "-o", tmp_path / "s.h5", "--workers", 0)
    assert r.exit_code == 0, r.output
    assert f"images: {n_good} used, {len(bad)} skipped" in r.stdout
    for name in bad:
        assert name in r.stderr
    stats = read_stats(tmp_path / "s.h5")
    assert stats.num_images == n_good
    assert {os.path.basename(p) for p, _ in stats.skipped} == bad
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["num_skipped"] == len(bad)
        assert all(reason.decode().startswith("cannot decode") for reason in f["skipped/reason"][()])


def test_strict_stops_at_the_first_bad_file_and_writes_nothing(messy, tmp_path):
    d, _, _ = messy
    r = invoke("compute-stats", d, *BASE, "-o", tmp_path / "s.h5", "--workers", 0, "--strict", "--checkpoint-every", 1)
    assert r.exit_code == 1
    assert "--strict: cannot use" in r.stderr and "bad/" in r.stderr and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "d").mkdir()
    bad_files(tmp_path / "d")
    r = invoke("compute-stats", tmp_path / "d", *BASE, "-o", tmp_path / "s.h5", "--workers", 0)
    assert r.exit_code == 1 and "could be decoded" in r.stderr
    assert not (tmp_path / "s.h5").exists()


def test_workers_and_batch_size_do_not_change_the_result(messy, tmp_path):
    d, _, _ = messy
    runs = [
        ("--workers", 0, "--batch-size", 3),
        ("--workers", 2, "--batch-size", 3),
        ("--workers", 1, "--batch-size", 8),
    ]
    results = []
    for i, opts in enumerate(runs):
        r = invoke("compute-stats", d, *BASE, "-o", tmp_path / f"{i}.h5", *opts)
        assert r.exit_code == 0, r.output
        results.append(read_stats(tmp_path / f"{i}.h5"))
    a, b, c = results
    assert a.num_images == b.num_images == c.num_images and a.skipped == b.skipped == c.skipped
    for name in a.layers:
        assert a.layers[name].count == b.layers[name].count == c.layers[name].count
        # workers only decode: bit-identical
        assert np.array_equal(a.layers[name].sum.numpy(), b.layers[name].sum.numpy())
        # another batch size lets the float32 conv kernels block differently: equal to rounding
        scale = float(a.layers[name].mean.max())
        np.testing.assert_allclose(
            c.layers[name].mean.numpy(), a.layers[name].mean.numpy(), rtol=1e-6, atol=1e-6 * scale
        )


def test_resume_refuses_other_arguments_or_data(messy, tmp_path):
    d, _, _ = messy
    out = tmp_path / "s.h5"
    r = invoke("compute-stats", d, *BASE, "-o", out, "--workers", 0)
    assert r.exit_code == 0
    r = invoke("compute-stats", d, *BASE, "-o", out, "--workers", 0, "--resume")
    assert r.exit_code == 1 and "already complete" in r.stderr
    with h5py.File(out, "r+") as f:  # make it look interrupted
        f.attrs["complete"] = False
        f.attrs["position"] = 3
    r = invoke("compute-stats", d, *BASE[:-2], "32", "--no-progress", "-o", out, "--workers", 0, "--resume")
    assert r.exit_code == 1 and "crop: 40" in r.stderr and "32 now" in r.stderr
    r = invoke("compute-stats", d, *BASE, "--weights", "random:1", "-o", out, "--workers", 0, "--resume")
    assert r.exit_code == 1 and "weights:" in r.stderr
    r = invoke("compute-stats", d / "class0", *BASE, "-o", out, "--workers", 0, "--resume")
    assert r.exit_code == 1 and "dataset_fingerprint" in r.stderr
    with h5py.File(out, "r+") as f:  # as if started with --decode gpu on a GPU machine
        f.attrs["decode"] = "gpu"
    r = invoke("compute-stats", d, *BASE, "-o", out, "--workers", 0, "--resume")
    assert r.exit_code == 1 and "decode: 'gpu' in the file, 'cpu' now" in r.stderr
    r = invoke("compute-stats", d, *BASE, "-o", tmp_path / "none.h5", "--resume")
    assert r.exit_code == 1 and "does not exist" in r.stderr


def run_until_checkpoint(args, out, sig):
    """Start compute-stats in a subprocess; send ``sig`` as soon as a checkpoint is on disk.

    The caller puts a named pipe last among the images: it blocks the loader (nobody writes to it),
    so the signal always lands mid-run, however fast the files before it are measured.

    The child gets SIGINT's default disposition, as a program started from a terminal has: a test
    run started in the background by a non-interactive shell (`nohup make test &`) inherits SIGINT
    *ignored*, and Python then installs no KeyboardInterrupt handler, so Ctrl-C does nothing, as
    the user of nohup asked (this made the test hang once).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "vggnorm", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


def test_an_interrupt_just_after_the_first_checkpoint_is_renamed_saves_the_progress(photos, tmp_path, monkeypatch):
    """Ctrl-C between the first checkpoint's rename and the end of its write (flushing its folder) saves the
    progress over that checkpoint, as later (before: "exists already", exit 1)."""
    import vggnorm.io.checkpoint

    flush = vggnorm.io.checkpoint._fsync_folder
    flushes = []

    def interrupted_once(folder):
        flushes.append(folder)
        flush(folder)
        if len(flushes) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(vggnorm.io.checkpoint, "_fsync_folder", interrupted_once)
    out = tmp_path / "s.h5"
    options = ["--weights", "random:0", "--resize", 40, "--crop", 32, "--workers", 0, "--batch-size", 2]
    r = invoke("compute-stats", photos, "--model", TINY["tiny"], *options, "--checkpoint-every", 1, "-o", out)
    assert r.exit_code == 130 and "--resume" in r.stderr, r.output
    assert len(flushes) == 2 and not read_stats(out, allow_incomplete=True).complete


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_uninterrupted_result(photos, tmp_path, sig):
    d = tmp_path / "data"
    d.mkdir()
    for k in range(2):  # 16 real photos in two classes, then the pipe
        (d / f"class{k}").mkdir()
        for p in photos.iterdir():
            (d / f"class{k}" / p.name).write_bytes(p.read_bytes())
    fifo = d / "class1" / "zz_pipe.jpg"
    os.mkfifo(fifo)
    options = "--weights random:0 --resize 128 --crop 112 --workers 0 --batch-size 2 --no-progress"
    args = ["compute-stats", d, "--model", TINY["tiny"], *options.split(), "--per-class"]
    out = tmp_path / "part.h5"
    code, _, stderr = run_until_checkpoint([*args, "-o", out, "--checkpoint-every", 1], out, sig)
    partial = read_stats(out, allow_incomplete=True)
    assert not partial.complete and 0 < partial.position < 17
    if sig == signal.SIGINT:
        assert code == 130 and "--resume" in stderr and "Traceback" not in stderr
    else:
        assert code == -signal.SIGKILL

    fifo.unlink()
    fifo.write_bytes(b"")  # the same name and size: the folder's fingerprint is unchanged
    full = tmp_path / "full.h5"
    assert invoke(*args, "-o", full).exit_code == 0
    r = invoke(*args, "-o", out, "--resume")
    assert r.exit_code == 0, r.output
    a, b = read_stats(full), read_stats(out)
    assert a.num_images == b.num_images == 16 and len(a.skipped) == len(b.skipped) == 1
    for name in a.layers:
        assert a.layers[name].count == b.layers[name].count
        np.testing.assert_allclose(b.layers[name].mean.numpy(), a.layers[name].mean.numpy(), rtol=1e-6, atol=1e-12)
        # per-class sums too: the resumed run equals the uninterrupted one
        assert np.array_equal(b.layers[name].class_count.numpy(), a.layers[name].class_count.numpy())
        np.testing.assert_allclose(b.layers[name].class_sum.numpy(), a.layers[name].class_sum.numpy(), rtol=1e-6)
