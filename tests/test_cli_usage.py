"""CLI behaviour that needs no network weights: help, usage errors, bad folders, exit codes."""

from pathlib import Path

import pytest

from conftest import invoke
from vggnorm.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_and_is_in_the_docs(command):
    """Every option has a help text, which the docs' command-line reference is generated from
    (tests/test_docs.py checks that the generated reference names every option); every command is shown."""
    r = invoke(command, "--help")
    assert r.exit_code == 0 and cli.commands[command].help
    for param in cli.commands[command].params:
        assert param.name == "help" or getattr(param, "help", None) or param.param_type_name == "argument", param.name
    docs = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert f"vggnorm {command}" in docs
    for param in cli.commands[command].params:  # each option is in --help, the text the reference is made of
        assert all(opt in r.output for opt in param.opts if opt.startswith("--")), param.name


def test_missing_folder_is_a_usage_error(tmp_path):
    r = invoke("compute-stats", tmp_path / "nope", "--weights", "random:0", "--arch", "vgg11", "-o", tmp_path / "s.h5")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "s.h5").exists()


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    r = invoke("compute-stats", tmp_path / "empty", "--weights", "random:0", "--arch", "vgg11", "-o", tmp_path / "s.h5")
    assert r.exit_code == 1 and "no images in" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "s.h5").exists()


def test_compute_stats_refuses_to_overwrite_before_working(tmp_path, photos):
    (tmp_path / "s.h5").write_text("keep me")
    r = invoke("compute-stats", photos, "--weights", "random:0", "--arch", "vgg11", "-o", tmp_path / "s.h5")
    assert r.exit_code == 1 and "exists already" in r.stderr
    assert (tmp_path / "s.h5").read_text() == "keep me"


def test_bad_option_values_are_usage_errors(photos):
    assert invoke("compute-stats", photos, "--batch-size", 0).exit_code == 2
    assert invoke("compute-stats", photos, "--arch", "vgg99").exit_code == 2


def test_a_torchvision_model_that_cannot_be_normalized_is_refused_before_any_weights(photos, tmp_path):
    r = invoke(
        "compute-stats", photos, "--arch", "mobilenet_v2", "-o", tmp_path / "s.h5"
    )  # default weights: not fetched
    assert r.exit_code == 1 and "(ReLU6): is not positively homogeneous" in r.stderr
    assert "Downloading" not in r.output and not (tmp_path / "s.h5").exists()


def test_cuda_requested_without_cuda(tmp_path, photos, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    r = invoke(
        "compute-stats", photos, "--weights", "random:0", "--arch", "vgg11", "--device", "cuda", "-o", tmp_path / "s.h5"
    )
    assert r.exit_code == 1 and "CUDA is not available" in r.stderr


def test_verify_exits_1_on_an_unreadable_input_and_2_on_usage_errors(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"junk")
    r = invoke("verify", tmp_path / "x.pth", "--data", tmp_path)
    assert r.exit_code == 1 and "not a readable PyTorch checkpoint" in r.stderr
    r = invoke("verify", tmp_path / "x.pth")
    assert r.exit_code == 2 and "nothing to verify" in r.stderr


def test_an_unknown_arch_is_a_usage_error_without_importing_torch(tmp_path):
    """Said at once: the names are known without importing torch or torchvision."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vggnorm.cli import main\n"
        "for argv in (['compute-stats', '.', '--arch', 'vgg99', '-o', 'x.h5'], ['inspect', 'nosuchnet']):\n"
        "    sys.argv = ['vggnorm', *argv]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 2, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "not a torchvision classification model" in r.stderr


def test_the_torchvision_names_vggnorm_knows_are_torchvisions():
    import torchvision

    from vggnorm.defaults import TORCHVISION_CLASSIFIERS, TORCHVISION_VERSION

    if torchvision.__version__.split("+")[0] != TORCHVISION_VERSION:
        pytest.skip(f"the list is for torchvision {TORCHVISION_VERSION}; another is asked directly")
    assert tuple(torchvision.models.list_models(module=torchvision.models)) == TORCHVISION_CLASSIFIERS


def _kinds_of_error():
    from vggnorm import errors
    from vggnorm.core.witness import WitnessError

    return [
        *errors.KINDS,
        errors.OutputExistsError,
        errors.WeightsUnavailableError,
        errors.StatsFileError,
        WitnessError,
    ]


@pytest.mark.parametrize("error", _kinds_of_error(), ids=lambda e: e.__name__)
def test_every_command_exits_with_the_status_its_error_carries(error, tmp_path, monkeypatch):
    """The status is the error's, the same in every command: verify, compare and inspect (whose 1 also means
    "no") give an unreadable input, a refused output or a missing package the status the others give."""
    (tmp_path / "f").write_bytes(b"")

    def fail(*args, **kwargs):
        raise error("what was wrong; what to do")

    calls = {
        "compute-stats": ("vggnorm.commands.compute.compute_stats", [tmp_path]),
        "apply": ("vggnorm.commands.apply.apply_stats", ["random:0", "--stats", tmp_path / "f"]),
        "verify": ("vggnorm.commands.verify.verify_checkpoint", [tmp_path / "f", "--data", tmp_path]),
        "compare": ("vggnorm.commands.compare.compare_checkpoints", ["random:0", tmp_path / "f"]),
        "inspect": ("vggnorm.commands.inspection.inspect_model", ["vgg11"]),
        "centers": ("vggnorm.commands.centers.write_centers", [tmp_path / "f", "--layer", "x", "-o", tmp_path / "c"]),
        "merge-stats": ("vggnorm.io.statsfile.merge_stats", [tmp_path / "f", "-o", tmp_path / "m"]),
    }
    assert set(calls) == set(cli.commands)
    for command, (function, args) in calls.items():
        monkeypatch.setattr(function, fail)
        r = invoke(command, *args)
        assert r.exit_code == error.exit_status, (command, r.output)
        assert r.stderr == "Error: what was wrong; what to do\n", (command, r.stderr)
    assert error.exit_status == (2 if issubclass(error, _kinds_of_error()[0]) else 1)


def test_no_error_is_raised_without_its_kind():
    """Every error raised is one of the five kinds (or a subclass), never the base class without a status
    of its own."""
    import ast

    package = Path(__file__).resolve().parents[1] / "src" / "vggnorm"
    bare = [
        f"{path.relative_to(package)}:{node.lineno}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Raise)
        and isinstance(node.exc, ast.Call)
        and getattr(node.exc.func, "id", None) == "VggnormError"
    ]
    assert not bare
