"""Never lose a user's data, never crash: each case of the red-team pass as a test."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, invoke, one_line_error
from vggnorm.io.statsfile import read_stats

MODEL = ["--model", TINY["tiny"]]
SMALL = ["--resize", "40", "--crop", "32", "--workers", 0, "--no-progress"]


@pytest.fixture
def run(photos, checkpoints, tmp_path):
    """A finished compute-stats -> apply on the look-alike, in tmp_path."""
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(checkpoints["tiny"].read_bytes())
    stats, out = tmp_path / "s.h5", tmp_path / "n.pth"
    assert invoke("compute-stats", photos, *MODEL, "--weights", ckpt, "-o", stats, *SMALL).exit_code == 0
    assert invoke("apply", ckpt, "--stats", stats, "-o", out, *MODEL).exit_code == 0
    return {"ckpt": ckpt, "stats": stats, "out": out}


def test_an_output_is_never_one_of_the_inputs(run, photos, tmp_path):
    ckpt, stats = run["ckpt"], run["stats"]
    before = ckpt.read_bytes()
    r = invoke("compute-stats", photos, *MODEL, "--weights", ckpt, "-o", ckpt, "--force", *SMALL)
    one_line_error(r, "also an input", "even with --force")
    r = invoke("apply", ckpt, "--stats", stats, "-o", stats, "--force", *MODEL)
    one_line_error(r, "also an input")
    r = invoke("apply", ckpt, "--stats", stats, "-o", ckpt, "--force", *MODEL)
    one_line_error(r, "also an input")
    os.link(ckpt, tmp_path / "hardlink.pth")  # the same file under another name
    r = invoke("apply", ckpt, "--stats", stats, "-o", tmp_path / "hardlink.pth", "--force", *MODEL)
    one_line_error(r, "also an input")
    r = invoke("verify", run["out"], "--data", photos, "--report", tmp_path / "n", "--force", *MODEL)
    assert r.exit_code == 0  # n.json / n.md are not inputs
    # apply's report beside the checkpoint is an input too: verify reads the recorded policy from it
    r = invoke("verify", run["out"], "--data", photos, "--report", tmp_path / "n.report", "--force", *MODEL)
    one_line_error(r, "also an input")
    r = invoke("merge-stats", stats, "-o", stats, "--force")
    one_line_error(r, "also an input")
    assert ckpt.read_bytes() == before and read_stats(stats).num_images == 8


def test_applys_worker_thread_is_done_when_its_block_is_left():
    """apply imports and draws its figure in a thread (apply.meanwhile): leaving the block, by an exception too,
    waits for the work under way and cancels the rest, so nothing runs on (an import of matplotlib still
    under way would break the next figure drawn in the same process)."""
    import threading
    import time

    from vggnorm.commands.apply import meanwhile

    started, done = threading.Event(), []
    with pytest.raises(RuntimeError), meanwhile() as worker:
        worker.submit(lambda: (started.set(), time.sleep(0.2), done.append(1)))
        later = worker.submit(done.append, 2)
        started.wait()
        raise RuntimeError
    assert done == [1] and later.cancelled()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("vggnorm-apply")]


def test_apply_runs_torch_on_one_thread_and_gives_back_the_callers_count():
    """apply's kernels run on one thread (core.device.one_thread): the caller's thread count is back afterwards, an
    exception too."""
    import torch

    from vggnorm.core.device import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def limited_file_size(limit):
    def preexec():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def vggnorm_popen(*args, limit):
    """vggnorm in a process whose files may not grow past ``limit`` bytes."""
    return subprocess.Popen(
        [sys.executable, "-m", "vggnorm", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limited_file_size(limit),
    )


@pytest.mark.slow
def test_a_write_that_fails_is_one_line_leaves_the_old_file_and_no_temporary(run, photos, tmp_path):
    """The file system refusing a write (here: a file-size limit, as a full disk would) is one line,
    exit 1; the file being replaced is intact and no temporary file is left."""
    stats, ckpt = run["stats"], run["ckpt"]
    old = stats.read_bytes()
    # both at once (mostly Python and torch starting up); apply only reads the statistics being refused
    measure = vggnorm_popen(
        "compute-stats", photos, *MODEL, "--weights", ckpt, "-o", stats, "--force", *SMALL, limit=4096
    )
    apply = vggnorm_popen("apply", ckpt, "--stats", stats, "-o", tmp_path / "n2.pth", *MODEL, limit=4096)
    _, err = measure.communicate(timeout=300)
    assert measure.returncode == 1 and "File too large" in err and "Traceback" not in err, err
    assert stats.read_bytes() == old
    _, err = apply.communicate(timeout=300)
    assert apply.returncode == 1 and "File too large" in err and "Traceback" not in err, err
    assert "nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not (tmp_path / "n2.report.json").exists()


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(run, photos, tmp_path, monkeypatch):
    import vggnorm.io.checkpoint

    real = os.access
    monkeypatch.setattr(vggnorm.io.checkpoint.os, "access", lambda p, mode: not str(p).endswith("ro") and real(p, mode))
    (tmp_path / "ro").mkdir()  # as if mounted read-only (root ignores file modes, so the test cannot chmod)
    measured = []
    monkeypatch.setattr("vggnorm.commands.compute._stream", lambda *a, **k: measured.append(1))
    r = invoke("compute-stats", photos, *MODEL, "--weights", run["ckpt"], "-o", tmp_path / "ro" / "s.h5", *SMALL)
    one_line_error(r, "cannot write in the folder", "ro")
    assert not measured


@pytest.mark.parametrize(
    ("case", "error", "what_to_do"),
    [
        ("exists", "OutputExistsError", "pass --force to overwrite it, or choose another -o path"),
        ("folder", "OutputExistsError", "give a file name with -o"),
        ("missing folder", "OutputFolderMissingError", "create it first, or choose another -o path"),
        ("permission", "OutputNotWritableError", "fix its permissions, or choose another -o path"),
        ("no space", "NoSpaceError", "free some space or choose another -o path"),
    ],
)
def test_each_output_that_cannot_be_written_says_what_to_do(tmp_path, monkeypatch, case, error, what_to_do):
    import shutil

    import vggnorm.errors
    from vggnorm.io.checkpoint import check_writable

    path = tmp_path / "out.pth"
    if case == "exists":
        path.write_bytes(b"old")
    elif case == "folder":
        path.mkdir()
    elif case == "missing folder":
        path = tmp_path / "nowhere" / "out.pth"
    elif case == "permission":
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    else:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20))
    with pytest.raises(vggnorm.errors.OutputError) as e:
        check_writable(path, force=False, size=2**30)
    assert type(e.value).__name__ == error and what_to_do in str(e.value) and e.value.exit_status == 1


@pytest.mark.parametrize("option", ["--report", "--junit-xml"])
def test_verify_names_its_own_output_option_not_o(run, tmp_path, option):
    """verify has no -o: an output it cannot write names the option that gave it."""
    (tmp_path / "exists.xml").write_text("old")
    (tmp_path / "exists.json").write_text("old")
    target = tmp_path / "exists.xml" if option == "--junit-xml" else tmp_path / "exists"
    base = ["verify", run["out"], "--original", run["ckpt"], "--stats", run["stats"], *MODEL]
    for path, words in (
        (target, ["pass --force", f"choose another {option} path"]),
        (tmp_path / "nowhere" / "r.xml", ["create it first", f"choose another {option} path"]),
    ):
        r = invoke(*base, option, path)
        one_line_error(r, *words)
        assert "another -o path" not in r.stderr, r.stderr


def test_the_model_file_and_the_labels_file_are_inputs_never_written_over_even_with_force(run, photos, tmp_path):
    """--model FILE.py:NAME runs FILE.py and --labels reads its file: both are inputs of the command, which an
    output may not name (-o mynet.py --force wrote HDF5 over the user's model code)."""
    import shutil

    from lookalikes import __file__ as lookalikes_file

    code = tmp_path / "mynet.py"
    shutil.copy(lookalikes_file, code)
    model = ["--model", f"{code}:tiny_vgg"]
    before = code.read_bytes()
    r = invoke("compute-stats", photos, *model, "--weights", "random:0", "-o", code, "--force", *SMALL)
    one_line_error(r, "is also an input of this command")
    r = invoke("verify", run["out"], *model, "--data", photos, *SMALL[:4], "--junit-xml", code, "--force")
    one_line_error(r, "is also an input of this command")
    assert code.read_bytes() == before
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{'ab'[i % 2]}\n" for i in range(len(list(photos.iterdir())))))
    before = labels.read_bytes()
    per_class = ["--per-class", "--labels", labels, "--weights", run["ckpt"], *MODEL, *SMALL]
    r = invoke("compute-stats", photos, *per_class, "-o", labels, "--force")
    one_line_error(r, "is also an input of this command")
    assert labels.read_bytes() == before


def test_atomic_writes_flushes_every_file_before_any_rename_and_each_folder_after(tmp_path, monkeypatch):
    from vggnorm.io.checkpoint import atomic_writes

    (tmp_path / "a").mkdir()
    paths = [tmp_path / "a" / "x", tmp_path / "a" / "y", tmp_path / "z"]
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or real_replace(a, b))
    with atomic_writes(paths, force=False) as temps:
        for tmp in temps:
            tmp.write_text(tmp.name)
    inodes = {p.stat().st_ino: p.name for p in paths} | {p.stat().st_ino: p.name for p in (paths[0].parent, tmp_path)}
    named = [(kind, inodes.get(what, what)) for kind, what in events]
    assert named == [
        *[("fsync", p.name) for p in paths],
        *[("rename", p.name) for p in paths],
        ("fsync", "a"),
        ("fsync", tmp_path.name),
    ]


def test_a_file_that_cannot_be_flushed_is_a_write_error_and_nothing_is_renamed(tmp_path, monkeypatch):
    import errno

    from vggnorm.errors import WriteError
    from vggnorm.io.checkpoint import atomic_writes

    old = tmp_path / "y"
    old.write_text("old")

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with (
        pytest.raises(WriteError, match="Input/output error; nothing was written"),
        atomic_writes([tmp_path / "x", old], force=True) as temps,
    ):
        for tmp in temps:
            tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y"] and old.read_text() == "old"


def test_broken_symlinks_unreadable_files_and_odd_names_are_skipped_and_recorded(photos, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for p in sorted(photos.iterdir())[:3]:
        (d / p.name).write_bytes(p.read_bytes())
    os.symlink(d / "missing.jpg", d / "broken.jpg")
    odd = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    (d / odd).write_bytes(b"not an image")
    good_odd = os.fsdecode(b"ph\xf6to.jpg")
    (d / good_odd).write_bytes(next(iter(sorted(photos.iterdir()))).read_bytes())
    r = invoke("compute-stats", d, *MODEL, "--weights", "random:0", "-o", tmp_path / "s.h5", *SMALL)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    stats = read_stats(tmp_path / "s.h5")
    assert stats.num_images == 4 and len(stats.skipped) == 2
    assert {os.path.basename(p) for p, _ in stats.skipped} == {"broken.jpg", odd}  # the names' exact bytes
    assert "caf\\xe9.jpg" in r.stderr


def test_a_crop_the_arch_cannot_pool_is_refused_with_the_minimum(photos, tmp_path):
    r = invoke(
        "compute-stats",
        photos,
        "--arch",
        "vgg11",
        "--weights",
        "random:0",
        "-o",
        tmp_path / "s.h5",
        "--resize",
        "16",
        "--crop",
        "16",
    )
    one_line_error(r, "--crop 16 is too small for vgg11", "at least 32x32", code=2)
    r = invoke("compute-stats", photos, *MODEL, "--weights", "random:0", "-o", tmp_path / "s.h5", "--crop", "3")
    one_line_error(r, "at least 4x4", code=2)
    assert not (tmp_path / "s.h5").exists()


def test_outputs_get_the_mode_of_the_umask(run, photos, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "m.pth"
        assert invoke("apply", run["ckpt"], "--stats", run["stats"], "-o", out, *MODEL).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE(out.with_name("m.report.json").stat().st_mode) == 0o644
        os.umask(0o027)
        assert invoke("apply", run["ckpt"], "--stats", run["stats"], "-o", out, "--force", *MODEL).exit_code == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
        s = tmp_path / "s2.h5"
        assert invoke("compute-stats", photos, *MODEL, "--weights", run["ckpt"], "-o", s, *SMALL).exit_code == 0
        assert stat.S_IMODE(s.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_temporaries_of_a_killed_run_are_removed_by_the_next(run, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that is gone
    stale = tmp_path / f".x.pth.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"\0" * 1000)
    with caplog.at_level("WARNING", logger="vggnorm"):
        r = invoke("apply", run["ckpt"], "--stats", run["stats"], "-o", tmp_path / "x.pth", *MODEL)
    assert r.exit_code == 0 and not stale.exists() and "interrupted earlier run" in caplog.text


def test_an_unfinished_file_suggests_resume_not_force(photos, run, tmp_path):
    import h5py

    with h5py.File(run["stats"], "r+") as f:
        f.attrs["complete"] = False
        f.attrs["position"] = 3
    r = invoke("compute-stats", photos, *MODEL, "--weights", run["ckpt"], "-o", run["stats"], *SMALL)
    one_line_error(r, "unfinished run (3 of 8 files done)", "--resume")


def test_resume_on_a_changed_folder_says_what_changed(photos, run, tmp_path):
    import h5py

    d = tmp_path / "data"
    d.mkdir()
    for p in photos.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    s = tmp_path / "r.h5"
    assert invoke("compute-stats", d, *MODEL, "--weights", run["ckpt"], "-o", s, *SMALL).exit_code == 0
    with h5py.File(s, "r+") as f:
        f.attrs["complete"] = False
        f.attrs["position"] = 3
    (d / "extra.jpg").write_bytes(next(iter(photos.iterdir())).read_bytes())
    r = invoke("compute-stats", d, *MODEL, "--weights", run["ckpt"], "-o", s, *SMALL, "--resume")
    assert (
        r.exit_code == 1 and "8 image files then, 9 now: 1 added (extra.jpg)" in r.stderr and "start over" in r.stderr
    )


def test_weights_of_another_arch_are_named(checkpoints, photos, tmp_path):
    r = invoke("compute-stats", photos, "--arch", "vgg13", "--weights", checkpoints["vgg11"], "-o", tmp_path / "s.h5")
    one_line_error(r, "holds vgg11 weights", "--arch vgg11")


def test_help_and_usage_errors_do_not_import_torch():
    probe = (
        "import sys\nfrom vggnorm.cli import cli\n"
        "for args in (['--help'], ['compute-stats', '--help'], ['apply', '--help'], ['verify', '--bad']):\n"
        "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("NO TORCH"), r.stdout + r.stderr


def test_verbose_works_after_the_command_and_logs_each_skipped_file_once(photos, tmp_path, caplog):
    import logging

    d = tmp_path / "data"
    d.mkdir()
    (d / "bad.jpg").write_bytes(b"junk")
    (d / "good.jpg").write_bytes(next(iter(photos.iterdir())).read_bytes())
    try:  # no caplog.at_level: only -v (given after the command) lets the INFO records through
        r = invoke("compute-stats", d, *MODEL, "--weights", "random:0", "-o", tmp_path / "s.h5", *SMALL, "-v")
    finally:
        logging.getLogger("vggnorm").setLevel(logging.NOTSET)
    assert r.exit_code == 0, r.output
    logged = [m for m in caplog.messages if "bad.jpg" in m]
    echoed = [line for line in r.stderr.splitlines() if "bad.jpg" in line]
    assert len(logged) == 1 and not echoed  # logged as it happened, not listed again at the end


def test_stdout_carries_results_only_when_torchvision_downloads(monkeypatch, tmp_path, photos):
    import torchvision

    def fake_download(self, progress, check_hash):
        print("Downloading: https://download.pytorch.org/models/vgg11.pth")
        raise OSError("offline")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_download)
    r = invoke("compute-stats", photos, "--arch", "vgg11", "-o", tmp_path / "s.h5", *SMALL)
    assert r.exit_code == 1 and "Downloading" not in r.stdout and "--weights PATH" in r.stderr


def test_the_declared_python_is_the_one_the_code_needs():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in text  # datetime.UTC (stats.now) is 3.11+
    assert sys.version_info >= (3, 11)
